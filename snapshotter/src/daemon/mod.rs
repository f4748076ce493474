//! beam-snapshotter's service plumbing: the gRPC adapter for containerd and systemd readiness.

pub mod control;
pub mod grpc;
pub mod lazy;

/// Tell systemd (when it started us with `Type=notify`) that we are ready.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    if let Err(e) = sock.send_to(b"READY=1", &path) {
        tracing::warn!("sd_notify: {e}");
    }
}
