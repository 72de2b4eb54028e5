//! The engine with a user-written handler: callbacks, timers, posted
//! events, per-connection data, and both models.

use std::any::Any;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cport::frame::{Frame, HEADER_LEN, parse_header};
use cport::server::{CloseInfo, CloseReason, Ctx, Engine, EngineConfig, EngineRef, Handler};

/// Counts frames per connection; answers each with the running count; a
/// timer sends "tick"; a posted value is sent back as text.
#[derive(Default)]
struct Counter {
    closed: Mutex<Vec<(CloseReason, u64)>>,
    opened: Mutex<Vec<cport::server::ConnId>>,
}

impl Handler for Counter {
    fn on_open(&self, ctx: &mut Ctx<'_>) {
        ctx.set_data(0u64);
        self.opened.lock().unwrap().push(ctx.id());
        ctx.set_timer(Duration::from_millis(30), 7).unwrap();
    }
    fn on_frame(&self, ctx: &mut Ctx<'_>, frame: Frame) {
        let n = ctx.data_mut::<u64>().unwrap();
        *n += 1;
        let n = *n;
        if frame.body().as_ref() == b"bye" {
            ctx.close();
            return;
        }
        ctx.send_frame(Frame::new(100, n.to_string().as_bytes()));
    }
    fn on_timer(&self, ctx: &mut Ctx<'_>, value: u64) {
        assert_eq!(value, 7);
        ctx.send_frame(Frame::new(101, b"tick"));
    }
    fn on_posted(&self, ctx: &mut Ctx<'_>, value: u64) {
        ctx.send_frame(Frame::new(102, value.to_string().as_bytes()));
    }
    fn on_close(
        &self,
        _engine: EngineRef<'_>,
        info: &CloseInfo,
        data: Option<Box<dyn Any + Send>>,
    ) {
        let n = data
            .and_then(|d| d.downcast::<u64>().ok())
            .map_or(0, |b| *b);
        self.closed.lock().unwrap().push((info.reason, n));
    }
}

fn read_frame(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let (len, cmd) = parse_header(&h);
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).unwrap();
    (cmd, body)
}

fn run_model(ports: usize, workers: usize) {
    let handler = Arc::new(Counter::default());
    let mut cfg = EngineConfig {
        ports,
        workers,
        ..EngineConfig::default()
    };
    cfg.port.backend = crate::util::test_port_backend();
    let backend = cfg.port.backend;
    let mut engine = Engine::start(cfg, handler.clone()).unwrap();
    if backend != cport::port::BackendKind::Auto {
        assert_eq!(engine.backend(), backend.name());
    }
    let addr = engine.listen("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The timer fires first.
    assert_eq!(read_frame(&mut s), (101, b"tick".to_vec()));
    for i in 1..=50u64 {
        s.write_all(Frame::new(1, b"x").wire()).unwrap();
        assert_eq!(read_frame(&mut s), (100, i.to_string().into_bytes()));
    }
    let id = handler.opened.lock().unwrap()[0];
    assert!(engine.handle().post(id, 99));
    assert_eq!(read_frame(&mut s), (102, b"99".to_vec()));
    s.write_all(Frame::new(1, b"bye").wire()).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // Posting to a closed connection is refused, not delivered to another.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while handler.closed.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!engine.handle().post(id, 1));
    assert_eq!(
        *handler.closed.lock().unwrap(),
        vec![(CloseReason::Local, 51)]
    );
    let summary = engine.shutdown(Duration::from_secs(1));
    assert_eq!(summary.connections_served, 1);
    assert_eq!(summary.outstanding_ops, 0);
    assert_eq!(summary.outstanding_bufs, 0);
    assert_eq!(summary.backend, engine.backend());
}

#[test]
fn user_handler_shared_model() {
    run_model(1, 2);
}

#[test]
fn user_handler_per_core_model() {
    run_model(2, 2);
}

/// Pairs connections: each frame a connection sends is relayed to its
/// partner with `EngineRef::send` from inside `on_frame`, and a closing
/// connection tells its partner from `on_close`. Both directions at once
/// would deadlock if `send` locked the partner.
#[derive(Default)]
struct Relay {
    conns: Mutex<Vec<cport::server::ConnId>>,
}

impl Relay {
    fn partner(&self, me: cport::server::ConnId) -> Option<cport::server::ConnId> {
        let c = self.conns.lock().unwrap();
        let i = c.iter().position(|&x| x == me)?;
        c.get(i ^ 1).copied()
    }
}

impl Handler for Relay {
    fn on_open(&self, ctx: &mut Ctx<'_>) {
        self.conns.lock().unwrap().push(ctx.id());
        let reserved = ctx.set_timer(Duration::from_secs(1), u64::MAX);
        assert!(reserved.is_err(), "a reserved timer value must be refused");
    }
    fn on_frame(&self, ctx: &mut Ctx<'_>, frame: Frame) {
        if let Some(p) = self.partner(ctx.id()) {
            assert!(ctx.engine().send(p, frame.into_wire()));
        }
    }
    fn on_close(
        &self,
        engine: EngineRef<'_>,
        info: &CloseInfo,
        _data: Option<Box<dyn Any + Send>>,
    ) {
        if let Some(p) = self.partner(info.id) {
            engine.send(p, Frame::new(200, b"partner left").into_wire());
            engine.close(p);
        }
    }
}

#[test]
fn callbacks_send_to_each_other_without_deadlock() {
    let handler = Arc::new(Relay::default());
    let mut cfg = EngineConfig {
        ports: 1,
        workers: 2,
        ..EngineConfig::default()
    };
    cfg.port.backend = crate::util::test_port_backend();
    let mut engine = Engine::start(cfg, handler.clone()).unwrap();
    let addr = engine.listen("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let mut a = TcpStream::connect(addr).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while handler.conns.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut b = TcpStream::connect(addr).unwrap();
    while handler.conns.lock().unwrap().len() < 2 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    // Both write 2,000 frames at once, so both relays run concurrently.
    let n = 2000;
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let wa = std::thread::spawn(move || {
        for i in 0..n {
            a2.write_all(Frame::new(1, format!("a{i}").as_bytes()).wire())
                .unwrap();
        }
    });
    let wb = std::thread::spawn(move || {
        for i in 0..n {
            b2.write_all(Frame::new(1, format!("b{i}").as_bytes()).wire())
                .unwrap();
        }
    });
    for i in 0..n {
        assert_eq!(read_frame(&mut b), (1, format!("a{i}").into_bytes()));
        assert_eq!(read_frame(&mut a), (1, format!("b{i}").into_bytes()));
    }
    wa.join().unwrap();
    wb.join().unwrap();
    // Closing one tells the other from `on_close`, which then closes it.
    drop(a);
    assert_eq!(read_frame(&mut b), (200, b"partner left".to_vec()));
    let mut rest = Vec::new();
    b.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let summary = engine.shutdown(Duration::from_secs(1));
    assert_eq!(summary.outstanding_ops, 0);
    assert_eq!(summary.outstanding_bufs, 0);
}
