//! Talking to OCI registries: auth, manifests, blobs (whole and by Range), pushes, referrers.
//!
//! Reads go through Beam's own HTTP client ([`http`]: every body bounded, errors typed with
//! their status, codes and `Retry-After`); pushes and existence checks through `oci-client`.
//! Credentials come from the Docker config (`~/.docker/config.json` or `$DOCKER_CONFIG`, incl.
//! credential helpers); basic auth and bearer tokens; plain HTTP only for hosts the caller
//! names or when asked for all; extra CA certificates for private HTTPS registries, per host
//! where given per host. Credentials never appear in errors or logs: errors name the registry
//! and repository, never the auth.

mod http;
pub use http::{retry_after, BodyError, StatusError, MAX_RETRY_AFTER};

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
pub struct RegistryOptions {
    /// Plain HTTP for every registry.
    pub plain_http: bool,
    /// Plain HTTP for these hosts (`host` or `host:port`).
    pub plain_http_hosts: Vec<String>,
    /// PEM files of extra CAs to trust for every registry (`--ca-file` of a command).
    pub ca_files: Vec<PathBuf>,
    /// PEM files of CAs trusted for one registry host only (a `hosts.toml`'s `ca`, a
    /// `[[registry]]`'s `ca_file`, the `--ca-file` of the `beam pull` that named the host):
    /// a CA given for one host never vouches for another (issue 16).
    pub host_ca_files: std::collections::BTreeMap<String, Vec<PathBuf>>,
    /// Mirror hosts tried in order before the origin for blob reads of every registry.
    pub mirrors: Vec<String>,
    /// Mirror hosts for one registry host only.
    pub host_mirrors: std::collections::BTreeMap<String, Vec<String>>,
    /// Docker config file to read credentials from (default: `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`, with its credential helpers).
    pub docker_config: Option<PathBuf>,
}

/// The transport settings one `beam pull` used for its registry, carried to beam-snapshotter
/// with each layer's Prepare (label [`crate::labels::PULL_TRANSPORT`]) so the daemon reaches the
/// registry the way the user's command did (issue 12: `beam pull --plain-http` was lazy only
/// if the daemon had been configured the same way). Paths, never secrets: the label is stored
/// in containerd's and the daemon's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullTransport {
    /// The registry host these settings are for (`host[:port]`).
    pub host: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain_http: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_files: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_config: Option<PathBuf>,
}

impl PullTransport {
    /// Whether it asks for nothing beyond the daemon's own settings.
    pub fn is_empty(&self) -> bool {
        !self.plain_http
            && self.ca_files.is_empty()
            && self.mirrors.is_empty()
            && self.docker_config.is_none()
    }
}

impl RegistryOptions {
    /// The settings these options give registry `host` (what `beam pull` hands the daemon).
    pub fn transport_for(&self, host: &str) -> PullTransport {
        let mut mirrors = self.host_mirrors.get(host).cloned().unwrap_or_default();
        mirrors.extend(self.mirrors.iter().cloned());
        let docker_config = self.docker_config.clone().or_else(|| {
            let dir = std::env::var_os("DOCKER_CONFIG")?;
            let file = PathBuf::from(dir).join("config.json");
            file.is_file().then_some(file)
        });
        PullTransport {
            host: host.to_string(),
            plain_http: self.plain_http || self.plain_http_hosts.iter().any(|h| h == host),
            ca_files: self
                .ca_files
                .iter()
                .chain(self.host_ca_files.get(host).into_iter().flatten())
                .map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()))
                .collect(),
            mirrors,
            docker_config: docker_config.map(|f| std::fs::canonicalize(&f).unwrap_or(f)),
        }
    }

    /// These options with a pull's settings for its registry added (the pull's mirrors first;
    /// its credentials file replaces the daemon's for every registry of this client).
    pub fn with_transport(&self, t: &PullTransport) -> RegistryOptions {
        let mut o = self.clone();
        if t.plain_http && !o.plain_http_hosts.contains(&t.host) {
            o.plain_http_hosts.push(t.host.clone());
        }
        // The pull's CAs vouch for its registry host, not for every host of this client. A
        // host without any gets no entry: an entry makes a TLS client at once, which loads
        // the system's CAs (about 30 ms from a cold disk, before a layer can mount).
        if !t.ca_files.is_empty() {
            let cas = o.host_ca_files.entry(t.host.clone()).or_default();
            for f in &t.ca_files {
                if !cas.contains(f) {
                    cas.push(f.clone());
                }
            }
        }
        if !t.mirrors.is_empty() {
            let mut m = t.mirrors.clone();
            for x in o.host_mirrors.remove(&t.host).unwrap_or_default() {
                if !m.contains(&x) {
                    m.push(x);
                }
            }
            o.host_mirrors.insert(t.host.clone(), m);
        }
        if t.docker_config.is_some() {
            o.docker_config = t.docker_config.clone();
        }
        o
    }

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

