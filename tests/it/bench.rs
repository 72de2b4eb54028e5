//! `cport bench` on cport's own servers (the peers of `cport-peer` are
//! built with the workspace, not by `cargo test`; `.ci/bench.sh` runs them):
//! a small run checked through its JSON and chart, and bad flags.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

/// Output files unique to this test process, removed on drop.
struct Out(PathBuf, PathBuf);

impl Out {
    fn new(name: &str) -> Out {
        let d = std::env::temp_dir();
        let id = std::process::id();
        Out(
            d.join(format!("cport-bench-{id}-{name}.json")),
            d.join(format!("cport-bench-{id}-{name}.svg")),
        )
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(&self.1);
    }
}

/// The cport servers to bench on the backend under test.
fn servers() -> String {
    match test_backend().as_deref() {
        Some("poll") => "cport-raw-poll,cport-framed-poll-shared".into(),
        _ => "cport-raw,cport-framed-shared".into(),
    }
}

#[test]
fn bench_small_run_writes_table_json_and_chart() {
    let out = Out::new("small");
    let servers = servers();
    let mut args = vec![
        "bench",
        "--servers",
        &servers,
        "--loads",
        "pingpong:20x256,threads:10x256,flood:20x1KiB,idle:200,idle-echo:200",
        "--rounds",
        "2",
        "--duration",
        "400ms",
        "--warmup",
        "100ms",
        "--json",
        out.0.to_str().unwrap(),
        "--chart",
        out.1.to_str().unwrap(),
    ];
    let backend = test_backend();
    if let Some(b) = &backend {
        args.extend(["--client-backend", b.as_str()]);
    }
    let o = run_cport(&args, None, Duration::from_secs(180));
    assert_eq!(o.status.code(), Some(0), "{}", o.dump());
    assert!(
        o.stdout.contains("| load | server | req/s |"),
        "{}",
        o.dump()
    );
    let names: Vec<&str> = servers.split(',').collect();
    for n in &names {
        assert!(
            o.stdout.contains(&format!("| pingpong:20x256 | {n} |")),
            "{}",
            o.dump()
        );
    }

    let text = std::fs::read_to_string(&out.0).expect("JSON written");
    let r: Value = serde_json::from_str(&text).expect("JSON parses");
    // The first server listed is the baseline when tokio is not benched.
    assert_eq!(r["baseline"], names[0], "{r:#}");
    let ms = r["measurements"].as_array().unwrap();
    // Two rounds of three traffic loads, one round of each idle load,
    // per server.
    assert_eq!(ms.len(), 2 * (2 * 3 + 2), "{r:#}");
    for m in ms {
        assert_eq!(m["errors"], 0, "{m:#}");
    }
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5 * 2, "{r:#}");
    for row in rows {
        let med = &row["median"];
        if row["load"].as_str().unwrap().starts_with("idle") {
            let per_conn = med["rss_per_conn"]
                .as_f64()
                .expect("idle RSS per connection");
            // Below 1 MiB per idle connection, and not wildly negative.
            assert!(per_conn > -10_000.0 && per_conn < 1e6, "{row:#}");
            assert!(med["req_per_s"].is_null(), "{row:#}");
        } else {
            assert!(med["req_per_s"].as_f64().unwrap() > 0.0, "{row:#}");
            assert!(med["mb_per_s"].as_f64().unwrap() > 0.0, "{row:#}");
            assert!(med["cpu_us_per_req"].as_f64().unwrap() > 0.0, "{row:#}");
            assert!(med["machine_us_per_req"].as_f64().unwrap() > 0.0, "{row:#}");
            assert!(med["p99_us"].as_f64().unwrap() >= med["p50_us"].as_f64().unwrap());
            assert_eq!(row["runs"], 2, "{row:#}");
        }
        if row["server"] == names[0] && !med["req_per_s"].is_null() {
            assert_eq!(row["ratio"]["req_per_s"].as_f64(), Some(1.0), "{row:#}");
        }
    }

    let svg = std::fs::read_to_string(&out.1).expect("chart written");
    assert!(
        svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
        "{svg}"
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("Server CPU per echo"));
    assert!(svg.contains("memory per idle connection"));
    assert!(!svg.contains("NaN"));
}

#[test]
fn bench_bad_flags_exit_2_with_one_error_line() {
    let cases: &[&[&str]] = &[
        &["--loads", "storm:1x1"],
        &["--loads", "pingpong:0x512"],
        &["--loads", "idle:99999"],
        &["--loads", "threads:5000x512"],
        &["--servers", "nginx"],
        &["--servers", "cport-raw", "--baseline", "tokio-mt"],
        &["--servers", "cport-raw", "--duration", "10ms"],
        &["--servers", "cport-raw", "--rounds", "0"],
        &["--servers", "tokio-mt", "--peer", "/nonexistent/cport-peer"],
        &[
            "--servers",
            "cport-raw",
            "--json",
            "/nonexistent-dir/x/b.json",
        ],
    ];
    let mut failures = Vec::new();
    for case in cases {
        let mut args = vec!["bench"];
        args.extend_from_slice(case);
        let out = run_cport(&args, None, Duration::from_secs(20));
        let ok = out.status.code() == Some(2)
            && error_lines(&out.stderr).len() == 1
            && !out.stderr.contains("panicked");
        if !ok {
            failures.push(format!("cport {}:\n{}", args.join(" "), out.dump()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn bench_list_names_every_server() {
    let out = run_cport(&["bench", "--list"], None, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{}", out.dump());
    for n in [
        "tokio-mt",
        "threads",
        "monoio",
        "uring-ref",
        "cport-raw",
        "cport-framed-poll-shared",
    ] {
        assert!(out.stdout.contains(n), "{n}: {}", out.dump());
    }
}
