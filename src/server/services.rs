//! cport's built-in service, itself just a [`Handler`]: ECHO, PING and
//! BROADCAST, PING and STATS on the framed protocol (FILE answers ERROR 2
//! until it is built), and echo on the raw protocol.

use bytes::Bytes;

use crate::frame::{self, Frame, cmd, code};
use crate::server::handler::{Ctx, Handler};

/// The built-in service.
#[derive(Debug, Default)]
pub struct Services {}

impl Services {
    /// A new service handler.
    pub fn new() -> Services {
        Services {}
    }
}

impl Handler for Services {
    fn on_frame(&self, ctx: &mut Ctx<'_>, f: Frame) {
        match f.cmd() {
            // The request frame is the reply, byte for byte: no copy.
            cmd::ECHO => ctx.send_frame(f),
            cmd::PING => ctx.send_frame(Frame::from_parts(cmd::PONG, f.body())),
            cmd::BROADCAST => {
                ctx.broadcast(&f.body());
            }
            cmd::STATS => {
                let json = serde_json::to_vec(&ctx.engine().stats()).unwrap_or_default();
                ctx.send_frame(Frame::new(cmd::STATS, &json));
            }
            other => ctx.send_error(
                code::UNKNOWN_COMMAND,
                &format!("unknown command {other} ({})", frame::cmd::name(other)),
            ),
        }
    }

    fn on_data(&self, ctx: &mut Ctx<'_>, data: &[u8]) {
        ctx.send(Bytes::copy_from_slice(data));
    }
}