/// oci-client's settings: `protocol`, trusting the system's CAs and `extra_root_certificates`.
fn oci_config(
    protocol: &ClientProtocol,
    extra_root_certificates: Vec<Certificate>,
) -> ClientConfig {
    ClientConfig {
        protocol: protocol.clone(),
        extra_root_certificates,
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        platform_resolver: None,
        ..Default::default()
    }
}

/// A registry client shared by everything in one process.
pub struct Registry {
    /// The client of every host without CAs of its own, made on first use (only pushes and
    /// HEADs use it; making one loads the system's CA roots, ~4 ms, on a pull's path).
    client: std::sync::OnceLock<Client>,
    /// Its settings: the protocol and the global CAs.
    client_config: (ClientProtocol, Vec<Certificate>),
    /// The clients of hosts with CAs of their own: each trusts the global CAs and its own.
    host_clients: std::collections::BTreeMap<String, Client>,
    /// Where credentials come from (None: the Docker config of this process).
    docker_config: Option<PathBuf>,
    /// Credentials per registry, read once (credential helpers are processes: not one per
    /// chunk request) and read again only after the registry refused them.
    credentials: std::sync::Mutex<std::collections::HashMap<String, RegistryAuth>>,
    /// The HTTP client of every read, with bounded bodies.
    reads: http::HttpReads,
}

/// What a failed registry request means for whoever asked, from the error's type (never from
/// its text: a digest or URL may contain "404").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No such manifest, blob or repository (404, or the registry's `*_UNKNOWN` codes).
    NotFound,
    /// The credentials were refused (401, 403, `UNAUTHORIZED`, `DENIED`).
    Denied,
    /// Too many requests (429) or service unavailable (503): later, more slowly.
    Busy,
    /// Worth another try: another 5xx, a connection error, a timeout, a cut body.
    Transient,
    /// Another try gets the same answer: any other 4xx, a malformed answer.
    Permanent,
}

impl Failure {
    /// Whether retrying the same request can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Failure::Busy | Failure::Transient)
    }

    fn of_status(code: u16) -> Failure {
        match code {
            404 => Failure::NotFound,
            401 | 403 => Failure::Denied,
            429 | 503 => Failure::Busy,
            408 | 500..=599 => Failure::Transient,
            _ => Failure::Permanent,
        }
    }

    /// The meaning of one error of oci-client.
    pub fn of_oci(e: &oci_client::errors::OciDistributionError) -> Failure {
        use oci_client::errors::{OciDistributionError as E, OciErrorCode as C};
        match e {
            E::ImageManifestNotFoundError(_) => Failure::NotFound,
            E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => Failure::Denied,
            // A manifest push refused because a blob it names is unknown, right after we
            // uploaded that blob: the registry has not made it visible yet (another upload
            // of the same blob committing at once, an eventually consistent store). The
            // body is the spec's error envelope; its codes, not its text, decide.
            E::ServerError {
                code: 400, message, ..
            } if serde_json::from_str::<oci_client::errors::OciEnvelope>(message).is_ok_and(
                |env| {
                    env.errors
                        .iter()
                        .any(|e| matches!(e.code, C::ManifestBlobUnknown | C::BlobUnknown))
                },
            ) =>
            {
                Failure::Transient
            }
            E::ServerError { code, .. } => Failure::of_status(*code),
            E::RegistryError { envelope, .. } => {
                let codes: Vec<&C> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        C::ManifestUnknown
                            | C::BlobUnknown
                            | C::NameUnknown
                            | C::NotFound
                            | C::ManifestBlobUnknown
                    )
                }) {
                    Failure::NotFound
                } else if codes
                    .iter()
                    .any(|c| matches!(c, C::Unauthorized | C::Denied))
                {
                    Failure::Denied
                } else if codes.iter().any(|c| matches!(c, C::Toomanyrequests)) {
                    Failure::Busy
                } else {
                    Failure::Permanent
                }
            }
            E::RequestError(r) => Failure::of_reqwest(r),
            E::IoError(_) => Failure::Transient,
            _ => Failure::Permanent,
        }
    }

    /// The meaning of an answer to one of Beam's own reads: the registry's error codes
    /// first, then the status.
    pub fn of_read(e: &StatusError) -> Failure {
        let has = |names: &[&str]| e.codes.iter().any(|c| names.contains(&c.as_str()));
        if has(&[
            "MANIFEST_UNKNOWN",
            "BLOB_UNKNOWN",
            "NAME_UNKNOWN",
            "NOT_FOUND",
            "MANIFEST_BLOB_UNKNOWN",
        ]) {
            Failure::NotFound
        } else if has(&["UNAUTHORIZED", "DENIED"]) {
            Failure::Denied
        } else if has(&["TOOMANYREQUESTS"]) {
            Failure::Busy
        } else {
            Failure::of_status(e.status)
        }
    }

    fn of_reqwest(e: &reqwest::Error) -> Failure {
        match e.status() {
            Some(s) => Failure::of_status(s.as_u16()),
            // Connection refused or reset, timeouts, a body cut short.
            None => Failure::Transient,
        }
    }

    /// The meaning of an error chain: its first error of a known type decides. An error of
    /// no known type (a check of ours, such as a digest mismatch) is permanent.
    pub fn of(e: &anyhow::Error) -> Failure {
        for c in e.chain() {
            if let Some(s) = c.downcast_ref::<StatusError>() {
                return Failure::of_read(s);
            }
            if let Some(b) = c.downcast_ref::<BodyError>() {
                return match b {
                    BodyError::TooLong { .. } => Failure::Permanent,
                    BodyError::Read { .. } => Failure::Transient,
                };
            }
            if let Some(o) = c.downcast_ref::<oci_client::errors::OciDistributionError>() {
                return Failure::of_oci(o);
            }
            if let Some(r) = c.downcast_ref::<reqwest::Error>() {
                return Failure::of_reqwest(r);
            }
            if c.downcast_ref::<std::io::Error>().is_some() {
                return Failure::Transient;
            }
        }
        Failure::Permanent
    }
}

