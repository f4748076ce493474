//! Beam's control API (`proto/beam/control/v1/control.proto`): the daemon's state for
//! `beam status`. Server and client live here so that, like the snapshots adapter, the tonic
//! 0.9 types stay inside the daemon module; callers get [`DaemonStatus`].

// Generated code and tonic's large `Status` error type.
#![allow(clippy::result_large_err)]

use super::lazy::LazyLayers;
use crate::metrics::ServiceCounters;
use crate::snapshot::Snapshots;
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Generated bindings.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("beam.control.v1");
}

pub use pb::{LayerStatus, StatusResponse as DaemonStatus};

/// The control service.
pub struct ControlService {
    pub snapshots: Arc<Snapshots>,
    pub remote: Option<Arc<LazyLayers>>,
    pub counters: Arc<ServiceCounters>,
    pub cache_budget: u64,
}

impl ControlService {
    /// The daemon's state now.
    pub fn status(&self) -> DaemonStatus {
        let mut s = DaemonStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            lazy_mounts: self.counters.lazy_mounts.load(Ordering::Relaxed),
            fallbacks: self.counters.fallbacks.load(Ordering::Relaxed),
            unlabelled_layer_prepares: self.counters.unlabelled.load(Ordering::Relaxed),
            last_fallback: self
                .counters
                .last_fallback
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
            last_fallback_fix: self
                .counters
                .last_fallback_fix
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
            cache_budget_bytes: self.cache_budget,
            ..Default::default()
        };
        let Some(remote) = &self.remote else {
            return s;
        };
        s.takeover = remote.takeover_enabled();
        if s.takeover {
            s.takeover_grace_secs = remote.takeover_grace().as_secs_f64();
        }
        let f = &remote.fetcher;
        s.fetch_requests = f.counters.requests.load(Ordering::Relaxed);
        s.fetch_bytes = f.counters.bytes.load(Ordering::Relaxed);
        s.fetch_failures = f.counters.failures.load(Ordering::Relaxed);
        s.cache_bytes = f.cache.used();
        let by_id = remote.layer_states();
        if let Ok(records) = self.snapshots.remote_records() {
            for r in records {
                let Some(remote_layer) = r.remote else {
                    continue;
                };
                let state = by_id.iter().find(|l| l.id == r.id);
                s.layers.push(LayerStatus {
                    snapshot: r.name,
                    image: remote_layer.image,
                    layer: remote_layer.layer,
                    mountpoint: state.map(|l| l.mountpoint.clone()).unwrap_or_default(),
                    chunks_total: state.map(|l| l.chunks_total).unwrap_or(0),
                    chunks_cached: state.map(|l| l.chunks_cached).unwrap_or(0),
                    reads: state.map(|l| l.reads).unwrap_or(0),
                    read_errors: state.map(|l| l.read_errors).unwrap_or(0),
                    held: state.is_some_and(|l| l.held),
                    passthrough_opens: state.map(|l| l.passthrough_opens).unwrap_or(0),
                    admitted: r
                        .labels
                        .get(crate::labels::ADMITTED)
                        .cloned()
                        .unwrap_or_default(),
                    taken_over_unix_ms: state
                        .and_then(|l| l.taken_over_at)
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0),
                });
            }
        }
        s
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn status(
        &self,
        _req: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<DaemonStatus>, tonic::Status> {
        Ok(tonic::Response::new(ControlService::status(self)))
    }

    async fn prune(
        &self,
        req: tonic::Request<pb::PruneRequest>,
    ) -> Result<tonic::Response<pb::PruneResponse>, tonic::Status> {
        let req = req.into_inner();
        let Some(remote) = &self.remote else {
            return Err(tonic::Status::not_found("this daemon has no chunk cache"));
        };
        let cache = remote.fetcher.cache.clone();
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        if !same(Path::new(&req.cache_dir), cache.dir()) {
            return Err(tonic::Status::not_found(format!(
                "this daemon's cache is {}, not {}",
                cache.dir().display(),
                req.cache_dir
            )));
        }
        let to = req.to_bytes;
        let p = tokio::task::spawn_blocking(move || cache.prune(to).map(|p| (p, cache.used())))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .map_err(|e| tonic::Status::internal(format!("pruning the cache: {e}")))?;
        Ok(tonic::Response::new(pb::PruneResponse {
            removed_chunks: p.0.removed_chunks,
            removed_files: p.0.removed_files,
            freed_bytes: p.0.freed_bytes,
            used_bytes: p.1,
        }))
    }
}

/// The tonic service to add to the daemon's server.
pub fn server(svc: ControlService) -> pb::control_server::ControlServer<ControlService> {
    pb::control_server::ControlServer::new(svc)
}

async fn connect(
    socket: &Path,
) -> Result<pb::control_client::ControlClient<tonic::transport::Channel>> {
    let socket = socket.to_path_buf();
    let shown = socket.display().to_string();
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            tokio::net::UnixStream::connect(socket.clone())
        }))
        .await
        .with_context(|| format!("connecting to beam-snapshotter at {shown}"))?;
    Ok(pb::control_client::ControlClient::new(channel))
}

/// What a prune through the daemon did.
pub use pb::PruneResponse as DaemonPrune;

/// Prune `cache_dir` down to `to_bytes` through the daemon on `socket`, which keeps what its
/// mounted layers pin. `Ok(None)`: no daemon answers there, or its cache is another directory;
/// the caller may prune the directory itself.
pub async fn prune_through(
    socket: &Path,
    cache_dir: &Path,
    to_bytes: u64,
) -> Result<Option<DaemonPrune>> {
    let Ok(mut client) = connect(socket).await else {
        return Ok(None);
    };
    match client
        .prune(pb::PruneRequest {
            cache_dir: cache_dir.display().to_string(),
            to_bytes,
        })
        .await
    {
        Ok(r) => Ok(Some(r.into_inner())),
        Err(s) if s.code() == tonic::Code::NotFound || s.code() == tonic::Code::Unimplemented => {
            Ok(None)
        }
        Err(s) => Err(anyhow::anyhow!(
            "beam-snapshotter at {} could not prune: {}",
            socket.display(),
            s.message()
        )),
    }
}

/// Ask the daemon listening on `socket` for its state.
pub async fn fetch_status(socket: &Path) -> Result<DaemonStatus> {
    let shown = socket.display().to_string();
    let mut client = connect(socket).await?;
    let r = client
        .status(pb::StatusRequest {})
        .await
        .with_context(|| format!("asking beam-snapshotter at {shown} for its status"))?;
    Ok(r.into_inner())
}
