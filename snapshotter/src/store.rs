//! One interface over the two places images live: a registry (`host[:port]/repo:tag`) and an
//! OCI layout on disk (`oci:DIR[:tag]`). Conversion, unpacking and the tests use it so that
//! every command accepts both.

use crate::layout::Layout;
use crate::oci::{self, Descriptor, ImageIndex, ImageManifest};
use crate::registry::{self, Registry, RegistryOptions};
use anyhow::{bail, Context, Result};
use oci_client::Reference;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where an image is.
#[derive(Debug, Clone)]
pub enum Location {
    Registry(Reference),
    Layout { dir: PathBuf, tag: Option<String> },
}

impl Location {
    /// Parse `oci:DIR[:TAG]` or a registry reference.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("oci:") {
            if let Some((dir, tag)) = rest.rsplit_once(':') {
                if !tag.contains('/') && !tag.is_empty() {
                    return Ok(Location::Layout {
                        dir: dir.into(),
                        tag: Some(tag.into()),
                    });
                }
            }
            return Ok(Location::Layout {
                dir: rest.into(),
                tag: None,
            });
        }
        Ok(Location::Registry(registry::parse_reference(s)?))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Registry(r) => write!(f, "{r}"),
            Location::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            Location::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
        }
    }
}

/// An image store: a registry repository or an OCI layout.
pub enum Store {
    Registry {
        reference: Reference,
        /// One client per daemon or command: connections and tokens are reused across layers.
        registry: Arc<Registry>,
        /// Mirrors tried for every host, before the origin.
        mirrors: Vec<String>,
        /// Mirrors of one host (containerd's `hosts.toml`), tried first.
        host_mirrors: std::collections::BTreeMap<String, Vec<String>>,
    },
    Layout {
        dir: PathBuf,
        tag: Option<String>,
        layout: Layout,
    },
}

/// A resolved image manifest (one platform).
#[derive(Debug, Clone)]
pub struct ResolvedManifest {
    pub desc: Descriptor,
    pub manifest: ImageManifest,
    pub bytes: Vec<u8>,
}

impl Store {
    /// A registry location served by an existing client (one client per daemon: its
    /// connections and tokens are reused across layers).
    pub fn with_registry(
        reference: Reference,
        registry: Arc<Registry>,
        opts: &RegistryOptions,
    ) -> Self {
        Store::Registry {
            reference,
            registry,
            mirrors: opts.mirrors.clone(),
            host_mirrors: opts.host_mirrors.clone(),
        }
    }

    /// Open `location`. `create` makes an OCI layout when missing.
    pub fn open(location: Location, opts: &RegistryOptions, create: bool) -> Result<Self> {
        match location {
            Location::Registry(reference) => Ok(Store::with_registry(
                reference,
                Arc::new(Registry::new(opts)?),
                opts,
            )),
            Location::Layout { dir, tag } => {
                let layout = if create {
                    Layout::create(&dir)?
                } else {
                    Layout::open(&dir)?
                };
                Ok(Store::Layout { dir, tag, layout })
            }
        }
    }

    /// Where this store is.
    pub fn location(&self) -> Location {
        match self {
            Store::Registry { reference, .. } => Location::Registry(reference.clone()),
            Store::Layout { dir, tag, .. } => Location::Layout {
                dir: dir.clone(),
                tag: tag.clone(),
            },
        }
    }

    /// The tag of this location, if any.
    pub fn tag(&self) -> Option<String> {
        match self {
            Store::Registry { reference, .. } => reference.tag().map(String::from),
            Store::Layout { tag, .. } => tag.clone(),
        }
    }

    /// The top-level descriptor and bytes the location names (a manifest or an index).
    pub async fn resolve_top(&self) -> Result<(Descriptor, Vec<u8>)> {
        match self {
            Store::Registry {
                registry: reg,
                reference: r,
                ..
            } => {
                let (bytes, digest, mt) = reg.manifest(r).await?;
                let size = bytes.len() as u64;
                Ok((Descriptor::new(&mt, digest, size), bytes))
            }
            Store::Layout { layout: l, tag, .. } => {
                let d = l.resolve(tag.as_deref())?;
                let bytes = l.blob(&d.digest)?;
                Ok((d, bytes))
            }
        }
    }

