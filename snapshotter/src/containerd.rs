//! A client of containerd's own gRPC API (content, images, leases, snapshots, diff, version),
//! for `beam pull` and `beam doctor`: they act on containerd the way `ctr` and CRI do, so
//! that what they leave behind is an ordinary containerd image.
//!
//! containerd-client is built on tonic 0.14 while the daemon's snapshot service is on tonic
//! 0.9 (containerd-snapshots); the 0.14 types stay inside this module and the rest of Beam sees
//! plain Rust types.

use anyhow::{bail, Context, Result};
use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::tonic::{self, metadata::MetadataValue, Code, Request};
use containerd_client::types::{Descriptor as ApiDescriptor, Mount as ApiMount};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;

/// The gRPC metadata key containerd reads the namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// The gRPC metadata key that puts a request under a lease (GC protection while pulling).
const LEASE_HEADER: &str = "containerd-lease";
/// Size of the messages content is streamed to containerd in.
const WRITE_CHUNK: usize = 1 << 20;

/// What went wrong talking to containerd, with the gRPC code kept so callers can tell
/// "already exists" and "not found" from failures.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message} (gRPC {code:?})")]
pub struct ApiError {
    pub what: String,
    pub code: Code,
    pub message: String,
}

impl ApiError {
    fn new(what: impl Into<String>, s: tonic::Status) -> Self {
        ApiError {
            what: what.into(),
            code: s.code(),
            message: s.message().to_string(),
        }
    }
    pub fn is_already_exists(&self) -> bool {
        self.code == Code::AlreadyExists
    }
    pub fn is_not_found(&self) -> bool {
        self.code == Code::NotFound
    }
}

/// A mount as containerd describes it (type, source, options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
}

/// A content descriptor for containerd.
#[derive(Debug, Clone)]
pub struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// containerd's answer to Prepare: mounts to fill, or the target already exists (a remote
/// snapshot was committed by the snapshotter).
#[derive(Debug)]
pub enum Prepared {
    Mounts(Vec<Mount>),
    AlreadyExists,
}

/// A connection to one containerd, in one namespace, optionally under a lease.
#[derive(Clone)]
pub struct Containerd {
    channel: tonic::transport::Channel,
    namespace: String,
    lease: Option<String>,
    address: PathBuf,
}

impl Containerd {
    /// Connect to containerd's socket.
    pub async fn connect(address: &Path, namespace: &str) -> Result<Self> {
        let channel = containerd_client::connect(address)
            .await
            .with_context(|| format!("connecting to containerd at {}", address.display()))?;
        if namespace.is_empty() {
            bail!("empty containerd namespace");
        }
        MetadataValue::<tonic::metadata::Ascii>::try_from(namespace)
            .with_context(|| format!("namespace {namespace:?} is not a valid header value"))?;
        Ok(Containerd {
            channel,
            namespace: namespace.to_string(),
            lease: None,
            address: address.to_path_buf(),
        })
    }

    pub fn address(&self) -> &Path {
        &self.address
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A request with the namespace (and lease) headers.
    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        md.insert(
            NAMESPACE_HEADER,
            self.namespace.parse().expect("checked in connect"),
        );
        if let Some(lease) = &self.lease {
            md.insert(LEASE_HEADER, lease.parse().expect("lease ids are ASCII"));
        }
        req
    }

    /// containerd's version and revision.
    pub async fn version(&self) -> Result<(String, String)> {
        let mut c = api::version_client::VersionClient::new(self.channel.clone());
        let r = c
            .version(Request::new(()))
            .await
            .map_err(|s| ApiError::new("containerd version", s))?
            .into_inner();
        Ok((r.version, r.revision))
    }

    /// The plugins containerd reports for `type_prefix` (e.g. `io.containerd.snapshotter.v1`):
    /// id, and the init error if it failed to load.
    pub async fn plugins(&self, filter: &str) -> Result<Vec<PluginInfo>> {
        let mut c = api::introspection_client::IntrospectionClient::new(self.channel.clone());
        let r = c
            .plugins(self.request(api::PluginsRequest {
                filters: if filter.is_empty() {
                    vec![]
                } else {
                    vec![filter.to_string()]
                },
            }))
            .await
            .map_err(|s| ApiError::new("listing containerd plugins", s))?
            .into_inner();
        Ok(r.plugins
            .into_iter()
            .map(|p| PluginInfo {
                kind: p.r#type,
                id: p.id,
                exports: p.exports.into_iter().collect(),
                error: p.init_err.map(|e| e.message),
            })
            .collect())
    }

