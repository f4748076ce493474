//! OCI image types Beam reads and writes, its media types and annotations, and the Beam
//! artifact that links converted layers to the original image.
//!
//! A converted image is the original image, untouched, plus one **Beam artifact** per image
//! manifest: an OCI 1.1 image manifest whose `subject` is the original manifest, whose
//! `artifactType` is [`ARTIFACT_TYPE`], and whose `layers` are, for every original layer in
//! order, the layer's index blob then its chunk blob. Nodes without Beam never look at it;
//! nodes with Beam find it through the referrers API, or the referrers tag fallback
//! (`sha256-<hex>`) on registries without that API (Distribution 2.8). See `docs/format.md`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `artifactType` of a Beam artifact manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.beam.image.v1";
/// Media type of a layer's index blob.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.beam.layer.index.v1";
/// Media type of a layer's index blob packed with lz4 (`format::index::packed`): what
/// `beam convert` writes by default. Daemons before it refuse such an artifact (unexpected
/// media type) and the node pulls the image as containerd would.
pub const MEDIA_TYPE_INDEX_LZ4: &str = "application/vnd.beam.layer.index.v1+lz4";
/// Media type of a layer's chunk blob.
pub const MEDIA_TYPE_CHUNKS: &str = "application/vnd.beam.layer.chunks.v1";
/// Annotation on both blobs of a Beam layer: digest of the original (compressed) layer.
pub const ANNOTATION_SOURCE_LAYER: &str = "dev.beam.layer.source";
/// Annotation on both blobs of a Beam layer: diff ID (sha256 of the uncompressed tar).
pub const ANNOTATION_DIFF_ID: &str = "dev.beam.layer.diff-id";
/// Annotation on the index blob: digest of the matching chunk blob.
pub const ANNOTATION_CHUNKS: &str = "dev.beam.layer.chunks";
/// Annotation on the artifact: Beam format version of its indexes.
pub const ANNOTATION_FORMAT_VERSION: &str = "dev.beam.format.version";
/// Annotation on the artifact: chunk size used.
pub const ANNOTATION_CHUNK_SIZE: &str = "dev.beam.chunk-size";
/// Annotation on a bound image manifest (the original's config and layers, plus this): the
/// digest of its Beam artifact. The manifest's digest, which users pin, sign and deploy, so
/// covers the Beam layers too (docs/security.md).
pub const ANNOTATION_BOUND_ARTIFACT: &str = "dev.beam.artifact";

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The empty JSON object `{}` used as config of artifacts (OCI 1.1).
pub const EMPTY_CONFIG: &[u8] = b"{}";
/// Annotation naming a tag in an OCI layout's index.json.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The Beam artifact a manifest binds (its [`ANNOTATION_BOUND_ARTIFACT`]), if any.
pub fn bound_artifact(manifest: &ImageManifest) -> Option<&str> {
    manifest
        .annotations
        .get(ANNOTATION_BOUND_ARTIFACT)
        .map(String::as_str)
}

/// The bound form of image manifest `original` (its JSON bytes): the same document with the
/// annotation naming `artifact` added. Every other field is kept as it is, so nodes without
/// Beam pull and run it unchanged.
pub fn bind_manifest(original: &[u8], artifact: &str) -> serde_json::Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(original)?;
    let Some(obj) = v.as_object_mut() else {
        return Err(serde::de::Error::custom("a manifest is a JSON object"));
    };
    let annotations = obj
        .entry("annotations")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    let Some(annotations) = annotations.as_object_mut() else {
        return Err(serde::de::Error::custom(
            "manifest annotations are not an object",
        ));
    };
    annotations.insert(ANNOTATION_BOUND_ARTIFACT.into(), artifact.into());
    serde_json::to_vec(&v)
}

/// Image index `index` (its JSON bytes) with each entry whose digest is a key of `replaced`
/// pointing at that descriptor's digest and size instead; every other field is kept.
pub fn repoint_index(
    index: &[u8],
    replaced: &BTreeMap<String, Descriptor>,
) -> serde_json::Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(index)?;
    if let Some(entries) = v.get_mut("manifests").and_then(|m| m.as_array_mut()) {
        for e in entries {
            let new = e
                .get("digest")
                .and_then(|d| d.as_str())
                .and_then(|d| replaced.get(d));
            if let Some(b) = new {
                e["digest"] = b.digest.clone().into();
                e["size"] = b.size.into();
            }
        }
    }
    serde_json::to_vec(&v)
}