    /// A manifest by digest, checked.
    pub async fn manifest(&self, digest: &str) -> Result<Vec<u8>> {
        match self {
            Store::Registry {
                registry: reg,
                reference: r,
                ..
            } => Ok(reg.manifest(&registry::with_digest(r, digest)).await?.0),
            Store::Layout { layout: l, .. } => l.blob(digest),
        }
    }

    /// Every image manifest the location names: the manifest itself, or each platform
    /// manifest of an index (attestation entries are skipped).
    pub async fn image_manifests(&self) -> Result<Vec<ResolvedManifest>> {
        let (top, bytes) = self.resolve_top().await?;
        self.image_manifests_in(&top, bytes).await
    }

    /// [`Store::image_manifests`], given what [`Store::resolve_top`] answered; an index's
    /// manifests are fetched at once, in its order.
    pub async fn image_manifests_in(
        &self,
        top: &Descriptor,
        bytes: Vec<u8>,
    ) -> Result<Vec<ResolvedManifest>> {
        let mt = registry::media_type_of(&bytes)?;
        if let Some(index) = index_of(top, &mt, &bytes)? {
            let images = index
                .manifests
                .iter()
                .filter(|d| d.platform.as_ref().is_none_or(|p| p.os != "unknown"));
            return futures_util::future::try_join_all(images.map(|d| self.resolved_manifest(d)))
                .await;
        }
        let manifest: ImageManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing manifest {}", top.digest))?;
        Ok(vec![ResolvedManifest {
            desc: Descriptor::new(&mt, top.digest.clone(), top.size),
            manifest,
            bytes,
        }])
    }

    /// The manifest of the current platform (linux/amd64 or the host's arch).
    pub async fn platform_manifest(&self) -> Result<ResolvedManifest> {
        let (top, bytes) = self.resolve_top().await?;
        self.platform_manifest_in(&top, bytes).await
    }

    /// The manifest of the current platform, given what [`Store::resolve_top`] answered: the
    /// manifest itself, or the entry of the index whose platform is this host's, fetched
    /// alone (as containerd picks it). Only an index whose entries name no platform costs
    /// more: its manifests are fetched at once and matched on their configs.
    ///
    /// Most images in public registries are indexes. Asking the registry for the top again,
    /// then for every platform's manifest and config in turn, cost a pull about ten round
    /// trips on a five-platform image before its first layer.
    pub async fn platform_manifest_in(
        &self,
        top: &Descriptor,
        bytes: Vec<u8>,
    ) -> Result<ResolvedManifest> {
        let mt = registry::media_type_of(&bytes)?;
        let arch = host_arch();
        if let Some(index) = index_of(top, &mt, &bytes)? {
            if let Some(entry) = platform_entry(&index.manifests, arch) {
                return self.resolved_manifest(entry).await;
            }
        }
        // A manifest, or an index that names no entry for this platform: each manifest's
        // config decides.
        let all = self.image_manifests_in(top, bytes).await?;
        if all.len() == 1 {
            return Ok(all.into_iter().next().expect("one"));
        }
        let configs = futures_util::future::try_join_all(
            all.iter()
                .map(|m| self.blob_bytes(&m.manifest.config, 1 << 20)),
        )
        .await?;
        for (m, cfg) in all.into_iter().zip(configs) {
            let v: serde_json::Value = serde_json::from_slice(&cfg)?;
            if v.get("architecture").and_then(|a| a.as_str()) == Some(arch)
                && v.get("os").and_then(|a| a.as_str()) == Some("linux")
            {
                return Ok(m);
            }
        }
        bail!("{}: no linux/{arch} image", self.location())
    }

    /// The manifest an index entry names, fetched and checked.
    async fn resolved_manifest(&self, entry: &Descriptor) -> Result<ResolvedManifest> {
        let bytes = self.manifest(&entry.digest).await?;
        let manifest: ImageManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing manifest {}", entry.digest))?;
        Ok(ResolvedManifest {
            desc: Descriptor::new(
                &registry::media_type_of(&bytes)?,
                entry.digest.clone(),
                bytes.len() as u64,
            ),
            manifest,
            bytes,
        })
    }