    /// Create a lease that expires after `expire_secs` (so a killed pull leaves nothing that
    /// GC will not collect) and put every later request of this connection under it.
    pub async fn begin_lease(&mut self, expire_secs: u64) -> Result<String> {
        let id = format!(
            "beam-pull-{}-{:08x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            fastrand::u32(..)
        );
        let expire = time_rfc3339(
            std::time::SystemTime::now() + std::time::Duration::from_secs(expire_secs),
        );
        let mut labels = HashMap::new();
        labels.insert("containerd.io/gc.expire".to_string(), expire);
        let mut c = api::leases_client::LeasesClient::new(self.channel.clone());
        c.create(self.request(api::CreateRequest {
            id: id.clone(),
            labels,
        }))
        .await
        .map_err(|s| ApiError::new(format!("creating lease {id}"), s))?;
        self.lease = Some(id.clone());
        Ok(id)
    }

    /// Delete the lease this connection works under (what it protected stays if referenced).
    pub async fn end_lease(&mut self) -> Result<()> {
        let Some(id) = self.lease.take() else {
            return Ok(());
        };
        let mut c = api::leases_client::LeasesClient::new(self.channel.clone());
        c.delete(self.request(api::DeleteRequest {
            id: id.clone(),
            sync: false,
        }))
        .await
        .map_err(|s| ApiError::new(format!("deleting lease {id}"), s))?;
        Ok(())
    }

    /// Labels of a blob in the content store, or None if it is not there.
    pub async fn content_labels(&self, digest: &str) -> Result<Option<BTreeMap<String, String>>> {
        let mut c = api::content_client::ContentClient::new(self.channel.clone());
        let r = c
            .info(self.request(api::InfoRequest {
                digest: digest.to_string(),
            }))
            .await;
        labels_if_found(
            r,
            |r| r.info.map(|i| i.labels),
            || format!("content info {digest}"),
        )
    }

    /// Set `labels` on a blob of the content store, keeping its other labels.
    pub async fn content_set_labels(
        &self,
        digest: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let mut c = api::content_client::ContentClient::new(self.channel.clone());
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        c.update(self.request(api::UpdateRequest {
            info: Some(api::Info {
                digest: digest.to_string(),
                labels: labels.clone().into_iter().collect(),
                ..Default::default()
            }),
            update_mask: Some(prost_types_014::FieldMask { paths }),
        }))
        .await
        .map_err(|s| ApiError::new(format!("labelling content {digest}"), s))?;
        Ok(())
    }

    /// Write `data` into the content store as `digest`, with `labels`. Content that is
    /// already there is left as it is (its labels are then set separately).
    pub async fn write_bytes(
        &self,
        digest: &str,
        data: Vec<u8>,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let size = data.len() as u64;
        let mut chunks = Vec::new();
        let mut off = 0usize;
        while off < data.len() {
            let end = (off + WRITE_CHUNK).min(data.len());
            chunks.push(data[off..end].to_vec());
            off = end;
        }
        self.write_chunks(
            digest,
            size,
            labels,
            futures_util::stream::iter(chunks.into_iter().map(Ok)),
        )
        .await
    }

