//! Keeping FUSE mounts alive across a restart of the daemon that serves them (groundwork for
//! issue 7: running containers survive a beam-snapshotter restart).
//!
//! Why this works: the kernel keeps a FUSE connection alive for as long as *any* process holds
//! an open `/dev/fuse` file of that connection. When the only holder is the daemon, a crash or
//! restart aborts the connection and every container reading through the mount sees
//! `ENOTCONN`. So the daemon parks a dup of each connection's fd, with what a successor needs to
//! serve it, in a separate tiny process (the [`holder`]); a successor lists the holder and takes
//! each connection over ([`session::take_over`]) instead of mounting anew.
//!
//! Why the takeover is not just `fuser::Session::from_fd`: fuser insists on reading a
//! `FUSE_INIT` first, and the kernel sends INIT exactly once per connection (it answers the
//! first real request of a second "handshake" with EIO). So the handshake is run against a
//! socketpair fed a synthetic INIT rebuilt from the parameters the kernel offered the first
//! daemon ([`InitParams`], recorded in `Filesystem::init`); then the real fuse fd is `dup3`'d
//! onto the session's fd number. Before serving, `FUSE_NOTIFY_RESEND` (kernel 6.9+) asks the
//! kernel to redeliver requests the dead daemon had read but not answered; without it, those
//! requests (and the processes waiting on them) hang forever.
//!
//! What a filesystem must guarantee to be taken over (the kernel remembers these across the
//! restart): stable node ids and generations (derive them from the layer index), stateless file
//! handles (any fh value the old daemon handed out must mean the same to the new one), the same
//! negotiated INIT answer (same `init` code given the same offer), no `clone_fd` (cloned
//! fds belong to the dead process; a request read on one fails with ECONNABORTED), and, with
//! FUSE passthrough, the same backing id for every open of an inode: the [`open_table`] carries
//! the ids (and caching-open counts) to the successor.

pub mod holder;
pub mod open_table;
pub mod proto;
pub mod session;

#[cfg(test)]
mod tests;

pub use holder::{run_holder, HolderClient, HolderEntry, RELEASING};
pub use open_table::{OpenSlot, OpenTable};
pub use session::{notify_resend, take_over, InitParams};

/// Errors of the holder protocol and of session takeover.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: nix::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed holder message: {0}")]
    Protocol(String),
    #[error("holder protocol version {got}, this build speaks {want}")]
    Version { got: u32, want: u32 },
    #[error("holder refused: {0}")]
    Refused(String),
    #[error("a holder already listens on {0}")]
    AlreadyRunning(String),
}

impl TakeoverError {
    pub(crate) fn sys(context: impl Into<String>, source: nix::Error) -> Self {
        TakeoverError::Sys {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TakeoverError::Io {
            context: context.into(),
            source,
        }
    }
}
