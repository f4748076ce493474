//! Remote snapshots (containerd's remote-snapshotter protocol): when containerd prepares a
//! layer with the target label and the CRI labels, and the image has a Beam conversion, the
//! layer is mounted lazily and committed under the target name at once, so containerd skips
//! downloading and unpacking it. Anything else, or any failure, falls back to an ordinary
//! snapshot that containerd fills, and the reason is logged with the layer digest.
//!
//! With takeover on (issue 7, `crate::takeover`), every lazy layer's FUSE connection is parked
//! in the fd holder under `snapshot-ID`; a restarted daemon takes live connections over instead
//! of remounting, so containers reading through them see a stall, not ENOTCONN.

use crate::fetch::Fetcher;
use crate::labels;
use crate::mount::{self, Held, HeldState, MountOptions, MountedLayer};
use crate::registry::RegistryOptions;
use crate::snapshot::db::LazyLayer;
use crate::snapshot::Snapshots;
use crate::store::{Location, Store};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};

/// How long a Beam artifact found for an image manifest is reused by the Prepares of the
/// image's other layers (one referrers lookup per pull instead of one per layer).
const ARTIFACT_TTL: Duration = Duration::from_secs(60);

/// An index load shared by everyone who needs that index now.
type IndexLoad = Shared<BoxFuture<'static, Result<crate::fs::SharedIndex, String>>>;

/// A Beam artifact found for `(repository, manifest, pull settings)`.
type ArtifactKey = (String, String, Option<crate::registry::PullTransport>);

/// When a Beam artifact was found, its digest, its layers and the rule that admitted it.
type FoundArtifact = (Instant, String, Vec<crate::oci::BeamLayer>, String);

/// Default of `[fetch] whole_layer_max_bytes`: layers of at most 2 MiB of chunks are fetched
/// whole while they mount.
pub const DEFAULT_WHOLE_LAYER_MAX_BYTES: u64 = 2 << 20;

/// A chunk blob asked for whole ahead of its mount ([`crate::blob::AheadBody`]).
type AheadSource = Arc<dyn crate::blob::RangeSource>;

/// Lazily mounted layers of the daemon, by snapshot id.
pub struct LazyLayers {
    pub fetcher: Arc<Fetcher>,
    pub registry: RegistryOptions,
    /// The daemon's registry client for its own settings.
    client: Arc<crate::registry::Registry>,
    /// Beam artifacts found lately, by repository, manifest and pull settings.
    artifacts: Mutex<HashMap<ArtifactKey, FoundArtifact>>,
    /// Index loads in flight, by index digest: a layer's Prepare joins the load that the
    /// image's first layer started for it.
    index_loads: Arc<Mutex<HashMap<String, IndexLoad>>>,
    /// Small layers' chunk blobs asked for whole beside their indexes, by chunk blob digest,
    /// until the layer mounts on them ([`crate::blob::AheadBody`]).
    ahead_bodies: Mutex<HashMap<String, (Instant, AheadSource)>>,
    /// Layers whose chunk blob is at most this many bytes are fetched whole while they mount.
    whole_layer_max_bytes: u64,
    /// What an index may hold (size, inodes, depth): `[remote] max_index_*`.
    index_limits: crate::format::ReadLimits,
    /// Clients for the settings `beam pull` sent with a layer (issue 12), by those settings.
    pull_clients: Mutex<
        HashMap<crate::registry::PullTransport, (RegistryOptions, Arc<crate::registry::Registry>)>,
    >,
    pub mount: MountOptions,
    mounted: Mutex<HashMap<u64, MountedLayer>>,
    /// One lazy mount per target snapshot at a time: concurrent Prepares of one layer (two
    /// pulls of one image) wait for the first and then find the target committed, instead of
    /// each mounting it and all but one falling back to a download.
    preparing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Whether the registry settings `beam pull` sends are used.
    accept_pull_settings: bool,
    /// Which referrer-found (unbound) Beam artifacts are used; bound ones always are.
    trust: crate::store::Trust,
    /// The fd holder's socket when takeover is on.
    holder: Option<PathBuf>,
    /// This daemon's `attach` connection to the holder, open for its lifetime (the holder's
    /// grace period starts when it closes).
    _attached: Option<crate::takeover::HolderClient>,
    /// The holder's grace period (takeover on).
    grace: std::time::Duration,
}

