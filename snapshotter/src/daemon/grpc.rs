//! containerd's snapshots API over gRPC: the only module that sees the `containerd-snapshots`
//! crate's types (tonic 0.9 / prost 0.11). It maps requests onto [`Snapshots`] and errors
//! onto gRPC codes; everything else in Beam uses its own types.

// The trait fixes the error type to tonic's `Status`, which is large.
#![allow(clippy::result_large_err)]

use crate::snapshot::{Info, Kind, Mount, SnapshotError, Snapshots};
use containerd_snapshots as cs;
use cs::tonic::Status;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

/// The service containerd's proxy plugin talks to.
pub struct SnapshotService {
    pub snapshots: Arc<Snapshots>,
    /// Lazy layers; `None` serves only ordinary snapshots.
    pub remote: Option<Arc<super::lazy::LazyLayers>>,
    pub counters: Arc<crate::metrics::ServiceCounters>,
}

impl SnapshotService {
    /// Count, log and remember a lazy mount that failed with `e` (containerd downloads the
    /// layer instead); the labels that say why and what to change, for the fallback snapshot.
    async fn note_fallback(
        &self,
        e: &anyhow::Error,
        target: &str,
        l: &BTreeMap<String, String>,
    ) -> Vec<(String, String)> {
        use crate::labels as rl;
        use std::sync::atomic::Ordering::Relaxed;
        self.counters.fallbacks.fetch_add(1, Relaxed);
        let layer = l.get(rl::LAYER_DIGEST).map(String::as_str).unwrap_or("?");
        if !l.contains_key(rl::IMAGE_REF) && !l.contains_key(rl::LAYER_DIGEST) {
            self.counters.unlabelled.fetch_add(1, Relaxed);
        }
        let host = l
            .get(rl::IMAGE_REF)
            .and_then(|r| crate::registry::parse_reference(r).ok())
            .map(|r| r.registry().to_string())
            .unwrap_or_else(|| "the registry".into());
        let fix = crate::registry::diagnose(e, &host)
            .await
            .unwrap_or_default();
        tracing::info!(
            layer,
            target,
            fix,
            "no lazy mount, containerd will download the layer: {e:#}"
        );
        if let Ok(mut last) = self.counters.last_fallback.lock() {
            *last = format!("layer {layer} (target {target}): {e:#}");
        }
        if let Ok(mut last) = self.counters.last_fallback_fix.lock() {
            last.clone_from(&fix);
        }
        crate::labels::fallback::for_reason(&format!("{e:#}"), &fix)
    }

