//! cport's built-in service, itself just a [`Handler`]: ECHO, BROADCAST,
//! PING, FILE and STATS on the framed protocol, and echo on the raw
//! protocol.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::frame::{self, Frame, cmd, code};
use crate::port::sys;
use crate::server::handler::{Ctx, Handler};

/// The built-in service.
#[derive(Debug, Default)]
pub struct Services {
    /// The directory FILE serves from (`--files`), opened once.
    files: Option<File>,
    /// The cluster BROADCAST also goes to (`--cluster`).
    #[cfg(feature = "cluster")]
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Services {
    /// A service without file serving.
    pub fn new() -> Services {
        Services::default()
    }

    /// A service whose FILE command serves files beneath `dir`.
    pub fn with_files(dir: &Path) -> io::Result<Services> {
        let root = sys::open_dir(dir)?;
        if !root.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(Services {
            files: Some(root),
            #[cfg(feature = "cluster")]
            cluster: None,
        })
    }

    /// The same service with BROADCAST reaching every client of every node
    /// of `cluster` (and carrying cluster-wide sender ids).
    #[cfg(feature = "cluster")]
    pub fn with_cluster(mut self, cluster: Arc<crate::cluster::Cluster>) -> Services {
        self.cluster = Some(cluster);
        self
    }

    /// FILE: the reply is a frame header announcing the file's size, then
    /// the file itself (read and sent, or zero-copy: see
    /// `EngineConfig::file_copy_below`). Only regular files are opened; a
    /// request waits while the server's file reply places are all taken.
    fn file(&self, ctx: &mut Ctx<'_>, f: Frame) {
        let body = f.body();
        let Some(root) = &self.files else {
            return ctx.send_error(
                code::NOT_FOUND,
                "file serving is off (start the server with --files DIR)",
            );
        };
        let Ok(path) = std::str::from_utf8(&body) else {
            return ctx.send_error(code::FORBIDDEN, "path is not UTF-8");
        };
        // Refuse what is plainly outside before asking the kernel, which
        // enforces the root for everything else (symlinks included).
        let climbs = Path::new(path)
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
        if path.is_empty() || path.starts_with('/') || climbs || path.contains('\0') {
            return ctx.send_error(
                code::FORBIDDEN,
                &format!("forbidden path {path:?}: must be relative, without '..'"),
            );
        }
        // A place under the server's bound on file replies in progress
        // (each holds descriptors until sent), or wait for one.
        if !ctx.reserve_file() {
            return ctx.defer_until_file_place(f);
        }
        let file = match sys::open_beneath(root, path) {
            Ok(f) => f,
            Err(e) if sys::is_escape(&e) => {
                return ctx.send_error(
                    code::FORBIDDEN,
                    &format!("forbidden path {path:?}: leads outside the files directory"),
                );
            }
            Err(e) if sys::is_loop(&e) => {
                return ctx.send_error(
                    code::NOT_FOUND,
                    &format!(
                        "{path:?} cannot be resolved: symbolic link loop \
                         (too many levels of symbolic links)"
                    ),
                );
            }
            Err(e) if sys::is_not_regular(&e) && e.kind() == io::ErrorKind::IsADirectory => {
                return ctx.send_error(code::NOT_FOUND, &format!("{path:?} {e}"));
            }
            // A FIFO (whose open would wait for a writer), a socket or a
            // device: never opened for reading.
            Err(e) if sys::is_not_regular(&e) => {
                return ctx.send_error(code::FORBIDDEN, &format!("forbidden path {path:?}: {e}"));
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return ctx.send_error(code::FORBIDDEN, &format!("{path:?}: {e}"));
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(sys::errno::EMFILE) | Some(sys::errno::ENFILE)
                ) =>
            {
                tracing::debug!("FILE {path:?}: {e}");
                return ctx.send_error(
                    code::BUSY,
                    &format!("server busy: cannot open {path:?} now ({e})"),
                );
            }
            Err(e) => return ctx.send_error(code::NOT_FOUND, &format!("{path:?}: {e}")),
        };
        let size = match file.metadata() {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => return ctx.send_error(code::NOT_FOUND, &format!("{path:?} is not a file")),
            Err(e) => return ctx.send_error(code::NOT_FOUND, &format!("{path:?}: {e}")),
        };
        let Ok(len) = u32::try_from(size) else {
            return ctx.send_error(
                code::FILE_TOO_LARGE,
                &format!("{path:?} is {size} bytes, over the 4 GiB - 1 a frame can carry"),
            );
        };
        ctx.engine().count_frame_out_of(cmd::FILE, len as usize);
        ctx.send(Bytes::copy_from_slice(&frame::encode_header(
            cmd::FILE,
            len,
        )));
        ctx.send_file(Arc::new(file), 0, len as usize);
    }
}

impl Handler for Services {
    fn on_frame(&self, ctx: &mut Ctx<'_>, f: Frame) {
        match f.cmd() {
            // The request frame is the reply, byte for byte: no copy.
            cmd::ECHO => ctx.send_frame(f),
            cmd::PING => ctx.send_frame(Frame::from_parts(cmd::PONG, f.body())),
            cmd::BROADCAST => {
                #[cfg(feature = "cluster")]
                if let Some(c) = &self.cluster {
                    c.broadcast(ctx.engine(), ctx.id(), &f.body());
                    return;
                }
                ctx.broadcast(&f.body());
            }
            cmd::FILE => self.file(ctx, f),
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
