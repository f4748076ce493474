//! `beam convert`: convert every layer of an image and publish the Beam artifact beside it.
//!
//! Steps per image manifest: fetch each layer to a temp file (digest checked), decompress it
//! as a stream into [`convert_layer`](super::layer::convert_layer), push the index and chunk
//! blobs, then the artifact manifest (subject = the original manifest), then register it as a
//! referrer. When the destination differs from the source, the original image is copied
//! first, byte for byte, so the same reference runs on nodes without Beam. Everything is
//! deterministic: converting twice pushes nothing new.
//!
//! By default the conversion is **bound** ([`Binding::Bound`], issue 16): beside the original
//! manifest `M` (unchanged, the artifact's subject) a new manifest `M'` is pushed: `M`'s own
//! JSON plus the annotation `dev.beam.artifact` naming the artifact by digest, and the tag
//! moves to it (an index gets a new index naming the bound manifests). `M'` has `M`'s config
//! and layers, so nodes without Beam run it unchanged, and its digest, which users pin, sign and
//! deploy, covers the Beam layers: a Beam node uses only the artifact the pulled manifest binds
//! (unless its operator trusts referrers of the repository; docs/security.md). The unbound form
//! ([`Binding::Referrer`]) only attaches the artifact as a referrer of `M`.

use super::layer::{convert_layer, ConvertOptions, ConvertStats};
use super::{entrypoint, follows};
use crate::format::index::{with_follows, with_prefetch, IndexReader};
use crate::oci::{self, BeamLayer, Descriptor, LayerCompression};
use crate::store::{ResolvedManifest, Store};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{BufReader, Read};
use std::path::Path;

/// Result of converting one image manifest.
#[derive(Debug, Clone)]
pub struct ConvertedImage {
    pub subject: Descriptor,
    pub artifact: Descriptor,
    pub layers: Vec<BeamLayer>,
    pub stats: Vec<ConvertStats>,
    /// True when an identical artifact was already there.
    pub already: bool,
    /// The bound manifest naming the artifact (bound conversions).
    pub bound: Option<Descriptor>,
}

/// The tag named another image when the conversion was done than when it started: the bound
/// manifest is not pushed (the artifact of the image converted is, harmlessly).
#[derive(Debug, thiserror::Error)]
#[error(
    "{location} moved from {was} to {now} during the conversion; not binding it (convert it again)"
)]
pub struct TagMoved {
    pub location: String,
    pub was: String,
    pub now: String,
}

/// How the Beam artifact is tied to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Binding {
    /// A new manifest (the original's plus an annotation naming the artifact) takes the tag.
    #[default]
    Bound,
    /// The artifact is only attached as a referrer of the original manifest.
    Referrer,
}

