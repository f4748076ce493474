//! Mounting a converted image lazily: one FUSE mount per Beam layer, stacked with overlayfs
//! the way a container runtime stacks layers, and background fetch of the rest.
//!
//! Used by `beam mount` (outside containerd, for debugging and tests) and, later, by
//! beam-snapshotter. Whatever this module mounts it unmounts: dropping a [`MountedImage`]
//! unmounts the overlay first, then each layer, and removes the mountpoints it made.
//!
//! A layer mounted with [`Held`] (beam-snapshotter with takeover on, issue 7) also parks a dup
//! of its `/dev/fuse` fd in the fd holder (`crate::takeover`), with a [`HeldState`] saying what
//! a successor needs to serve it, so the connection outlives this process. Such a layer can be
//! left mounted on purpose ([`MountedLayer::leave_mounted`]) and taken over later
//! ([`Held::existing`]). Passthrough backing ids belong to the connection but only their
//! registering process knows them, so a held mount writes them (and its caching-mode open
//! counts) to `WORK_DIR/NAME.opens` (`takeover::OpenTable`), which the successor adopts.

use crate::blob::RangeSource;
use crate::cache::ChunkCache;
use crate::fetch::{ChunkRef, Fetcher};
use crate::format::index::{IndexReader, InodeKind};
use crate::fs::{AccessTrace, LayerCounters, LayerFs, SharedIndex};
use crate::mounter::{FuseSession, Mounter};
use crate::oci::BeamLayer;
use crate::store::Store;
use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Fetch the rest of each layer in the background after mounting.
    pub background_fetch: bool,
    /// Use FUSE passthrough for wholly cached files where the kernel allows it.
    pub passthrough: bool,
    /// FUSE worker threads per layer.
    pub threads: usize,
    /// Where per-layer mountpoints are made.
    pub work_dir: PathBuf,
    /// Record each layer's file access order (for `beam record`).
    pub trace_access: bool,
    /// Who makes the mounts ([`crate::mounter::system`] outside tests).
    pub mounter: Arc<dyn Mounter>,
    /// The layers mounted with these options, by diff_id: a layer's follows may lead to
    /// another's files (`crate::follow`).
    pub layers: Arc<crate::follow::MountedLayers>,
}

/// A layer mount parked in the fd holder: the holder's socket and the entry's name.
#[derive(Debug)]
pub struct Held {
    pub socket: PathBuf,
    pub name: String,
    /// Take over this live connection (fd from the holder, the INIT offer it saw) instead of
    /// mounting anew. The mountpoint must still be its mount.
    pub existing: Option<(std::os::fd::OwnedFd, crate::takeover::InitParams)>,
}

/// What the holder keeps beside a layer's fd (JSON): enough for a successor to serve it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HeldState {
    /// Digest of the original layer.
    pub layer: String,
    /// The Beam layer served (index and chunk blob descriptors): with it, and the index in the
    /// local cache, a successor takes the connection over without asking the registry.
    #[serde(default)]
    pub beam_layer: Option<BeamLayer>,
    pub mountpoint: PathBuf,
    pub init: crate::takeover::InitParams,
}

/// One mounted layer.
pub struct MountedLayer {
    pub layer: BeamLayer,
    pub mountpoint: PathBuf,
    pub index: SharedIndex,
    /// Where its chunks are read from.
    pub source: Arc<dyn RangeSource>,
    pub counters: Arc<LayerCounters>,
    pub access_trace: Option<Arc<AccessTrace>>,
    session: Option<Box<dyn FuseSession>>,
    mounter: Arc<dyn Mounter>,
    stop: Arc<AtomicBool>,
    owns_mountpoint: bool,
    cache: Arc<ChunkCache>,
    /// The holder entry of this mount (dropped after unmounting).
    held: Option<(PathBuf, String)>,
    /// The session came from `takeover::take_over`: fuser does not know the mount, so it is
    /// unmounted by path.
    taken_over: bool,
    /// When it was taken over.
    taken_over_at: Option<std::time::SystemTime>,
    /// The open-state file of a held mount (removed when the mount ends).
    open_table: Option<PathBuf>,
    /// The filesystem's hand-over switch (see `LayerFs::frozen`).
    frozen: Arc<AtomicBool>,
}

impl MountedLayer {
    /// Whether this mount's connection was taken over from a previous daemon.
    pub fn taken_over(&self) -> bool {
        self.taken_over
    }

    /// When this mount's connection was taken over (None: mounted by this daemon).
    pub fn taken_over_at(&self) -> Option<std::time::SystemTime> {
        self.taken_over_at
    }

    /// Whether the connection is parked in the fd holder (survives this process).
    pub fn held(&self) -> bool {
        self.held.is_some()
    }

