//! `beam pull`: pull an image into containerd the way CRI does, with the remote-snapshot
//! labels on every layer, so that beam-snapshotter mounts converted layers lazily and
//! containerd downloads nothing but the manifest and config (like stargz's `ctr-remote image
//! rpull` and `soci image rpull`). `ctr` has no way to add those labels itself.
//!
//! What it leaves is an ordinary containerd image: manifest, config (and index) in the content
//! store with containerd's GC labels, one committed snapshot per layer named by its chain ID,
//! and an image record. Layers the snapshotter cannot serve lazily (no Beam conversion, or a
//! mount that failed; the daemon logs why) are downloaded into the content store and applied
//! by containerd's diff service, exactly as `ctr image pull` would. All of it happens under a
//! lease, so a pull that dies midway leaves nothing GC keeps.

use crate::containerd::{Containerd, Desc, Prepared};
use crate::labels::{self, fallback};
use crate::oci::{self, ImageConfig};
use crate::registry::RegistryOptions;
use crate::store::{Location, Store};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// containerd's limit on the length of one label (key and value).
const MAX_LABEL_LEN: usize = 4096;
/// How long the pull's lease keeps things alive if the pull dies (`--lease-secs`).
pub const DEFAULT_LEASE_SECS: u64 = 3600;

/// What to pull, and where to.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd's socket.
    pub address: PathBuf,
    /// containerd namespace (`default` for ctr, `k8s.io` for CRI).
    pub namespace: String,
    /// Snapshotter name as containerd knows it (the proxy plugin's name).
    pub snapshotter: String,
    pub registry: RegistryOptions,
    /// Print a line per layer as it is done.
    pub progress: bool,
    /// Seconds the pull's lease protects what it fetched: long enough for the pull, short
    /// enough that containerd's GC removes what a killed pull left.
    pub lease_secs: u64,
}

/// How one layer got into containerd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerOutcome {
    /// The snapshotter mounted it lazily; nothing was downloaded.
    Lazy,
    /// Downloaded in full and applied by containerd: bytes, and the snapshotter's reason for
    /// not mounting it lazily (when it said one).
    Downloaded(u64, Option<Fallback>),
    /// Its snapshot was already there.
    Present,
}

/// Why the snapshotter did not mount a layer lazily, as it said on the fallback snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    pub reason: String,
    /// The setting to change, when the cause is one.
    pub fix: Option<String>,
}

/// The result of a pull.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The image name in containerd.
    pub name: String,
    /// Digest of the manifest or index the image record points at.
    pub target: String,
    /// Digest of the platform manifest.
    pub manifest: String,
    /// Whether the registry has a Beam conversion of the manifest.
    pub converted: bool,
    /// The rule by which the snapshotter admitted the image's Beam artifact (lazy layers).
    pub admitted: Option<String>,
    /// Per layer: digest, chain ID, outcome.
    pub layers: Vec<(String, String, LayerOutcome)>,
    pub seconds: f64,
    /// Seconds per step: resolve (manifest), config, containerd (connect and lease; at the
    /// same time as the first two), layers (content, every layer's Prepare, the image record).
    pub steps: Vec<(&'static str, f64)>,
}

impl PullReport {
    pub fn count(&self, f: impl Fn(&LayerOutcome) -> bool) -> usize {
        self.layers.iter().filter(|(_, _, o)| f(o)).count()
    }
    pub fn downloaded_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|(_, _, o)| match o {
                LayerOutcome::Downloaded(n, _) => *n,
                _ => 0,
            })
            .sum()
    }
}