    /// Download a blob to a file, checked.
    pub async fn blob_to_file(&self, desc: &Descriptor, path: &Path) -> Result<()> {
        match self {
            Store::Registry {
                registry: reg,
                reference: r,
                ..
            } => reg.blob_to_file(r, desc, path).await,
            Store::Layout { layout: l, .. } => {
                let src = l.blob_path(&desc.digest)?;
                tokio::fs::copy(&src, path)
                    .await
                    .with_context(|| format!("copying {}", src.display()))?;
                let digest = file_digest(path).await?;
                if digest != desc.digest {
                    bail!("{}: content does not match its digest", src.display());
                }
                Ok(())
            }
        }
    }

    /// A small blob, checked.
    pub async fn blob_bytes(&self, desc: &Descriptor, max: u64) -> Result<Vec<u8>> {
        match self {
            Store::Registry {
                registry: reg,
                reference: r,
                ..
            } => reg.blob_bytes(r, desc, max).await,
            Store::Layout { layout: l, .. } => {
                if desc.size > max {
                    bail!("blob {} is over the {max}-byte limit", desc.digest);
                }
                l.blob(&desc.digest)
            }
        }
    }

    /// Referrers of `subject`.
    pub async fn referrers(&self, subject: &str) -> Result<Vec<Descriptor>> {
        match self {
            Store::Registry {
                registry: reg,
                reference: r,
                ..
            } => reg.referrers(r, subject).await,
            Store::Layout { layout: l, .. } => l.referrers(subject),
        }
    }

    /// Store a blob from a file.
    pub async fn put_blob_file(&self, path: &Path, digest: &str, size: u64) -> Result<()> {
        match self {
            Store::Registry {
                registry: reg,
                reference: r,
                ..
            } => reg.push_blob_file(r, path, digest, size).await,
            Store::Layout { layout: l, .. } => l.put_blob_file(path, digest),
        }
    }

    /// Store a blob from memory; returns its digest.
    pub async fn put_blob_bytes(&self, data: Vec<u8>) -> Result<String> {
        match self {
            Store::Registry {
                registry: reg,
                reference: r,
                ..
            } => Ok(reg.push_blob_bytes(r, data).await?.digest),
            Store::Layout { layout: l, .. } => l.put_blob(&data),
        }
    }

    /// Store a manifest, tagged `tag` if given, and return its descriptor. In a layout the
    /// manifest is listed in index.json (with the tag as `ref.name`).
    pub async fn put_manifest(
        &self,
        bytes: Vec<u8>,
        media_type: &str,
        tag: Option<&str>,
        artifact_type: Option<&str>,
    ) -> Result<Descriptor> {
        let mut desc = Descriptor::new(media_type, oci::sha256_digest(&bytes), bytes.len() as u64);
        desc.artifact_type = artifact_type.map(String::from);
        match self {
            Store::Registry {
                registry: reg,
                reference: r,
                ..
            } => {
                let at = match tag {
                    Some(t) => registry::with_tag(r, t),
                    None => registry::with_digest(r, &desc.digest),
                };
                reg.push_manifest(&at, bytes, media_type).await?;
            }
            Store::Layout { layout: l, .. } => {
                l.put_blob(&bytes)?;
                let mut entry = desc.clone();
                if let Some(t) = tag {
                    entry
                        .annotations
                        .insert(oci::ANNOTATION_REF_NAME.into(), t.into());
                }
                l.add_manifest(entry)?;
            }
        }
        Ok(desc)
    }

    /// Where the blob `desc` can be read by byte range: the registry (mirrors first, then the
    /// origin) or the layout's blob file.
    pub fn range_source(&self, desc: &Descriptor) -> Result<Arc<dyn crate::blob::RangeSource>> {
        match self {
            Store::Registry {
                registry,
                reference: r,
                mirrors,
                host_mirrors,
            } => {
                let mut locations: Vec<Reference> = host_mirrors
                    .get(r.registry())
                    .into_iter()
                    .flatten()
                    .chain(mirrors.iter())
                    .map(|m| {
                        Reference::with_digest(
                            m.clone(),
                            r.repository().to_string(),
                            desc.digest.clone(),
                        )
                    })
                    .collect();
                locations.push(registry::with_digest(r, &desc.digest));
                Ok(Arc::new(crate::blob::RegistryBlob {
                    registry: registry.clone(),
                    locations,
                    digest: desc.digest.clone(),
                }))
            }
            Store::Layout { layout: l, .. } => Ok(Arc::new(crate::blob::LayoutBlob {
                path: l.blob_path(&desc.digest)?,
            })),
        }
    }

