//! The cluster bridge (docs/CLUSTER.md): real `nats-server` processes on
//! loopback ports, three `cport server --cluster` nodes, clients on each.
//!
//! Without `nats-server` on the PATH each test prints "SKIPPED:
//! nats-server not installed" and passes (CI installs it, see
//! .ci/prereqs.sh). Every process is killed on drop; every wait has a
//! deadline.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{self, Server, connect, read_frame_timeout, write_frame};

const CMD_BROADCAST: u32 = 2;
const WAIT: Duration = Duration::from_secs(30);

fn nats_installed() -> bool {
    let ok = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: nats-server not installed");
    }
    ok
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `nats-server` on loopback; killed on drop.
struct Nats {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
}

impl Nats {
    fn start(port: u16) -> Nats {
        Nats::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[String]) -> Nats {
        let mut args = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        args.extend(extra.iter().cloned());
        let mut n = Nats {
            child: None,
            port,
            args,
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        eprintln!("[it] nats-server {}", self.args.join(" "));
        let child = Command::new("nats-server")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < WAIT,
                "nats-server did not listen on {} within {WAIT:?}",
                self.port
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("nats-server running").id() as i32;
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a cport node in the cluster behind `urls`.
fn node(name: &str, urls: &[String], subject: &str) -> Server {
    let mut args: Vec<&str> = vec![
        "--node-name",
        name,
        "--cluster-subject",
        subject,
        "--summary-every",
        "1s",
        "--workers",
        "2",
    ];
    for u in urls {
        args.push("--cluster");
        args.push(u);
    }
    Server::start(&args)
}

/// The node's `cluster` STATS object; broadcasts that reach this
/// connection meanwhile are skipped.
fn cluster_of(s: &mut TcpStream) -> serde_json::Value {
    const CMD_STATS: u32 = 8;
    write_frame(s, CMD_STATS, b"").unwrap();
    let body = expect_cmd(s, CMD_STATS, WAIT);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["cluster"].clone()
}

/// Waits until every node is up and has heard from all the others (so
/// each has subscribed and the NATS routes, if any, carry traffic).
fn wait_joined(nodes: &[&Server]) {
    let mut ctl: Vec<TcpStream> = nodes.iter().map(|n| connect(n.addr())).collect();
    let start = Instant::now();
    loop {
        let views: Vec<serde_json::Value> = ctl.iter_mut().map(cluster_of).collect();
        let ok = views.iter().all(|c| {
            c["state"] == "up" && c["nodes"].as_array().map_or(0, |a| a.len()) >= nodes.len() - 1
        });
        if ok {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "the nodes did not all join within {WAIT:?}: {views:#?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn wait_state(s: &Server, state: &str) -> serde_json::Value {
    let mut ctl = connect(s.addr());
    let start = Instant::now();
    loop {
        let c = cluster_of(&mut ctl);
        if c["state"] == state {
            return c;
        }
        assert!(
            start.elapsed() < WAIT,
            "node did not become {state} within {WAIT:?}: {c:#}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the node has `n` client connections open (besides the
/// STATS connection this opens).
fn wait_open(addr: SocketAddr, n: u64) {
    let mut ctl = connect(addr);
    util::wait_stats(&mut ctl, "clients connected", |v| {
        util::stat_u64(v, "connections_open") > n
    });
}

fn body(tag: u32, seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&tag.to_be_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    b.resize(56, 0xAB);
    b
}

/// One BROADCAST as a client sees it: sender id, tag, sequence number.
fn parse_bcast(cmd: u32, b: &[u8]) -> (u64, u32, u32) {
    assert_eq!(cmd, CMD_BROADCAST, "expected a BROADCAST, got cmd {cmd:#x}");
    assert_eq!(b.len(), 64, "BROADCAST body of {} bytes", b.len());
    (
        u64::from_be_bytes(b[..8].try_into().unwrap()),
        u32::from_be_bytes(b[8..12].try_into().unwrap()),
        u32::from_be_bytes(b[12..16].try_into().unwrap()),
    )
}

/// Reads BROADCASTs until `n` arrived or `limit` passed.
fn read_bcasts(s: &mut TcpStream, n: usize, limit: Duration) -> Vec<(u64, u32, u32)> {
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < n {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        match read_frame_timeout(s, left) {
            Ok((cmd, b)) => got.push(parse_bcast(cmd, &b)),
            Err(_) => break,
        }
    }
    got
}

/// Nothing more arrives for `quiet`.
fn assert_quiet(s: &mut TcpStream, quiet: Duration, what: &str) {
    if let Ok((cmd, b)) = read_frame_timeout(s, quiet) {
        panic!("{what}: unexpected frame cmd {cmd:#x} ({} bytes)", b.len());
    }
}

fn node_bits(id: u64) -> u64 {
    id >> 52
}

#[test]
fn exactly_once_and_in_order_with_300_clients_on_three_nodes() {
    if !nats_installed() {
        return;
    }
    let nats = Nats::start(free_port());
    let urls = [nats.url()];
    let names = ["a", "b", "c"];
    let nodes: Vec<Server> = names.iter().map(|n| node(n, &urls, "t1")).collect();
    wait_joined(&nodes.iter().collect::<Vec<_>>());

    const PER_NODE: usize = 100;
    const SENDERS_PER_NODE: usize = 10;
    const MSGS: u32 = 20;
    let expected = 3 * SENDERS_PER_NODE * MSGS as usize;
    let mut clients: Vec<(usize, TcpStream)> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for _ in 0..PER_NODE {
            clients.push((i, connect(n.addr())));
        }
    }
    // Every node has all its clients before anyone speaks.
    for n in &nodes {
        wait_open(n.addr(), PER_NODE as u64);
    }
    let mut senders: Vec<TcpStream> = Vec::new();
    let mut sender_node = Vec::new();
    for (i, (n, c)) in clients.iter().enumerate() {
        if i % PER_NODE < SENDERS_PER_NODE {
            senders.push(c.try_clone().unwrap());
            sender_node.push(*n);
        }
    }
    // Readers first, so no socket fills while the senders write.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(n, mut c)| {
            thread::spawn(move || (n, read_bcasts(&mut c, expected, Duration::from_secs(60))))
        })
        .collect();
    let t0 = Instant::now();
    for seq in 1..=MSGS {
        for (tag, s) in senders.iter_mut().enumerate() {
            s.write_all(&util::encode_frame(CMD_BROADCAST, &body(tag as u32, seq)))
                .unwrap();
        }
    }
    // tag -> the sender id every client must see for it.
    let mut ids: HashMap<u32, u64> = HashMap::new();
    let mut total = 0;
    for r in readers {
        let (n, got) = r.join().unwrap();
        assert_eq!(
            got.len(),
            expected,
            "a client of node {} got {} of {expected} broadcasts",
            names[n],
            got.len()
        );
        let mut next: HashMap<u32, u32> = HashMap::new();
        for (id, tag, seq) in got {
            let want = next.entry(tag).or_insert(1);
            assert_eq!(
                seq, *want,
                "client of node {}: sender {tag} out of order or repeated",
                names[n]
            );
            *want += 1;
            let first = *ids.entry(tag).or_insert(id);
            assert_eq!(first, id, "sender {tag} seen with two ids");
        }
        assert_eq!(next.len(), 3 * SENDERS_PER_NODE);
        assert!(next.values().all(|v| *v == MSGS + 1));
        total += expected;
    }
    eprintln!(
        "[it] {total} deliveries to 300 clients in {:?}",
        t0.elapsed()
    );
    // The sender ids name the node: one node number per node, three in all.
    let mut by_node: HashMap<usize, u64> = HashMap::new();
    for (tag, id) in &ids {
        let n = sender_node[*tag as usize];
        let bits = *by_node.entry(n).or_insert(node_bits(*id));
        assert_eq!(
            bits,
            node_bits(*id),
            "senders of one node with two node numbers"
        );
    }
    let mut distinct: Vec<u64> = by_node.values().copied().collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "node numbers {by_node:?}");
    // Each node published its own 200 once and delivered the other 400.
    for n in &nodes {
        let c = cluster_of(&mut connect(n.addr()));
        assert_eq!(c["published"], 200, "{c:#}");
        assert_eq!(c["delivered"], 400, "{c:#}");
        assert_eq!(
            c["dropped"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum::<u64>(),
            0,
            "{c:#}"
        );
    }
    drop(senders);
}

#[test]
fn nats_killed_and_restarted_mid_run() {
    if !nats_installed() {
        return;
    }
    let mut nats = Nats::start(free_port());
    let urls = [nats.url()];
    let a = node("a", &urls, "t2");
    let b = node("b", &urls, "t2");
    let c = node("c", &urls, "t2");
    wait_joined(&[&a, &b, &c]);
    let mut ca = connect(a.addr());
    let mut ca2 = connect(a.addr());
    let mut cb = connect(b.addr());
    let mut cc = connect(c.addr());
    for (n, k) in [(&a, 2), (&b, 1), (&c, 1)] {
        wait_open(n.addr(), k);
    }
    write_frame(&mut ca, CMD_BROADCAST, &body(1, 1)).unwrap();
    for s in [&mut ca, &mut ca2, &mut cb, &mut cc] {
        assert_eq!(read_bcasts(s, 1, WAIT).len(), 1, "before the restart");
    }

    nats.kill();
    for n in [&a, &b, &c] {
        let st = wait_state(n, "degraded");
        assert!(
            st["reason"].as_str().unwrap().contains("NATS"),
            "reason: {st:#}"
        );
    }
    assert!(
        a.stderr_text().contains("cluster: degraded ("),
        "{}",
        a.stderr_text()
    );
    // Local service goes on: echo, and broadcasts to the node's own clients.
    const DOWN: u32 = 10;
    for seq in 2..2 + DOWN {
        write_frame(&mut ca, CMD_BROADCAST, &body(1, seq)).unwrap();
        util::echo_roundtrip(&mut cb, b"still here");
    }
    for s in [&mut ca, &mut ca2] {
        let got = read_bcasts(s, DOWN as usize, WAIT);
        assert_eq!(
            got.len(),
            DOWN as usize,
            "local broadcasts while NATS is down"
        );
    }

    nats.restart();
    wait_joined(&[&a, &b, &c]);
    // The cluster resumes; what was lost in between was counted.
    let after = 2 + DOWN;
    write_frame(&mut ca, CMD_BROADCAST, &body(1, after)).unwrap();
    for (name, s) in [("b", &mut cb), ("c", &mut cc)] {
        let got = read_bcasts(s, 1 + DOWN as usize, Duration::from_secs(5));
        let seqs: Vec<u32> = got.iter().map(|g| g.2).collect();
        assert_eq!(
            seqs.last(),
            Some(&after),
            "node {name} after the restart: {seqs:?}"
        );
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "order on {name}: {seqs:?}"
        );
        let delivered = seqs.len() as u64 - 1;
        let ca_view = cluster_of(&mut connect(a.addr()));
        let here = cluster_of(&mut connect(if name == "b" { b.addr() } else { c.addr() }));
        let dropped_a = ["disconnected", "publish_error", "queue_full_out"]
            .iter()
            .map(|k| ca_view["dropped"][k].as_u64().unwrap())
            .sum::<u64>();
        let lost_here = here["dropped"]["lost_in_transit"].as_u64().unwrap();
        assert_eq!(
            delivered + dropped_a + lost_here,
            DOWN as u64,
            "node {name}: every message sent while NATS was down is delivered or counted (a: {ca_view:#}, {name}: {here:#})"
        );
    }
    assert!(
        a.stderr_text().contains("cluster: up"),
        "{}",
        a.stderr_text()
    );
}

#[test]
fn a_node_killed_the_others_go_on() {
    if !nats_installed() {
        return;
    }
    let nats = Nats::start(free_port());
    let urls = [nats.url()];
    let a = node("a", &urls, "t3");
    let b = node("b", &urls, "t3");
    let mut c = node("c", &urls, "t3");
    wait_joined(&[&a, &b, &c]);
    let mut ca = connect(a.addr());
    let mut cb = connect(b.addr());
    let mut cc = connect(c.addr());
    for n in [&a, &b, &c] {
        wait_open(n.addr(), 1);
    }
    // SIGKILL: no goodbye to NATS or anyone.
    let _ = c.stop_with(libc::SIGKILL);
    assert!(cc.read(&mut [0u8; 1]).map_or(true, |n| n == 0));
    for seq in 1..=5 {
        write_frame(&mut ca, CMD_BROADCAST, &body(7, seq)).unwrap();
        write_frame(&mut cb, CMD_BROADCAST, &body(8, seq)).unwrap();
    }
    for (name, s) in [("a", &mut ca), ("b", &mut cb)] {
        let got = read_bcasts(s, 10, WAIT);
        assert_eq!(got.len(), 10, "client of {name}");
        for tag in [7, 8] {
            let seqs: Vec<u32> = got.iter().filter(|g| g.1 == tag).map(|g| g.2).collect();
            assert_eq!(seqs, vec![1, 2, 3, 4, 5], "client of {name}, sender {tag}");
        }
        assert_quiet(s, Duration::from_millis(300), name);
    }
    for n in [&a, &b] {
        let v = cluster_of(&mut connect(n.addr()));
        assert_eq!(v["state"], "up", "{v:#}");
    }
}

#[test]
fn nats_absent_at_start_degraded_then_recovers() {
    if !nats_installed() {
        return;
    }
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let admin_port = free_port();
    let admin = format!("127.0.0.1:{admin_port}");
    let a = Server::start(&[
        "--node-name",
        "a",
        "--cluster",
        &url,
        "--cluster-subject",
        "t4",
        "--admin",
        &admin,
        "--workers",
        "2",
    ]);
    let st = wait_state(&a, "degraded");
    assert!(st["reason"].as_str().unwrap().contains("NATS"), "{st:#}");
    let start = Instant::now();
    while !a.stderr_text().contains("cluster: degraded (") {
        assert!(start.elapsed() < WAIT, "{}", a.stderr_text());
        thread::sleep(Duration::from_millis(50));
    }
    let metrics = http_get(&admin, "/metrics");
    assert!(metrics.contains("cport_cluster_up 0"), "{metrics}");
    assert!(metrics.contains("state=\"degraded\""), "{metrics}");
    let dash = http_get(&admin, "/api/live");
    assert!(dash.contains("\"state\":\"degraded\""), "{dash}");
    // Local service while degraded: a broadcast reaches the node's own clients.
    let mut c1 = connect(a.addr());
    let mut c2 = connect(a.addr());
    wait_open(a.addr(), 2);
    write_frame(&mut c1, CMD_BROADCAST, &body(1, 1)).unwrap();
    for s in [&mut c1, &mut c2] {
        assert_eq!(read_bcasts(s, 1, WAIT).len(), 1);
    }

    let _nats = Nats::start(port);
    let b = node("b", std::slice::from_ref(&url), "t4");
    wait_joined(&[&a, &b]);
    let metrics = http_get(&admin, "/metrics");
    assert!(metrics.contains("cport_cluster_up 1"), "{metrics}");
    let mut cb = connect(b.addr());
    wait_open(b.addr(), 1);
    write_frame(&mut c1, CMD_BROADCAST, &body(1, 2)).unwrap();
    let got = read_bcasts(&mut cb, 1, WAIT);
    assert_eq!(got.len(), 1, "the cluster works once NATS is there");
    assert_eq!(got[0].2, 2);
    assert!(
        a.stderr_text().contains("cluster: up"),
        "{}",
        a.stderr_text()
    );
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn nats_cluster_of_three_with_one_killed() {
    if !nats_installed() {
        return;
    }
    let client_ports = [free_port(), free_port(), free_port()];
    let route_ports = [free_port(), free_port(), free_port()];
    let routes = route_ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut servers: Vec<Nats> = (0..3)
        .map(|i| {
            Nats::start_with(
                client_ports[i],
                &[
                    "--name".into(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "cport-test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", route_ports[i]),
                    "--routes".into(),
                    routes.clone(),
                ],
            )
        })
        .collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let names = ["a", "b", "c"];
    let nodes: Vec<Server> = names.iter().map(|n| node(n, &urls, "t5")).collect();
    wait_joined(&nodes.iter().collect::<Vec<_>>());

    let round = |tag: u32, clients: &mut Vec<TcpStream>, seq: u32| {
        for (i, s) in clients.iter_mut().enumerate() {
            write_frame(s, CMD_BROADCAST, &body(tag + i as u32, seq)).unwrap();
        }
        for (i, s) in clients.iter_mut().enumerate() {
            let got = read_bcasts(s, 3, WAIT);
            let mut tags: Vec<u32> = got.iter().map(|g| g.1).collect();
            tags.sort();
            assert_eq!(tags, vec![tag, tag + 1, tag + 2], "client of {}", names[i]);
        }
    };
    let mut clients: Vec<TcpStream> = nodes.iter().map(|n| connect(n.addr())).collect();
    for n in &nodes {
        wait_open(n.addr(), 1);
    }
    round(10, &mut clients, 1);

    servers[0].kill();
    // Whoever was on the killed server fails over to another.
    let start = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(200));
        let ok = nodes.iter().all(|n| {
            let v = cluster_of(&mut connect(n.addr()));
            v["state"] == "up"
        });
        if ok {
            break;
        }
        assert!(start.elapsed() < WAIT, "the nodes did not fail over");
    }
    wait_joined(&nodes.iter().collect::<Vec<_>>());
    round(20, &mut clients, 2);
    for (i, s) in clients.iter_mut().enumerate() {
        assert_quiet(s, Duration::from_millis(300), names[i]);
    }
}

/// Broadcast load across three nodes with `cport stress --mode broadcast`:
/// it checks exactly-once and per-sender order itself and fails otherwise.
#[test]
fn stress_broadcast_mode_across_three_nodes() {
    if !nats_installed() {
        return;
    }
    let nats = Nats::start(free_port());
    let urls = [nats.url()];
    let nodes: Vec<Server> = ["a", "b", "c"]
        .iter()
        .map(|n| node(n, &urls, "t6"))
        .collect();
    wait_joined(&nodes.iter().collect::<Vec<_>>());
    let mut args: Vec<String> = vec!["stress".into()];
    for n in &nodes {
        args.push("--connect".into());
        args.push(n.addr().to_string());
    }
    args.extend(
        [
            "--mode",
            "broadcast",
            "--connections",
            "60",
            "--rate",
            "200",
            "--duration",
            "2s",
        ]
        .map(String::from),
    );
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = util::run_cport(&argv, None, Duration::from_secs(60));
    assert!(out.status.success(), "{}", out.dump());
    assert!(
        out.stdout.contains("exactly once, in order"),
        "{}",
        out.dump()
    );
}

/// Reads frames until one with command `want` (skipping notices), within `limit`.
fn expect_cmd(s: &mut TcpStream, want: u32, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        assert!(!left.is_zero(), "no frame {want} within {limit:?}");
        let (cmd, b) =
            read_frame_timeout(s, left).unwrap_or_else(|e| panic!("waiting for frame {want}: {e}"));
        if cmd == want {
            return String::from_utf8(b).unwrap();
        }
        assert_ne!(cmd, 0xFFFF_FFFF, "ERROR frame while waiting for {want}");
    }
}

#[test]
fn chat_rooms_span_nodes() {
    use crate::chat::chat_example::{Chat, ChatConfig, cmd};
    use cport::cluster::{Cluster, ClusterConfig};
    use cport::server::{Engine, EngineConfig};
    use std::sync::Arc;

    if !nats_installed() {
        return;
    }
    let nats = Nats::start(free_port());
    let start_node = |name: &str| {
        let mut cc = ClusterConfig::new(vec![nats.url()], name.into());
        cc.subject = "t7".into();
        let cluster = Arc::new(Cluster::start(cc).unwrap());
        let chat = Chat::with_cluster(
            ChatConfig {
                announce: None,
                ..ChatConfig::default()
            },
            cluster.clone(),
        );
        let mut cfg = EngineConfig {
            workers: 2,
            ports: 1,
            ..EngineConfig::default()
        };
        cfg.port.backend = util::test_port_backend();
        let engine = Engine::start(cfg, chat.clone()).unwrap();
        let addr = engine.listen("127.0.0.1:0".parse().unwrap(), 128).unwrap();
        (cluster, chat, engine, addr)
    };
    let (ca, chat_a, mut ea, addr_a) = start_node("chat-a");
    let (cb, chat_b, mut eb, addr_b) = start_node("chat-b");
    thread::scope(|s| {
        let (ea, eb) = (&ea, &eb);
        let (ca2, cb2) = (&ca, &cb);
        s.spawn(move || ca2.run_delivery(ea.handle()));
        s.spawn(move || cb2.run_delivery(eb.handle()));
        let start = Instant::now();
        while !(ca.snapshot().state == "up"
            && cb.snapshot().nodes.len() == 1
            && ca.snapshot().nodes.len() == 1)
        {
            assert!(start.elapsed() < WAIT, "chat nodes did not join");
            thread::sleep(Duration::from_millis(50));
        }
        let mut alice = connect(addr_a);
        let mut bob = connect(addr_b);
        for (s, nick) in [(&mut alice, "alice"), (&mut bob, "bob")] {
            write_frame(s, cmd::NICK, nick.as_bytes()).unwrap();
            assert_eq!(expect_cmd(s, cmd::OK, WAIT), format!("nick {nick}"));
            write_frame(s, cmd::JOIN, b"lobby").unwrap();
            assert_eq!(expect_cmd(s, cmd::OK, WAIT), "joined lobby");
        }
        // Each node learns the other's members; WHO lists both on both.
        let start = Instant::now();
        for s in [&mut alice, &mut bob] {
            loop {
                write_frame(s, cmd::WHO, b"").unwrap();
                if expect_cmd(s, cmd::NAMES, WAIT) == "alice\nbob" {
                    break;
                }
                assert!(start.elapsed() < WAIT, "membership did not spread");
                thread::sleep(Duration::from_millis(100));
            }
        }
        write_frame(&mut alice, cmd::SAY, b"hello from a").unwrap();
        assert_eq!(expect_cmd(&mut bob, cmd::MSG, WAIT), "alice: hello from a");
        assert_eq!(
            expect_cmd(&mut alice, cmd::MSG, WAIT),
            "alice: hello from a"
        );
        write_frame(&mut bob, cmd::SAY, b"hi from b").unwrap();
        assert_eq!(expect_cmd(&mut alice, cmd::MSG, WAIT), "bob: hi from b");
        // The targeted sends went through NATS, one each way.
        assert!(ca.snapshot().delivered >= 1 && cb.snapshot().delivered >= 1);
        drop((alice, bob));
        ca.stop();
        cb.stop();
    });
    for e in [&mut ea, &mut eb] {
        let summary = e.shutdown(Duration::from_secs(2));
        assert_eq!(summary.connections_left, 0, "{summary}");
    }
    let _ = (chat_a.census(), chat_b.census());
}

/// NATS stops reading (SIGSTOP): the node's queue to NATS fills, the rest
/// is dropped and counted, memory stays flat, and local clients still get
/// every broadcast. After SIGCONT the cluster goes on.
#[test]
fn slow_nats_the_queue_bound_holds() {
    if !nats_installed() {
        return;
    }
    let nats = Nats::start(free_port());
    let urls = [nats.url()];
    let extra = |name: &'static str| {
        let mut args: Vec<String> = [
            "--node-name",
            name,
            "--cluster-subject",
            "t8",
            "--cluster-queue",
            "1000",
            "--workers",
            "2",
        ]
        .map(String::from)
        .to_vec();
        args.push("--cluster".into());
        args.push(urls[0].clone());
        args
    };
    let aa = extra("a");
    let mut a = Server::start(&aa.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let bb = extra("b");
    let b = Server::start(&bb.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    wait_joined(&[&a, &b]);
    let mut ca = connect(a.addr());
    let cb = connect(b.addr());
    wait_open(a.addr(), 1);
    wait_open(b.addr(), 1);
    let rss0 = a.rss_kib().unwrap();

    nats.signal(libc::SIGSTOP);
    const N: u32 = 40_000;
    let mut big = body(1, 0);
    big.resize(2000, 0xCD);
    let mut reader = ca.try_clone().unwrap();
    let local = thread::spawn(move || {
        let mut n = 0u32;
        while n < N {
            let (cmd, b) = read_frame_timeout(&mut reader, WAIT).expect("local broadcast");
            assert_eq!(cmd, CMD_BROADCAST);
            assert_eq!(b.len(), 2008);
            n += 1;
        }
        n
    });
    for seq in 1..=N {
        big[4..8].copy_from_slice(&seq.to_be_bytes());
        write_frame(&mut ca, CMD_BROADCAST, &big).unwrap();
    }
    assert_eq!(
        local.join().unwrap(),
        N,
        "local clients get every broadcast"
    );
    let v = cluster_of(&mut connect(a.addr()));
    let rss1 = a.rss_kib().unwrap();
    let dropped = v["dropped"]["queue_full_out"].as_u64().unwrap()
        + v["dropped"]["disconnected"].as_u64().unwrap();
    assert!(dropped > 0, "nothing dropped with NATS stopped: {v:#}");
    assert!(v["queue_out"].as_u64().unwrap() <= 1000, "{v:#}");
    eprintln!(
        "[it] NATS stopped: {N} broadcasts of 2 KB, {dropped} dropped for the cluster, RSS {rss0} -> {rss1} KiB"
    );
    assert!(
        rss1 < rss0 + 48 * 1024,
        "RSS grew from {rss0} to {rss1} KiB with {N} x 2 KB broadcasts and NATS stopped"
    );
    // A node stops promptly even with its NATS thread held by the stalled
    // NATS (its queue full, a publish waiting).
    let (status, took, _) = a.stop_within(libc::SIGTERM, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(8), "stopping took {took:?}");
    // From here on: b, and a new node c that starts while NATS is stalled.
    let a = b;
    let mut ca = cb;
    let cc = extra("c");
    let b = Server::start(&cc.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let mut cb = connect(b.addr());

    nats.signal(libc::SIGCONT);
    wait_joined(&[&a, &b]);
    // Whatever NATS still had buffered may come first; then the new one.
    let start = Instant::now();
    loop {
        write_frame(&mut ca, CMD_BROADCAST, &body(99, 1)).unwrap();
        let _ = read_bcasts_until(&mut ca, 99, WAIT);
        if read_bcasts_until(&mut cb, 99, Duration::from_secs(2)) {
            break;
        }
        assert!(start.elapsed() < WAIT, "the cluster did not resume");
    }
}

/// Reads frames until a BROADCAST with tag `tag`; false if none in `limit`.
fn read_bcasts_until(s: &mut TcpStream, tag: u32, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return false;
        }
        match read_frame_timeout(s, left) {
            Ok((CMD_BROADCAST, b)) if b.len() >= 12 => {
                if u32::from_be_bytes(b[8..12].try_into().unwrap()) == tag {
                    return true;
                }
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// Starts a node and waits for `state`, checking the log agrees.
fn node_with(args: &[&str], state: &str) -> Server {
    let mut full = vec!["--cluster-subject", "t9", "--workers", "2"];
    full.extend_from_slice(args);
    let s = Server::start(&full);
    wait_state(&s, state);
    s
}

#[test]
fn token_user_password_and_tls_reach_nats() {
    if !nats_installed() {
        return;
    }
    // Token.
    let port = free_port();
    let _n = Nats::start_with(port, &["--auth".into(), "s3cret".into()]);
    let url = format!("nats://127.0.0.1:{port}");
    let ok = node_with(&["--cluster", &url, "--cluster-token", "s3cret"], "up");
    drop(ok);
    let bad = node_with(&["--cluster", &url, "--cluster-token", "wrong"], "degraded");
    thread::sleep(Duration::from_millis(1500));
    assert!(
        !bad.stderr_text().contains("cluster: up"),
        "{}",
        bad.stderr_text()
    );
    drop(bad);

    // User and password.
    let port = free_port();
    let _n = Nats::start_with(
        port,
        &["--user".into(), "u1".into(), "--pass".into(), "p1".into()],
    );
    let url = format!("nats://127.0.0.1:{port}");
    let ok = node_with(
        &[
            "--cluster",
            &url,
            "--cluster-user",
            "u1",
            "--cluster-password",
            "p1",
        ],
        "up",
    );
    drop(ok);

    // TLS with our own CA.
    let have_openssl = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_openssl {
        eprintln!("SKIPPED (TLS part): openssl not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("cport-cluster-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    std::fs::write(d("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: Vec<Vec<String>> = vec![
        [
            &["req", "-x509"][..],
            &ec[..],
            &[
                "-keyout",
                &d("ca.key"),
                "-out",
                &d("ca.pem"),
                "-days",
                "2",
                "-subj",
                "/CN=cport test CA",
            ][..],
        ]
        .concat(),
        [
            &["req"][..],
            &ec[..],
            &[
                "-keyout",
                &d("srv.key"),
                "-out",
                &d("srv.csr"),
                "-subj",
                "/CN=127.0.0.1",
            ][..],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            &d("srv.csr"),
            "-CA",
            &d("ca.pem"),
            "-CAkey",
            &d("ca.key"),
            "-CAcreateserial",
            "-out",
            &d("srv.pem"),
            "-days",
            "2",
            "-extfile",
            &d("ext.cnf"),
        ],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    for args in steps {
        let out = Command::new("openssl").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let port = free_port();
    let _n = Nats::start_with(
        port,
        &[
            "--tls".into(),
            "--tlscert".into(),
            d("srv.pem"),
            "--tlskey".into(),
            d("srv.key"),
        ],
    );
    let url = format!("tls://127.0.0.1:{port}");
    let ok = node_with(
        &[
            "--cluster",
            &url,
            "--cluster-tls-ca",
            &d("ca.pem"),
            "--cluster-tls-required",
        ],
        "up",
    );
    drop(ok);
    // Without the CA the server's certificate is not trusted.
    let bad = node_with(&["--cluster", &url, "--cluster-tls-required"], "degraded");
    thread::sleep(Duration::from_millis(1500));
    assert!(
        !bad.stderr_text().contains("cluster: up"),
        "{}",
        bad.stderr_text()
    );
    drop(bad);
    let _ = std::fs::remove_dir_all(&dir);
}