    /// Stop serving without unmounting and keep the holder entry: for a daemon that stops so
    /// that a successor takes the connection over. The session's thread and fds live until the
    /// process exits (the holder's dup keeps the connection alive after that).
    pub fn leave_mounted(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.frozen.store(true, Ordering::SeqCst);
        // Forgetting the session keeps fuser's mount guard from unmounting.
        std::mem::forget(self.session.take());
        self.held = None;
        self.open_table = None;
        self.owns_mountpoint = false;
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.session.take() {
            if self.taken_over {
                match self.mounter.umount(&self.mountpoint, false) {
                    Ok(()) => {
                        // Unmounting aborted the connection: the session thread sees ENODEV.
                        if let Err(e) = s.join() {
                            tracing::warn!(mountpoint = %self.mountpoint.display(), "layer session: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(mountpoint = %self.mountpoint.display(), "unmounting layer: {e}; detaching");
                        let _ = self.mounter.umount(&self.mountpoint, true);
                        // Not joined: the detached mount may still be in use.
                        drop(s);
                    }
                }
            } else if let Err(e) = s.umount_and_join() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "unmounting layer: {e}");
            }
        }
        if let Some((socket, name)) = self.held.take() {
            let dropped =
                crate::takeover::HolderClient::connect(&socket).and_then(|c| c.drop_entry(&name));
            if let Err(e) = dropped {
                tracing::warn!(entry = %name, "dropping the holder entry: {e}");
            }
        }
        if let Some(t) = self.open_table.take() {
            let _ = std::fs::remove_file(t);
        }
        self.cache.unpin(&self.mountpoint.display().to_string());
        if self.owns_mountpoint {
            let _ = std::fs::remove_dir(&self.mountpoint);
        }
    }
}

/// A mounted image: its layers, bottom first, and the overlay stacking them (if more than one).
pub struct MountedImage {
    pub target: PathBuf,
    pub layers: Vec<MountedLayer>,
    overlay: bool,
    work_dir: Option<PathBuf>,
    mounter: Arc<dyn Mounter>,
}

impl MountedImage {
    /// Unmount everything (also done on drop).
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_overlay()
    }

    fn unmount_overlay(&mut self) -> Result<()> {
        if self.overlay {
            self.overlay = false;
            self.mounter
                .umount(&self.target, false)
                .or_else(|_| self.mounter.umount(&self.target, true))
                .with_context(|| format!("unmounting {}", self.target.display()))?;
        }
        Ok(())
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_overlay() {
            tracing::warn!("{e:#}");
        }
        // Top layer first.
        while let Some(l) = self.layers.pop() {
            drop(l);
        }
        if let Some(w) = &self.work_dir {
            let _ = std::fs::remove_dir(w);
        }
    }
}

/// Read a layer's index: from the cache when there, else from the store (then cached).
pub async fn load_index(
    store: &Store,
    cache: &ChunkCache,
    layer: &BeamLayer,
    limits: &crate::format::ReadLimits,
) -> Result<SharedIndex> {
    let path = cache.index_path(&layer.index.digest);
    if layer.index.size > limits.max_len as u64 {
        return Err(crate::format::IndexError::TooLong {
            len: layer.index.size as usize,
            limit: limits.max_len,
        })
        .with_context(|| format!("index {} of layer {}", layer.index.digest, layer.source));
    }
    // The cache keeps the blob as the registry has it (packed or not), checked against its
    // digest on every load.
    let read = |blob: Vec<u8>| -> Result<IndexReader<Vec<u8>>> {
        let bytes = crate::oci::index_of_blob(&layer.index, blob, limits.max_len)?;
        Ok(IndexReader::with_limits(bytes, limits)?)
    };
    if let Ok(blob) = std::fs::read(&path) {
        if crate::oci::sha256_digest(&blob) == layer.index.digest {
            let r = read(blob).with_context(|| {
                format!("index {} of layer {}", layer.index.digest, layer.source)
            })?;
            return Ok(Arc::new(r));
        }
        let _ = std::fs::remove_file(&path);
    }
    let blob = store
        .blob_bytes(&layer.index, limits.max_len as u64)
        .await
        .with_context(|| format!("fetching index of layer {}", layer.source))?;
    // Validated before it is cached: a refused index does not take disk either.
    let r = read(blob.clone())
        .with_context(|| format!("index {} of layer {}", layer.index.digest, layer.source))?;
    cache
        .write_atomic(&path, &blob)
        .with_context(|| format!("caching index {}", layer.index.digest))?;
    Ok(Arc::new(r))
}