    /// Make artifact `desc` findable from `subject`.
    pub async fn add_referrer(&self, subject: &str, desc: &Descriptor) -> Result<()> {
        match self {
            Store::Registry {
                registry: reg,
                reference: r,
                ..
            } => reg.add_referrer(r, subject, desc).await,
            // put_manifest already listed it in index.json.
            Store::Layout { .. } => Ok(()),
        }
    }

    /// The image manifest of this platform and its Beam conversion (artifact digest and layers,
    /// which must match the manifest's layers one for one), or an error saying to convert.
    /// Command-line tools (`beam mount`, `unpack`, `record`) act on an image the user names
    /// and accept referrer-found artifacts ([`Trust::any_referrer`]); the daemon applies
    /// the node's [`Trust`].
    pub async fn beam_image(&self) -> Result<(ResolvedManifest, String, Vec<oci::BeamLayer>)> {
        let m = self.platform_manifest().await?;
        let Some(found) = self
            .find_beam_for(&m.desc.digest, &m.manifest, &Trust::any_referrer())
            .await?
        else {
            bail!(
                "{} ({}) has no Beam conversion; run `beam convert` first",
                self.location(),
                m.desc.digest
            );
        };
        Ok((m, found.artifact, found.layers))
    }

    /// The Beam artifact that may serve image manifest `subject` under `trust` (the manifest
    /// is fetched; see [`Store::find_beam_for`]).
    pub async fn find_beam(&self, subject: &str, trust: &Trust) -> Result<Option<FoundBeam>> {
        self.find_beam_hinted(subject, &ManifestHints::default(), trust)
            .await
    }

    /// [`Store::find_beam`], taking the image manifest and its bound artifact from `hints`
    /// where their digests match (a pull fetched them already), else from the registry.
    pub async fn find_beam_hinted(
        &self,
        subject: &str,
        hints: &ManifestHints,
        trust: &Trust,
    ) -> Result<Option<FoundBeam>> {
        let hinted = hints
            .manifest
            .as_deref()
            .filter(|m| oci::sha256_digest(m) == subject);
        tracing::debug!(
            manifest_hint = hinted.is_some(),
            artifact_hint = hints.artifact.is_some(),
            "finding the Beam artifact"
        );
        let bytes = match hinted {
            Some(b) => b.to_vec(),
            None => self.manifest(subject).await?,
        };
        let manifest: ImageManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing manifest {subject}"))?;
        self.find_beam_in(subject, &manifest, trust, hints.artifact.as_deref())
            .await
    }

    /// The Beam artifact that may serve image manifest `manifest` (digest `subject`) under
    /// `trust`:
    /// - the artifact the manifest binds (its `dev.beam.artifact` annotation; the digest the
    ///   user pulled covers it), always; the referrers are then not asked at all;
    /// - else an artifact found by the referrers of `subject`, only in a repository `trust`
    ///   lists (anyone with push rights can attach one); one found elsewhere is an error that
    ///   says why it was refused and what to do;
    /// - else none (the image was not converted).
    ///
    /// The artifact's layers must match the manifest's one for one.
    pub async fn find_beam_for(
        &self,
        subject: &str,
        manifest: &ImageManifest,
        trust: &Trust,
    ) -> Result<Option<FoundBeam>> {
        self.find_beam_in(subject, manifest, trust, None).await
    }

