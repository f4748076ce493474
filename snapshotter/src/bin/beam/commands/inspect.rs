//! `beam inspect`: an image's Beam conversion (artifact, layers, chunk counts).

use super::RegistryFlags;
use anyhow::{bail, Context, Result};
use beam::store::{Location, Store};

/// Flags of `beam inspect`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    registry: RegistryFlags,
    image: String,
}

pub async fn run(args: Args) -> Result<()> {
    let Args { registry, image } = args;

    let store = Store::open(Location::parse(&image)?, &registry.options()?, false)?;
    let m = store.platform_manifest().await?;
    let Some(found) = store
        .find_beam_for(
            &m.desc.digest,
            &m.manifest,
            &beam::store::Trust::any_referrer(),
        )
        .await?
    else {
        bail!("{image} ({}) has no Beam conversion", m.desc.digest);
    };
    println!("image    {}", m.desc.digest);
    let layers = found.layers;
    println!("artifact {} ({})", found.artifact, found.admitted);
    for l in layers {
        let blob = store
            .blob_bytes(&l.index, beam::format::index::MAX_INDEX_LEN as u64)
            .await?;
        let idx = beam::oci::index_of_blob(&l.index, blob, beam::format::index::MAX_INDEX_LEN)
            .with_context(|| format!("index of layer {}", l.source))?;
        let packing = match beam::oci::IndexPacking::of_media_type(&l.index.media_type) {
            Some(beam::oci::IndexPacking::Lz4) => format!(", lz4 of {} bytes", idx.len()),
            _ => String::new(),
        };
        let r = beam::format::IndexReader::new(idx)
            .with_context(|| format!("index of layer {}", l.source))?;
        println!(
                    "layer {}\n  index {} ({} bytes{packing}, {} inodes, chunk size {}, {} files to prefetch)\n  chunks {} ({} bytes, {} unique chunks)",
                    l.source,
                    l.index.digest,
                    l.index.size,
                    r.inode_count(),
                    r.chunk_size(),
                    r.prefetch().count(),
                    l.chunks.digest,
                    l.chunks.size,
                    r.chunk_count()
                );
    }
    Ok(())
}