    /// Count an error answer (a Stat of a missing snapshot is a question, not an error).
    fn counted<T>(&self, r: Result<T, Status>) -> Result<T, Status> {
        if let Err(e) = &r {
            if e.code() != cs::tonic::Code::NotFound {
                self.counters
                    .errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        r
    }
}

fn status(e: SnapshotError) -> Status {
    match e {
        SnapshotError::NotFound(_) => Status::not_found(e.to_string()),
        SnapshotError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        SnapshotError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        SnapshotError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        SnapshotError::Internal(_) | SnapshotError::Io(_) => Status::internal(e.to_string()),
    }
}

fn to_cs_info(i: Info) -> cs::Info {
    cs::Info {
        kind: match i.kind {
            Kind::View => cs::Kind::View,
            Kind::Active => cs::Kind::Active,
            Kind::Committed => cs::Kind::Committed,
        },
        name: i.name,
        parent: i.parent,
        labels: i.labels.into_iter().collect(),
        created_at: i.created,
        updated_at: i.updated,
    }
}

fn to_pb_mounts(m: Vec<Mount>) -> Vec<cs::api::types::Mount> {
    m.into_iter()
        .map(|m| cs::api::types::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn labels(l: HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

/// Run blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("snapshot task failed: {e}")))?
        .map_err(status)
}

type InfoStream = Pin<Box<dyn futures_util::Stream<Item = Result<cs::Info, Status>> + Send>>;

#[cs::tonic::async_trait]
impl cs::Snapshotter for SnapshotService {
    type Error = Status;

    async fn stat(&self, key: String) -> Result<cs::Info, Status> {
        let s = self.snapshots.clone();
        blocking(move || s.stat(&key)).await.map(to_cs_info)
    }

    async fn update(
        &self,
        info: cs::Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<cs::Info, Status> {
        let s = self.snapshots.clone();
        blocking(move || {
            s.update(
                &info.name,
                labels(info.labels),
                &fieldpaths.unwrap_or_default(),
            )
        })
        .await
        .map(to_cs_info)
    }

    async fn usage(&self, key: String) -> Result<cs::Usage, Status> {
        let s = self.snapshots.clone();
        let u = blocking(move || s.usage(&key)).await?;
        Ok(cs::Usage {
            inodes: u.inodes,
            size: u.size,
        })
    }

    async fn mounts(&self, key: String) -> Result<Vec<cs::api::types::Mount>, Status> {
        let s = self.snapshots.clone();
        blocking(move || s.mounts(&key)).await.map(to_pb_mounts)
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        l: HashMap<String, String>,
    ) -> Result<Vec<cs::api::types::Mount>, Status> {
        let mut l = labels(l);
        if let Some(remote) = &self.remote {
            if let Some(target) = l.get(crate::labels::TARGET_REF).cloned() {
                match remote.prepare(&self.snapshots, &key, &parent, &l).await {
                    Ok(true) => {
                        self.counters
                            .lazy_mounts
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Err(Status::already_exists(format!(
                            "target snapshot {target} exists (mounted lazily)"
                        )));
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // The ordinary snapshot containerd fills says why, for the client.
                        let said = self.note_fallback(&e, &target, &l).await;
                        l.extend(said);
                    }
                }
            }
        }
        if let Some(remote) = &self.remote {
            // A container's root (or an unpacked layer) is being prepared: background fill
            // leaves the container's start alone.
            remote.fetcher.note_start();
        }
        let s = self.snapshots.clone();
        let r = blocking(move || s.create(Kind::Active, &key, &parent, l)).await;
        self.counted(r).map(to_pb_mounts)
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        l: HashMap<String, String>,
    ) -> Result<Vec<cs::api::types::Mount>, Status> {
        let s = self.snapshots.clone();
        let r = blocking(move || s.create(Kind::View, &key, &parent, labels(l))).await;
        self.counted(r).map(to_pb_mounts)
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        l: HashMap<String, String>,
    ) -> Result<(), Status> {
        let s = self.snapshots.clone();
        let r = blocking(move || s.commit(&name, &key, labels(l))).await;
        self.counted(r)
    }

    async fn remove(&self, key: String) -> Result<(), Status> {
        let s = self.snapshots.clone();
        let rec = blocking(move || s.remove_record(&key)).await?;
        if rec.remote.is_some() {
            if let Some(remote) = &self.remote {
                let remote = remote.clone();
                let id = rec.id;
                tokio::task::spawn_blocking(move || remote.unmount(id))
                    .await
                    .map_err(|e| Status::internal(format!("unmounting: {e}")))?;
                crate::crash::point("remove.unmounted");
            }
        }
        let s = self.snapshots.clone();
        blocking(move || {
            s.remove_dir(rec.id);
            Ok(())
        })
        .await
    }

    async fn clear(&self) -> Result<(), Status> {
        let s = self.snapshots.clone();
        blocking(move || s.cleanup().map(|_| ())).await
    }

    type InfoStream = InfoStream;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<InfoStream, Status> {
        let s = self.snapshots.clone();
        let infos = blocking(move || s.list(&filters)).await?;
        Ok(Box::pin(futures_util::stream::iter(
            infos.into_iter().map(|i| Ok(to_cs_info(i))),
        )))
    }
}

/// Serve the snapshots API on the unix socket `listener` until `shutdown` resolves.
pub async fn serve(
    service: SnapshotService,
    control: super::control::ControlService,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    cs::tonic::transport::Server::builder()
        .add_service(cs::server(Arc::new(service)))
        .add_service(super::control::server(control))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
