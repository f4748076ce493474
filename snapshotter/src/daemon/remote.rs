//! Remote snapshots (containerd's remote-snapshotter protocol): when containerd prepares a
//! layer with the target label and the CRI labels, and the image has a Beam conversion, the
//! layer is mounted lazily and committed under the target name at once, so containerd skips
//! downloading and unpacking it. Anything else, or any failure, falls back to an ordinary
//! snapshot that containerd fills, and the reason is logged with the layer digest.

use crate::fetch::Fetcher;
use crate::mount::{self, MountOptions, MountedLayer};
use crate::remote::RemoteOptions;
use crate::snapshot::store::RemoteLayer;
use crate::snapshot::Snapshots;
use crate::store::{Location, Store};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The labels of the protocol (containerd's `snapshots` and `pkg/snapshotters`).
pub mod labels {
    /// Name under which the snapshotter may commit the layer itself.
    pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
    pub const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
    pub const MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
    pub const LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
    pub const IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
}

/// Lazily mounted layers of the daemon, by snapshot id.
pub struct RemoteLayers {
    pub fetcher: Arc<Fetcher>,
    pub registry: RemoteOptions,
    /// The daemon's one registry client.
    client: Arc<crate::remote::Registry>,
    pub mount: MountOptions,
    mounted: Mutex<HashMap<u64, MountedLayer>>,
}

impl RemoteLayers {
    pub fn new(
        fetcher: Arc<Fetcher>,
        registry: RemoteOptions,
        mount: MountOptions,
    ) -> Result<Self> {
        Ok(RemoteLayers {
            client: Arc::new(crate::remote::Registry::new(&registry)?),
            fetcher,
            registry,
            mount,
            mounted: Mutex::new(HashMap::new()),
        })
    }

    /// Mount the layer `remote` lazily at `mountpoint`.
    async fn mount_at(&self, remote: &RemoteLayer, mountpoint: &Path) -> Result<MountedLayer> {
        let loc = Location::parse(&remote.image)?;
        let Location::Registry(reference) = &loc else {
            bail!("image {} is not in a registry", remote.image);
        };
        let at_manifest = crate::remote::with_digest(reference, &remote.manifest);
        let store = Store::with_registry(at_manifest, self.client.clone(), &self.registry);
        let Some((artifact, layers)) = store.find_beam(&remote.manifest).await? else {
            bail!("image {} has no Beam conversion", remote.manifest);
        };
        let layer = layers
            .into_iter()
            .find(|l| l.source == remote.layer)
            .with_context(|| format!("Beam artifact {artifact} has no layer {}", remote.layer))?;
        let index = mount::load_index(&store, &self.fetcher.cache, &layer).await?;
        let source = store.range_source(&layer.chunks)?;
        mount::mount_layer(
            layer,
            index,
            source,
            self.fetcher.clone(),
            mountpoint,
            &self.mount,
            false,
        )
    }

    /// Try to serve a Prepare lazily. `Ok(true)`: the target snapshot now exists (answer
    /// AlreadyExists). `Ok(false)`: this is not a remote-snapshot request.
    pub async fn prepare(
        &self,
        snapshots: &Snapshots,
        parent: &str,
        req_labels: &BTreeMap<String, String>,
    ) -> Result<bool> {
        let Some(target) = req_labels.get(labels::TARGET_REF) else {
            return Ok(false);
        };
        let (Some(image), Some(manifest), Some(layer)) = (
            req_labels.get(labels::IMAGE_REF),
            req_labels.get(labels::MANIFEST_DIGEST),
            req_labels.get(labels::LAYER_DIGEST),
        ) else {
            bail!("no image, manifest or layer label (containerd's snapshot annotations are off?)");
        };
        if snapshots.record(target)?.is_some() {
            return Ok(true);
        }
        let remote = RemoteLayer {
            image: image.clone(),
            manifest: manifest.clone(),
            layer: layer.clone(),
        };
        let (id, fs) = snapshots.reserve()?;
        let mounted = match self.mount_at(&remote, &fs).await {
            Ok(m) => m,
            Err(e) => {
                // Nothing is mounted on the reservation: give it back now.
                snapshots.release(id);
                return Err(e);
            }
        };
        // The target keeps the request's labels (containerd's unpacker looks for them).
        match snapshots.commit_remote(id, target, parent, req_labels.clone(), remote) {
            Ok(()) => {
                self.mounted
                    .lock()
                    .expect("remote lock")
                    .insert(id, mounted);
                tracing::info!(target, layer = %layer, "layer mounted lazily");
                Ok(true)
            }
            Err(e) => {
                drop(mounted);
                let _ = snapshots.cleanup();
                Err(e.into())
            }
        }
    }

    /// Unmount the lazy layer of snapshot `id` (before its snapshot is removed).
    pub fn unmount(&self, id: u64) {
        let m = self.mounted.lock().expect("remote lock").remove(&id);
        drop(m);
    }

    /// Remount every lazy layer the metadata records (after a restart). A layer that cannot be
    /// mounted is logged; snapshots on top of it report it when containerd asks for mounts.
    pub async fn recover(&self, snapshots: &Snapshots) -> usize {
        let Ok(records) = snapshots.remote_records() else {
            return 0;
        };
        let mut n = 0;
        for r in records {
            let fs = snapshots.fs_path(r.id);
            if crate::snapshot::is_mountpoint(&fs) {
                // The previous daemon's mount: its connection died with it.
                let _ = nix::mount::umount2(&fs, nix::mount::MntFlags::MNT_DETACH);
            }
            let remote = r.remote.clone().expect("remote record");
            match self.mount_at(&remote, &fs).await {
                Ok(m) => {
                    self.mounted.lock().expect("remote lock").insert(r.id, m);
                    n += 1;
                }
                Err(e) => tracing::warn!(
                    snapshot = %r.name,
                    layer = %remote.layer,
                    "cannot remount lazy layer: {e:#}"
                ),
            }
        }
        n
    }

    /// Per mounted layer: snapshot id, mountpoint, chunks in the layer, chunks cached, reads,
    /// read errors.
    pub fn layer_states(&self) -> Vec<(u64, String, u64, u64, u64, u64)> {
        let mounted = self.mounted.lock().expect("remote lock");
        mounted
            .iter()
            .map(|(id, m)| {
                let total = m.index.chunk_count();
                let cached = (0..total)
                    .filter_map(|i| m.index.chunk(i).ok())
                    .filter(|c| self.fetcher.cache.contains(&c.digest))
                    .count() as u64;
                (
                    *id,
                    m.mountpoint.display().to_string(),
                    total,
                    cached,
                    m.counters.reads.load(std::sync::atomic::Ordering::Relaxed),
                    m.counters
                        .read_errors
                        .load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Number of lazy layers mounted now.
    pub fn mounted_count(&self) -> u64 {
        self.mounted.lock().expect("remote lock").len() as u64
    }

    /// Unmount everything (daemon stop).
    pub fn unmount_all(&self) {
        let all: Vec<MountedLayer> = self
            .mounted
            .lock()
            .expect("remote lock")
            .drain()
            .map(|(_, m)| m)
            .collect();
        drop(all);
    }
}