/// Mount one layer's filesystem at `mountpoint`. With `held`, park the connection in the fd
/// holder and keep its open table (or take over the live connection it names, adopting the
/// open table its predecessor kept).
#[allow(clippy::too_many_arguments)]
pub fn mount_layer(
    layer: BeamLayer,
    index: SharedIndex,
    source: Arc<dyn RangeSource>,
    fetcher: Arc<Fetcher>,
    mountpoint: &Path,
    opts: &MountOptions,
    owns_mountpoint: bool,
    held: Option<Held>,
) -> Result<MountedLayer> {
    let rt = tokio::runtime::Handle::current();
    let mut fs = LayerFs::new(
        index.clone(),
        source.clone(),
        fetcher.clone(),
        rt.clone(),
        opts.passthrough,
    );
    if let Some(id) = crate::oci::sha256_bytes(&layer.diff_id) {
        let handle = Arc::new(crate::follow::LayerHandle {
            index: index.clone(),
            source: source.clone(),
        });
        opts.layers.add(id, &handle);
        fs.follow = Some((handle, opts.layers.clone()));
    }
    // A held mount writes its open state down for a successor (passthrough across takeover);
    // a taken-over one adopts what its predecessor wrote.
    let open_table_path = held
        .as_ref()
        .map(|h| opts.work_dir.join(format!("{}.opens", h.name)));
    if let (Some(h), Some(path)) = (&held, &open_table_path) {
        let inodes = index.inode_count();
        let table = if h.existing.is_some() {
            crate::takeover::OpenTable::open_existing(path, inodes)
        } else {
            std::fs::create_dir_all(&opts.work_dir)
                .and_then(|()| crate::takeover::OpenTable::create(path, inodes))
        };
        match table.and_then(|t| fs.with_open_table(Arc::new(t), h.existing.is_some())) {
            Ok(()) => {}
            Err(e) => tracing::warn!(
                table = %path.display(),
                "open table unusable: {e}; a successor cannot reuse this mount's passthrough \
                 opens"
            ),
        }
    }
    let access_trace = opts.trace_access.then(|| Arc::new(AccessTrace::default()));
    fs.access_trace = access_trace.clone();
    let counters = fs.counters.clone();
    let init_params = fs.init_params.clone();
    let frozen = fs.frozen.clone();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName(format!("beam:{}", &layer.source)),
        fuser::MountOption::Subtype("beam".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    let mut taken_over = false;
    let mut held_entry = None;
    let mounter = opts.mounter.clone();
    let session = match held {
        None => mounter
            .mount_fuse(fs, mountpoint, &config)
            .with_context(|| {
                format!(
                    "mounting layer {} at {}",
                    layer.source,
                    mountpoint.display()
                )
            })?,
        Some(Held {
            socket,
            name,
            existing: Some((fd, init)),
        }) => {
            let session = mounter.take_over(fs, fd, &init, config).with_context(|| {
                format!(
                    "taking over layer {} at {}",
                    layer.source,
                    mountpoint.display()
                )
            })?;
            taken_over = true;
            held_entry = Some((socket, name));
            session
        }
        Some(Held {
            socket,
            name,
            existing: None,
        }) => {
            let mut park = |fd: std::os::fd::BorrowedFd<'_>| {
                let init = init_params.lock().unwrap_or_else(|p| p.into_inner()).take();
                let parked = init
                    .context("FUSE_INIT parameters were not recorded")
                    .and_then(|init| {
                        let state = serde_json::to_vec(&HeldState {
                            layer: layer.source.clone(),
                            beam_layer: Some(layer.clone()),
                            mountpoint: mountpoint.to_path_buf(),
                            init,
                        })?;
                        // The holder receives its own reference to the /dev/fuse file
                        // (SCM_RIGHTS).
                        crate::takeover::HolderClient::connect(&socket)?.put(&name, fd, &state)?;
                        anyhow::Ok(())
                    });
                match parked {
                    Ok(()) => held_entry = Some((socket.clone(), name.clone())),
                    // The mount works; it just will not survive this process.
                    Err(e) => tracing::warn!(
                        mountpoint = %mountpoint.display(),
                        "cannot park the layer's connection in the fd holder: {e:#}"
                    ),
                }
            };
            mounter
                .mount_fuse_parked(fs, mountpoint, &config, &mut park)
                .with_context(|| {
                    format!(
                        "mounting layer {} at {}",
                        layer.source,
                        mountpoint.display()
                    )
                })?
        }
    };
    let digests: HashSet<_> = (0..index.chunk_count())
        .filter_map(|i| index.chunk(i).ok().map(|c| c.digest))
        .collect();
    fetcher
        .cache
        .pin(&mountpoint.display().to_string(), digests);
    let stop = Arc::new(AtomicBool::new(false));
    // A container is about to start on this layer: background fill leaves its start alone.
    fetcher.note_start();
    // What containerd reads to build the spec and the recorded prefetch list are fetched as
    // soon as the layer mounts; the rest of the layer too unless background fetch is off.
    let spec_files = SPEC_FILES
        .iter()
        .any(|p| index.lookup_path(p).ok().flatten().is_some());
    let fetch_first = opts.background_fetch || spec_files || index.prefetch().next().is_some();
    {
        let (index, fetcher, stop, source) =
            (index.clone(), fetcher.clone(), stop.clone(), source.clone());
        let fill = opts.background_fetch;
        let (mounter, mountpoint) = (opts.mounter.clone(), mountpoint.to_path_buf());
        rt.spawn(async move {
            if fetch_first {
                background_fetch(index.clone(), source, fetcher.clone(), stop.clone(), fill).await;
            }
            // A layer wholly in the cache (filled, or cached before it mounted) is read at
            // local speed: a wider kernel readahead window for it.
            let cache = fetcher.cache.clone();
            let cached = tokio::task::spawn_blocking(move || layer_is_cached(&index, &cache))
                .await
                .unwrap_or(false);
            if cached && !stop.load(Ordering::Relaxed) {
                match mounter.set_read_ahead(&mountpoint, CACHED_LAYER_READ_AHEAD_KIB) {
                    Ok(()) => tracing::debug!(
                        mountpoint = %mountpoint.display(),
                        "layer wholly cached: readahead {CACHED_LAYER_READ_AHEAD_KIB} KiB"
                    ),
                    // A read-only /sys (a daemon in a container): reads stay correct, in
                    // the kernel's default windows.
                    Err(e) => tracing::info!(
                        mountpoint = %mountpoint.display(),
                        "cannot widen the readahead of a cached layer: {e}"
                    ),
                }
            }
        });
    }
    Ok(MountedLayer {
        layer,
        mountpoint: mountpoint.to_path_buf(),
        index,
        source,
        counters,
        access_trace,
        session: Some(session),
        mounter,
        stop,
        owns_mountpoint,
        cache: fetcher.cache.clone(),
        held: held_entry,
        open_table: open_table_path,
        taken_over,
        frozen,
        taken_over_at: taken_over.then(std::time::SystemTime::now),
    })
}

