//! The mount syscalls Beam makes, behind one trait, so that what decides *when* to mount and
//! unmount (cleanup on drop and on error, takeover bookkeeping) is tested without root.
//!
//! [`SystemMounter`] is the real thing: fuser sessions on `/dev/fuse`, overlayfs through
//! `mount(2)`, `umount2(2)`. [`RecordingMounter`] (tests only) records every call, keeps each
//! layer's filesystem object instead of serving it, and can be told to fail an overlay mount.
//! Modelled on youki's `Syscall` trait: the callers take an `Arc<dyn Mounter>` and never call
//! the syscalls themselves.

use crate::fs::LayerFs;
use crate::takeover::InitParams;
use anyhow::{Context, Result};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

/// A FUSE session serving one layer on a background thread.
pub trait FuseSession: Send + Sync {
    /// Unmount (the session knows its mount) and wait for the serving thread.
    fn umount_and_join(self: Box<Self>) -> std::io::Result<()>;
    /// Wait for the serving thread; for a session whose mount was removed by path (a
    /// taken-over connection: fuser does not know its mount).
    fn join(self: Box<Self>) -> std::io::Result<()>;
}

/// Mounting and unmounting.
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Mount `fs` at `mountpoint` and serve it in the background.
    fn mount_fuse(
        &self,
        fs: LayerFs,
        mountpoint: &Path,
        config: &fuser::Config,
    ) -> Result<Box<dyn FuseSession>> {
        self.mount_fuse_parked(fs, mountpoint, config, &mut |_| {})
    }

    /// Like [`Mounter::mount_fuse`], but `park` sees the connection's `/dev/fuse` fd after the
    /// mount and before serving starts (to hand a copy to the fd holder).
    fn mount_fuse_parked(
        &self,
        fs: LayerFs,
        mountpoint: &Path,
        config: &fuser::Config,
        park: &mut dyn FnMut(BorrowedFd<'_>),
    ) -> Result<Box<dyn FuseSession>>;

    /// Serve a live connection a predecessor left (`fd`, with the FUSE_INIT it negotiated).
    fn take_over(
        &self,
        fs: LayerFs,
        fd: OwnedFd,
        init: &InitParams,
        config: fuser::Config,
    ) -> Result<Box<dyn FuseSession>>;

    /// Mount a read-only overlay at `target` with the given mount data (`lowerdir=...`).
    fn mount_overlay(&self, target: &Path, data: &str) -> std::io::Result<()>;

    /// Unmount `target`; with `detach`, lazily (`MNT_DETACH`).
    fn umount(&self, target: &Path, detach: bool) -> std::io::Result<()>;

    /// Set the kernel's readahead window of the filesystem mounted at `mountpoint` to `kib`
    /// KiB (its backing device's `read_ahead_kb`).
    fn set_read_ahead(&self, mountpoint: &Path, kib: u32) -> std::io::Result<()>;
}

/// The mounter of the running system.
pub fn system() -> Arc<dyn Mounter> {
    Arc::new(SystemMounter)
}

/// Real mounts: fuser and the mount syscalls.
#[derive(Debug, Default)]
pub struct SystemMounter;

impl FuseSession for fuser::BackgroundSession {
    fn umount_and_join(self: Box<Self>) -> std::io::Result<()> {
        fuser::BackgroundSession::umount_and_join(*self)
    }

    fn join(self: Box<Self>) -> std::io::Result<()> {
        fuser::BackgroundSession::join(*self)
    }
}

impl Mounter for SystemMounter {
    fn mount_fuse_parked(
        &self,
        fs: LayerFs,
        mountpoint: &Path,
        config: &fuser::Config,
        park: &mut dyn FnMut(BorrowedFd<'_>),
    ) -> Result<Box<dyn FuseSession>> {
        let session = fuser::Session::new(fs, mountpoint, config)?;
        park(session.as_fd());
        Ok(Box::new(
            session.spawn().context("starting the layer session")?,
        ))
    }

    fn take_over(
        &self,
        fs: LayerFs,
        fd: OwnedFd,
        init: &InitParams,
        config: fuser::Config,
    ) -> Result<Box<dyn FuseSession>> {
        let session = crate::takeover::take_over(fs, fd, init, config)?;
        Ok(Box::new(
            session.spawn().context("starting the taken-over session")?,
        ))
    }

    fn mount_overlay(&self, target: &Path, data: &str) -> std::io::Result<()> {
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(data),
        )?;
        Ok(())
    }

