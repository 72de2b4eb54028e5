//! The tokio echo server, as tokio's own examples write it: a task per
//! connection reading into a buffer and writing it back.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Runs the server on a multi-thread runtime with `workers` workers, or on
/// a current-thread runtime when `None`. Never returns unless it fails.
pub(crate) fn run(addr: SocketAddr, workers: Option<usize>, buf: usize) -> anyhow::Result<()> {
    let rt = match workers {
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    let what = match workers {
        Some(n) => format!("tokio multi-thread, {n} workers"),
        None => "tokio current-thread".to_string(),
    };
    rt.block_on(async move {
        let std = crate::listener(addr, false)?;
        std.set_nonblocking(true)?;
        let l = TcpListener::from_std(std)?;
        crate::announce(l.local_addr()?, &what);
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(echo(s, buf));
                }
                // EMFILE and friends: back off instead of spinning.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    })
}

async fn echo(mut s: TcpStream, buf: usize) {
    let _ = s.set_nodelay(true);
    let mut b = vec![0u8; buf];
    loop {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&b[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
