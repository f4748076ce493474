//! `beam cache`: the local chunk cache's size (`stats`) and cleanup (`prune`).

use super::CacheFlags;
use anyhow::Result;
use clap::Subcommand;

/// Flags of `beam cache`: one of its subcommands.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Chunks, files and indexes in the cache, and their sizes.
    Stats {
        #[command(flatten)]
        cache: CacheFlags,
        #[arg(long)]
        json: bool,
    },
    /// Remove cached chunks, oldest first, down to `--to` bytes (default: everything). When
    /// beam-snapshotter serves this cache, the prune goes through it and keeps every chunk a
    /// mounted layer pins; otherwise the directory is pruned here (a running `beam mount`
    /// fetches again what it needs).
    Prune {
        #[command(flatten)]
        cache: CacheFlags,
        #[arg(long, default_value_t = 0)]
        to: u64,
        /// The daemon's socket.
        #[arg(long, default_value = "/run/beam/beam.sock")]
        address: std::path::PathBuf,
    },
}

pub async fn run(args: Args) -> Result<()> {
    match args.command {
        CacheCommand::Stats { cache, json } => {
            let c = beam::cache::ChunkCache::open(&cache.cache_dir, cache.cache_budget)?;
            let s = c.stats()?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "dir": cache.cache_dir,
                        "chunks": s.chunks, "chunk_bytes": s.chunk_bytes,
                        "files": s.files, "file_bytes": s.file_bytes,
                        "indexes": s.indexes, "index_bytes": s.index_bytes,
                        "total_bytes": s.total_bytes(),
                    })
                );
            } else {
                println!("cache     {}", cache.cache_dir.display());
                println!(
                    "chunks    {} ({:.1} MB)",
                    s.chunks,
                    s.chunk_bytes as f64 / 1e6
                );
                println!(
                    "files     {} ({:.1} MB, passthrough backing)",
                    s.files,
                    s.file_bytes as f64 / 1e6
                );
                println!(
                    "indexes   {} ({:.1} MB)",
                    s.indexes,
                    s.index_bytes as f64 / 1e6
                );
                println!("total     {:.1} MB", s.total_bytes() as f64 / 1e6);
            }
            Ok(())
        }
        CacheCommand::Prune { cache, to, address } => {
            if let Some(p) =
                beam::daemon::control::prune_through(&address, &cache.cache_dir, to).await?
            {
                println!(
                    "removed {} chunks and {} files, freed {:.1} MB (through beam-snapshotter at \
                     {}: chunks its mounted layers use were kept; {:.1} MB left)",
                    p.removed_chunks,
                    p.removed_files,
                    p.freed_bytes as f64 / 1e6,
                    address.display(),
                    p.used_bytes as f64 / 1e6
                );
                return Ok(());
            }
            let c = beam::cache::ChunkCache::open(&cache.cache_dir, cache.cache_budget)?;
            let p = c.prune(to)?;
            println!(
                "removed {} chunks and {} files, freed {:.1} MB",
                p.removed_chunks,
                p.removed_files,
                p.freed_bytes as f64 / 1e6
            );
            Ok(())
        }
    }
}