    /// [`Store::find_beam_for`], with the bound artifact's manifest bytes when the caller has
    /// them (used only if their digest is the bound one).
    pub async fn find_beam_in(
        &self,
        subject: &str,
        manifest: &ImageManifest,
        trust: &Trust,
        artifact_hint: Option<&[u8]>,
    ) -> Result<Option<FoundBeam>> {
        if let Some(artifact) = oci::bound_artifact(manifest) {
            let (layers, _) = self
                .beam_artifact(artifact, artifact_hint)
                .await
                .with_context(|| format!("Beam artifact {artifact} bound by {subject}"))?;
            check_layers_match(artifact, &layers, manifest, subject)?;
            return Ok(Some(FoundBeam {
                artifact: artifact.to_string(),
                layers,
                admitted: Admission::Bound,
            }));
        }
        let mut refs = self.referrers(subject).await?;
        // Newest first, and artifacts with a recorded prefetch list before those without.
        refs.reverse();
        refs.sort_by_key(|d| !d.annotations.contains_key("dev.beam.prefetch"));
        let mut last_err = None;
        for d in refs.iter() {
            if d.artifact_type.as_deref() != Some(oci::ARTIFACT_TYPE) {
                continue;
            }
            let layers = match self.beam_artifact(&d.digest, None).await {
                Ok((layers, of)) if of.as_deref() == Some(subject) => layers,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(artifact = %d.digest, "skipping Beam artifact: {e:#}");
                    last_err = Some(e);
                    continue;
                }
            };
            let Some(rule) = trust.admits(&self.repository()) else {
                bail!(
                    "Beam artifact {} is attached to {subject} as a referrer only, and {} is not \
                     a trusted repository (a referrer can be pushed by anyone with push rights): \
                     convert with `beam convert` (which binds the artifact into the image) and \
                     pull the image it prints, or trust the repository on this node \
                     ([remote] trust_referrers, --trust-referrers)",
                    d.digest,
                    self.repository()
                );
            };
            check_layers_match(&d.digest, &layers, manifest, subject)?;
            return Ok(Some(FoundBeam {
                artifact: d.digest.clone(),
                layers,
                admitted: Admission::TrustedReferrer(rule),
            }));
        }
        if let Some(e) = last_err {
            tracing::debug!("no usable Beam artifact: {e:#}");
        }
        Ok(None)
    }

    /// The layers of Beam artifact `digest`, and the digest of its subject.
    async fn beam_artifact(
        &self,
        digest: &str,
        hint: Option<&[u8]>,
    ) -> Result<(Vec<oci::BeamLayer>, Option<String>)> {
        let bytes = match hint.filter(|b| oci::sha256_digest(b) == digest) {
            Some(b) => b.to_vec(),
            None => self.manifest(digest).await?,
        };
        let m: ImageManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing Beam artifact {digest}"))?;
        Ok((oci::parse_artifact(&m)?, m.subject.map(|s| s.digest)))
    }

    /// `registry/repository` of a registry store; `oci:DIR` of a layout.
    pub fn repository(&self) -> String {
        match self {
            Store::Registry { reference, .. } => {
                format!("{}/{}", reference.registry(), reference.repository())
            }
            Store::Layout { dir, .. } => format!("oci:{}", dir.display()),
        }
    }
}

/// Manifests a caller already holds (`beam pull` passes them with its Prepares: labels
/// [`crate::labels::PULL_MANIFEST`], [`crate::labels::PULL_ARTIFACT`]); each is used only
/// where its digest is the one that would be fetched.
#[derive(Debug, Clone, Default)]
pub struct ManifestHints {
    pub manifest: Option<Vec<u8>>,
    pub artifact: Option<Vec<u8>>,
}

/// A Beam artifact admitted to serve an image, and by which rule.
#[derive(Debug, Clone)]
pub struct FoundBeam {
    pub artifact: String,
    pub layers: Vec<oci::BeamLayer>,
    pub admitted: Admission,
}

/// The rule that admitted a Beam artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The pulled manifest names it by digest.
    Bound,
    /// Found by referrers in a repository the node trusts (the matching pattern).
    TrustedReferrer(String),
}

impl std::fmt::Display for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Admission::Bound => write!(f, "bound by the image manifest"),
            Admission::TrustedReferrer(p) => write!(f, "referrer in trusted repository {p}"),
        }
    }
}

/// Which referrer-found (unbound) Beam artifacts a node accepts: those of the repositories
/// it lists. Patterns are `host[:port]/repository`, `host[:port]/prefix/*` or `*`; an OCI
/// layout on local disk is always trusted (whoever can write it owns the node's files).
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub referrer_repositories: Vec<String>,
}

