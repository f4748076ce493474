//! `beam mount`: mount a converted image (or one of its layers) read-only and lazily, until
//! Ctrl-C or SIGTERM.

use super::{CacheFlags, RegistryFlags};
use anyhow::{Context, Result};
use beam::registry::RegistryOptions;
use beam::store::{Location, Store};
use std::path::PathBuf;

/// Flags of `beam mount`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    registry: RegistryFlags,
    /// Do not fetch the rest of the layers in the background.
    #[arg(long)]
    no_background_fetch: bool,
    /// Serve every read from the daemon (no FUSE passthrough for cached files).
    #[arg(long)]
    no_passthrough: bool,
    #[command(flatten)]
    cache: CacheFlags,
    /// Give up on a chunk after this many seconds (reads then fail with EIO).
    #[arg(long, default_value_t = 60.0)]
    fetch_deadline: f64,
    /// Concurrent Range requests for reads (foreground) and background fetch.
    #[arg(long, default_value_t = 8)]
    fetch_concurrency: usize,
    #[arg(long, default_value_t = 2)]
    background_concurrency: usize,
    /// Cap background fetch at this many bytes per second (reads are never capped).
    #[arg(long)]
    background_rate: Option<u64>,
    /// FUSE threads per layer.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Where per-layer mountpoints are made.
    #[arg(long, default_value = "/run/beam/mounts")]
    work_dir: PathBuf,
    /// Image (`host[:port]/repo:tag` or `oci:DIR[:TAG]`), optionally `@LAYER_DIGEST`.
    image: String,
    dir: PathBuf,
}

pub async fn run(args: Args) -> Result<()> {
    let Args {
        registry,
        no_background_fetch,
        no_passthrough,
        cache,
        fetch_deadline,
        fetch_concurrency,
        background_concurrency,
        background_rate,
        threads,
        work_dir,
        image,
        dir,
    } = args;

    let opts = registry.options()?;
    let (store, layer) = resolve_mount_target(&image, &opts).await?;
    let chunk_cache = std::sync::Arc::new(
        beam::cache::ChunkCache::open(&cache.cache_dir, cache.cache_budget)
            .with_context(|| format!("opening cache {}", cache.cache_dir.display()))?,
    );
    let fetcher = std::sync::Arc::new(beam::fetch::Fetcher::new(
        chunk_cache,
        beam::fetch::FetchOptions {
            deadline: std::time::Duration::from_secs_f64(fetch_deadline),
            attempt_timeout: std::time::Duration::from_secs_f64(
                (fetch_deadline / 2.0).clamp(1.0, 20.0),
            ),
            foreground_concurrency: fetch_concurrency,
            background_concurrency,
            background_bytes_per_sec: background_rate,
            ..Default::default()
        },
    ));
    let mopts = beam::mount::MountOptions {
        background_fetch: !no_background_fetch,
        passthrough: !no_passthrough,
        threads,
        work_dir,
        trace_access: false,
        mounter: beam::mounter::system(),
        layers: Default::default(),
    };
    let mounted =
        beam::mount::mount_image(&store, fetcher.clone(), &dir, layer.as_deref(), &mopts).await?;
    println!(
        "mounted {} ({} layers) at {}",
        image,
        mounted.layers.len(),
        dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tokio::task::block_in_place(move || drop(mounted));
    let c = &fetcher.counters;
    use std::sync::atomic::Ordering::Relaxed;
    eprintln!(
                "unmounted {}; fetched {} bytes in {} requests ({} chunks, {} retries, {} corrupt answers discarded)",
                dir.display(),
                c.bytes.load(Relaxed),
                c.requests.load(Relaxed),
                c.chunks.load(Relaxed),
                c.retries.load(Relaxed),
                c.corrupt.load(Relaxed),
            );
    Ok(())
}
/// `IMAGE` or `IMAGE@LAYER_DIGEST`: when the part after the last `@` is the digest of one of
/// the image's layers, mount that layer alone; otherwise the whole string names the image.
async fn resolve_mount_target(
    image: &str,
    opts: &RegistryOptions,
) -> Result<(Store, Option<String>)> {
    if let Some((base, digest)) = image.rsplit_once('@') {
        if beam::oci::is_sha256_digest(digest) {
            if let Ok(loc) = Location::parse(base) {
                if let Ok(store) = Store::open(loc, opts, false) {
                    if let Ok(m) = store.platform_manifest().await {
                        if m.manifest.layers.iter().any(|l| l.digest == digest) {
                            return Ok((store, Some(digest.to_string())));
                        }
                    }
                }
            }
        }
    }
    Ok((Store::open(Location::parse(image)?, opts, false)?, None))
}