    fn umount(&self, target: &Path, detach: bool) -> std::io::Result<()> {
        let flags = if detach {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        nix::mount::umount2(target, flags)?;
        Ok(())
    }

    fn set_read_ahead(&self, mountpoint: &Path, kib: u32) -> std::io::Result<()> {
        // The device from mountinfo: a stat of the mount would be a request to the FUSE
        // session, which may not be served (a frozen hand-over).
        let mounts = crate::mountinfo::mounts();
        let device = crate::mountinfo::mount_at(&mounts, mountpoint)
            .map(|m| m.device.clone())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} is not a mount point", mountpoint.display()),
                )
            })?;
        // A FUSE mount's backing device is its anonymous device number, "0:N".
        std::fs::write(
            format!("/sys/class/bdi/{device}/read_ahead_kb"),
            kib.to_string(),
        )
    }
}

#[cfg(test)]
pub use recording::{Call, RecordingMounter};

#[cfg(test)]
mod recording {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Mutex;

    /// One call a [`RecordingMounter`] saw.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        MountFuse {
            mountpoint: PathBuf,
        },
        TakeOver,
        MountOverlay {
            target: PathBuf,
            data: String,
        },
        Umount {
            target: PathBuf,
            detach: bool,
        },
        /// A session unmounted itself (fuser's way) and was joined; `label` is its mountpoint.
        SessionUmountAndJoin {
            label: String,
        },
        /// A session was joined after its mount was removed by path.
        SessionJoin {
            label: String,
        },
    }

    /// Records calls; keeps the filesystems it was asked to serve.
    #[derive(Default)]
    pub struct RecordingMounter {
        pub calls: Arc<Mutex<Vec<Call>>>,
        /// The filesystems "mounted", by mountpoint (or "takeover" for taken-over ones).
        pub filesystems: Mutex<Vec<(String, LayerFs)>>,
        /// Fail the next overlay mount with this errno.
        pub fail_overlay: Mutex<Option<nix::errno::Errno>>,
        /// Readahead windows set, in order (apart from `calls`: they are set asynchronously).
        pub read_ahead: Mutex<Vec<(PathBuf, u32)>>,
    }

    impl std::fmt::Debug for RecordingMounter {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RecordingMounter")
                .field("calls", &self.calls())
                .finish_non_exhaustive()
        }
    }

    impl RecordingMounter {
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        fn session(&self, label: String) -> Box<dyn FuseSession> {
            Box::new(RecordingSession {
                label,
                calls: self.calls.clone(),
            })
        }
    }

    struct RecordingSession {
        label: String,
        calls: Arc<Mutex<Vec<Call>>>,
    }

    impl FuseSession for RecordingSession {
        fn umount_and_join(self: Box<Self>) -> std::io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::SessionUmountAndJoin { label: self.label });
            Ok(())
        }

        fn join(self: Box<Self>) -> std::io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::SessionJoin { label: self.label });
            Ok(())
        }
    }

    impl Mounter for RecordingMounter {
        fn mount_fuse_parked(
            &self,
            fs: LayerFs,
            mountpoint: &Path,
            _config: &fuser::Config,
            park: &mut dyn FnMut(BorrowedFd<'_>),
        ) -> Result<Box<dyn FuseSession>> {
            let label = mountpoint.display().to_string();
            self.calls.lock().unwrap().push(Call::MountFuse {
                mountpoint: mountpoint.into(),
            });
            // Any fd stands in for the connection.
            let stand_in = std::fs::File::open("/dev/null")?;
            park(stand_in.as_fd());
            self.filesystems.lock().unwrap().push((label.clone(), fs));
            Ok(self.session(label))
        }

        fn take_over(
            &self,
            fs: LayerFs,
            _fd: OwnedFd,
            _init: &InitParams,
            _config: fuser::Config,
        ) -> Result<Box<dyn FuseSession>> {
            self.calls.lock().unwrap().push(Call::TakeOver);
            self.filesystems
                .lock()
                .unwrap()
                .push(("takeover".into(), fs));
            Ok(self.session("takeover".into()))
        }

        fn mount_overlay(&self, target: &Path, data: &str) -> std::io::Result<()> {
            self.calls.lock().unwrap().push(Call::MountOverlay {
                target: target.into(),
                data: data.into(),
            });
            match self.fail_overlay.lock().unwrap().take() {
                Some(e) => Err(e.into()),
                None => Ok(()),
            }
        }

        fn umount(&self, target: &Path, detach: bool) -> std::io::Result<()> {
            self.calls.lock().unwrap().push(Call::Umount {
                target: target.into(),
                detach,
            });
            Ok(())
        }

        fn set_read_ahead(&self, mountpoint: &Path, kib: u32) -> std::io::Result<()> {
            self.read_ahead
                .lock()
                .unwrap()
                .push((mountpoint.into(), kib));
            Ok(())
        }
    }
}