/// Parse `host[:port]/repo[:tag|@digest]`.
///
/// The distribution grammar is checked by hand first ([`parse_reference_fast`]); only what that
/// does not accept goes to oci-spec's parser, for its verdict and error. That parser's regex
/// (Unicode `\w`) takes about 40 ms to compile on first use, once in every `beam pull` and on
/// the daemon's first Prepare: a tenth of the pull step (issue 13).
pub fn parse_reference(s: &str) -> Result<Reference> {
    if let Some(r) = parse_reference_fast(s) {
        return Ok(r);
    }
    s.parse::<Reference>()
        .with_context(|| format!("invalid image reference {s:?}"))
}

/// The references the distribution grammar accepts with ASCII tags, parsed and normalised
/// exactly as oci-spec's `Reference::try_from` does (docker.io and `library/` for short names,
/// `latest` without tag or digest); `None` for anything else.
fn parse_reference_fast(s: &str) -> Option<Reference> {
    let (before, digest) = match s.split_once('@') {
        Some((b, d)) => (b, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest {
        let (algo, hex) = d.split_once(':')?;
        let algo_ok = algo.split(['-', '_', '+', '.']).all(|part| {
            let mut c = part.chars();
            c.next().is_some_and(|f| f.is_ascii_alphabetic())
                && c.all(|x| x.is_ascii_alphanumeric())
        });
        let want = match algo {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return None,
        };
        if !algo_ok || hex.len() != want || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
    }
    let last_slash = before.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match before[last_slash..].rfind(':') {
        Some(i) => (
            &before[..last_slash + i],
            Some(&before[last_slash + i + 1..]),
        ),
        None => (before, None),
    };
    if let Some(t) = tag {
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let b = t.as_bytes();
        if b.is_empty() || b.len() > 128 || !word(b[0]) {
            return None;
        }
        if !b[1..].iter().all(|&x| word(x) || x == b'.' || x == b'-') {
            return None;
        }
    }
    let parts: Vec<&str> = name.split('/').collect();
    let path_ok = |ps: &[&str]| !ps.is_empty() && ps.iter().all(|p| path_component(p));
    if !(path_ok(&parts) || (parts.len() > 1 && domain(parts[0]) && path_ok(&parts[1..]))) {
        return None;
    }
    // oci-spec's split_domain.
    let (mut registry, mut repository) = match name.split_once('/') {
        Some((left, right)) if left.contains('.') || left.contains(':') || left == "localhost" => {
            (left.to_string(), right.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if registry == "index.docker.io" {
        registry = "docker.io".to_string();
    }
    if registry == "docker.io" && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    if repository.len() > 255 {
        return None;
    }
    Some(match (tag, digest) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.to_string(), d.to_string())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.to_string()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").to_string()),
    })
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`: lowercase alphanumeric runs joined by `.`, `_`,
/// `__` or dashes.
fn path_component(p: &str) -> bool {
    let b = p.as_bytes();
    let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(&b[0]) || !alnum(&b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(&b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(&b[i]) {
            i += 1;
        }
        let sep = &p[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// `host[:port]`: dot-separated labels of alphanumerics with inner dashes, and digits after a
/// colon.
fn domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    host.split('.').all(|l| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
    })
}

impl Registry {
    pub fn new(opts: &RegistryOptions) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let protocol = if opts.plain_http {
            ClientProtocol::Http
        } else if !opts.plain_http_hosts.is_empty() {
            ClientProtocol::HttpsExcept(opts.plain_http_hosts.clone())
        } else {
            ClientProtocol::Https
        };
        let read = |files: &mut dyn Iterator<Item = &PathBuf>| -> Result<Vec<Certificate>> {
            files
                .map(|f| {
                    let data = std::fs::read(f)
                        .with_context(|| format!("reading CA file {}", f.display()))?;
                    Ok(Certificate {
                        encoding: CertificateEncoding::Pem,
                        data,
                    })
                })
                .collect()
        };
        let config = |certs| oci_config(&protocol, certs);
        // Each CA file is read once: the global ones, then each host's own (its client trusts
        // both).
        let roots = read(&mut opts.ca_files.iter())?;
        let mut host_clients = std::collections::BTreeMap::new();
        let mut host_roots = Vec::new();
        for (host, files) in &opts.host_ca_files {
            let own = read(&mut files.iter())?;
            host_roots.push((host.clone(), own.iter().map(|c| c.data.clone()).collect()));
            let certs = roots.iter().cloned().chain(own).collect();
            host_clients.insert(host.clone(), Client::new(config(certs)));
        }
        let reads = http::HttpReads::new(
            opts.plain_http,
            opts.plain_http_hosts.clone(),
            &roots.iter().map(|c| c.data.clone()).collect::<Vec<_>>(),
            &host_roots,
        )?;
        Ok(Registry {
            client: std::sync::OnceLock::new(),
            client_config: (protocol.clone(), roots),
            host_clients,
            docker_config: opts.docker_config.clone(),
            credentials: Default::default(),
            reads,
        })
    }

    /// Credentials for `registry`, from this client's Docker config file when it has one;
    /// read once per registry.
    fn auth(&self, registry: &str) -> RegistryAuth {
        let mut known = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        known
            .entry(registry.to_string())
            .or_insert_with(|| self.read_auth(registry))
            .clone()
    }

    fn read_auth(&self, registry: &str) -> RegistryAuth {
        match &self.docker_config {
            None => docker_auth(registry),
            Some(path) => docker_auth_from(path, registry),
        }
    }

    /// After a second 401: `registry`'s credentials read again (they may have been rotated).
    fn reread_auth(&self, registry: &str) -> RegistryAuth {
        let auth = self.read_auth(registry);
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(registry.to_string(), auth.clone());
        auth
    }

    /// The client for `r`'s host: its own when the host has CAs of its own.
    pub(crate) fn client(&self, r: &Reference) -> &Client {
        self.host_clients
            .get(r.registry())
            .or_else(|| self.host_clients.get(r.resolve_registry()))
            .unwrap_or_else(|| {
                self.client.get_or_init(|| {
                    let (protocol, roots) = &self.client_config;
                    Client::new(oci_config(protocol, roots.clone()))
                })
            })
    }

    /// Make sure credentials for `r`'s registry are known to the client.
    async fn login(&self, r: &Reference) -> Result<()> {
        let registry = r.resolve_registry();
        let auth = self.auth(registry);
        self.client(r).store_auth_if_needed(registry, &auth).await;
        Ok(())
    }

    /// Fetch a manifest or index by tag or digest: bytes, digest, media type.
    pub async fn manifest(&self, r: &Reference) -> Result<(Vec<u8>, String, String)> {
        let bytes = self
            .get_bounded(
                r,
                &http::manifest_path(r),
                &http::pull_scope(r),
                oci::MANIFEST_MEDIA_TYPES,
                MAX_MANIFEST_LEN,
            )
            .await
            .with_context(|| format!("fetching manifest {r}"))?;
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
        let mut resp = self
            .get_blob(r, &desc.digest)
            .await
            .with_context(|| format!("fetching blob {} of {r}", desc.digest))?;
        let mut file = tokio::fs::File::create(path)
            .await
            .with_context(|| format!("creating {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut n: u64 = 0;
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("reading blob {} of {r}", desc.digest))?
        {
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
        // A registry that sends more than the descriptor says is cut off there, not buffered.
        let out = self
            .get_bounded(
                r,
                &http::blob_path(r, &desc.digest),
                &http::pull_scope(r),
                &[],
                desc.size as usize,
            )
            .await
            .with_context(|| format!("fetching blob {} of {r}", desc.digest))?;
        if out.len() as u64 != desc.size || oci::sha256_digest(&out) != desc.digest {
            bail!(
                "blob {} of {r}: content does not match its descriptor",
                desc.digest
            );
        }
        Ok(out.to_vec())
    }

    /// The answer (200) to a GET of blob `digest`, its body not yet read.
    async fn get_blob(&self, r: &Reference, digest: &str) -> Result<reqwest::Response> {
        let resp = self
            .send_read(
                r,
                reqwest::Method::GET,
                &http::blob_path(r, digest),
                &http::pull_scope(r),
                |b| b,
            )
            .await?;
        Ok(http::expect_status(resp, &[reqwest::StatusCode::OK]).await?)
    }

    /// The answer to a GET of `len` bytes at `offset` of blob `digest`, its body not yet
    /// read, and whether it is the range (206) rather than the whole blob (200, from a
    /// registry that ignores Range). A 401 renews the token, then reads the credentials
    /// again, before the answer stands.
    pub async fn range_response(
        &self,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<(reqwest::Response, bool)> {
        let range = format!("bytes={offset}-{}", (offset + len).saturating_sub(1));
        let resp = self
            .send_read(
                r,
                reqwest::Method::GET,
                &http::blob_path(r, digest),
                &http::pull_scope(r),
                |b| b.header(reqwest::header::RANGE, range.as_str()),
            )
            .await?;
        let resp = http::expect_status(
            resp,
            &[
                reqwest::StatusCode::PARTIAL_CONTENT,
                reqwest::StatusCode::OK,
            ],
        )
        .await?;
        let partial = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        Ok((resp, partial))
    }

    /// Whether blob `digest` is in `r`'s repository.
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool> {
        self.login(r).await?;
        self.client(r)
            .blob_exists(r, digest)
            .await
            .with_context(|| format!("checking blob {digest} in {r}"))
    }

    /// Upload `data` as a blob unless the repository already has it.
    pub async fn push_blob_bytes(&self, r: &Reference, data: Vec<u8>) -> Result<Descriptor> {
        let digest = oci::sha256_digest(&data);
        let size = data.len() as u64;
        if !self.blob_exists(r, &digest).await? {
            self.client(r)
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
            self.client(r)
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
        self.client(r)
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
        self.client(r)
            .push_manifest_raw(r, bytes, ct)
            .await
            .with_context(|| format!("pushing manifest {digest} to {r}"))?;
        Ok(digest)
    }

    /// Every repository of the registry `host` (`/v2/_catalog`, page by page). Registries
    /// with token auth need a token with the `registry:catalog:*` scope for this; where that
    /// is not given, list the repositories in the configuration instead.
    pub async fn catalog(&self, host: &str) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            repositories: Option<Vec<String>>,
        }
        let r = parse_reference(&format!("{host}/catalog:latest"))?;
        self.list_pages(&r, "_catalog", "registry:catalog:*", |body| {
            Ok(serde_json::from_slice::<Page>(body)?
                .repositories
                .unwrap_or_default())
        })
        .await
        .with_context(|| format!("listing the repositories of {host}"))
    }

    /// Every tag of `r`'s repository, page by page.
    pub async fn tags(&self, r: &Reference) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let path = format!("{}/tags/list", r.repository());
        self.list_pages(r, &path, &http::pull_scope(r), |body| {
            Ok(serde_json::from_slice::<Page>(body)?
                .tags
                .unwrap_or_default())
        })
        .await
        .with_context(|| format!("listing the tags of {}", r.repository()))
    }

    /// The entries of a paginated list (`?n=&last=`), each page bounded.
    async fn list_pages(
        &self,
        r: &Reference,
        path: &str,
        scope: &str,
        entries: impl Fn(&[u8]) -> Result<Vec<String>>,
    ) -> Result<Vec<String>> {
        const PAGE: usize = 1000;
        let mut out: Vec<String> = Vec::new();
        loop {
            let mut page_path = format!("{path}?n={PAGE}");
            if let Some(last) = out.last() {
                page_path.push_str(&format!("&last={last}"));
            }
            let body = self
                .get_bounded(r, &page_path, scope, &[], http::MAX_LIST_BODY)
                .await?;
            let page = entries(&body)?;
            let n = page.len();
            out.extend(page);
            if n < PAGE {
                return Ok(out);
            }
        }
    }

    /// Referrers of manifest `subject` in `r`'s repository: the referrers API when the
    /// registry has it, else the referrers tag fallback. Empty when there are none.
    pub async fn referrers(&self, r: &Reference, subject: &str) -> Result<Vec<Descriptor>> {
        // Both at once: the API and the tag fallback (registries without the API, such as
        // Distribution 2.8, answer the first with 404), one round trip instead of two.
        let (api, tag) = tokio::join!(
            self.referrers_api(r, subject),
            self.referrers_tag_index(r, subject)
        );
        if let Ok(Some(index)) = api {
            if !index.manifests.is_empty() {
                return Ok(index.manifests);
            }
        }
        Ok(tag?.manifests)
    }

    /// The referrers API's index of `subject`; `None` from a registry without the API (404).
    async fn referrers_api(&self, r: &Reference, subject: &str) -> Result<Option<ImageIndex>> {
        let path = format!("{}/referrers/{subject}", r.repository());
        let resp = self
            .send_read(r, reqwest::Method::GET, &path, &http::pull_scope(r), |b| {
                b.header(reqwest::header::ACCEPT, oci::MEDIA_TYPE_OCI_INDEX)
            })
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = http::expect_status(resp, &[reqwest::StatusCode::OK]).await?;
        let body = http::read_body(resp, MAX_MANIFEST_LEN).await?;
        let index = serde_json::from_slice(&body)
            .with_context(|| format!("the referrers of {subject} are not an image index"))?;
        Ok(Some(index))
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
        if let Ok(Some(index)) = self.referrers_api(r, subject).await {
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

/// Whether an error chain says the registry has no such manifest or blob (by its type: see
/// [`Failure`]).
pub fn is_not_found(e: &anyhow::Error) -> bool {
    Failure::of(e) == Failure::NotFound
}

/// Credentials for `registry` from the Docker config; anonymous when there are none.
/// Never logged.
fn docker_server(registry: &str) -> &str {
    if registry == "docker.io" || registry == "index.docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    }
}

/// Credentials for `registry` from the Docker config file `path` (and its helpers).
pub fn docker_auth_from(path: &Path, registry: &str) -> RegistryAuth {
    let server = docker_server(registry);
    let cred = std::fs::File::open(path)
        .map_err(|e| e.to_string())
        .and_then(|f| {
            docker_credential::get_credential_from_reader(f, server).map_err(|e| e.to_string())
        });
    match cred {
        Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => {
            RegistryAuth::Basic(u, p)
        }
        Ok(docker_credential::DockerCredential::IdentityToken(t)) => RegistryAuth::Bearer(t),
        Err(e) => {
            tracing::debug!(registry, config = %path.display(), "no credentials: {e}");
            RegistryAuth::Anonymous
        }
    }
}

pub fn docker_auth(registry: &str) -> RegistryAuth {
    let server = docker_server(registry);
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

/// What to change so that a registry request that failed with `e` succeeds, when the cause is
/// a setting (plain HTTP vs HTTPS, an untrusted certificate, credentials, an unreachable
/// host); `None` otherwise (the message says it all). A failed TLS handshake is checked by
/// asking `host` over plain HTTP (2 s at most): only a registry that answers is said to serve
/// plain HTTP. Used for the daemon's fallbacks and `beam pull`'s own errors.
pub async fn diagnose(e: &anyhow::Error, host: &str) -> Option<String> {
    let text = format!("{e:#}").to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if has(&[
        "tls handshake eof",
        "invalid http version",
        "wrong version number",
        "corrupt message",
        "invalidcontenttype",
        "invalid content type",
        "http request to an https server",
        "record overflow",
    ]) {
        return Some(if answers_plain_http(host).await {
            format!(
                "the registry {host} answered plain HTTP; it serves plain HTTP: pass --plain-http \
                 to beam pull, or add it to hosts.toml (server = \"http://{host}\") or to \
                 beam-snapshotter's config ([[registry]] host = \"{host}\", plain_http = true) \
                 for every pull"
            )
        } else {
            format!(
                "the TLS handshake with {host} failed: check that it serves HTTPS on that port; a \
                 registry on plain HTTP needs --plain-http (beam pull) or server = \"http://{host}\" \
                 in its hosts.toml"
            )
        });
    }
    if has(&[
        "invalid peer certificate",
        "unknownissuer",
        "unknown issuer",
        "certificate verify failed",
        "notvalidforname",
        "bad certificate",
    ]) {
        Some(format!(
            "the TLS certificate of {host} is not trusted: pass --ca-file CA.pem to beam pull, or \
             add `ca = \"CA.pem\"` to its hosts.toml"
        ))
    } else if Failure::of(e) == Failure::Denied
        || has(&["401", "unauthorized", "403 forbidden", "denied"])
    {
        Some(format!(
            "{host} refused the credentials: log in (`docker login {host}` writes \
             ~/.docker/config.json; beam pull passes $DOCKER_CONFIG on) or fix the pull secret"
        ))
    } else if has(&[
        "connection refused",
        "dns error",
        "failed to lookup address",
        "no route to host",
        "timed out",
    ]) {
        Some(format!(
            "{host} cannot be reached: check the address and the node's network, or name a \
             mirror in hosts.toml"
        ))
    } else {
        None
    }
}