/// Batches of one layer's prefetch or fill handed to the fetcher at once.
const BATCHES_IN_FLIGHT: usize = 3;

/// The kernel readahead window of a layer mount once every chunk of the layer is in the
/// cache: 1 MiB, the largest read a FUSE connection takes (`max_pages`, 256 pages by default).
///
/// Without FUSE passthrough (kernels before 6.9, or a file opened before all its chunks were
/// in), every read of a cached file goes through the daemon, in requests the size of the
/// window. A FUSE mount starts with the kernel's default, 128 KiB; a sequential read of a
/// cached 200 MiB file through the daemon ran at 332 MB/s with it and 635 MB/s with 1 MiB on
/// the project's 2-core VM (medians of 3). A lazy layer keeps the default: the window also sizes the
/// read-around of a page fault in a mapped file (a program's libraries), and 1 MiB around each
/// fault would fetch far more than a starting program reads.
pub const CACHED_LAYER_READ_AHEAD_KIB: u32 = 1024;

/// Whether every chunk the layer's files reference is in `cache` (stops at the first that is
/// not, so a lazy layer costs a few lookups).
pub fn layer_is_cached<B: AsRef<[u8]>>(index: &IndexReader<B>, cache: &ChunkCache) -> bool {
    (1..=index.inode_count()).all(|ino| match index.inode(ino) {
        Ok(r) if r.kind == InodeKind::File => index
            .file_chunks(&r)
            .all(|c| index.chunk(c).is_ok_and(|rec| cache.contains(&rec.digest))),
        Ok(_) => true,
        Err(_) => false,
    })
}

/// Files containerd reads from a container's root while it builds the container's spec
/// (`WithUser`, `WithAdditionalGIDs`), before runc starts: fetched first when a layer mounts.
const SPEC_FILES: [&[u8]; 2] = [b"etc/passwd", b"etc/group"];