impl Trust {
    /// Every referrer (command-line tools acting on an image the user names).
    pub fn any_referrer() -> Trust {
        Trust {
            referrer_repositories: vec!["*".into()],
        }
    }

    /// The pattern that admits referrers of `repository` (`host/repo`, or `oci:DIR`).
    pub fn admits(&self, repository: &str) -> Option<String> {
        if repository.starts_with("oci:") {
            return Some("(local OCI layout)".into());
        }
        self.referrer_repositories
            .iter()
            .find(|p| {
                p.as_str() == "*"
                    || p.as_str() == repository
                    || p.strip_suffix("/*")
                        .is_some_and(|prefix| repository.starts_with(&format!("{prefix}/")))
            })
            .cloned()
    }
}

/// An artifact's layers must be the manifest's, in order.
fn check_layers_match(
    artifact: &str,
    layers: &[oci::BeamLayer],
    manifest: &ImageManifest,
    subject: &str,
) -> Result<()> {
    if layers.len() != manifest.layers.len()
        || layers
            .iter()
            .zip(&manifest.layers)
            .any(|(b, o)| b.source != o.digest)
    {
        bail!("Beam artifact {artifact} does not match the layers of {subject}");
    }
    Ok(())
}

/// sha256 of a file, as `sha256:<hex>`.
pub async fn file_digest(path: &Path) -> Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(format!("sha256:{}", hex::encode(h.finalize())))
    })
    .await?
}

/// `bytes` (of media type `mt`, named by `top`) parsed as an image index, or `None` when it
/// is a manifest.
fn index_of(top: &Descriptor, mt: &str, bytes: &[u8]) -> Result<Option<ImageIndex>> {
    if mt != oci::MEDIA_TYPE_OCI_INDEX && mt != oci::MEDIA_TYPE_DOCKER_LIST {
        return Ok(None);
    }
    let index = serde_json::from_slice(bytes)
        .with_context(|| format!("parsing image index {}", top.digest))?;
    Ok(Some(index))
}

/// The index entry for linux on `arch`: the first entry of that OS and architecture that
/// names no variant (on arm64 `v8` is the same), else the first of any variant (this host's
/// CPU level is not checked). `None` when no entry names that platform.
fn platform_entry<'a>(entries: &'a [Descriptor], arch: &str) -> Option<&'a Descriptor> {
    let matching: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .collect();
    let plain = matching.iter().find(|d| {
        d.platform
            .as_ref()
            .and_then(|p| p.variant.as_deref())
            .is_none_or(|v| arch == "arm64" && v == "v8")
    });
    plain.or(matching.first()).copied()
}