/// Whether `host` (`name[:port]`, port 80 if none) answers an HTTP/1.1 request in plain text.
async fn answers_plain_http(host: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
        s.write_all(
            format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf.starts_with(b"HTTP/1."))
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {

    /// The hand-written parser agrees with oci-spec's on every reference it accepts, and
    /// leaves to it what it does not (the same verdicts and errors as before).
    #[test]
    fn fast_reference_parsing_agrees_with_oci_spec() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "index.docker.io/foo/bar:x".into(),
            "docker.io/busybox".into(),
            "localhost/a:b".into(),
            "localhost:5000/a/b/c:v1.2-rc_3".into(),
            "127.0.0.1:41234/bench/python:1".into(),
            "my-host.example.com/ns/repo__x/y-z.w".into(),
            format!("127.0.0.1:5000/r@{d}"),
            format!("127.0.0.1:5000/r:t@{d}"),
            format!("r@{d}"),
            "a--b/c".into(),
            // Rejected by the grammar, or left to oci-spec.
            "".into(),
            "UPPER/case".into(),
            "host:5000/UPPER".into(),
            "a..b".into(),
            "a___b".into(),
            "a_-b".into(),
            "-a".into(),
            "a:".into(),
            "a:-tag".into(),
            format!("a:{}", "t".repeat(129)),
            "a@sha256:abc".into(),
            format!("a@md5:{}", "ab".repeat(16)),
            format!("a@sha256:{}", "zz".repeat(32)),
            "host:port/x".into(),
            "-host.com/x".into(),
            "h/".into(),
            "/x".into(),
            "a:tag:more".into(),
            "a:täg".into(),
            format!("x/{}", "a".repeat(300)),
        ];
        for c in &cases {
            let slow = c.parse::<Reference>();
            match parse_reference_fast(c) {
                Some(fast) => {
                    let slow =
                        slow.unwrap_or_else(|e| panic!("{c:?}: fast accepted, oci-spec: {e}"));
                    assert_eq!(
                        (
                            fast.registry(),
                            fast.repository(),
                            fast.tag(),
                            fast.digest()
                        ),
                        (
                            slow.registry(),
                            slow.repository(),
                            slow.tag(),
                            slow.digest()
                        ),
                        "{c:?}"
                    );
                }
                None => {
                    // Whatever oci-spec says stands (parse_reference asks it).
                    let _ = slow;
                }
            }
            assert_eq!(
                parse_reference(c).ok().map(|r| r.whole()),
                c.parse::<Reference>().ok().map(|r| r.whole()),
                "{c:?}"
            );
        }
        for common in ["busybox", "127.0.0.1:41234/bench/python:1"] {
            assert!(parse_reference_fast(common).is_some(), "{common}");
        }
    }
    use super::*;

    #[test]
    fn a_pulls_settings_reach_the_daemons_options_for_its_host_only() {
        let cli = RegistryOptions {
            plain_http: true,
            ca_files: vec!["/etc/ca.pem".into()],
            host_mirrors: [("r:5000".to_string(), vec!["m:5000".to_string()])].into(),
            mirrors: vec!["all:5000".into()],
            docker_config: Some("/home/u/.docker/config.json".into()),
            ..Default::default()
        };
        let t = cli.transport_for("r:5000");
        assert!(t.plain_http && !t.is_empty());
        assert_eq!(t.mirrors, ["m:5000", "all:5000"]);
        // Through the label and back.
        let label = serde_json::to_string(&t).unwrap();
        let back: PullTransport = serde_json::from_str(&label).unwrap();
        assert_eq!(back, t);

        let daemon = RegistryOptions {
            plain_http_hosts: vec!["other:5000".into()],
            host_mirrors: [("r:5000".to_string(), vec!["d:5000".to_string()])].into(),
            ..Default::default()
        };
        let o = daemon.with_transport(&back);
        assert!(!o.plain_http, "plain HTTP for the pull's host only");
        assert_eq!(o.plain_http_hosts, ["other:5000", "r:5000"]);
        // The pull's CA is trusted for its registry host only.
        assert!(o.ca_files.is_empty());
        assert_eq!(o.host_ca_files["r:5000"], [PathBuf::from("/etc/ca.pem")]);
        assert_eq!(
            o.transport_for("r:5000").ca_files,
            [PathBuf::from("/etc/ca.pem")]
        );
        assert!(o.transport_for("other:5000").ca_files.is_empty());
        assert_eq!(o.host_mirrors["r:5000"], ["m:5000", "all:5000", "d:5000"]);
        assert_eq!(
            o.docker_config,
            Some(PathBuf::from("/home/u/.docker/config.json"))
        );
        // A pull with no settings of its own sends nothing.
        assert!(RegistryOptions::default()
            .transport_for("r:5000")
            .is_empty());
        // Unknown fields are refused, not ignored.
        assert!(
            serde_json::from_str::<PullTransport>(r#"{"host":"r","skip_verify":true}"#).is_err()
        );
    }

    #[test]
    fn credentials_come_from_the_given_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        // "u:p" in base64.
        std::fs::write(&path, r#"{"auths":{"r:5000":{"auth":"dTpw"}}}"#).unwrap();
        assert!(matches!(
            docker_auth_from(&path, "r:5000"),
            RegistryAuth::Basic(u, p) if u == "u" && p == "p"
        ));
        assert!(matches!(
            docker_auth_from(&path, "elsewhere:5000"),
            RegistryAuth::Anonymous
        ));
    }

    /// A registry with token auth, in process: the distribution token protocol end to end
    /// (a challenge, a token fetched with the node's credentials, the token reused until the
    /// registry stops taking it, then a new one).
    #[tokio::test]
    async fn bearer_tokens_are_fetched_with_the_credentials_reused_and_renewed() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = l.local_addr().unwrap().to_string();
        // Tokens issued so far; only the latest is taken.
        let issued = Arc::new(AtomicU32::new(0));
        let server = {
            let issued = issued.clone();
            let host = host.clone();
            tokio::spawn(async move {
                loop {
                    let (mut c, _) = l.accept().await.unwrap();
                    let mut buf = vec![0u8; 8192];
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        let k = c.read(&mut buf[n..]).await.unwrap();
                        if k == 0 {
                            break;
                        }
                        n += k;
                    }
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
                    let auth = req
                        .lines()
                        .find_map(|l| l.strip_prefix("authorization: "))
                        .unwrap_or("")
                        .to_string();
                    let (status, extra, body) = if path.starts_with("/token?") {
                        // "u:p", as the Docker config below has it.
                        let scope_ok = path.contains("scope=repository%3Arepo%3Apull")
                            && path.contains("service=fake");
                        if auth == "Basic dTpw" && scope_ok {
                            let t = issued.fetch_add(1, Ordering::SeqCst) + 1;
                            (200, String::new(), format!(r#"{{"token":"tok-{t}"}}"#))
                        } else {
                            (401, String::new(), "{}".to_string())
                        }
                    } else {
                        let current = format!("Bearer tok-{}", issued.load(Ordering::SeqCst));
                        if auth == current {
                            (200, String::new(), r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"a","digest":"sha256:00","size":0},"layers":[]}"#.to_string())
                        } else {
                            (
                                401,
                                format!(
                                    "WWW-Authenticate: Bearer realm=\"http://{host}/token\",service=\"fake\"\r\n"
                                ),
                                r#"{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}"#
                                    .to_string(),
                            )
                        }
                    };
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = c.write_all(answer.as_bytes()).await;
                }
            })
        };

        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(
            &config,
            format!(r#"{{"auths":{{"{host}":{{"auth":"dTpw"}}}}}}"#),
        )
        .unwrap();
        let registry = Registry::new(&RegistryOptions {
            plain_http: true,
            docker_config: Some(config),
            ..Default::default()
        })
        .unwrap();
        let r = parse_reference(&format!("{host}/repo:1")).unwrap();

        registry.manifest(&r).await.unwrap();
        assert_eq!(issued.load(Ordering::SeqCst), 1, "one token fetched");
        registry.manifest(&r).await.unwrap();
        assert_eq!(issued.load(Ordering::SeqCst), 1, "the token is reused");
        // The registry stops taking it (expired, revoked): one new token, and on.
        issued.fetch_add(1, Ordering::SeqCst);
        registry.manifest(&r).await.unwrap();
        assert_eq!(issued.load(Ordering::SeqCst), 3, "one token renewed");
        server.abort();
    }

    #[tokio::test]
    async fn a_failed_handshake_is_called_plain_http_only_if_the_host_answers_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let e = anyhow::anyhow!("client error (Connect): tls handshake eof");
        // A plain-HTTP server.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = c.read(&mut buf).await;
            let _ = c
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                .await;
        });
        let fix = diagnose(&e, &host).await.unwrap();
        assert!(
            fix.contains("answered plain HTTP") && fix.contains("--plain-http"),
            "{fix}"
        );
        // A server that closes without a word: not said to be plain HTTP.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (c, _) = l.accept().await.unwrap();
            drop(c);
        });
        let fix = diagnose(&e, &host).await.unwrap();
        assert!(fix.contains("TLS handshake with"), "{fix}");
    }

    #[tokio::test]
    async fn other_registry_errors_name_the_setting() {
        let cert = anyhow::anyhow!("invalid peer certificate: UnknownIssuer");
        assert!(diagnose(&cert, "r").await.unwrap().contains("--ca-file"));
        let auth = anyhow::anyhow!("Not authorized: url https://r/v2/ 401");
        assert!(diagnose(&auth, "r").await.unwrap().contains("credentials"));
        // Not a setting: the message says it all.
        let none = anyhow::anyhow!("image sha256:00 has no Beam conversion");
        assert!(diagnose(&none, "r").await.is_none());
    }

    #[test]
    fn failures_are_told_apart_by_type_not_by_text() {
        use oci_client::errors::{OciDistributionError as E, OciEnvelope, OciError, OciErrorCode};
        let server = |code: u16| E::ServerError {
            code,
            // A referrers tag whose digest happens to contain "404".
            url: "https://r/v2/a/manifests/sha256-4040aa".into(),
            message: "404 not found".into(),
        };
        assert_eq!(
            Failure::of(&anyhow::Error::new(server(500))),
            Failure::Transient
        );
        assert!(!is_not_found(
            &anyhow::Error::new(server(502)).context("fetching 404")
        ));
        assert_eq!(
            Failure::of(&anyhow::Error::new(server(404))),
            Failure::NotFound
        );
        assert_eq!(Failure::of(&anyhow::Error::new(server(429))), Failure::Busy);
        assert_eq!(
            Failure::of(&anyhow::Error::new(server(403))),
            Failure::Denied
        );
        assert_eq!(
            Failure::of(&anyhow::Error::new(server(400))),
            Failure::Permanent
        );
        let envelope = |code| E::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError {
                    code,
                    message: String::new(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "https://r/v2/a/manifests/t".into(),
        };
        let unknown = anyhow::Error::new(envelope(OciErrorCode::ManifestUnknown)).context("x");
        assert!(is_not_found(&unknown));
        assert_eq!(
            Failure::of(&anyhow::Error::new(envelope(OciErrorCode::Denied))),
            Failure::Denied
        );
        assert_eq!(
            Failure::of(&anyhow::Error::new(E::UnauthorizedError {
                url: "u".into()
            })),
            Failure::Denied
        );
        // Distribution 2.8's answer to a manifest push racing another upload of a blob it
        // names (seen with two autoconvert replicas): worth another try.
        let racing = E::ServerError {
            code: 400,
            url: "http://r/v2/a/manifests/sha256:aa".into(),
            message: r#"{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content"},{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:44"}]}"#.into(),
        };
        assert_eq!(Failure::of(&anyhow::Error::new(racing)), Failure::Transient);
        // Text alone decides nothing.
        assert!(!is_not_found(&anyhow!("manifest sha256-404 unknown: 404")));
        assert!(!Failure::of(&anyhow!("HTTP 404")).is_retryable());
    }
}
