//! Thread per connection with std's blocking sockets: the "traditional
//! multithreaded model" of the seeds' table.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// Accepts forever, one thread per connection (std's default stack size,
/// as a user who writes `thread::spawn` gets). Never returns unless the
/// listener cannot be made.
pub(crate) fn run(addr: SocketAddr, buf: usize) -> anyhow::Result<()> {
    let l = crate::listener(addr, false)?;
    crate::announce(l.local_addr()?, "thread per connection");
    loop {
        match l.accept() {
            Ok((s, _)) => {
                if std::thread::Builder::new()
                    .spawn(move || echo(s, buf))
                    .is_err()
                {
                    // Out of threads or memory: the connection is dropped
                    // (closed), as such a server does.
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
}

fn echo(mut s: TcpStream, buf: usize) {
    let _ = s.set_nodelay(true);
    let mut b = vec![0u8; buf];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&b[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