/// Every manifest media type Beam asks a registry for.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_LIST,
];

/// How an original layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    /// From a layer media type; `None` for media types that are not layers Beam converts.
    pub fn from_media_type(mt: &str) -> Option<Self> {
        match mt {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => {
                Some(LayerCompression::None)
            }
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip" => {
                Some(LayerCompression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(LayerCompression::Zstd)
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: String, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            artifact_type: None,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

/// An image manifest (OCI or Docker schema 2; same shape for what Beam uses).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index / manifest list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageIndex {
    pub fn empty() -> Self {
        ImageIndex {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_INDEX.into()),
            manifests: Vec::new(),
            annotations: BTreeMap::new(),
        }
    }
}

/// The parts of an image config Beam reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Whether `s` is a well-formed `sha256:<64 hex>` digest (safe to use in a file path).
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The 32 bytes of a well-formed `sha256:<64 hex>` digest.
pub fn sha256_bytes(s: &str) -> Option<[u8; 32]> {
    if !is_sha256_digest(s) {
        return None;
    }
    hex::decode(&s["sha256:".len()..]).ok()?.try_into().ok()
}

/// Tag of the OCI referrers tag fallback for `digest` (`sha256-<hex>`).
pub fn referrers_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

/// The Beam layer of one original layer, as listed in an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeamLayer {
    /// Digest of the original layer blob.
    pub source: String,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    pub index: Descriptor,
    pub chunks: Descriptor,
}

/// How a layer's index is stored in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IndexPacking {
    /// lz4 ([`MEDIA_TYPE_INDEX_LZ4`]): about half the bytes before a layer can mount.
    #[default]
    Lz4,
    /// As encoded ([`MEDIA_TYPE_INDEX`]): readable by daemons older than packed indexes.
    Plain,
}

impl IndexPacking {
    /// The packing of an index blob of media type `media_type`, if it is an index blob.
    pub fn of_media_type(media_type: &str) -> Option<IndexPacking> {
        match media_type {
            MEDIA_TYPE_INDEX_LZ4 => Some(IndexPacking::Lz4),
            MEDIA_TYPE_INDEX => Some(IndexPacking::Plain),
            _ => None,
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            IndexPacking::Lz4 => MEDIA_TYPE_INDEX_LZ4,
            IndexPacking::Plain => MEDIA_TYPE_INDEX,
        }
    }

    /// The blob to store for the encoded index `index`.
    pub fn pack(self, index: Vec<u8>) -> Vec<u8> {
        match self {
            IndexPacking::Lz4 => crate::format::index::packed::pack(&index),
            IndexPacking::Plain => index,
        }
    }
}

/// The encoded index in `blob`, the bytes of the index descriptor `desc` (already checked
/// against its digest), unpacked as its media type says; at most `max_len` bytes.
pub fn index_of_blob(
    desc: &Descriptor,
    blob: Vec<u8>,
    max_len: usize,
) -> Result<Vec<u8>, crate::format::IndexError> {
    match IndexPacking::of_media_type(&desc.media_type) {
        Some(IndexPacking::Lz4) => crate::format::index::packed::unpack(&blob, max_len),
        // An artifact's layers were checked to be index blobs when it was read.
        Some(IndexPacking::Plain) | None => Ok(blob),
    }
}