/// What `beam status` shows of one mounted lazy layer.
#[derive(Debug, Clone)]
pub struct LayerState {
    /// Snapshot id.
    pub id: u64,
    pub mountpoint: String,
    pub chunks_total: u64,
    pub chunks_cached: u64,
    pub reads: u64,
    pub read_errors: u64,
    /// Opens answered with FUSE passthrough.
    pub passthrough_opens: u64,
    /// The connection is parked in the fd holder.
    pub held: bool,
    /// When this daemon took the connection over from its predecessor.
    pub taken_over_at: Option<std::time::SystemTime>,
}

/// The holder entry name of snapshot `id`'s lazy layer.
fn entry_name(id: u64) -> String {
    format!("snapshot-{id}")
}

/// Whether `p` is a mount point of a FUSE filesystem (from mountinfo, without touching the
/// mount: a live connection nobody serves yet would block a stat).
fn is_fuse_mount(p: &Path) -> bool {
    crate::mountinfo::mount_at(&crate::mountinfo::mounts(), p)
        .is_some_and(|m| m.fstype == "fuse" || m.fstype.starts_with("fuse."))
}

impl LazyLayers {
    pub fn new(
        fetcher: Arc<Fetcher>,
        registry: RegistryOptions,
        mount: MountOptions,
    ) -> Result<Self> {
        Ok(LazyLayers {
            client: Arc::new(crate::registry::Registry::new(&registry)?),
            pull_clients: Mutex::new(HashMap::new()),
            artifacts: Mutex::new(HashMap::new()),
            index_loads: Arc::new(Mutex::new(HashMap::new())),
            ahead_bodies: Mutex::new(HashMap::new()),
            whole_layer_max_bytes: DEFAULT_WHOLE_LAYER_MAX_BYTES,
            index_limits: crate::format::ReadLimits::default(),
            fetcher,
            registry,
            mount,
            mounted: Mutex::new(HashMap::new()),
            preparing: Mutex::new(HashMap::new()),
            accept_pull_settings: true,
            trust: crate::store::Trust::default(),
            holder: None,
            _attached: None,
            grace: std::time::Duration::ZERO,
        })
    }

    /// Park every lazy layer's connection in the fd holder listening on `socket` (takeover on;
    /// passthrough opens are written down per mount for the successor). `attached` is this
    /// daemon's attach connection (kept open while the daemon runs), `grace` the holder's grace
    /// period.
    pub fn with_holder(
        mut self,
        socket: PathBuf,
        attached: Option<crate::takeover::HolderClient>,
        grace: std::time::Duration,
    ) -> Self {
        self.holder = Some(socket);
        self._attached = attached;
        self.grace = grace;
        self
    }

    /// Fetch layers whose chunk blob is at most `bytes` whole while they mount (0: never).
    pub fn whole_layer_max_bytes(mut self, bytes: u64) -> Self {
        self.whole_layer_max_bytes = bytes;
        self
    }

    /// Refuse indexes past these limits (the layer is then downloaded in full).
    pub fn index_limits(mut self, limits: crate::format::ReadLimits) -> Self {
        self.index_limits = limits;
        self
    }

    /// Also use Beam artifacts found by referrers (not bound into the image) in these
    /// repositories (see [`crate::store::Trust`]).
    pub fn trust(mut self, trust: crate::store::Trust) -> Self {
        self.trust = trust;
        self
    }

    /// Use (default) or ignore the registry settings `beam pull` sends with its layers.
    pub fn accept_pull_settings(mut self, yes: bool) -> Self {
        self.accept_pull_settings = yes;
        self
    }