/// Fetch the chunks of [`SPEC_FILES`] and of the files in the layer's prefetch list (merged
/// into requests of about 50 ms of the link, at prefetch priority), then, with `fill`, every other chunk in blob order at
/// background priority (requests sized to the link, behind every read).
pub async fn background_fetch(
    index: SharedIndex,
    source: Arc<dyn RangeSource>,
    fetcher: Arc<Fetcher>,
    stop: Arc<AtomicBool>,
    fill: bool,
) {
    let mut order: Vec<u64> = Vec::new();
    let mut seen = BTreeSet::new();
    // What containerd reads of the image before the container exists comes first: it reads
    // /etc/passwd and /etc/group from the root to build the container's spec (the user and its
    // groups). Fetched behind the prefetch list, that read waited on the list's megabytes (python
    // at 200 Mbit/s: 120 ms before runc could start, on a near registry as on a far one).
    let spec_files = SPEC_FILES
        .iter()
        .filter_map(|path| index.lookup_path(path).ok().flatten());
    for ino in spec_files.chain(index.prefetch()) {
        if let Ok(r) = index.inode(ino) {
            if r.kind == InodeKind::File {
                for c in index.file_chunks(&r) {
                    if seen.insert(c) {
                        order.push(c);
                    }
                }
            }
        }
    }
    // The recorded files first, at prefetch priority in large merged requests, then (with
    // `fill`) the rest at background priority in requests sized to the link, one per batch so
    // that each waits its turn behind the foreground. Batches never mix the two (a batch is
    // fetched in offset order).
    // Background fill takes only chunks that files reference (an index may list others; a
    // hostile one, many), in blob order.
    let mut rest = Vec::new();
    if fill {
        let mut referenced = vec![false; index.chunk_count() as usize];
        for ino in 1..=index.inode_count() {
            if let Ok(r) = index.inode(ino) {
                if r.kind == InodeKind::File {
                    for c in index.file_chunks(&r) {
                        if let Some(x) = referenced.get_mut(c as usize) {
                            *x = true;
                        }
                    }
                }
            }
        }
        rest.extend(
            (0..index.chunk_count()).filter(|c| referenced[*c as usize] && !seen.contains(c)),
        );
    }
    for (chunks, p) in [
        (order, crate::fetch::Priority::Prefetch),
        (rest, crate::fetch::Priority::Background),
    ] {
        // Up to BATCHES_IN_FLIGHT batches at once, so that one is on the wire while the one
        // before is decoded and stored (the fetcher's request budgets still bound the wire).
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let send = |batch: Vec<ChunkRef>| {
            let fetcher = fetcher.clone();
            async move {
                if let Err(e) = fetcher.ensure(&batch, p).await {
                    tracing::info!("background fetch: {e}; will retry on demand");
                }
            }
        };
        let mut batch: Vec<ChunkRef> = Vec::new();
        let mut batch_bytes = 0u64;
        // What the batch takes in the cache (chunks are stored decompressed).
        let mut batch_cached = 0u64;
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                // Batches handed over finish (a dropped fetch would leave its chunks marked
                // in flight).
                while in_flight.next().await.is_some() {}
                return;
            }
            let Ok(rec) = index.chunk(c) else { continue };
            // Fill stops short of the cache budget: past it, it would only evict what it
            // fetched (or what readers need) to make room. Reads still fetch what they need.
            if p == crate::fetch::Priority::Background
                && fetcher
                    .cache
                    .near_budget(batch_cached + rec.uncompressed_len as u64)
            {
                if !batch.is_empty() {
                    in_flight.push(send(std::mem::take(&mut batch)));
                }
                while in_flight.next().await.is_some() {}
                tracing::info!(
                    source = %source.describe(),
                    "background fill stops: the cache is at 90% of its budget"
                );
                return;
            }
            if !fetcher.cache.contains(&rec.digest) {
                batch_cached += rec.uncompressed_len as u64;
                batch_bytes += rec.stored_len as u64;
                batch.push(ChunkRef {
                    rec,
                    source: source.clone(),
                });
            }
            // Both sized to about 50 ms of the link: a read that needs a chunk of a batch on the
            // wire waits for that batch (single flight), so a batch must not be large.
            let max = fetcher.background_request_bytes();
            if !batch.is_empty() && (batch_bytes >= max || i + 1 == n) {
                in_flight.push(send(std::mem::take(&mut batch)));
                batch_bytes = 0;
                batch_cached = 0;
                while in_flight.len() >= BATCHES_IN_FLIGHT {
                    in_flight.next().await;
                }
            }
        }
        // The prefetch list is all in before fill starts.
        while in_flight.next().await.is_some() {}
    }
    tracing::debug!(source = %source.describe(), "background fetch done");
}

