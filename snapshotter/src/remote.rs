//! Talking to OCI registries: auth, manifests, blobs (whole and by Range), pushes, referrers.
//!
//! Built on `oci-client`. Credentials come from the Docker config (`~/.docker/config.json` or
//! `$DOCKER_CONFIG`, incl. credential helpers); basic auth and bearer tokens (the token
//! exchange is done by `oci-client`); plain HTTP only for hosts the caller names or when asked
//! for all; extra CA certificates for private HTTPS registries. Credentials never appear in
//! errors or logs: errors name the registry and repository, never the auth.

use crate::oci::{self, Descriptor, ImageIndex};
use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    /// Plain HTTP for every registry.
    pub plain_http: bool,
    /// Plain HTTP for these hosts (`host` or `host:port`).
    pub plain_http_hosts: Vec<String>,
    /// PEM files of extra CAs to trust.
    pub ca_files: Vec<PathBuf>,
    /// Mirror hosts tried in order before the origin for blob reads of every registry.
    pub mirrors: Vec<String>,
    /// Mirror hosts for one registry host only.
    pub host_mirrors: std::collections::BTreeMap<String, Vec<String>>,
}

impl RemoteOptions {
    /// Read `BEAM_PLAIN_HTTP_HOSTS` (comma-separated) into the options.
    pub fn with_env(mut self) -> Self {
        if let Ok(v) = std::env::var("BEAM_PLAIN_HTTP_HOSTS") {
            self.plain_http_hosts.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            );
        }
        self
    }
}

/// Largest manifest or index Beam reads (4 MiB, as containerd).
pub const MAX_MANIFEST_LEN: usize = 4 << 20;

/// A registry client shared by everything in one process.
pub struct Registry {
    client: Client,
}

/// Parse `host[:port]/repo[:tag|@digest]`.
pub fn parse_reference(s: &str) -> Result<Reference> {
    s.parse::<Reference>()
        .with_context(|| format!("invalid image reference {s:?}"))
}

impl Registry {
    pub fn new(opts: &RemoteOptions) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if opts.plain_http {
            ClientProtocol::Http
        } else if !opts.plain_http_hosts.is_empty() {
            ClientProtocol::HttpsExcept(opts.plain_http_hosts.clone())
        } else {
            ClientProtocol::Https
        };
        let mut extra_root_certificates = Vec::new();
        for f in &opts.ca_files {
            let data =
                std::fs::read(f).with_context(|| format!("reading CA file {}", f.display()))?;
            extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let config = ClientConfig {
            protocol,
            extra_root_certificates,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            platform_resolver: None,
            ..Default::default()
        };
        Ok(Registry {
            client: Client::new(config),
        })
    }

    /// The underlying client (for the fetcher's Range requests).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Make sure credentials for `r`'s registry are known to the client.
    pub(crate) async fn ensure_login(&self, r: &Reference) {
        let registry = r.resolve_registry();
        self.client
            .store_auth_if_needed(registry, &docker_auth(registry))
            .await;
    }

    /// Make sure credentials for `r`'s registry are known to the client.
    async fn login(&self, r: &Reference) -> Result<()> {
        let registry = r.resolve_registry();
        let auth = docker_auth(registry);
        self.client.store_auth_if_needed(registry, &auth).await;
        Ok(())
    }

    /// Fetch a manifest or index by tag or digest: bytes, digest, media type.
    pub async fn manifest(&self, r: &Reference) -> Result<(Vec<u8>, String, String)> {
        self.login(r).await?;
        let (bytes, _registry_digest) = self
            .client
            .pull_manifest_raw(
                r,
                &docker_auth(r.resolve_registry()),
                oci::MANIFEST_MEDIA_TYPES,
            )
            .await
            .with_context(|| format!("fetching manifest {r}"))?;
        if bytes.len() > MAX_MANIFEST_LEN {
            bail!(
                "manifest {r} is {} bytes, over the {MAX_MANIFEST_LEN}-byte limit",
                bytes.len()
            );
        }
        let actual = oci::sha256_digest(&bytes);
        if let Some(d) = r.digest() {
            if d != actual {
                bail!("manifest {r}: registry returned content with digest {actual}");
            }
        }
        let media_type =
            media_type_of(&bytes).with_context(|| format!("manifest {r} is not valid JSON"))?;
        Ok((bytes.to_vec(), actual, media_type))
    }