    /// How long the fd holder keeps this daemon's lazy layers after it stops (takeover on).
    pub fn takeover_grace(&self) -> std::time::Duration {
        self.grace
    }

    /// A new holder entry for snapshot `id`, when takeover is on.
    fn held(&self, id: u64) -> Option<Held> {
        self.holder.as_ref().map(|socket| Held {
            socket: socket.clone(),
            name: entry_name(id),
            existing: None,
        })
    }

    /// Mount the layer `remote` lazily at `mountpoint`. `known` is its Beam layer when the
    /// caller has it (a takeover: then neither the artifact nor, when cached, the index is
    /// asked of the registry, so a registry that is down or slow does not stop a takeover).
    /// `accept` may refuse the Beam layer before anything is fetched or mounted for it.
    async fn mount_at(
        &self,
        remote: &LazyLayer,
        mountpoint: &Path,
        held: Option<Held>,
        known: Option<crate::oci::BeamLayer>,
        hints: &crate::store::ManifestHints,
        accept: impl FnOnce(&crate::oci::BeamLayer) -> Result<()>,
    ) -> Result<(MountedLayer, String)> {
        let loc = Location::parse(&remote.image)?;
        let Location::Registry(reference) = &loc else {
            bail!("image {} is not in a registry", remote.image);
        };
        let at_manifest = crate::registry::with_digest(reference, &remote.manifest);
        let (options, client) = self.client_for(remote.transport.as_ref())?;
        let store = Store::with_registry(at_manifest.clone(), client.clone(), &options);
        let (layer, admitted) = match known.filter(|l| l.source == remote.layer) {
            Some(l) => (l, "admitted before this daemon started".to_string()),
            None => {
                let (artifact, layers, admitted) = self
                    .find_artifact(&store, remote, hints, &at_manifest, &client, &options)
                    .await?;
                let layer = layers
                    .into_iter()
                    .find(|l| l.source == remote.layer)
                    .with_context(|| {
                        format!("Beam artifact {artifact} has no layer {}", remote.layer)
                    })?;
                (layer, admitted)
            }
        };
        accept(&layer)?;
        // Beside the index (the first Prepare of this process only): whether guesses pay is
        // known before the container's first read.
        if self.fetcher.wants_round_trip_probe() {
            if let Ok(probe) = store.range_source(&layer.chunks) {
                self.fetcher.probe_round_trip(probe);
            }
        }
        let index = self
            .index_load(&at_manifest, &client, &options, &layer)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let source = match self.take_ahead_body(&layer.chunks.digest) {
            Some(ahead) => ahead,
            None => store.range_source(&layer.chunks)?,
        };
        let mounted = mount::mount_layer(
            layer,
            index,
            source,
            self.fetcher.clone(),
            mountpoint,
            &self.mount,
            false,
            held,
        )?;
        Ok((mounted, admitted))
    }

