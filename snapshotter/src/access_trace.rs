//! `beam record`: run a workload on a lazy mount of an image, note the order in which it first
//! opens each file, and publish a Beam artifact whose indexes carry that order as their
//! prefetch list. Background fetch then starts with those files, so the next start of the same
//! workload finds them cached or in flight.
//!
//! The chunk blobs are reused as they are; only the index blobs (whose prefetch section
//! changes) and the artifact manifest are new. The new artifact is marked
//! `dev.beam.prefetch=recorded` and preferred by readers.

use crate::fetch::Fetcher;
use crate::format::index::with_prefetch;
use crate::mount::{mount_image, MountOptions};
use crate::oci::{self, BeamLayer, Descriptor};
use crate::store::Store;
use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::Duration;

/// Annotation marking an artifact whose indexes carry a recorded prefetch list.
pub const ANNOTATION_PREFETCH: &str = "dev.beam.prefetch";

/// What a recording produced.
#[derive(Debug)]
pub struct Recorded {
    pub artifact: Descriptor,
    /// The bound manifest naming the recorded artifact, when the image was a bound one.
    pub bound: Option<Descriptor>,
    /// Files recorded per layer, bottom first.
    pub files_per_layer: Vec<usize>,
    pub exit_code: Option<i32>,
}

/// The capabilities a container gets by default (Docker's and containerd's default set); the
/// workload keeps no other (no `CAP_SYS_ADMIN`: it cannot mount, load modules or leave its root).
const CONTAINER_CAPS: &str = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,\
+setpcap,+net_bind_service,+net_raw,+sys_chroot,+mknod,+audit_write,+setfcap";

/// `cmd` run isolated in the image mounted at `root` (issue 16), as a container would be, by
/// util-linux's `unshare` and `setpriv`:
/// - its own mount, PID, network, IPC and UTS namespaces (PID 1 of its own; only a loopback
///   interface, which is down; killed with everything it started when `beam record` stops it);
/// - the image's root bind-mounted `nosuid,nodev` in that mount namespace: a device node in the
///   image opens no host device, a setuid binary gains nothing;
/// - `no_new_privs` and the container default capability bounding set;
/// - chrooted into the image.
fn isolated(root: &std::path::Path, cmd: &[String]) -> tokio::process::Command {
    const SCRIPT: &str = r#"t="$0"; caps="$1"; shift
mount --bind "$t" "$t" && mount -o remount,bind,nosuid,nodev "$t" &&
exec setpriv --no-new-privs --bounding-set "$caps" chroot "$t" "$@""#;
    let mut c = tokio::process::Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--net",
        "--ipc",
        "--uts",
        "--",
        "/bin/sh",
        "-c",
        SCRIPT,
    ])
    .arg(root)
    .arg(CONTAINER_CAPS)
    .args(cmd);
    c
}

