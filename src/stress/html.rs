//! The stress report as one self-contained HTML page (`cport stress
//! --report FILE.html`): the summary table, then charts drawn with
//! [`crate::chart`] — connections during the ramp, messages per second,
//! the round-trip histogram and percentile curve, and the server's CPU and
//! memory over the run. Nothing on the page loads from elsewhere.

use std::fmt::Write as _;

use crate::chart::{self, Series, escape};
use crate::stress::{Mode, StressReport};

fn series(name: &str, points: Vec<(f64, f64)>) -> Series {
    Series {
        name: name.to_string(),
        points,
    }
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// Rows of (what, value) as an HTML table; both are escaped here.
fn table(rows: &[(String, String)]) -> String {
    let mut t = String::from("<table>\n");
    for (k, v) in rows {
        let _ = writeln!(t, "<tr><td>{}</td><td>{}</td></tr>", escape(k), escape(v));
    }
    t.push_str("</table>");
    t
}

impl StressReport {
    /// The report as a self-contained HTML page with charts.
    pub fn render_html(&self) -> String {
        let r = &self.run;
        let title = format!(
            "cport stress: {} mode, {} connections to {}",
            r.mode.name(),
            self.connections.requested,
            r.targets.join(", ")
        );
        let mut sections = vec![("Summary".to_string(), self.summary_html())];

        let tl = &self.timeline;
        let mut conns = vec![
            series(
                "open (client)",
                tl.iter().map(|p| (p.t_s, p.open as f64)).collect(),
            ),
            series(
                "failed",
                tl.iter().map(|p| (p.t_s, p.failed as f64)).collect(),
            ),
        ];
        if let Some(s) = &self.server {
            conns.push(series(
                "open (server)",
                s.timeline
                    .iter()
                    .map(|p| (p.t_s, p.connections as f64))
                    .collect(),
            ));
        }
        sections.push((
            "Connections over time".to_string(),
            chart::line_chart(
                "Connections during the run",
                "seconds since the start",
                "connections",
                &conns,
            ),
        ));
        sections.push((
            "Messages per second".to_string(),
            chart::line_chart(
                "Messages per second",
                "seconds since the start",
                "messages / s",
                &[
                    series(
                        "echoes received",
                        tl.iter().map(|p| (p.t_s, p.received_per_s)).collect(),
                    ),
                    series("sent", tl.iter().map(|p| (p.t_s, p.sent_per_s)).collect()),
                ],
            ),
        ));

        let bins: Vec<(f64, f64, u64)> = self
            .latency_bins
            .iter()
            .map(|b| (b.from_us as f64 / 1e3, b.to_us as f64 / 1e3, b.count))
            .collect();
        // The tail on a "nines" axis: 1 = p90, 2 = p99, 3 = p99.9; the
        // maximum (infinitely many nines) is in the table.
        let curve: Vec<(f64, f64)> = self
            .latency_curve
            .iter()
            .filter(|p| p.percentile < 100.0)
            .map(|p| (-(1.0 - p.percentile / 100.0).log10(), p.us as f64 / 1e3))
            .collect();
        sections.push((
            "Latency".to_string(),
            format!(
                "{}\n{}",
                chart::histogram("Round trips up to p99.9", "round trip (ms)", &bins),
                chart::line_chart(
                    "Round trip by percentile",
                    "percentile in nines (1 = p90, 2 = p99, 3 = p99.9)",
                    "round trip (ms)",
                    &[series("round trip", curve)],
                )
            ),
        ));

        let server = match &self.server {
            Some(s) if !s.timeline.is_empty() => {
                let cpu = s
                    .timeline
                    .iter()
                    .filter_map(|p| p.cpu_pct.map(|c| (p.t_s, c)))
                    .collect();
                let rss = s
                    .timeline
                    .iter()
                    .map(|p| (p.t_s, p.rss_bytes as f64 / (1u64 << 20) as f64))
                    .collect();
                format!(
                    "<p>From {} ({} samples).</p>\n{}\n{}",
                    escape(&s.source),
                    s.samples,
                    chart::line_chart(
                        "Server CPU",
                        "seconds since the start",
                        "% of one core",
                        &[series("cpu", cpu)]
                    ),
                    chart::line_chart(
                        "Server memory (RSS)",
                        "seconds since the start",
                        "MiB",
                        &[series("rss", rss)]
                    )
                )
            }
            Some(s) => format!(
                "<p>The server could not be sampled: {}</p>",
                escape(s.error.as_deref().unwrap_or("no samples"))
            ),
            None => "<p>The server was not sampled (--no-server-stats).</p>".to_string(),
        };
        sections.push(("Server CPU and memory".to_string(), server));
        sections.push((
            "Text report".to_string(),
            format!("<pre>{}</pre>", escape(&self.render())),
        ));
        chart::html_page(&title, &sections)
    }

    fn summary_html(&self) -> String {
        let r = &self.run;
        let c = &self.connections;
        let m = &self.messages;
        let t = &self.throughput;
        let l = &self.latency_us;
        let load = match r.mode {
            Mode::Interval => format!("{} messages every {} ms", r.messages, r.interval_ms),
            Mode::Pingpong => "one request in flight per connection".to_string(),
            Mode::Flood => format!("{} requests in flight per connection", r.window),
        };
        let mut rows = vec![
            (
                "result".to_string(),
                if self.ok {
                    "ok".to_string()
                } else {
                    "FAILED".to_string()
                },
            ),
            ("mode".into(), format!("{} ({load})", r.mode.name())),
            ("message size".into(), format!("{} B", r.size)),
            (
                "processes / client backend".into(),
                format!("{} / {}", r.procs, r.backend),
            ),
            ("elapsed".into(), format!("{:.2} s", self.elapsed_s)),
            (
                "connections".into(),
                format!(
                    "requested {}, opened {}, failed {}, peak open {}",
                    c.requested, c.opened, c.failed, c.peak_open
                ),
            ),
        ];
        for (reason, n) in &c.failed_by_reason {
            rows.push((format!("failed: {reason}"), n.to_string()));
        }
        rows.extend([
            (
                "messages".into(),
                format!(
                    "sent {}, received {}, lost {}, mismatches {}",
                    m.sent, m.received, m.lost, m.mismatches
                ),
            ),
            (
                "throughput".into(),
                format!(
                    "{:.0} msgs/s, {:.2} MB/s received, {:.2} MB/s sent (over {:.2} s)",
                    t.msgs_per_s, t.mb_per_s, t.mb_per_s_sent, t.window_s
                ),
            ),
            (
                "latency".into(),
                format!(
                    "p50 {}, p90 {}, p99 {}, p99.9 {}, max {} ({} samples)",
                    ms(l.p50),
                    ms(l.p90),
                    ms(l.p99),
                    ms(l.p999),
                    ms(l.max),
                    l.count
                ),
            ),
            (
                "client CPU".into(),
                format!("{:.0} % of one core", self.client_cpu_pct),
            ),
        ]);
        if let Some(s) = &self.server {
            let pct = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.1} %"));
            rows.push((
                "server CPU".into(),
                format!("avg {}, peak {}", pct(s.cpu_avg_pct), pct(s.cpu_peak_pct)),
            ));
            if let (Some(a), Some(b)) = (s.rss_start_bytes, s.rss_peak_bytes) {
                let per = s
                    .rss_per_connection_bytes
                    .map(|v| format!(", {v:.0} B per connection"))
                    .unwrap_or_default();
                rows.push((
                    "server RSS".into(),
                    format!("{} at start, peak {}{per}", mib(a), mib(b)),
                ));
            }
        }
        for n in &r.notes {
            rows.push(("note".into(), n.clone()));
        }
        table(&rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Percentiles;
    use crate::stress::{
        ByteCounts, ConnectionCounts, LatencyBin, MessageCounts, PercentilePoint, RunFacts,
        ServerFigures, ServerPoint, Throughput, TimelinePoint,
    };

    fn report() -> StressReport {
        StressReport {
            run: RunFacts {
                mode: Mode::Pingpong,
                targets: vec!["127.0.0.1:9000".into()],
                sources: vec![],
                procs: 1,
                backend: "uring".into(),
                messages: 3,
                interval_ms: 3000,
                size: 512,
                window: 16,
                run_time_s: 2.0,
                ramp: 0.0,
                notes: vec!["a <note> & more".into()],
            },
            connections: ConnectionCounts {
                requested: 10,
                opened: 10,
                peak_open: 10,
                ..Default::default()
            },
            messages: MessageCounts {
                sent: 100,
                received: 100,
                ..Default::default()
            },
            bytes: ByteCounts::default(),
            throughput: Throughput::default(),
            latency_us: Percentiles {
                count: 100,
                p50: 100,
                max: 900,
                ..Default::default()
            },
            latency_bins: vec![
                LatencyBin {
                    from_us: 50,
                    to_us: 100,
                    count: 60,
                },
                LatencyBin {
                    from_us: 100,
                    to_us: 150,
                    count: 40,
                },
            ],
            latency_curve: vec![
                PercentilePoint {
                    percentile: 0.0,
                    us: 50,
                },
                PercentilePoint {
                    percentile: 90.0,
                    us: 140,
                },
                PercentilePoint {
                    percentile: 100.0,
                    us: 900,
                },
            ],
            timeline: (0..3)
                .map(|i| TimelinePoint {
                    t_s: i as f64,
                    open: 10,
                    opened: 10,
                    received_per_s: 50.0,
                    sent_per_s: 50.0,
                    ..Default::default()
                })
                .collect(),
            server: Some(ServerFigures {
                source: "stats 127.0.0.1:9000".into(),
                samples: 3,
                timeline: (0..3)
                    .map(|i| ServerPoint {
                        t_s: i as f64 - 0.5,
                        cpu_pct: (i > 0).then_some(12.5),
                        rss_bytes: 20 << 20,
                        connections: 10,
                    })
                    .collect(),
                ..Default::default()
            }),
            client_cpu_pct: 10.0,
            elapsed_s: 2.5,
            interrupted: false,
            ok: true,
        }
    }

    #[test]
    fn html_report_has_every_chart_and_escapes_text() {
        let html = report().render_html();
        assert!(html.starts_with("<!DOCTYPE html>"));
        for title in [
            "Connections during the run",
            "Messages per second",
            "Round trips up to p99.9",
            "Round trip by percentile",
            "Server CPU",
            "Server memory (RSS)",
        ] {
            assert!(html.contains(title), "no chart {title}");
        }
        assert_eq!(html.matches("<svg").count(), 6);
        assert!(html.contains("a &lt;note&gt; &amp; more"));
        assert!(!html.contains("<note>"));
        assert!(!html.contains("NaN"));
        assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    }

    #[test]
    fn html_report_without_server_samples_says_so() {
        let mut r = report();
        r.server = None;
        let html = r.render_html();
        assert!(html.contains("not sampled"));
        assert_eq!(html.matches("<svg").count(), 4);
    }
}