    /// The Beam artifact of `remote`'s image: found once per pull (cached [`ARTIFACT_TTL`]),
    /// and on finding it, the indexes of all its layers are fetched at once, so the Prepares
    /// of the layers above (which containerd sends one after another) find them ready.
    async fn find_artifact(
        &self,
        store: &Store,
        remote: &LazyLayer,
        hints: &crate::store::ManifestHints,
        at_manifest: &oci_client::Reference,
        client: &Arc<crate::registry::Registry>,
        options: &RegistryOptions,
    ) -> Result<(String, Vec<crate::oci::BeamLayer>, String)> {
        let key: ArtifactKey = (
            format!("{}/{}", at_manifest.registry(), at_manifest.repository()),
            remote.manifest.clone(),
            remote.transport.clone(),
        );
        {
            let mut cache = self.artifacts.lock().expect("artifacts lock");
            cache.retain(|_, (at, ..)| at.elapsed() < ARTIFACT_TTL);
            if let Some((_, artifact, layers, admitted)) = cache.get(&key) {
                return Ok((artifact.clone(), layers.clone(), admitted.clone()));
            }
        }
        let found = store
            .find_beam_hinted(&remote.manifest, hints, &self.trust)
            .await?;
        let Some(found) = found else {
            bail!("image {} has no Beam conversion", remote.manifest);
        };
        tracing::info!(
            manifest = %remote.manifest,
            artifact = %found.artifact,
            "Beam artifact admitted: {}",
            found.admitted
        );
        let (artifact, layers, admitted) =
            (found.artifact, found.layers, found.admitted.to_string());
        // Every layer's index at once, and the chunks of the small layers (fetched whole at
        // mount anyway), asked for beside their index: the Prepares of this and the layers
        // above join what is under way.
        for l in &layers {
            let load = self.index_load(at_manifest, client, options, l);
            let small = l.chunks.size > 0 && l.chunks.size <= self.whole_layer_max_bytes;
            let whole = if small {
                Store::with_registry(at_manifest.clone(), client.clone(), options)
                    .range_source(&l.chunks)
                    .ok()
                    .map(|source| {
                        // A layer whose index is cached was here before: its chunks may be
                        // too, and the fetch below asks only for those missing.
                        if self.fetcher.cache.index_path(&l.index.digest).exists() {
                            return (self.fetcher.clone(), source);
                        }
                        let ahead: AheadSource =
                            crate::blob::AheadBody::start(source, l.chunks.size);
                        self.ahead_bodies
                            .lock()
                            .expect("ahead bodies lock")
                            .insert(l.chunks.digest.clone(), (Instant::now(), ahead.clone()));
                        (self.fetcher.clone(), ahead)
                    })
            } else {
                None
            };
            tokio::spawn(async move {
                let Ok(index) = load.await else { return };
                if let Some((fetcher, source)) = whole {
                    let chunks = crate::fetch::ChunkRef::all_of(&index, &source);
                    let _ = fetcher
                        .ensure(&chunks, crate::fetch::Priority::Prefetch)
                        .await;
                }
            });
        }
        self.artifacts.lock().expect("artifacts lock").insert(
            key,
            (
                Instant::now(),
                artifact.clone(),
                layers.clone(),
                admitted.clone(),
            ),
        );
        Ok((artifact, layers, admitted))
    }

    /// The chunk blob `digest` asked for whole ahead of its mount, if it was (and lately).
    fn take_ahead_body(&self, digest: &str) -> Option<AheadSource> {
        let mut ahead = self.ahead_bodies.lock().expect("ahead bodies lock");
        ahead.retain(|_, (at, _)| at.elapsed() < crate::blob::AHEAD_BODY_KEPT);
        ahead.remove(digest).map(|(_, source)| source)
    }

    /// Load `layer`'s index (from the cache, else the registry), joining a load of the same
    /// index already under way.
    fn index_load(
        &self,
        at_manifest: &oci_client::Reference,
        client: &Arc<crate::registry::Registry>,
        options: &RegistryOptions,
        layer: &crate::oci::BeamLayer,
    ) -> IndexLoad {
        let digest = layer.index.digest.clone();
        let mut loads = self.index_loads.lock().expect("index loads lock");
        if let Some(l) = loads.get(&digest) {
            return l.clone();
        }
        let store = Store::with_registry(at_manifest.clone(), client.clone(), options);
        let cache = self.fetcher.cache.clone();
        let layer = layer.clone();
        let loads_map = self.index_loads.clone();
        let key = digest.clone();
        let limits = self.index_limits;
        let load = async move {
            let r = mount::load_index(&store, &cache, &layer, &limits)
                .await
                .map_err(|e| {
                    let over = e.chain().any(|c| {
                        matches!(
                            c.downcast_ref::<crate::format::IndexError>(),
                            Some(
                                crate::format::IndexError::TooLong { .. }
                                    | crate::format::IndexError::TooMany { .. }
                                    | crate::format::IndexError::TooDeep { .. }
                            )
                        )
                    });
                    if over {
                        format!("{e:#} (the node's limit: [remote] max_index_bytes, max_index_inodes, max_index_depth)")
                    } else {
                        format!("{e:#}")
                    }
                });
            // Done: later loads read the cached file.
            loads_map.lock().expect("index loads lock").remove(&key);
            r
        }
        .boxed()
        .shared();
        loads.insert(digest, load.clone());
        load
    }