/// Mount `store`'s image, run `cmd` isolated in it ([`isolated`]) (killed after `timeout`), and publish the
/// recorded artifact.
pub async fn record(
    store: &Store,
    fetcher: Arc<Fetcher>,
    cmd: &[String],
    timeout: Duration,
    work_dir: &std::path::Path,
) -> Result<Recorded> {
    if cmd.is_empty() {
        bail!("no command to record");
    }
    let target = tempfile::Builder::new()
        .prefix("beam-record-")
        .tempdir()
        .context("creating a mount target")?;
    let opts = MountOptions {
        background_fetch: false,
        passthrough: false,
        threads: 4,
        work_dir: work_dir.to_path_buf(),
        trace_access: true,
        mounter: crate::mounter::system(),
        layers: Default::default(),
    };
    let mounted = mount_image(store, fetcher, target.path(), None, &opts).await?;
    let mut child = isolated(target.path(), cmd)
        .kill_on_drop(true)
        .spawn()
        .context("starting the workload (unshare, from util-linux)")?;
    let exit_code = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status?.code(),
        Err(_) => {
            tracing::info!("workload still running after {timeout:?}; stopping it");
            child.kill().await.ok();
            None
        }
    };
    let recorded: Vec<(BeamLayer, Vec<u8>, Vec<u64>)> = mounted
        .layers
        .iter()
        .map(|l| {
            (
                l.layer.clone(),
                l.index.as_bytes().to_vec(),
                l.access_trace
                    .as_ref()
                    .map(|r| r.order())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let chunk_size = mounted
        .layers
        .first()
        .map(|l| l.index.chunk_size())
        .unwrap_or(crate::format::DEFAULT_CHUNK_SIZE);
    tokio::task::block_in_place(move || drop(mounted));

    let m = store.platform_manifest().await?;
    let mut layers = Vec::new();
    let mut files_per_layer = Vec::new();
    for (layer, index, order) in recorded {
        let new_index = with_prefetch(&index, &order)
            .with_context(|| format!("index of layer {}", layer.source))?;
        // Stored packed as the index it replaces was.
        let packing = oci::IndexPacking::of_media_type(&layer.index.media_type).unwrap_or_default();
        let blob = packing.pack(new_index);
        let size = blob.len() as u64;
        let digest = store.put_blob_bytes(blob).await?;
        files_per_layer.push(order.len());
        layers.push(BeamLayer {
            index: Descriptor::new(packing.media_type(), digest, size),
            ..layer
        });
    }
    let mut subject = m.desc.clone();
    subject.annotations.clear();
    subject.platform = None;
    let mut artifact = oci::artifact_manifest(subject.clone(), &layers, chunk_size);
    artifact
        .annotations
        .insert(ANNOTATION_PREFETCH.into(), "recorded".into());
    store.put_blob_bytes(oci::EMPTY_CONFIG.to_vec()).await?;
    let desc = store
        .put_manifest(
            serde_json::to_vec(&artifact)?,
            oci::MEDIA_TYPE_OCI_MANIFEST,
            None,
            Some(oci::ARTIFACT_TYPE),
        )
        .await?;
    let mut referrer = desc.clone();
    referrer
        .annotations
        .insert(oci::ANNOTATION_CHUNK_SIZE.into(), chunk_size.to_string());
    referrer
        .annotations
        .insert(ANNOTATION_PREFETCH.into(), "recorded".into());
    store.add_referrer(&subject.digest, &referrer).await?;
    let bound = bind_recorded(store, &m, &desc.digest).await?;
    Ok(Recorded {
        artifact: desc,
        bound,
        files_per_layer,
        exit_code,
    })
}

/// When the recorded image is a bound one (what `beam convert` makes), bind the recorded
/// artifact the same way: the manifest with its `dev.beam.artifact` pointing at the new
/// artifact takes the tag (and an index naming it gets the new entry), so that nodes, which
/// use the artifact the pulled manifest binds, get the recorded prefetch lists.
async fn bind_recorded(
    store: &Store,
    m: &crate::store::ResolvedManifest,
    artifact: &str,
) -> Result<Option<Descriptor>> {
    if oci::bound_artifact(&m.manifest).is_none() {
        return Ok(None);
    }
    let bytes = oci::bind_manifest(&m.bytes, artifact)?;
    let (top, top_bytes) = store.resolve_top().await?;
    let tag = store.tag();
    if top.digest == m.desc.digest {
        let d = store
            .put_manifest(bytes, &m.desc.media_type, tag.as_deref(), None)
            .await?;
        return Ok(Some(d));
    }
    let d = store
        .put_manifest(bytes, &m.desc.media_type, None, None)
        .await?;
    let replaced = [(m.desc.digest.clone(), d.clone())].into_iter().collect();
    let index = oci::repoint_index(&top_bytes, &replaced)
        .with_context(|| format!("parsing image index {}", top.digest))?;
    store
        .put_manifest(index, &top.media_type, tag.as_deref(), None)
        .await?;
    Ok(Some(d))
}