    /// Whether the manifest `r` exists.
    pub async fn manifest_exists(&self, r: &Reference) -> Result<bool> {
        match self.manifest(r).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Download blob `digest` of `r`'s repository to `path`, checking size and digest.
    pub async fn blob_to_file(&self, r: &Reference, desc: &Descriptor, path: &Path) -> Result<()> {
        if !oci::is_sha256_digest(&desc.digest) {
            bail!("unsupported blob digest {:?}", desc.digest);
        }
        self.login(r).await?;
        let mut stream = self
            .client
            .pull_blob_stream(r, desc.digest.as_str())
            .await
            .with_context(|| format!("fetching blob {} of {r}", desc.digest))?;
        let mut file = tokio::fs::File::create(path)
            .await
            .with_context(|| format!("creating {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut n: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("reading blob {} of {r}", desc.digest))?;
            n += chunk.len() as u64;
            if n > desc.size {
                bail!(
                    "blob {} of {r} is longer than its descriptor's {} bytes",
                    desc.digest,
                    desc.size
                );
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .with_context(|| format!("writing {}", path.display()))?;
        }
        file.flush().await?;
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if n != desc.size || actual != desc.digest {
            bail!(
                "blob {} of {r}: got {n} bytes with digest {actual}, expected {} bytes",
                desc.digest,
                desc.size
            );
        }
        Ok(())
    }

    /// Download a small blob into memory, checking size and digest.
    pub async fn blob_bytes(&self, r: &Reference, desc: &Descriptor, max: u64) -> Result<Vec<u8>> {
        if desc.size > max {
            bail!(
                "blob {} is {} bytes, over the {max}-byte limit",
                desc.digest,
                desc.size
            );
        }
        self.login(r).await?;
        let mut out = Vec::with_capacity(desc.size as usize);
        self.client
            .pull_blob(r, desc.digest.as_str(), &mut out)
            .await
            .with_context(|| format!("fetching blob {} of {r}", desc.digest))?;
        if out.len() as u64 != desc.size || oci::sha256_digest(&out) != desc.digest {
            bail!(
                "blob {} of {r}: content does not match its descriptor",
                desc.digest
            );
        }
        Ok(out)
    }

    /// Whether blob `digest` is in `r`'s repository.
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool> {
        self.login(r).await?;
        self.client
            .blob_exists(r, digest)
            .await
            .with_context(|| format!("checking blob {digest} in {r}"))
    }

    /// Upload `data` as a blob unless the repository already has it.
    pub async fn push_blob_bytes(&self, r: &Reference, data: Vec<u8>) -> Result<Descriptor> {
        let digest = oci::sha256_digest(&data);
        let size = data.len() as u64;
        if !self.blob_exists(r, &digest).await? {
            self.client
                .push_blob(r, data, &digest)
                .await
                .with_context(|| format!("pushing blob {digest} to {r}"))?;
        }
        Ok(Descriptor::new("application/octet-stream", digest, size))
    }

    /// Upload the file at `path` (whose digest and size the caller knows) unless present.
    pub async fn push_blob_file(
        &self,
        r: &Reference,
        path: &Path,
        digest: &str,
        size: u64,
    ) -> Result<()> {
        if self.blob_exists(r, digest).await? {
            return Ok(());
        }
        if size < 8 << 20 {
            let data = tokio::fs::read(path)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            self.client
                .push_blob(r, data, digest)
                .await
                .with_context(|| format!("pushing blob {digest} to {r}"))?;
            return Ok(());
        }
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 4 << 20).map(|r| {
            r.map_err(|e| {
                oci_client::errors::OciDistributionError::GenericError(Some(e.to_string()))
            })
        });
        self.client
            .push_blob_stream(r, stream, digest, Some(size))
            .await
            .with_context(|| format!("pushing blob {digest} to {r}"))?;
        Ok(())
    }

    /// Upload a manifest under `r` (a tag, or the digest of `bytes`).
    pub async fn push_manifest(
        &self,
        r: &Reference,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> Result<String> {
        self.login(r).await?;
        let digest = oci::sha256_digest(&bytes);
        let ct = media_type
            .parse()
            .map_err(|_| anyhow!("invalid media type {media_type:?}"))?;
        self.client
            .push_manifest_raw(r, bytes, ct)
            .await
            .with_context(|| format!("pushing manifest {digest} to {r}"))?;
        Ok(digest)
    }

    /// Referrers of manifest `subject` in `r`'s repository: the referrers API when the
    /// registry has it, else the referrers tag fallback. Empty when there are none.
    pub async fn referrers(&self, r: &Reference, subject: &str) -> Result<Vec<Descriptor>> {
        self.login(r).await?;
        let at = with_digest(r, subject);
        if let Ok(index) = self.client.pull_referrers(&at, None).await {
            let json = serde_json::to_vec(&index)?;
            let idx: ImageIndex = serde_json::from_slice(&json)?;
            if !idx.manifests.is_empty() {
                return Ok(idx.manifests);
            }
        }
        Ok(self.referrers_tag_index(r, subject).await?.manifests)
    }

    async fn referrers_tag_index(&self, r: &Reference, subject: &str) -> Result<ImageIndex> {
        let tag = with_tag(r, &oci::referrers_tag(subject));
        match self.manifest(&tag).await {
            Ok((bytes, _, _)) => serde_json::from_slice(&bytes)
                .with_context(|| format!("referrers index {tag} is not an image index")),
            Err(e) if is_not_found(&e) => Ok(ImageIndex::empty()),
            Err(e) => Err(e),
        }
    }

    /// Make `desc` (a manifest whose subject is `subject`) findable as a referrer. Registries
    /// with the referrers API index it on push; otherwise the referrers tag index is read,
    /// the entry added, and the index written back, keeping every other tool's entries.
    pub async fn add_referrer(
        &self,
        r: &Reference,
        subject: &str,
        desc: &Descriptor,
    ) -> Result<()> {
        let at = with_digest(r, subject);
        if let Ok(index) = self.client.pull_referrers(&at, None).await {
            if index.manifests.iter().any(|m| m.digest == desc.digest) {
                return Ok(());
            }
        }
        let mut index = self.referrers_tag_index(r, subject).await?;
        if index.manifests.iter().any(|m| m.digest == desc.digest) {
            return Ok(());
        }
        index.manifests.push(desc.clone());
        let bytes = serde_json::to_vec(&index)?;
        let tag = with_tag(r, &oci::referrers_tag(subject));
        self.push_manifest(&tag, bytes, oci::MEDIA_TYPE_OCI_INDEX)
            .await?;
        Ok(())
    }
}

/// `r` with its tag/digest replaced by `digest`.
pub fn with_digest(r: &Reference, digest: &str) -> Reference {
    Reference::with_digest(
        r.registry().to_string(),
        r.repository().to_string(),
        digest.to_string(),
    )
}

/// `r` with its tag/digest replaced by `tag`.
pub fn with_tag(r: &Reference, tag: &str) -> Reference {
    Reference::with_tag(
        r.registry().to_string(),
        r.repository().to_string(),
        tag.to_string(),
    )
}

/// The `mediaType` field of a manifest, or a best guess from its shape.
pub fn media_type_of(bytes: &[u8]) -> Result<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    if let Some(mt) = v.get("mediaType").and_then(|m| m.as_str()) {
        return Ok(mt.to_string());
    }
    Ok(if v.get("manifests").is_some() {
        oci::MEDIA_TYPE_OCI_INDEX.into()
    } else {
        oci::MEDIA_TYPE_OCI_MANIFEST.into()
    })
}

/// Whether an error chain says the registry has no such manifest or blob.
pub fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let s = c.to_string().to_ascii_lowercase();
        s.contains("manifest unknown")
            || s.contains("manifest_unknown")
            || s.contains("blob unknown")
            || s.contains("blob_unknown")
            || s.contains("name unknown")
            || s.contains("name_unknown")
            || s.contains("not found")
            || s.contains("404")
    })
}

/// Credentials for `registry` from the Docker config; anonymous when there are none.
/// Never logged.
pub fn docker_auth(registry: &str) -> RegistryAuth {
    let server = if registry == "docker.io" || registry == "index.docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    match docker_credential::get_credential(server) {
        Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => {
            RegistryAuth::Basic(u, p)
        }
        Ok(docker_credential::DockerCredential::IdentityToken(t)) => RegistryAuth::Bearer(t),
        Err(e) => {
            tracing::debug!(registry, "no credentials from the Docker config: {e}");
            RegistryAuth::Anonymous
        }
    }
}