    /// The fetch of every chunk of a small layer, in one request (issue 13: lazy loading
    /// cannot win on a layer that small), at read priority; `None` for a larger layer.
    fn fetch_whole_if_small(
        &self,
        m: &MountedLayer,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let size = m.layer.chunks.size;
        if size == 0 || size > self.whole_layer_max_bytes {
            return None;
        }
        let chunks = crate::fetch::ChunkRef::all_of(&m.index, &m.source);
        let (fetcher, layer) = (self.fetcher.clone(), m.layer.source.clone());
        Some(async move {
            let t0 = Instant::now();
            match fetcher
                .ensure(&chunks, crate::fetch::Priority::Demand)
                .await
            {
                Ok(()) => tracing::debug!(
                    %layer,
                    bytes = size,
                    secs = t0.elapsed().as_secs_f64(),
                    "small layer fetched whole"
                ),
                Err(e) => tracing::info!(
                    %layer,
                    "fetching a small layer whole: {e}; its chunks are fetched on demand"
                ),
            }
        })
    }

    /// The registry options and client for a layer: the daemon's own, or those with a pull's
    /// transport settings added (one client per distinct settings, reused).
    fn client_for(
        &self,
        transport: Option<&crate::registry::PullTransport>,
    ) -> Result<(RegistryOptions, Arc<crate::registry::Registry>)> {
        let Some(t) = transport.filter(|t| self.accept_pull_settings && !t.is_empty()) else {
            return Ok((self.registry.clone(), self.client.clone()));
        };
        let mut clients = self.pull_clients.lock().expect("pull clients lock");
        if let Some((o, c)) = clients.get(t) {
            return Ok((o.clone(), c.clone()));
        }
        let options = self.registry.with_transport(t);
        let client = Arc::new(
            crate::registry::Registry::new(&options)
                .with_context(|| format!("registry settings of the pull for {}", t.host))?,
        );
        clients.insert(t.clone(), (options.clone(), client.clone()));
        Ok((options, client))
    }

    /// Try to serve a Prepare lazily. `Ok(true)`: the target snapshot now exists (answer
    /// AlreadyExists). `Ok(false)`: this is not a remote-snapshot request.
    pub async fn prepare(
        &self,
        snapshots: &Snapshots,
        key: &str,
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
        tracing::debug!(target, "prepare of a layer");
        if snapshots.record(target)?.is_some() {
            return Ok(true);
        }
        let turn = self
            .preparing
            .lock()
            .expect("preparing lock")
            .entry(target.clone())
            .or_default()
            .clone();
        let r = {
            let _turn = turn.lock().await;
            if snapshots.record(target)?.is_some() {
                Ok(true)
            } else {
                self.prepare_target(
                    snapshots, key, parent, req_labels, target, image, manifest, layer,
                )
                .await
            }
        };
        let mut preparing = self.preparing.lock().expect("preparing lock");
        // The last one out removes the entry (the map holds one reference, `turn` another).
        if Arc::strong_count(&turn) == 2 {
            preparing.remove(target);
        }
        r
    }