    /// Write a file into the content store as `digest` (see [`Containerd::write_bytes`]).
    pub async fn write_file(
        &self,
        digest: &str,
        path: &Path,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata().await?.len();
        let stream = futures_util::stream::unfold(file, |mut f| async move {
            let mut buf = vec![0u8; WRITE_CHUNK];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        self.write_chunks(digest, size, labels, stream).await
    }

    async fn write_chunks<S>(
        &self,
        digest: &str,
        size: u64,
        labels: &BTreeMap<String, String>,
        chunks: S,
    ) -> Result<()>
    where
        S: futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static,
    {
        use futures_util::StreamExt;
        let reference = format!("beam-{digest}");
        let (tx, rx) = tokio::sync::mpsc::channel::<api::WriteContentRequest>(4);
        let total = size as i64;
        let expected = digest.to_string();
        let commit_labels: HashMap<String, String> = labels.clone().into_iter().collect();
        let feed_ref = reference.clone();
        let feeder = tokio::spawn(async move {
            let mut chunks = std::pin::pin!(chunks);
            let mut offset: i64 = 0;
            while let Some(chunk) = chunks.next().await {
                let data = chunk.context("reading content to write")?;
                let n = data.len() as i64;
                let msg = api::WriteContentRequest {
                    action: api::WriteAction::Write as i32,
                    r#ref: feed_ref.clone(),
                    total,
                    expected: expected.clone(),
                    offset,
                    data,
                    labels: HashMap::new(),
                };
                offset += n;
                if tx.send(msg).await.is_err() {
                    return Ok(());
                }
            }
            let _ = tx
                .send(api::WriteContentRequest {
                    action: api::WriteAction::Commit as i32,
                    r#ref: feed_ref,
                    total,
                    expected,
                    offset,
                    data: vec![],
                    labels: commit_labels,
                })
                .await;
            anyhow::Ok(())
        });
        let mut c = api::content_client::ContentClient::new(self.channel.clone());
        let outcome = async {
            let mut responses = c
                .write(self.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
                .await?
                .into_inner();
            let mut committed = None;
            while let Some(r) = responses.message().await? {
                if r.action == api::WriteAction::Commit as i32 {
                    committed = Some(r.digest);
                }
            }
            Ok::<_, tonic::Status>(committed)
        }
        .await;
        let fed = feeder.await.context("content writer task")?;
        match outcome {
            Ok(Some(d)) if d == digest => {}
            Ok(Some(d)) => bail!("containerd committed {d} while writing {digest}"),
            Ok(None) => {
                fed?;
                bail!("containerd did not commit {digest}")
            }
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => {
                return Err(ApiError::new(format!("writing {digest} to containerd"), s).into())
            }
        }
        fed
    }

    /// Create or update image `name` pointing at `target`.
    pub async fn put_image(&self, name: &str, target: &Desc) -> Result<()> {
        let image = api::Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(api_desc(target)),
            created_at: None,
            updated_at: None,
        };
        let mut c = api::images_client::ImagesClient::new(self.channel.clone());
        match c
            .create(self.request(api::CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                c.update(self.request(api::UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types_014::FieldMask {
                        paths: vec!["target".into()],
                    }),
                    source_date_epoch: None,
                }))
                .await
                .map_err(|s| ApiError::new(format!("updating image {name}"), s))?;
                Ok(())
            }
            Err(s) => Err(ApiError::new(format!("creating image {name}"), s).into()),
        }
    }