/// Mount the image at `store` read-only at `target`: every layer lazily, stacked with
/// overlayfs (a single layer is mounted at `target` directly). With `only_layer`, mount that
/// one layer (digest of the original layer) alone at `target`.
pub async fn mount_image(
    store: &Store,
    fetcher: Arc<Fetcher>,
    target: &Path,
    only_layer: Option<&str>,
    opts: &MountOptions,
) -> Result<MountedImage> {
    let (m, artifact, layers) = store.beam_image().await?;
    let layers: Vec<BeamLayer> = match only_layer {
        Some(d) => {
            let l = layers
                .into_iter()
                .find(|l| l.source == d || l.diff_id == d)
                .with_context(|| format!("artifact {artifact} has no layer {d}"))?;
            vec![l]
        }
        None => layers,
    };
    if layers.is_empty() {
        bail!("{} has no layers", m.desc.digest);
    }
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let direct = layers.len() == 1;
    let work_dir = if direct {
        None
    } else {
        let w = opts
            .work_dir
            .join(format!("{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&w).with_context(|| format!("creating {}", w.display()))?;
        Some(w)
    };
    let mut image = MountedImage {
        target: target.to_path_buf(),
        layers: Vec::new(),
        overlay: false,
        work_dir: work_dir.clone(),
        mounter: opts.mounter.clone(),
    };
    for (i, l) in layers.into_iter().enumerate() {
        let index = load_index(store, &fetcher.cache, &l, &Default::default()).await?;
        if index.blob_size() != l.chunks.size {
            bail!(
                "layer {}: index expects a {}-byte chunk blob, descriptor says {}",
                l.source,
                index.blob_size(),
                l.chunks.size
            );
        }
        let source = store.range_source(&l.chunks)?;
        let (mp, owns) = match &work_dir {
            Some(w) => {
                let mp = w.join(format!("layer-{i}"));
                std::fs::create_dir_all(&mp)?;
                (mp, true)
            }
            None => (target.to_path_buf(), false),
        };
        let mounted = mount_layer(l, index, source, fetcher.clone(), &mp, opts, owns, None)?;
        image.layers.push(mounted);
    }
    if !direct {
        // overlayfs: the first lowerdir is the top layer.
        let lower: Vec<String> = image
            .layers
            .iter()
            .rev()
            .map(|l| l.mountpoint.display().to_string())
            .collect();
        let data = format!("lowerdir={}", lower.join(":"));
        opts.mounter
            .mount_overlay(target, &data)
            .with_context(|| format!("mounting overlay at {} ({data})", target.display()))?;
        image.overlay = true;
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    //! Mount bookkeeping with a [`RecordingMounter`]: runs without root.
    use super::*;
    use crate::cache::ChunkCache;
    use crate::convert::image::convert_image;
    use crate::convert::layer::ConvertOptions;
    use crate::fetch::FetchOptions;
    use crate::layout::Layout;
    use crate::mounter::{Call, RecordingMounter};
    use crate::oci::{self, Descriptor, ImageManifest};
    use crate::registry::RegistryOptions;
    use crate::store::Location;

    fn tar_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// An OCI layout at `dir` holding a converted image of `layers` (tagged `t`).
    async fn converted_image(dir: &Path, layers: &[Vec<u8>]) -> Store {
        let layout = Layout::create(dir).unwrap();
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for l in layers {
            let d = layout.put_blob(l).unwrap();
            diff_ids.push(d.clone());
            descs.push(Descriptor::new(
                "application/vnd.oci.image.layer.v1.tar",
                d,
                l.len() as u64,
            ));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": crate::store::host_arch(), "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let config_desc = Descriptor::new(
            "application/vnd.oci.image.config.v1+json",
            layout.put_blob(&config).unwrap(),
            config.len() as u64,
        );
        let manifest = serde_json::to_vec(&ImageManifest {
            schema_version: 2,
            media_type: Some(oci::MEDIA_TYPE_OCI_MANIFEST.into()),
            artifact_type: None,
            config: config_desc,
            layers: descs,
            subject: None,
            annotations: Default::default(),
        })
        .unwrap();
        let mut desc = Descriptor::new(
            oci::MEDIA_TYPE_OCI_MANIFEST,
            layout.put_blob(&manifest).unwrap(),
            manifest.len() as u64,
        );
        desc.annotations
            .insert(oci::ANNOTATION_REF_NAME.into(), "t".into());
        layout.add_manifest(desc).unwrap();
        let location = Location::Layout {
            dir: dir.into(),
            tag: Some("t".into()),
        };
        let store = Store::open(location, &RegistryOptions::default(), false).unwrap();
        convert_image(
            &store,
            &store,
            true,
            &ConvertOptions::default(),
            Default::default(),
            false,
        )
        .await
        .unwrap();
        store
    }

    struct Setup {
        _tmp: tempfile::TempDir,
        store: Store,
        fetcher: Arc<Fetcher>,
        mounter: Arc<RecordingMounter>,
        opts: MountOptions,
        target: PathBuf,
    }

    async fn setup(layers: usize) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let tars: Vec<Vec<u8>> = (0..layers)
            .map(|i| tar_layer(&[(&format!("file-{i}"), format!("layer {i}").as_bytes())]))
            .collect();
        let store = converted_image(&tmp.path().join("layout"), &tars).await;
        let cache = Arc::new(ChunkCache::open(&tmp.path().join("cache"), 1 << 30).unwrap());
        let fetcher = Arc::new(Fetcher::new(cache, FetchOptions::default()));
        let mounter = Arc::new(RecordingMounter::default());
        let opts = MountOptions {
            background_fetch: false,
            passthrough: false,
            threads: 1,
            work_dir: tmp.path().join("work"),
            trace_access: false,
            mounter: mounter.clone(),
            layers: Default::default(),
        };
        let target = tmp.path().join("target");
        Setup {
            _tmp: tmp,
            store,
            fetcher,
            mounter,
            opts,
            target,
        }
    }

    fn layer_mountpoints(calls: &[Call]) -> Vec<PathBuf> {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::MountFuse { mountpoint, .. } => Some(mountpoint.clone()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn layers_are_stacked_top_first_and_unmounted_overlay_first_then_top_down() {
        let s = setup(2).await;
        let image = mount_image(&s.store, s.fetcher.clone(), &s.target, None, &s.opts)
            .await
            .unwrap();
        let calls = s.mounter.calls();
        let mps = layer_mountpoints(&calls);
        assert_eq!(mps.len(), 2, "{calls:?}");
        assert_eq!(
            calls[2],
            Call::MountOverlay {
                target: s.target.clone(),
                data: format!("lowerdir={}:{}", mps[1].display(), mps[0].display()),
            }
        );
        let work = mps[0].parent().unwrap().to_path_buf();
        assert!(work.is_dir());
        drop(image);
        let after = &s.mounter.calls()[3..];
        assert_eq!(
            after,
            [
                Call::Umount {
                    target: s.target.clone(),
                    detach: false
                },
                Call::SessionUmountAndJoin {
                    label: mps[1].display().to_string()
                },
                Call::SessionUmountAndJoin {
                    label: mps[0].display().to_string()
                },
            ]
        );
        assert!(!work.exists(), "the per-mount work dir is removed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_overlay_unmounts_every_layer_it_mounted() {
        let s = setup(3).await;
        *s.mounter.fail_overlay.lock().unwrap() = Some(nix::errno::Errno::EPERM);
        let err = mount_image(&s.store, s.fetcher.clone(), &s.target, None, &s.opts)
            .await
            .err()
            .expect("the overlay mount fails");
        assert!(format!("{err:#}").contains("mounting overlay"), "{err:#}");
        let calls = s.mounter.calls();
        let mps = layer_mountpoints(&calls);
        assert_eq!(mps.len(), 3);
        // Never mounted, so never unmounted; every layer session ended, top first.
        assert!(!calls.iter().any(|c| matches!(c, Call::Umount { .. })));
        let ended: Vec<String> = calls
            .iter()
            .filter_map(|c| match c {
                Call::SessionUmountAndJoin { label } => Some(label.clone()),
                _ => None,
            })
            .collect();
        let want: Vec<String> = mps.iter().rev().map(|p| p.display().to_string()).collect();
        assert_eq!(ended, want);
        assert!(!mps[0].parent().unwrap().exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_taken_over_layer_is_unmounted_by_path_and_a_left_one_not_at_all() {
        let s = setup(1).await;
        let (m, _, layers) = s.store.beam_image().await.unwrap();
        assert_eq!(m.manifest.layers.len(), 1);
        let layer = layers[0].clone();
        let index = load_index(&s.store, &s.fetcher.cache, &layer, &Default::default())
            .await
            .unwrap();
        let source = s.store.range_source(&layer.chunks).unwrap();
        let init = crate::takeover::InitParams {
            major: 7,
            minor: 41,
            flags: 0,
            max_readahead: 1 << 17,
        };
        std::fs::create_dir_all(&s.target).unwrap();
        let held = |existing| Held {
            socket: s.opts.work_dir.join("no-holder.sock"),
            name: "layer".into(),
            existing,
        };
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let mounted = mount_layer(
            layer.clone(),
            index.clone(),
            source.clone(),
            s.fetcher.clone(),
            &s.target,
            &s.opts,
            false,
            Some(held(Some((fd, init)))),
        )
        .unwrap();
        assert!(mounted.taken_over());
        assert_eq!(s.mounter.calls(), [Call::TakeOver]);
        drop(mounted);
        assert_eq!(
            s.mounter.calls()[1..],
            [
                Call::Umount {
                    target: s.target.clone(),
                    detach: false
                },
                Call::SessionJoin {
                    label: "takeover".into()
                },
            ]
        );
        assert!(s.target.is_dir(), "a mountpoint it does not own stays");

        // Left mounted for a successor: no unmount, no join.
        let mounted = mount_layer(
            layer,
            index,
            source,
            s.fetcher.clone(),
            &s.target,
            &s.opts,
            false,
            None,
        )
        .unwrap();
        let before = s.mounter.calls().len();
        mounted.leave_mounted();
        assert_eq!(s.mounter.calls().len(), before);
    }

    /// A layer whose index lists `n` chunks of 4 KiB; the files reference the first
    /// `referenced` of them. Its chunk blob is a file in `dir`.
    fn layer_with_chunks(
        dir: &Path,
        n: usize,
        referenced: usize,
    ) -> (SharedIndex, Arc<dyn RangeSource>) {
        layer_with_files(dir, n, referenced, false)
    }

    /// `n` chunks; files `f0`... referencing the first `referenced`; with `etc_group`, the
    /// first of them is `etc/group` instead.
    fn layer_with_files(
        dir: &Path,
        n: usize,
        referenced: usize,
        etc_group: bool,
    ) -> (SharedIndex, Arc<dyn RangeSource>) {
        use crate::format::chunk;
        use crate::format::index::{ChunkRecord, IndexBuilder, Node};
        let mut blob = Vec::new();
        let mut chunks = Vec::new();
        for i in 0..n {
            let data: Vec<u8> = (0..4096u32)
                .map(|j| ((j * (i as u32 + 7)) % 253) as u8)
                .collect();
            let c = chunk::compress(&data);
            chunks.push(ChunkRecord {
                digest: c.digest,
                offset: blob.len() as u64,
                stored_len: c.stored.len() as u32,
                uncompressed_len: c.uncompressed_len,
            });
            blob.extend_from_slice(&c.stored);
        }
        let mut nodes = vec![Node::new(InodeKind::Dir, 0o755)];
        for i in 0..referenced {
            let mut f = Node::new(InodeKind::File, 0o644);
            f.size = 4096;
            f.chunks = vec![i as u32];
            nodes.push(f);
            let id = nodes.len() - 1;
            if etc_group && i == 0 {
                let mut etc = Node::new(InodeKind::Dir, 0o755);
                etc.children.insert(b"group".to_vec(), id);
                nodes.push(etc);
                let etc_id = nodes.len() - 1;
                nodes[0].children.insert(b"etc".to_vec(), etc_id);
            } else {
                nodes[0].children.insert(format!("f{i}").into_bytes(), id);
            }
        }
        let index = IndexBuilder {
            chunk_size: 4096,
            blob_size: blob.len() as u64,
            nodes,
            chunks,
            prefetch: Vec::new(),
        }
        .encode()
        .unwrap();
        let path = dir.join("chunks");
        std::fs::write(&path, &blob).unwrap();
        (
            Arc::new(IndexReader::new(index).unwrap()),
            Arc::new(crate::blob::LayoutBlob { path }),
        )
    }

    fn fetcher_with_budget(dir: &Path, budget: u64) -> Arc<Fetcher> {
        Arc::new(Fetcher::new(
            Arc::new(ChunkCache::open(dir, budget).unwrap()),
            FetchOptions::default(),
        ))
    }

    /// What containerd reads to build a container's spec is fetched when a layer mounts,
    /// even without a prefetch list or background fill, and nothing else is.
    #[tokio::test]
    async fn etc_group_is_fetched_first_without_fill() {
        let work = tempfile::tempdir().unwrap();
        let (index, source) = layer_with_files(work.path(), 4, 4, true);
        let fetcher = fetcher_with_budget(&work.path().join("cache"), 0);
        let stop = Arc::new(AtomicBool::new(false));
        background_fetch(index.clone(), source, fetcher.clone(), stop, false).await;
        let group = index.lookup_path(b"etc/group").unwrap().unwrap();
        let group = index.inode(group).unwrap();
        let first = index.file_chunks(&group).next().unwrap();
        for c in 0..4 {
            let d = index.chunk(c).unwrap().digest;
            assert_eq!(fetcher.cache.contains(&d), c == first, "chunk {c}");
        }
    }

    #[tokio::test]
    async fn background_fill_takes_only_chunks_files_reference() {
        let work = tempfile::tempdir().unwrap();
        let (index, source) = layer_with_chunks(work.path(), 6, 3);
        let fetcher = fetcher_with_budget(&work.path().join("cache"), 0);
        let stop = Arc::new(AtomicBool::new(false));
        background_fetch(index.clone(), source, fetcher.clone(), stop, true).await;
        for c in 0..6 {
            let d = index.chunk(c).unwrap().digest;
            assert_eq!(fetcher.cache.contains(&d), c < 3, "chunk {c}");
        }
    }

    #[tokio::test]
    async fn a_layer_is_cached_once_every_chunk_its_files_reference_is() {
        let work = tempfile::tempdir().unwrap();
        // Six chunks, of which files reference the first three.
        let (index, source) = layer_with_chunks(work.path(), 6, 3);
        let fetcher = fetcher_with_budget(&work.path().join("cache"), 0);
        assert!(!layer_is_cached(&index, &fetcher.cache));
        let first = ChunkRef {
            rec: index.chunk(0).unwrap(),
            source: source.clone(),
        };
        fetcher
            .ensure(&[first], crate::fetch::Priority::Demand)
            .await
            .unwrap();
        assert!(
            !layer_is_cached(&index, &fetcher.cache),
            "one chunk of three"
        );
        let stop = Arc::new(AtomicBool::new(false));
        background_fetch(index.clone(), source, fetcher.clone(), stop, true).await;
        assert!(layer_is_cached(&index, &fetcher.cache));
    }

    /// A layer the fill brings wholly into the cache gets the wider readahead window; one
    /// without fill keeps the kernel's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_filled_layer_gets_a_wider_readahead_window() {
        let mut s = setup(1).await;
        s.opts.background_fetch = true;
        let image = mount_image(&s.store, s.fetcher.clone(), &s.target, None, &s.opts)
            .await
            .unwrap();
        let mps = layer_mountpoints(&s.mounter.calls());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while s.mounter.read_ahead.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "readahead never set");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(
            *s.mounter.read_ahead.lock().unwrap(),
            [(mps[0].clone(), CACHED_LAYER_READ_AHEAD_KIB)]
        );
        drop(image);
    }

    #[tokio::test]
    async fn background_fill_stops_short_of_the_cache_budget() {
        let work = tempfile::tempdir().unwrap();
        let (index, source) = layer_with_chunks(work.path(), 40, 40);
        // Room for about ten of the forty chunks.
        let budget = 10 * 4096;
        let fetcher = fetcher_with_budget(&work.path().join("cache"), budget);
        let stop = Arc::new(AtomicBool::new(false));
        background_fetch(index.clone(), source, fetcher.clone(), stop, true).await;
        let cached = (0..40)
            .filter(|c| fetcher.cache.contains(&index.chunk(*c).unwrap().digest))
            .count();
        assert!(cached > 0, "nothing was filled");
        // Not fetched and evicted: never fetched. The chunks fetched fit the budget.
        let fetched = fetcher.counters.chunks.load(Ordering::Relaxed);
        assert!(fetched < 10, "{fetched} chunks fetched for room for 10");
        assert_eq!(fetched as usize, cached);
        assert!(fetcher.cache.used() <= budget);
    }
}