    /// [`LazyLayers::prepare`] for one target, its turn taken.
    #[allow(clippy::too_many_arguments)]
    async fn prepare_target(
        &self,
        snapshots: &Snapshots,
        key: &str,
        parent: &str,
        req_labels: &BTreeMap<String, String>,
        target: &str,
        image: &str,
        manifest: &str,
        layer: &str,
    ) -> Result<bool> {
        // Only from `beam pull`: on other pulls an image's layer annotation could set it.
        let transport = match req_labels.get(labels::PULL_TRANSPORT) {
            Some(_) if !labels::is_pull_key(key) => {
                tracing::warn!(
                    key,
                    "ignoring {} on a Prepare that beam pull did not make",
                    labels::PULL_TRANSPORT
                );
                None
            }
            None => None,
            Some(v) => Some(
                serde_json::from_str::<crate::registry::PullTransport>(v).with_context(|| {
                    format!(
                        "label {} is not Beam's pull settings",
                        labels::PULL_TRANSPORT
                    )
                })?,
            ),
        };
        let remote = LazyLayer {
            image: image.to_string(),
            manifest: manifest.to_string(),
            layer: layer.to_string(),
            transport,
        };
        // The manifests `beam pull` fetched already (used only where their digests match).
        let hints = crate::store::ManifestHints {
            manifest: labels::joined(req_labels, labels::PULL_MANIFEST).map(String::into_bytes),
            artifact: labels::joined(req_labels, labels::PULL_ARTIFACT).map(String::into_bytes),
        };
        let (id, fs) = snapshots.reserve()?;
        let mounted = self
            .mount_at(
                &remote,
                &fs,
                self.held(id),
                None,
                &hints,
                in_chain(target, parent),
            )
            .await;
        let (mounted, admitted) = match mounted {
            Ok((m, admitted)) => {
                // Not waited for: containerd creates the container meanwhile, and a read that
                // comes first waits for just its chunks of this fetch.
                if let Some(fetch) = self.fetch_whole_if_small(&m) {
                    tokio::spawn(fetch);
                }
                (m, admitted)
            }
            Err(e) => {
                // Nothing is mounted on the reservation: give it back now.
                snapshots.release(id);
                return Err(e);
            }
        };
        crate::crash::point("lazy.mounted");
        // The target keeps the request's labels (containerd's unpacker looks for them).
        let mut target_labels = req_labels.clone();
        labels::remove_split(&mut target_labels, labels::PULL_MANIFEST);
        labels::remove_split(&mut target_labels, labels::PULL_ARTIFACT);
        target_labels.insert(labels::ADMITTED.to_string(), admitted);
        match snapshots.commit_remote(id, target, parent, target_labels, remote) {
            Ok(()) => {
                self.mounted
                    .lock()
                    .expect("remote lock")
                    .insert(id, mounted);
                tracing::info!(target, layer = %layer, "layer mounted lazily");
                crate::crash::point("lazy.recorded");
                Ok(true)
            }
            Err(e) => {
                drop(mounted);
                let _ = snapshots.cleanup();
                if matches!(e, crate::snapshot::SnapshotError::AlreadyExists(_))
                    && snapshots.record(target)?.is_some()
                {
                    // Committed meanwhile by a request that did not wait its turn here.
                    return Ok(true);
                }
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
    ///
    /// With takeover on, a layer whose connection the holder still has, mounted where the
    /// record says, is taken over instead (no remount: readers of the old mount just stall
    /// meanwhile). Holder entries no record needs are unmounted (detached) and dropped.
    pub async fn recover(&self, snapshots: &Snapshots) -> usize {
        let Ok(records) = snapshots.remote_records() else {
            return 0;
        };
        let mut entries: HashMap<String, crate::takeover::HolderEntry> = HashMap::new();
        if let Some(socket) = &self.holder {
            match crate::takeover::HolderClient::connect(socket).and_then(|c| c.list()) {
                Ok(list) => entries.extend(list.into_iter().map(|e| (e.name.clone(), e))),
                Err(e) => tracing::warn!("cannot list the fd holder: {e}; remounting every layer"),
            }
        }
        let mut n = 0;
        for r in records {
            let fs = snapshots.fs_path(r.id);
            let remote = r.remote.clone().expect("remote record");
            if let (Some(entry), Some(socket)) = (entries.remove(&entry_name(r.id)), &self.holder) {
                match serde_json::from_slice::<HeldState>(&entry.state) {
                    Ok(st)
                        if st.mountpoint == fs
                            && st.layer == remote.layer
                            && is_fuse_mount(&fs) =>
                    {
                        let held = Held {
                            socket: socket.clone(),
                            name: entry.name.clone(),
                            existing: Some((entry.fd, st.init)),
                        };
                        let known = st.beam_layer.clone();
                        match self
                            .mount_at(
                                &remote,
                                &fs,
                                Some(held),
                                known,
                                &Default::default(),
                                in_chain(&r.name, &r.parent),
                            )
                            .await
                        {
                            Ok((m, _)) => {
                                tracing::info!(snapshot = %r.name, "lazy layer taken over");
                                self.mounted.lock().expect("remote lock").insert(r.id, m);
                                n += 1;
                                continue;
                            }
                            Err(e) => tracing::warn!(
                                snapshot = %r.name,
                                "cannot take the lazy layer over: {e:#}; remounting"
                            ),
                        }
                    }
                    Ok(_) => tracing::info!(
                        snapshot = %r.name,
                        "holder entry does not match a live mount; remounting"
                    ),
                    Err(e) => tracing::warn!(
                        snapshot = %r.name,
                        "unreadable holder entry: {e}; remounting"
                    ),
                }
                self.drop_entry(&entry.name);
            }
            if crate::snapshot::is_mountpoint(&fs) {
                // The previous daemon's mount: its connection died with it.
                let _ = self.mount.mounter.umount(&fs, true);
            }
            match self
                .mount_at(
                    &remote,
                    &fs,
                    self.held(r.id),
                    None,
                    &Default::default(),
                    in_chain(&r.name, &r.parent),
                )
                .await
            {
                Ok((m, _)) => {
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
        for (name, entry) in entries {
            // Held for a snapshot that is gone: nobody will serve it.
            if let Ok(st) = serde_json::from_slice::<HeldState>(&entry.state) {
                if crate::snapshot::is_mountpoint(&st.mountpoint) {
                    let _ = self.mount.mounter.umount(&st.mountpoint, true);
                }
            }
            tracing::info!(entry = %name, "dropping a holder entry no snapshot needs");
            self.drop_entry(&name);
        }
        n
    }

    fn drop_entry(&self, name: &str) {
        if let Some(socket) = &self.holder {
            let r = crate::takeover::HolderClient::connect(socket).and_then(|c| c.drop_entry(name));
            if let Err(e) = r {
                tracing::warn!(entry = %name, "dropping the holder entry: {e}");
            }
        }
    }

    /// The state of every mounted lazy layer.
    pub fn layer_states(&self) -> Vec<LayerState> {
        let mounted = self.mounted.lock().expect("remote lock");
        mounted
            .iter()
            .map(|(id, m)| {
                let total = m.index.chunk_count();
                let cached = (0..total)
                    .filter_map(|i| m.index.chunk(i).ok())
                    .filter(|c| self.fetcher.cache.contains(&c.digest))
                    .count() as u64;
                LayerState {
                    id: *id,
                    mountpoint: m.mountpoint.display().to_string(),
                    chunks_total: total,
                    chunks_cached: cached,
                    reads: m.counters.reads.load(std::sync::atomic::Ordering::Relaxed),
                    read_errors: m
                        .counters
                        .read_errors
                        .load(std::sync::atomic::Ordering::Relaxed),
                    passthrough_opens: m
                        .counters
                        .passthrough_opens
                        .load(std::sync::atomic::Ordering::Relaxed),
                    held: m.held(),
                    taken_over_at: m.taken_over_at(),
                }
            })
            .collect()
    }

    /// Number of lazy layers mounted now.
    pub fn mounted_count(&self) -> u64 {
        self.mounted.lock().expect("remote lock").len() as u64
    }

    /// Stop serving every lazy layer but leave it mounted, its connection held by the fd
    /// holder, for a successor daemon to take over (daemon stop with takeover on).
    pub fn leave_all_mounted(&self) {
        for m in self.take_all() {
            m.leave_mounted();
        }
    }

    /// Whether lazy layers' connections are parked in an fd holder.
    pub fn takeover_enabled(&self) -> bool {
        self.holder.is_some()
    }

    /// Unmount everything (daemon stop).
    pub fn unmount_all(&self) {
        drop(self.take_all());
    }

    /// Every mounted layer, out of the table (the lock is not held while they are handled).
    fn take_all(&self) -> Vec<MountedLayer> {
        self.mounted
            .lock()
            .expect("remote lock")
            .drain()
            .map(|(_, m)| m)
            .collect()
    }
}

/// The check every lazy mount of snapshot `target` on `parent` makes of its Beam layer: that
/// it is the layer containerd's chain names (issue 16; [`chain_mismatch`]).
fn in_chain<'a>(
    target: &'a str,
    parent: &'a str,
) -> impl FnOnce(&crate::oci::BeamLayer) -> Result<()> + 'a {
    move |l| match chain_mismatch(target, parent, &l.diff_id) {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// Why the Beam layer whose diff ID is `diff_id` may not be the snapshot `target` on `parent`,
/// or None when it may.
///
/// containerd names a layer's snapshot by its chain ID, which it computes from the diff IDs in
/// the image config that the pulled manifest names: `chain(L1) = diff_id(L1)`,
/// `chain(Ln) = sha256(chain(Ln-1) + " " + diff_id(Ln))`. The Beam artifact says which diff ID
/// each of its layers was converted from; if that does not give the target's chain ID from
/// the parent's, the artifact's layer is not the one the image vouches for (a referrer made for
/// another image, a layer swapped in the artifact), and the daemon must not serve it. Names
/// that are not chain IDs (a direct client of the snapshots API) are not checked: containerd,
/// not an image, chooses them.
pub fn chain_mismatch(target: &str, parent: &str, diff_id: &str) -> Option<String> {
    // containerd's metadata store passes backend keys `NAMESPACE/ID/NAME`.
    let bare = |k: &str| k.rsplit('/').next().unwrap_or(k).to_string();
    let target_chain = bare(target);
    if !crate::oci::is_sha256_digest(&target_chain) {
        return None;
    }
    let expected = if parent.is_empty() {
        diff_id.to_string()
    } else {
        let parent_chain = bare(parent);
        if !crate::oci::is_sha256_digest(&parent_chain) {
            return None;
        }
        crate::oci::sha256_digest(format!("{parent_chain} {diff_id}").as_bytes())
    };
    (expected != target_chain).then(|| {
        format!(
            "the Beam layer was converted from diff ID {diff_id}, which is not the layer the \
             image config names here (its chain ID would be {expected}, containerd expects \
             {target_chain}): refusing to serve it"
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_beam_layer_must_be_the_chains_layer() {
        use super::chain_mismatch;
        let d1 = crate::oci::sha256_digest(b"layer one");
        let d2 = crate::oci::sha256_digest(b"layer two");
        // chain(L1) = diff ID; chain(L2) = sha256("chain(L1) diffID(L2)").
        let c2 = crate::oci::sha256_digest(format!("{d1} {d2}").as_bytes());
        assert_eq!(chain_mismatch(&format!("default/7/{d1}"), "", &d1), None);
        assert_eq!(
            chain_mismatch(&format!("default/9/{c2}"), &format!("default/7/{d1}"), &d2),
            None
        );
        // Another layer's Beam layer, or the right one at the wrong place, is refused.
        assert!(
            chain_mismatch(&format!("default/9/{c2}"), &format!("default/7/{d1}"), &d1)
                .unwrap()
                .contains("refusing")
        );
        assert!(chain_mismatch(&d1, "", &d2).is_some());
        // Names a direct client chose are not chain IDs: not checked.
        assert_eq!(chain_mismatch("layer-1", "layer-0", &d2), None);
    }
}