/// Chain IDs of a layer stack (OCI image spec): `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => oci::sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The `cri.image-layers` label value: this layer's digest and those above it, comma
/// separated, cut (whole entries only) to fit containerd's label limit.
pub fn image_layers_label(layers: &[String]) -> String {
    let room = MAX_LABEL_LEN - labels::IMAGE_LAYERS.len();
    let mut out = String::new();
    for l in layers {
        let extra = if out.is_empty() { l.len() } else { l.len() + 1 };
        if out.len() + extra > room {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(l);
    }
    out
}

/// The remote-snapshot labels of layer `i` (what CRI's pull adds).
fn layer_labels(
    image: &str,
    manifest: &str,
    layers: &[String],
    i: usize,
    chain: &str,
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert(labels::TARGET_REF.to_string(), chain.to_string());
    l.insert(labels::IMAGE_REF.to_string(), image.to_string());
    l.insert(labels::MANIFEST_DIGEST.to_string(), manifest.to_string());
    l.insert(labels::LAYER_DIGEST.to_string(), layers[i].clone());
    l.insert(
        labels::IMAGE_LAYERS.to_string(),
        image_layers_label(&layers[i..]),
    );
    l
}

fn unique_key(chain: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}{nanos}-{:08x} {chain}",
        labels::PULL_KEY_PREFIX,
        fastrand::u32(..)
    )
}

/// Pull `image` into containerd. See the module documentation.
/// What the registry answered for an image: its top manifest (or index), the platform
/// manifest, the config, and the Beam artifact the manifest binds (when it binds one), with
/// the seconds taken to resolve the manifest and then to fetch the rest.
struct Resolved {
    top: oci::Descriptor,
    top_bytes: Vec<u8>,
    is_index: bool,
    platform: crate::store::ResolvedManifest,
    config_bytes: Vec<u8>,
    artifact_bytes: Option<Vec<u8>>,
    resolve_secs: f64,
    config_secs: f64,
}

pub async fn pull(image: &str, opts: &PullOptions) -> Result<PullReport> {
    let started = Instant::now();
    let loc = Location::parse(image)?;
    let Location::Registry(reference) = &loc else {
        bail!("beam pull takes a registry reference, not {image}");
    };
    let name = reference.whole();
    let store = Store::open(loc.clone(), &opts.registry, false)?;
    let mut steps: Vec<(&'static str, f64)> = vec![("open", started.elapsed().as_secs_f64())];
    // The registry's answers and containerd's connection at the same time.
    let resolve = async {
        let t0 = Instant::now();
        let (top, top_bytes) = match store.resolve_top().await {
            Ok(t) => t,
            Err(e) => {
                let e = e.context(format!("resolving {name}"));
                return Err(
                    match crate::registry::diagnose(&e, reference.registry()).await {
                        Some(fix) => anyhow::anyhow!("{e:#}\nfix: {fix}"),
                        None => e,
                    },
                );
            }
        };
        let top_mt = crate::registry::media_type_of(&top_bytes)?;
        let is_index = top_mt == oci::MEDIA_TYPE_OCI_INDEX || top_mt == oci::MEDIA_TYPE_DOCKER_LIST;
        // The index's entry for this platform, without asking for the top again.
        let platform = store.platform_manifest_in(&top, top_bytes.clone()).await?;
        let resolved = t0.elapsed().as_secs_f64();
        // The config, and beside it the Beam artifact the manifest binds: the daemon is handed
        // it with the Prepares instead of asking the registry again.
        let config = async {
            store
                .blob_bytes(&platform.manifest.config, 16 << 20)
                .await
                .with_context(|| format!("fetching config {}", platform.manifest.config.digest))
        };
        let artifact = async {
            match oci::bound_artifact(&platform.manifest) {
                Some(a) => store.manifest(a).await.ok(),
                None => None,
            }
        };
        let (config_bytes, artifact_bytes) = tokio::join!(config, artifact);
        let config_bytes = config_bytes?;
        let config_secs = t0.elapsed().as_secs_f64() - resolved;
        anyhow::Ok(Resolved {
            top,
            top_bytes,
            is_index,
            platform,
            config_bytes,
            artifact_bytes,
            resolve_secs: resolved,
            config_secs,
        })
    };
    let connect = async {
        let t0 = Instant::now();
        let mut ctd = Containerd::connect(&opts.address, &opts.namespace).await?;
        ctd.begin_lease(opts.lease_secs).await?;
        anyhow::Ok((ctd, t0.elapsed().as_secs_f64()))
    };
    let (resolved, connected) = tokio::join!(resolve, connect);
    let fetched = resolved?;
    let (mut ctd, connect_secs) = connected?;
    steps.push(("resolve", fetched.resolve_secs));
    steps.push(("config", fetched.config_secs));
    steps.push(("containerd", connect_secs));
    let platform = &fetched.platform;
    let manifest = &platform.manifest;
    let config: ImageConfig = serde_json::from_slice(&fetched.config_bytes)
        .with_context(|| format!("parsing image config {}", manifest.config.digest))?;
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        bail!(
            "{name}: the config lists {} layers, the manifest {}",
            diff_ids.len(),
            manifest.layers.len()
        );
    }
    // Whether the image has a Beam conversion only matters to this report (the snapshotter
    // looks for itself): asked beside the pull, not before it, to keep it off the critical
    // path.
    let converted = async {
        match store
            .find_beam_in(
                &platform.desc.digest,
                &platform.manifest,
                &crate::store::Trust::any_referrer(),
                fetched.artifact_bytes.as_deref(),
            )
            .await
        {
            Ok(found) => found.is_some(),
            Err(e) => {
                tracing::warn!("looking for a Beam conversion of {name}: {e:#}");
                false
            }
        }
    };

    let layers_started = Instant::now();
    let pulled = pull_under_lease(&ctd, &store, &name, reference, &fetched, diff_ids, opts);
    let (result, converted) = tokio::join!(pulled, converted);
    steps.push(("layers", layers_started.elapsed().as_secs_f64()));
    // The image record now holds what it needs; the lease only protected the pull.
    if let Err(e) = ctd.end_lease().await {
        tracing::warn!("{e:#}");
    }
    let (layers, admitted) = result.map_err(|e| {
        let secs = started.elapsed().as_secs();
        if secs >= opts.lease_secs {
            // What containerd's GC removed once the lease expired (a parent snapshot, a
            // blob) is what the pull then failed on.
            e.context(format!(
                "the pull took {secs} s, past its lease of {} s (--lease-secs): containerd's \
                 garbage collector may have removed what it had pulled; pull again, with a \
                 longer --lease-secs for a slow download",
                opts.lease_secs
            ))
        } else {
            e
        }
    })?;
    let report = PullReport {
        name,
        target: fetched.top.digest.clone(),
        manifest: platform.desc.digest.clone(),
        converted,
        admitted,
        layers,
        seconds: started.elapsed().as_secs_f64(),
        steps,
    };
    Ok(report)
}