    /// The target digest of image `name`, if it exists.
    pub async fn image_target(&self, name: &str) -> Result<Option<String>> {
        let mut c = api::images_client::ImagesClient::new(self.channel.clone());
        match c
            .get(self.request(api::GetImageRequest {
                name: name.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(r
                .into_inner()
                .image
                .and_then(|i| i.target)
                .map(|t| t.digest)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(ApiError::new(format!("getting image {name}"), s).into()),
        }
    }

    /// Stat a snapshot of `snapshotter`: its labels, or None if it does not exist.
    pub async fn snapshot_stat(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<Option<BTreeMap<String, String>>> {
        let mut c = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let r = c
            .stat(self.request(snap::StatSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            }))
            .await;
        labels_if_found(
            r,
            |r| r.info.map(|i| i.labels),
            || format!("stat of snapshot {key}"),
        )
    }

    /// Names of every snapshot of `snapshotter` in this namespace.
    pub async fn snapshot_names(&self, snapshotter: &str) -> Result<Vec<String>> {
        let mut c = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let mut stream = c
            .list(self.request(snap::ListSnapshotsRequest {
                snapshotter: snapshotter.to_string(),
                filters: vec![],
            }))
            .await
            .map_err(|s| ApiError::new("listing snapshots", s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = stream
            .message()
            .await
            .map_err(|s| ApiError::new("listing snapshots", s))?
        {
            out.extend(r.info.into_iter().map(|i| i.name));
        }
        Ok(out)
    }

    /// Prepare an active snapshot `key` on `parent` with `labels`.
    pub async fn snapshot_prepare(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Prepared> {
        let mut c = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        match c
            .prepare(self.request(snap::PrepareSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels: labels.clone().into_iter().collect(),
            }))
            .await
        {
            Ok(r) => Ok(Prepared::Mounts(
                r.into_inner()
                    .mounts
                    .into_iter()
                    .map(from_api_mount)
                    .collect(),
            )),
            Err(s) if s.code() == Code::AlreadyExists => Ok(Prepared::AlreadyExists),
            Err(s) => Err(ApiError::new(format!("preparing snapshot {key}"), s).into()),
        }
    }

    /// Commit active snapshot `key` as `name`.
    pub async fn snapshot_commit(
        &self,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        let mut c = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        c.commit(self.request(snap::CommitSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            name: name.to_string(),
            key: key.to_string(),
            labels: labels.clone().into_iter().collect(),
        }))
        .await
        .map_err(|s| ApiError::new(format!("committing snapshot {key} as {name}"), s))?;
        Ok(())
    }

    /// Remove snapshot `key`.
    pub async fn snapshot_remove(&self, snapshotter: &str, key: &str) -> Result<()> {
        let mut c = snap::snapshots_client::SnapshotsClient::new(self.channel.clone());
        c.remove(self.request(snap::RemoveSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
        }))
        .await
        .map_err(|s| ApiError::new(format!("removing snapshot {key}"), s))?;
        Ok(())
    }

    /// Apply layer `layer` (already in the content store) onto `mounts` with containerd's
    /// diff service; returns the digest of the uncompressed layer (its diff ID).
    pub async fn apply(&self, layer: &Desc, mounts: &[Mount]) -> Result<String> {
        let mut c = api::diff_client::DiffClient::new(self.channel.clone());
        let r = c
            .apply(self.request(api::ApplyRequest {
                diff: Some(api_desc(layer)),
                mounts: mounts.iter().map(to_api_mount).collect(),
                payloads: HashMap::new(),
                sync_fs: false,
            }))
            .await
            .map_err(|s| ApiError::new(format!("applying layer {}", layer.digest), s))?
            .into_inner();
        r.applied
            .map(|d| d.digest)
            .with_context(|| format!("containerd applied {} but returned no digest", layer.digest))
    }
}

/// A plugin containerd reports.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub kind: String,
    pub id: String,
    pub exports: BTreeMap<String, String>,
    pub error: Option<String>,
}

/// containerd's release as major.minor: what decides its config layout (1.x reads config version
/// 2, 2.x version 3) and its features (2.1's transfer service). Ordered, so `v >= Version::new(2,
/// 1)` reads as it should.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32) -> Self {
        Version { major, minor }
    }

    /// From the version strings containerd and distributions write: `1.7.24`, `v2.1.9`,
    /// `2.1.9~ds1`; None when it does not start with two numbers.
    pub fn parse(v: &str) -> Option<Version> {
        let v = v.trim().trim_start_matches('v');
        let mut parts = v.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Version { major, minor })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

fn api_desc(d: &Desc) -> ApiDescriptor {
    ApiDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        annotations: HashMap::new(),
    }
}

fn from_api_mount(m: ApiMount) -> Mount {
    Mount {
        kind: m.r#type,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

fn to_api_mount(m: &Mount) -> ApiMount {
    ApiMount {
        r#type: m.kind.clone(),
        source: m.source.clone(),
        target: m.target.clone(),
        options: m.options.clone(),
    }
}

/// RFC 3339 UTC time with seconds, as containerd's GC labels expect.
pub fn time_rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The labels an Info-like answer carries; `None` when containerd says NotFound.
fn labels_if_found<T>(
    answer: Result<tonic::Response<T>, tonic::Status>,
    labels: impl FnOnce(T) -> Option<HashMap<String, String>>,
    what: impl FnOnce() -> String,
) -> Result<Option<BTreeMap<String, String>>> {
    match answer {
        Ok(r) => Ok(Some(
            labels(r.into_inner())
                .map(|l| l.into_iter().collect())
                .unwrap_or_default(),
        )),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(ApiError::new(what(), s).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn versions_parse_from_release_strings() {
        assert_eq!(Version::parse("v2.1.9"), Some(Version::new(2, 1)));
        assert_eq!(Version::parse("1.7.24~ds1"), Some(Version::new(1, 7)));
        assert_eq!(Version::parse("1.6.20"), Some(Version::new(1, 6)));
        assert_eq!(Version::parse("garbage"), None);
        assert_eq!(Version::parse("2"), None);
        assert!(Version::new(2, 1) > Version::new(1, 7));
        assert!(Version::new(2, 0) < Version::new(2, 1));
        assert_eq!(Version::new(1, 7).to_string(), "1.7");
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(time_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            time_rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_661)),
            "2000-02-29T01:01:01Z"
        );
        assert_eq!(
            time_rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_737_600)),
            "2026-11-27T00:00:00Z"
        );
    }
}