/// Convert the image at `src` and publish to `dst`.
pub async fn convert_image(
    src: &Store,
    dst: &Store,
    same_place: bool,
    opts: &ConvertOptions,
    binding: Binding,
    progress: bool,
) -> Result<Vec<ConvertedImage>> {
    let bars = MultiProgress::with_draw_target(if progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let (top, top_bytes) = src.resolve_top().await?;
    let manifests = src.image_manifests_in(&top, top_bytes.clone()).await?;
    // A bound image again: nothing to do (its artifact is what it names).
    if let Some(done) = already_bound(src, &manifests).await? {
        if !same_place {
            bail!(
                "{} is already a bound Beam image; convert the original image to copy it",
                src.location()
            );
        }
        return Ok(done);
    }
    let tmp = tempfile::Builder::new()
        .prefix("beam-convert-")
        .tempdir()
        .context("creating a temp dir")?;

    if !same_place {
        copy_image(src, dst, &top, &top_bytes, &manifests, &bars).await?;
    }

    let mut out = Vec::new();
    for m in &manifests {
        out.push(convert_manifest(src, dst, m, opts, tmp.path(), &bars).await?);
    }
    if binding == Binding::Bound {
        if same_place {
            // Someone may have pushed to the tag while we converted: moving it to the bound
            // form of what it named before would throw their push away.
            let (now, _) = dst.resolve_top().await?;
            if now.digest != top.digest {
                return Err(TagMoved {
                    location: dst.location().to_string(),
                    was: top.digest.clone(),
                    now: now.digest,
                }
                .into());
            }
        }
        let tag = dst.tag().or_else(|| src.tag());
        bind(dst, &top, &top_bytes, &manifests, &mut out, tag.as_deref()).await?;
    }
    Ok(out)
}

/// When every manifest of the image is already bound to a valid artifact: the results.
async fn already_bound(
    src: &Store,
    manifests: &[ResolvedManifest],
) -> Result<Option<Vec<ConvertedImage>>> {
    if !manifests
        .iter()
        .all(|m| oci::bound_artifact(&m.manifest).is_some())
    {
        return Ok(None);
    }
    let mut out = Vec::new();
    for m in manifests {
        let found = src
            .find_beam_for(&m.desc.digest, &m.manifest, &crate::store::Trust::default())
            .await?
            .with_context(|| format!("{} names no Beam artifact", m.desc.digest))?;
        let bytes = src.manifest(&found.artifact).await?;
        let artifact: oci::ImageManifest = serde_json::from_slice(&bytes)?;
        let mut artifact_desc = Descriptor::new(
            oci::MEDIA_TYPE_OCI_MANIFEST,
            found.artifact.clone(),
            bytes.len() as u64,
        );
        artifact_desc.artifact_type = Some(oci::ARTIFACT_TYPE.into());
        out.push(ConvertedImage {
            subject: artifact.subject.clone().unwrap_or_else(|| m.desc.clone()),
            artifact: artifact_desc,
            layers: found.layers,
            stats: Vec::new(),
            already: true,
            bound: Some(m.desc.clone()),
        });
    }
    Ok(Some(out))
}

/// Push the bound form of each converted manifest (and of the index naming them), tagged
/// `tag`: the digest users pull then covers the Beam artifact.
async fn bind(
    dst: &Store,
    top: &Descriptor,
    top_bytes: &[u8],
    manifests: &[ResolvedManifest],
    out: &mut [ConvertedImage],
    tag: Option<&str>,
) -> Result<()> {
    let single = manifests.len() == 1 && manifests[0].desc.digest == top.digest;
    let mut replaced = std::collections::BTreeMap::new();
    for (m, c) in manifests.iter().zip(out.iter_mut()) {
        let bytes = oci::bind_manifest(&m.bytes, &c.artifact.digest)
            .with_context(|| format!("binding manifest {}", m.desc.digest))?;
        let desc = dst
            .put_manifest(
                bytes,
                &m.desc.media_type,
                if single { tag } else { None },
                None,
            )
            .await?;
        replaced.insert(m.desc.digest.clone(), desc.clone());
        c.bound = Some(desc);
    }
    if single {
        return Ok(());
    }
    // An index: the same index with each converted entry pointing at its bound manifest.
    let index = oci::repoint_index(top_bytes, &replaced)
        .with_context(|| format!("parsing image index {}", top.digest))?;
    dst.put_manifest(index, &top.media_type, tag, None).await?;
    Ok(())
}

async fn convert_manifest(
    src: &Store,
    dst: &Store,
    m: &ResolvedManifest,
    opts: &ConvertOptions,
    tmp: &Path,
    bars: &MultiProgress,
) -> Result<ConvertedImage> {
    // Every layer converted first (the entrypoint's files can be in any of them), then the
    // prefetch lists set, then everything pushed.
    let mut converted_layers = Vec::new();
    for (i, desc) in m.manifest.layers.iter().enumerate() {
        let compression =
            LayerCompression::from_media_type(&desc.media_type).with_context(|| {
                format!(
                    "layer {} has media type {}, which Beam cannot convert",
                    desc.digest, desc.media_type
                )
            })?;
        let layer_file = tmp.join(format!("layer-{i}"));
        let blob_file = tmp.join(format!("chunks-{i}"));
        src.blob_to_file(desc, &layer_file)
            .await
            .with_context(|| format!("fetching layer {}", desc.digest))?;
        let bar = bars.add(ProgressBar::new(desc.size));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("layer {}/{}", i + 1, m.manifest.layers.len()));
        let opts2 = opts.clone();
        let (lf, bf, bar2) = (layer_file.clone(), blob_file.clone(), bar.clone());
        let converted = tokio::task::spawn_blocking(move || -> Result<_> {
            let file = std::fs::File::open(&lf)?;
            let counted = ProgressReader {
                inner: file,
                bar: bar2,
            };
            let reader: Box<dyn Read + Send> = match compression {
                LayerCompression::None => Box::new(BufReader::with_capacity(1 << 20, counted)),
                LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
                    BufReader::with_capacity(1 << 20, counted),
                )),
                LayerCompression::Zstd => Box::new(zstd::stream::read::Decoder::new(counted)?),
            };
            let out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&bf)?);
            let c = convert_layer(reader, out, &opts2, None)?;
            Ok(c)
        })
        .await?
        .with_context(|| format!("converting layer {}", desc.digest))?;
        bar.finish_with_message(format!(
            "{} files, {} unique chunks",
            converted.stats.files, converted.stats.chunks_unique
        ));
        std::fs::remove_file(&layer_file).ok();
        converted_layers.push((desc, converted, blob_file));
    }
    let config = src.blob_bytes(&m.manifest.config, 16 << 20).await?;
    // Before anything is pushed: a layer that is not what the config says stops here.
    check_diff_ids(
        &config,
        &converted_layers
            .iter()
            .map(|(desc, c, _)| (desc.digest.as_str(), c.diff_id.as_str()))
            .collect::<Vec<_>>(),
    )?;
    let (lists, follows) = {
        let views = converted_layers
            .iter()
            .map(|(_, c, blob)| {
                Ok(entrypoint::Layer {
                    index: IndexReader::new(c.index.as_slice())?,
                    blob: blob.as_path(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ids = converted_layers
            .iter()
            .map(|(_, c, _)| {
                oci::sha256_bytes(&c.diff_id)
                    .with_context(|| format!("diff_id {} is not a sha256 digest", c.diff_id))
            })
            .collect::<Result<Vec<_>>>()?;
        (
            entrypoint::prefetch_lists(&views, &entrypoint::Process::of_config(&config)),
            follows::follows(&views, &ids),
        )
    };
    let edges: usize = follows.iter().map(|f| f.edges.len()).sum();
    if edges > 0 {
        tracing::info!(
            edges,
            bytes = edges * 8,
            "follows: what opening a file loads next (imports, libraries)"
        );
    }
    let files: usize = lists.iter().map(Vec::len).sum();
    if files > 0 {
        tracing::info!(files, "prefetch lists: the entrypoint and what it loads");
    }
    let mut layers = Vec::new();
    let mut stats = Vec::new();
    for (((desc, mut converted, blob_file), list), follows) in
        converted_layers.into_iter().zip(lists).zip(follows)
    {
        if !follows.edges.is_empty() {
            converted.index = with_follows(&converted.index, &follows.layers, &follows.edges)
                .with_context(|| format!("follows of layer {}", desc.digest))?;
        }
        if !list.is_empty() {
            converted.index = with_prefetch(&converted.index, &list)
                .with_context(|| format!("prefetch list of layer {}", desc.digest))?;
        }
        let index_blob = opts.index_packing.pack(converted.index);
        let index_size = index_blob.len() as u64;
        let index_digest = dst.put_blob_bytes(index_blob).await?;
        dst.put_blob_file(&blob_file, &converted.blob_digest, converted.blob_size)
            .await?;
        std::fs::remove_file(&blob_file).ok();
        layers.push(BeamLayer {
            source: desc.digest.clone(),
            diff_id: converted.diff_id.clone(),
            index: Descriptor::new(opts.index_packing.media_type(), index_digest, index_size),
            chunks: Descriptor::new(
                oci::MEDIA_TYPE_CHUNKS,
                converted.blob_digest.clone(),
                converted.blob_size,
            ),
        });
        stats.push(converted.stats);
    }
    dst.put_blob_bytes(oci::EMPTY_CONFIG.to_vec()).await?;
    let mut subject = m.desc.clone();
    subject.annotations.clear();
    subject.platform = None;
    let artifact = oci::artifact_manifest(subject.clone(), &layers, opts.chunk_size);
    let bytes = serde_json::to_vec(&artifact)?;
    let existing = dst.referrers(&subject.digest).await.unwrap_or_default();
    let digest = oci::sha256_digest(&bytes);
    let already = existing.iter().any(|d| d.digest == digest);
    let desc = dst
        .put_manifest(
            bytes,
            oci::MEDIA_TYPE_OCI_MANIFEST,
            None,
            Some(oci::ARTIFACT_TYPE),
        )
        .await?;
    let mut referrer = desc.clone();
    referrer.annotations.insert(
        oci::ANNOTATION_CHUNK_SIZE.into(),
        opts.chunk_size.to_string(),
    );
    dst.add_referrer(&subject.digest, &referrer).await?;
    Ok(ConvertedImage {
        subject,
        artifact: desc,
        layers,
        stats,
        already,
        bound: None,
    })
}

/// The image config's diff IDs must be the sha256 of the tars we read: otherwise the layer
/// is not what the image says it is.
/// `layers` are (layer digest, diff ID of what was converted), in order.
fn check_diff_ids(config: &[u8], layers: &[(&str, &str)]) -> Result<()> {
    let cfg: oci::ImageConfig = match serde_json::from_slice(config) {
        Ok(c) => c,
        Err(_) => return Ok(()), // not an image config (an artifact): nothing to check
    };
    if cfg.rootfs.diff_ids.len() != layers.len() {
        bail!(
            "image config lists {} diff IDs for {} layers",
            cfg.rootfs.diff_ids.len(),
            layers.len()
        );
    }
    for (want, (source, diff_id)) in cfg.rootfs.diff_ids.iter().zip(layers) {
        if want != diff_id {
            bail!(
                "layer {source}: uncompressed digest {diff_id} does not match the config's \
                 diff ID {want}"
            );
        }
    }
    Ok(())
}

/// Copy the original image (blobs, manifests, index, tag) from `src` to `dst` unchanged.
async fn copy_image(
    src: &Store,
    dst: &Store,
    top: &Descriptor,
    top_bytes: &[u8],
    manifests: &[ResolvedManifest],
    bars: &MultiProgress,
) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("beam-copy-").tempdir()?;
    let bar = bars.add(ProgressBar::new_spinner());
    bar.set_message("copying the original image");
    for m in manifests {
        let mut blobs = vec![m.manifest.config.clone()];
        blobs.extend(m.manifest.layers.iter().cloned());
        for b in blobs {
            let p = tmp.path().join("blob");
            src.blob_to_file(&b, &p).await?;
            dst.put_blob_file(&p, &b.digest, b.size).await?;
            std::fs::remove_file(&p).ok();
        }
        if m.desc.digest != top.digest {
            dst.put_manifest(m.bytes.clone(), &m.desc.media_type, None, None)
                .await?;
        }
    }
    let tag = dst.tag().or_else(|| src.tag());
    dst.put_manifest(top_bytes.to_vec(), &top.media_type, tag.as_deref(), None)
        .await?;
    bar.finish_and_clear();
    Ok(())
}

struct ProgressReader<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}