async fn pull_under_lease(
    ctd: &Containerd,
    store: &Store,
    name: &str,
    reference: &oci_client::Reference,
    image: &Resolved,
    diff_ids: &[String],
    opts: &PullOptions,
) -> Result<(Vec<(String, String, LayerOutcome)>, Option<String>)> {
    let Resolved {
        top,
        top_bytes,
        is_index,
        platform,
        config_bytes,
        artifact_bytes,
        ..
    } = image;
    let artifact_bytes = artifact_bytes.as_deref();
    let layer_digests: Vec<String> = platform
        .manifest
        .layers
        .iter()
        .map(|l| l.digest.clone())
        .collect();
    let manifest = &platform.manifest;
    let chains = &chain_ids(diff_ids);
    // Where the content came from, as containerd's fetcher records it (lets containerd fetch
    // missing layers later, e.g. for `ctr image export`).
    let source_key = format!("containerd.io/distribution.source.{}", reference.registry());
    let source = BTreeMap::from([(source_key.clone(), reference.repository().to_string())]);

    // Content first: config, manifest, index, each with the GC references containerd's own
    // pull sets, so the image keeps its snapshots and blobs once the lease is gone.
    let mut config_labels = source.clone();
    if let Some(top_chain) = chains.last() {
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            top_chain.clone(),
        );
    }
    put_content(
        ctd,
        &manifest.config.digest,
        config_bytes.to_vec(),
        &config_labels,
    )
    .await?;
    let mut manifest_labels = source.clone();
    manifest_labels.insert(
        "containerd.io/gc.ref.content.config".into(),
        manifest.config.digest.clone(),
    );
    for (i, l) in manifest.layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    put_content(
        ctd,
        &platform.desc.digest,
        platform.bytes.clone(),
        &manifest_labels,
    )
    .await?;
    if *is_index {
        let mut index_labels = source.clone();
        index_labels.insert(
            "containerd.io/gc.ref.content.m.0".into(),
            platform.desc.digest.clone(),
        );
        put_content(ctd, &top.digest, top_bytes.to_vec(), &index_labels).await?;
    }

    // The daemon reaches the registry the way this command does (issue 12): the transport
    // flags travel with every layer's Prepare.
    let transport = opts.registry.transport_for(reference.registry());
    let transport = (!transport.is_empty())
        .then(|| serde_json::to_string(&transport))
        .transpose()
        .context("encoding the pull's registry settings")?;
    // The manifests the daemon would fetch again, where they fit in a label.
    let mut hints = BTreeMap::new();
    for (key, bytes) in [
        (labels::PULL_MANIFEST, Some(platform.bytes.as_slice())),
        (labels::PULL_ARTIFACT, artifact_bytes),
    ] {
        if let Some(v) = bytes.and_then(|b| std::str::from_utf8(b).ok()) {
            hints.extend(labels::split(key, v));
        }
    }
    tracing::debug!("content written");
    let total = manifest.layers.len();
    let mut outcomes = Vec::with_capacity(total);
    let mut admitted: Option<String> = None;
    for (i, layer) in manifest.layers.iter().enumerate() {
        let chain = &chains[i];
        let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
        let started = Instant::now();
        let outcome = if ctd.snapshot_stat(&opts.snapshotter, chain).await?.is_some() {
            LayerOutcome::Present
        } else {
            let mut labels = layer_labels(name, &platform.desc.digest, &layer_digests, i, chain);
            if let Some(t) = &transport {
                labels.insert(labels::PULL_TRANSPORT.to_string(), t.clone());
            }
            labels.extend(hints.clone());
            let key = unique_key(chain);
            match ctd
                .snapshot_prepare(&opts.snapshotter, &key, parent, &labels)
                .await?
            {
                Prepared::AlreadyExists => {
                    let Some(l) = ctd.snapshot_stat(&opts.snapshotter, chain).await? else {
                        bail!(
                            "snapshotter {} answered AlreadyExists for layer {} but has no \
                             snapshot {chain}",
                            opts.snapshotter,
                            layer.digest
                        );
                    };
                    if let Some(a) = l.get(labels::ADMITTED) {
                        admitted.get_or_insert_with(|| a.clone());
                    }
                    LayerOutcome::Lazy
                }
                Prepared::Mounts(mounts) => {
                    // The snapshotter's reason for not mounting it lazily, if it gave one.
                    let why = match ctd.snapshot_stat(&opts.snapshotter, &key).await {
                        Ok(Some(l)) => l.get(fallback::REASON).map(|r| Fallback {
                            reason: r.clone(),
                            fix: l.get(fallback::FIX).cloned(),
                        }),
                        _ => None,
                    };
                    let r =
                        download_and_apply(ctd, store, layer, &mounts, &source, &diff_ids[i]).await;
                    let r = match r {
                        Ok(n) => ctd
                            .snapshot_commit(&opts.snapshotter, chain, &key, &BTreeMap::new())
                            .await
                            .map(|()| n)
                            .or_else(|e| {
                                // Someone else committed the same layer meanwhile.
                                if e.is_already_exists() {
                                    Ok(n)
                                } else {
                                    Err(e.into())
                                }
                            }),
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(n) => LayerOutcome::Downloaded(n, why),
                        Err(e) => {
                            if let Err(re) = ctd.snapshot_remove(&opts.snapshotter, &key).await {
                                tracing::warn!("{re:#}");
                            }
                            return Err(e.context(format!("layer {} of {name}", layer.digest)));
                        }
                    }
                }
            }
        };
        if opts.progress {
            let what = match &outcome {
                LayerOutcome::Lazy => match &admitted {
                    Some(a) => format!(
                        "lazy: mounted by the snapshotter (Beam artifact {a}), nothing downloaded"
                    ),
                    None => "lazy: mounted by the snapshotter, nothing downloaded".into(),
                },
                LayerOutcome::Present => "already present".into(),
                LayerOutcome::Downloaded(n, why) => {
                    let mut s = format!("downloaded {:.1} MB and unpacked", *n as f64 / 1e6);
                    if let Some(w) = why {
                        s.push_str(&format!("\n    not lazy: {}", w.reason));
                        if let Some(fix) = &w.fix {
                            s.push_str(&format!("\n    fix: {fix}"));
                        }
                    }
                    s
                }
            };
            eprintln!(
                "layer {}/{total} {} {what} ({:.2}s)",
                i + 1,
                short(&layer.digest),
                started.elapsed().as_secs_f64()
            );
        }
        tracing::debug!(
            layer = i,
            secs = started.elapsed().as_secs_f64(),
            "layer done"
        );
        outcomes.push((layer.digest.clone(), chain.clone(), outcome));
    }

    ctd.put_image(
        name,
        &Desc {
            media_type: top.media_type.clone(),
            digest: top.digest.clone(),
            size: top.size,
        },
    )
    .await?;
    Ok((outcomes, admitted))
}