/// Build the artifact manifest for `layers` (in image order) of the image `subject`.
pub fn artifact_manifest(
    subject: Descriptor,
    layers: &[BeamLayer],
    chunk_size: u32,
) -> ImageManifest {
    let mut descs = Vec::with_capacity(layers.len() * 2);
    for l in layers {
        let mut index = l.index.clone();
        if IndexPacking::of_media_type(&index.media_type).is_none() {
            index.media_type = MEDIA_TYPE_INDEX.into();
        }
        index
            .annotations
            .insert(ANNOTATION_SOURCE_LAYER.into(), l.source.clone());
        index
            .annotations
            .insert(ANNOTATION_DIFF_ID.into(), l.diff_id.clone());
        index
            .annotations
            .insert(ANNOTATION_CHUNKS.into(), l.chunks.digest.clone());
        let mut chunks = l.chunks.clone();
        chunks.media_type = MEDIA_TYPE_CHUNKS.into();
        chunks
            .annotations
            .insert(ANNOTATION_SOURCE_LAYER.into(), l.source.clone());
        chunks
            .annotations
            .insert(ANNOTATION_DIFF_ID.into(), l.diff_id.clone());
        descs.push(index);
        descs.push(chunks);
    }
    let mut annotations = BTreeMap::new();
    annotations.insert(
        ANNOTATION_FORMAT_VERSION.into(),
        crate::format::FORMAT_VERSION.to_string(),
    );
    annotations.insert(ANNOTATION_CHUNK_SIZE.into(), chunk_size.to_string());
    ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config: Descriptor::new(
            MEDIA_TYPE_EMPTY,
            sha256_digest(EMPTY_CONFIG),
            EMPTY_CONFIG.len() as u64,
        ),
        layers: descs,
        subject: Some(subject),
        annotations,
    }
}

/// Why a manifest is not a Beam artifact Beam can use.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("manifest is not a Beam artifact (artifactType {0:?})")]
    NotBeam(Option<String>),
    #[error("Beam artifact has format version {0}; this build reads {v}", v = crate::format::FORMAT_VERSION)]
    Version(String),
    #[error("Beam artifact is malformed: {0}")]
    Malformed(String),
}