/// This host's architecture in OCI terms.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image manifest whose config says `arch`, stored in `layout`; its descriptor.
    fn put_image(layout: &Layout, arch: &str) -> Descriptor {
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let config_digest = layout.put_blob(config.as_bytes()).unwrap();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[]}}"#,
            oci::MEDIA_TYPE_OCI_MANIFEST,
            config.len()
        );
        let digest = layout.put_blob(manifest.as_bytes()).unwrap();
        Descriptor::new(oci::MEDIA_TYPE_OCI_MANIFEST, digest, manifest.len() as u64)
    }

    /// `entries` as an index tagged `t` in a new layout at `dir`; the store that opens it.
    fn tagged_index(dir: &Path, layout: &Layout, entries: Vec<Descriptor>) -> Store {
        let index = ImageIndex {
            schema_version: 2,
            media_type: Some(oci::MEDIA_TYPE_OCI_INDEX.into()),
            manifests: entries,
            annotations: Default::default(),
        };
        let bytes = serde_json::to_vec(&index).unwrap();
        let digest = layout.put_blob(&bytes).unwrap();
        let mut desc = Descriptor::new(oci::MEDIA_TYPE_OCI_INDEX, digest, bytes.len() as u64);
        desc.annotations
            .insert(oci::ANNOTATION_REF_NAME.into(), "t".into());
        layout.add_manifest(desc).unwrap();
        let loc = Location::parse(&format!("oci:{}:t", dir.display())).unwrap();
        Store::open(loc, &RegistryOptions::default(), false).unwrap()
    }

    fn with_platform(mut d: Descriptor, arch: &str, variant: Option<&str>) -> Descriptor {
        d.platform = Some(oci::Platform {
            architecture: arch.into(),
            os: "linux".into(),
            variant: variant.map(String::from),
        });
        d
    }

    /// An index's entry for this host is fetched alone: the other platforms' manifests are
    /// never asked for (here they are not even stored, and asking would fail), as containerd
    /// picks it. Before, every platform's manifest and config were fetched in turn.
    #[tokio::test]
    async fn an_index_entry_for_this_platform_is_the_only_manifest_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let host = put_image(&layout, host_arch());
        let other_arch = if host_arch() == "arm64" {
            "amd64"
        } else {
            "arm64"
        };
        let missing = Descriptor::new(
            oci::MEDIA_TYPE_OCI_MANIFEST,
            oci::sha256_digest(b"a manifest this layout does not hold"),
            40,
        );
        let store = tagged_index(
            dir.path(),
            &layout,
            vec![
                with_platform(missing.clone(), other_arch, Some("v8")),
                with_platform(host.clone(), host_arch(), None),
                with_platform(missing, "s390x", None),
            ],
        );
        let m = store.platform_manifest().await.unwrap();
        assert_eq!(m.desc.digest, host.digest);
        assert!(m.manifest.layers.is_empty());
    }

    /// An index whose entries name no platform: each manifest's config decides.
    #[tokio::test]
    async fn an_index_without_platforms_is_matched_on_the_configs() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let other = put_image(&layout, "riscv64");
        let host = put_image(&layout, host_arch());
        let store = tagged_index(dir.path(), &layout, vec![other, host.clone()]);
        assert_eq!(
            store.platform_manifest().await.unwrap().desc.digest,
            host.digest
        );
        let only_other = put_image(&layout, "riscv64");
        let third = put_image(&layout, "ppc64le");
        let store = tagged_index(dir.path(), &layout, vec![only_other, third]);
        let err = store.platform_manifest().await.unwrap_err();
        assert!(format!("{err:#}").contains("no linux/"), "{err:#}");
    }

    #[test]
    fn the_platform_entry_prefers_no_variant_then_takes_the_first_match() {
        let d = |n: &[u8]| Descriptor::new(oci::MEDIA_TYPE_OCI_MANIFEST, oci::sha256_digest(n), 1);
        let entries = vec![
            with_platform(d(b"a"), "arm64", Some("v9")),
            with_platform(d(b"b"), "arm64", Some("v8")),
            with_platform(d(b"c"), "amd64", Some("v3")),
            with_platform(d(b"e"), "amd64", None),
        ];
        assert_eq!(platform_entry(&entries, "arm64"), Some(&entries[1]));
        assert_eq!(platform_entry(&entries, "amd64"), Some(&entries[3]));
        assert_eq!(platform_entry(&entries[..3], "amd64"), Some(&entries[2]));
        assert_eq!(platform_entry(&entries, "riscv64"), None);
        assert_eq!(platform_entry(&entries[..1], "arm64"), Some(&entries[0]));
    }

    /// A hinted manifest is used only when its digest is the subject's: then nothing is
    /// fetched (here the layout does not even hold it); a hint that does not match is ignored
    /// and the manifest is fetched (here: missing, an error).
    #[tokio::test]
    async fn manifest_hints_are_used_only_when_their_digest_matches() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::parse(&format!("oci:{}", dir.path().display())).unwrap();
        let store = Store::open(loc, &RegistryOptions::default(), true).unwrap();
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
        let subject = oci::sha256_digest(manifest);
        let trust = Trust::any_referrer();
        let hints = ManifestHints {
            manifest: Some(manifest.to_vec()),
            artifact: None,
        };
        let found = store.find_beam_hinted(&subject, &hints, &trust).await;
        assert!(matches!(found, Ok(None)), "{found:?}");
        let mut tampered = manifest.to_vec();
        tampered.extend_from_slice(b" ");
        let hints = ManifestHints {
            manifest: Some(tampered),
            artifact: None,
        };
        let found = store.find_beam_hinted(&subject, &hints, &trust).await;
        assert!(found.is_err(), "the tampered hint was used: {found:?}");
    }
}