/// Write content unless it is there, then make sure it carries `labels`.
async fn put_content(
    ctd: &Containerd,
    digest: &str,
    bytes: Vec<u8>,
    labels: &BTreeMap<String, String>,
) -> Result<()> {
    match ctd.content_labels(digest).await? {
        None => ctd.write_bytes(digest, bytes, labels).await,
        Some(have) => {
            let missing: BTreeMap<String, String> = labels
                .iter()
                .filter(|(k, v)| have.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            ctd.content_set_labels(digest, &missing).await
        }
    }
}

/// Download a layer blob into containerd's content store (checked against its digest on the
/// way) and have containerd's diff service apply it onto `mounts`. Returns bytes downloaded.
async fn download_and_apply(
    ctd: &Containerd,
    store: &Store,
    layer: &oci::Descriptor,
    mounts: &[crate::containerd::Mount],
    source: &BTreeMap<String, String>,
    diff_id: &str,
) -> Result<u64> {
    let mut downloaded = 0;
    if ctd.content_labels(&layer.digest).await?.is_none() {
        let tmp = tempfile::Builder::new()
            .prefix("beam-pull-")
            .tempfile()
            .context("creating a temporary file for a layer")?;
        store
            .blob_to_file(layer, tmp.path())
            .await
            .with_context(|| format!("downloading layer {}", layer.digest))?;
        ctd.write_file(&layer.digest, tmp.path(), source).await?;
        downloaded = layer.size;
    }
    let desc = Desc {
        media_type: layer.media_type.clone(),
        digest: layer.digest.clone(),
        size: layer.size,
    };
    let applied = ctd.apply(&desc, mounts).await?;
    if applied != diff_id {
        bail!(
            "layer {} unpacked to {applied}, but the image config says {diff_id}",
            layer.digest
        );
    }
    let uncompressed = BTreeMap::from([("containerd.io/uncompressed".to_string(), applied)]);
    ctd.content_set_labels(&layer.digest, &uncompressed).await?;
    Ok(downloaded)
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let diffs = vec![d('a'), d('b'), d('c')];
        let chains = chain_ids(&diffs);
        assert_eq!(chains[0], diffs[0]);
        assert_eq!(
            chains[1],
            oci::sha256_digest(format!("{} {}", diffs[0], diffs[1]).as_bytes())
        );
        assert_eq!(
            chains[2],
            oci::sha256_digest(format!("{} {}", chains[1], diffs[2]).as_bytes())
        );
    }

    #[test]
    fn image_layers_label_is_cut_to_whole_entries() {
        let layers: Vec<String> = (0..100).map(|i| format!("sha256:{:064x}", i)).collect();
        let v = image_layers_label(&layers);
        assert!(v.len() + labels::IMAGE_LAYERS.len() <= MAX_LABEL_LEN);
        let parts: Vec<&str> = v.split(',').collect();
        assert!(parts.len() < 100 && parts.len() > 10);
        assert!(parts.iter().zip(&layers).all(|(a, b)| a == b));
        assert_eq!(
            image_layers_label(&layers[..2]),
            format!("{},{}", layers[0], layers[1])
        );
    }
}
