//! `beam convert`: convert an image's layers into Beam layers and publish the Beam artifact.

use super::RegistryFlags;
use anyhow::Result;
use beam::convert::image::{convert_image, Binding};
use beam::convert::ConvertOptions;
use beam::store::{Location, Store};
use std::io::IsTerminal;

/// Flags of `beam convert`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    registry: RegistryFlags,
    /// Chunk size in bytes (4 KiB to 16 MiB).
    #[arg(long, default_value_t = beam::format::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Worker threads for hashing and compression (default: one per core).
    #[arg(long)]
    jobs: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// How each layer's index is stored: `lz4` (about half the bytes a node fetches before a
    /// layer mounts) or `none`, which daemons older than packed indexes also read.
    #[arg(long, value_enum, default_value_t = IndexCompression::Lz4)]
    index_compression: IndexCompression,
    /// Only attach the Beam artifact as a referrer of the original manifest; the tag keeps
    /// naming the original. By default the artifact is bound: a new manifest (the original's
    /// config and layers, plus the artifact's digest) takes the tag, so the digest users pin
    /// covers the Beam layers. Nodes use unbound artifacts only from repositories they trust.
    #[arg(long)]
    unbound: bool,
    /// Source image: `host[:port]/repo:tag` or `oci:DIR[:TAG]`.
    src: String,
    /// Destination (default: the source). The original image is copied there unchanged.
    dst: Option<String>,
}

/// Values of `--index-compression`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum IndexCompression {
    Lz4,
    None,
}

pub async fn run(args: Args) -> Result<()> {
    let Args {
        registry,
        chunk_size,
        index_compression,
        jobs,
        json,
        unbound,
        src,
        dst,
    } = args;
    let opts = registry.options()?;
    let src_loc = Location::parse(&src)?;
    let same_place = dst.is_none();
    let dst_loc = match &dst {
        Some(d) => Location::parse(d)?,
        None => src_loc.clone(),
    };
    let src_store = Store::open(src_loc, &opts, false)?;
    let dst_store = Store::open(dst_loc, &opts, true)?;
    let mut copts = ConvertOptions {
        chunk_size,
        index_packing: match index_compression {
            IndexCompression::Lz4 => beam::oci::IndexPacking::Lz4,
            IndexCompression::None => beam::oci::IndexPacking::Plain,
        },
        ..ConvertOptions::default()
    };
    if let Some(j) = jobs {
        copts.workers = j.max(1);
    }
    let progress = std::io::stderr().is_terminal() && !json;
    let started = std::time::Instant::now();
    let binding = if unbound {
        Binding::Referrer
    } else {
        Binding::Bound
    };
    let results = convert_image(
        &src_store, &dst_store, same_place, &copts, binding, progress,
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        let v: Vec<_> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "subject": r.subject.digest,
                    "artifact": r.artifact.digest,
                    "bound": r.bound.as_ref().map(|b| &b.digest),
                    "already_converted": r.already,
                    "layers": r.layers.iter().zip(&r.stats).map(|(l, s)| serde_json::json!({
                        "source": l.source,
                        "diff_id": l.diff_id,
                        "index": l.index.digest,
                        "index_size": l.index.size,
                        "chunks": l.chunks.digest,
                        "chunks_size": l.chunks.size,
                        "files": s.files,
                        "file_bytes": s.file_bytes,
                        "tar_bytes": s.tar_bytes,
                        "chunks_total": s.chunks_total,
                        "chunks_unique": s.chunks_unique,
                    })).collect::<Vec<_>>(),
                    "seconds": secs,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for r in &results {
            let tar: u64 = r.stats.iter().map(|s| s.tar_bytes).sum();
            let beam: u64 = r.layers.iter().map(|l| l.index.size + l.chunks.size).sum();
            println!(
                "{} {} -> Beam artifact {} ({} layers, {:.1} MB of tar -> {:.1} MB, {:.1}s){}",
                dst_store.location(),
                r.subject.digest,
                r.artifact.digest,
                r.layers.len(),
                tar as f64 / 1e6,
                beam as f64 / 1e6,
                secs,
                if r.already {
                    " (already converted)"
                } else {
                    ""
                }
            );
            if let Some(b) = &r.bound {
                println!("bound image {} (pull this digest, or the tag)", b.digest);
            }
        }
    }
    Ok(())
}