/// Read the Beam layers out of an artifact manifest.
pub fn parse_artifact(m: &ImageManifest) -> Result<Vec<BeamLayer>, ArtifactError> {
    if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
        return Err(ArtifactError::NotBeam(m.artifact_type.clone()));
    }
    let v = m
        .annotations
        .get(ANNOTATION_FORMAT_VERSION)
        .map(String::as_str)
        .unwrap_or("");
    if v != crate::format::FORMAT_VERSION.to_string() {
        return Err(ArtifactError::Version(v.to_string()));
    }
    if m.layers.len() % 2 != 0 {
        return Err(ArtifactError::Malformed(format!(
            "{} layer descriptors, expected pairs of index and chunks",
            m.layers.len()
        )));
    }
    let mut out = Vec::new();
    for pair in m.layers.chunks(2) {
        let (index, chunks) = (&pair[0], &pair[1]);
        if IndexPacking::of_media_type(&index.media_type).is_none()
            || chunks.media_type != MEDIA_TYPE_CHUNKS
        {
            return Err(ArtifactError::Malformed(format!(
                "unexpected media types {} / {}",
                index.media_type, chunks.media_type
            )));
        }
        let source = index.annotation(ANNOTATION_SOURCE_LAYER).unwrap_or("");
        let diff_id = index.annotation(ANNOTATION_DIFF_ID).unwrap_or("");
        if !is_sha256_digest(source)
            || !is_sha256_digest(diff_id)
            || !is_sha256_digest(&index.digest)
            || !is_sha256_digest(&chunks.digest)
            || index.annotation(ANNOTATION_CHUNKS) != Some(chunks.digest.as_str())
        {
            return Err(ArtifactError::Malformed(format!(
                "layer {} has missing or bad digests/annotations",
                index.digest
            )));
        }
        out.push(BeamLayer {
            source: source.into(),
            diff_id: diff_id.into(),
            index: index.clone(),
            chunks: chunks.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: char) -> String {
        format!("sha256:{}", n.to_string().repeat(64))
    }

    #[test]
    fn artifact_round_trips() {
        let layers = vec![BeamLayer {
            source: d('a'),
            diff_id: d('b'),
            index: Descriptor::new(MEDIA_TYPE_INDEX, d('c'), 10),
            chunks: Descriptor::new(MEDIA_TYPE_CHUNKS, d('d'), 20),
        }];
        let subject = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, d('e'), 30);
        let m = artifact_manifest(subject.clone(), &layers, 4096);
        let json = serde_json::to_vec(&m).unwrap();
        let back: ImageManifest = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.subject, Some(subject));
        let parsed = parse_artifact(&back).unwrap();
        assert_eq!(parsed[0].source, layers[0].source);
        assert_eq!(parsed[0].chunks.digest, layers[0].chunks.digest);
        // Deterministic bytes.
        assert_eq!(
            json,
            serde_json::to_vec(&artifact_manifest(
                back.subject.clone().unwrap(),
                &layers,
                4096
            ))
            .unwrap()
        );
    }

    #[test]
    fn an_index_is_stored_packed_or_as_is_as_its_media_type_says() {
        let index = crate::format::index::sample().encode().unwrap();
        let layer = |packing: IndexPacking| BeamLayer {
            source: d('a'),
            diff_id: d('b'),
            index: Descriptor::new(packing.media_type(), d('c'), 10),
            chunks: Descriptor::new(MEDIA_TYPE_CHUNKS, d('d'), 20),
        };
        for packing in [IndexPacking::Lz4, IndexPacking::Plain] {
            let subject = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, d('e'), 30);
            let m = artifact_manifest(subject, &[layer(packing)], 4096);
            let parsed = parse_artifact(&m).unwrap();
            assert_eq!(parsed[0].index.media_type, packing.media_type());
            let blob = packing.pack(index.clone());
            assert_eq!(
                index_of_blob(&parsed[0].index, blob, index.len()).unwrap(),
                index
            );
        }
        // A packed blob under the plain media type is not unpacked (and then fails the index
        // reader); a plain one under the lz4 media type is refused.
        let plain = Descriptor::new(MEDIA_TYPE_INDEX, d('c'), 10);
        let packed = IndexPacking::Lz4.pack(index.clone());
        assert_eq!(
            index_of_blob(&plain, packed.clone(), 1 << 20).unwrap(),
            packed
        );
        let lz4 = Descriptor::new(MEDIA_TYPE_INDEX_LZ4, d('c'), 10);
        assert!(matches!(
            index_of_blob(&lz4, index, 1 << 20),
            Err(crate::format::IndexError::BadPacking(_))
        ));
        // Any other media type in an index's place is refused with the artifact.
        let subject = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, d('e'), 30);
        let mut m = artifact_manifest(subject, &[layer(IndexPacking::Lz4)], 4096);
        m.layers[0].media_type = "application/vnd.beam.layer.index.v1+zstd".into();
        assert!(matches!(
            parse_artifact(&m),
            Err(ArtifactError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_artifacts_are_refused() {
        let subject = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, d('e'), 30);
        let mut m = artifact_manifest(subject, &[], 4096);
        m.layers.push(Descriptor::new(
            MEDIA_TYPE_INDEX,
            "sha256:../../etc".into(),
            1,
        ));
        assert!(parse_artifact(&m).is_err());
        m.layers.clear();
        m.artifact_type = None;
        assert!(matches!(
            parse_artifact(&m),
            Err(ArtifactError::NotBeam(None))
        ));
    }

    #[test]
    fn digests_are_checked_before_use_in_paths() {
        assert!(is_sha256_digest(&d('a')));
        assert!(!is_sha256_digest("sha256:../x"));
        assert!(!is_sha256_digest(&d('A')));
        assert_eq!(referrers_tag(&d('a')), format!("sha256-{}", "a".repeat(64)));
    }

    #[test]
    fn binding_adds_the_artifact_and_repointing_keeps_every_other_field() {
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"c","digest":"sha256:c","size":1},"layers":[],"x-other":7}"#;
        let bound: serde_json::Value =
            serde_json::from_slice(&bind_manifest(m, "sha256:a").unwrap()).unwrap();
        assert_eq!(bound["annotations"][ANNOTATION_BOUND_ARTIFACT], "sha256:a");
        assert_eq!(bound["x-other"], 7);
        let index = br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:m","size":1,"platform":{"os":"linux"}},{"digest":"sha256:k","size":2}]}"#;
        let replaced = [(
            "sha256:m".to_string(),
            Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, "sha256:b".into(), 9),
        )]
        .into_iter()
        .collect();
        let v: serde_json::Value =
            serde_json::from_slice(&repoint_index(index, &replaced).unwrap()).unwrap();
        assert_eq!(v["manifests"][0]["digest"], "sha256:b");
        assert_eq!(v["manifests"][0]["size"], 9);
        assert_eq!(v["manifests"][0]["platform"]["os"], "linux");
        assert_eq!(v["manifests"][1]["digest"], "sha256:k");
    }
}
