//! The monoio echo server, as monoio's README writes it, thread per core:
//! each thread runs its own runtime (its own io_uring) and its own
//! SO_REUSEPORT listener, so the kernel spreads connections over them.

use std::net::SocketAddr;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};

use crate::Ring;

/// The io-uring 0.6 builder monoio takes, with `ring`'s setup flags.
fn uring_builder(ring: Ring) -> io_uring_06::Builder {
    let mut b = io_uring_06::IoUring::builder();
    match ring {
        Ring::None => {}
        Ring::Coop => {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        Ring::Defer => {
            // The runtime is built on the thread that drives it, as
            // SINGLE_ISSUER requires.
            b.setup_single_issuer().setup_defer_taskrun();
        }
    }
    b
}

/// Runs `workers` threads; returns only if one fails to start.
pub(crate) fn run(addr: SocketAddr, workers: usize, ring: Ring, buf: usize) -> anyhow::Result<()> {
    // Bind every listener before announcing, so the first connection finds
    // them all.
    let listeners: Vec<std::net::TcpListener> = (0..workers)
        .map(|_| crate::listener(addr, true))
        .collect::<std::io::Result<_>>()?;
    let local = listeners[0].local_addr()?;
    let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let mut handles = Vec::new();
    for l in listeners {
        let tx = tx.clone();
        handles.push(std::thread::spawn(move || {
            let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .with_entries(1024)
                .uring_builder(uring_builder(ring))
                .build();
            let mut rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("monoio runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                l.set_nonblocking(true).ok();
                let l = match TcpListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = tx.send(Ok(()));
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            monoio::spawn(echo(s, buf));
                        }
                        // EMFILE and friends: back off instead of spinning (rare,
                        // so blocking this thread briefly is fine).
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    }
                }
            });
        }));
    }
    drop(tx);
    for _ in 0..workers {
        rx.recv()??;
    }
    crate::announce(local, &format!("monoio, {workers} threads, ring {ring:?}"));
    for h in handles {
        let _ = h.join();
    }
    anyhow::bail!("monoio threads ended")
}

async fn echo(mut s: TcpStream, buf: usize) {
    let _ = s.set_nodelay(true);
    let mut b: Vec<u8> = Vec::with_capacity(buf);
    loop {
        let (r, back) = s.read(b).await;
        b = back;
        match r {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let (r, back) = s.write_all(b).await;
        b = back;
        if r.is_err() {
            return;
        }
        b.clear();
    }
}
