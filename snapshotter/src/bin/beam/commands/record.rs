//! `beam record`: run a workload on a lazy mount, record the order in which it opens files, and
//! publish a Beam artifact whose prefetch lists follow that order.

use super::{CacheFlags, RegistryFlags};
use anyhow::{Context, Result};
use beam::store::{Location, Store};
use std::path::PathBuf;

/// Flags of `beam record`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    registry: RegistryFlags,
    #[command(flatten)]
    cache: CacheFlags,
    /// Stop the workload after this many seconds (what it opened so far is kept).
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    #[arg(long, default_value = "/run/beam/mounts")]
    work_dir: PathBuf,
    image: String,
    /// The workload, after `--`.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

pub async fn run(args: Args) -> Result<()> {
    let Args {
        registry,
        cache,
        timeout,
        work_dir,
        image,
        cmd,
    } = args;

    let store = Store::open(Location::parse(&image)?, &registry.options()?, false)?;
    let chunk_cache = std::sync::Arc::new(
        beam::cache::ChunkCache::open(&cache.cache_dir, cache.cache_budget)
            .with_context(|| format!("opening cache {}", cache.cache_dir.display()))?,
    );
    let fetcher = std::sync::Arc::new(beam::fetch::Fetcher::new(
        chunk_cache,
        beam::fetch::FetchOptions::default(),
    ));
    let r = beam::access_trace::record(
        &store,
        fetcher,
        &cmd,
        std::time::Duration::from_secs_f64(timeout),
        &work_dir,
    )
    .await?;
    println!(
        "recorded {} files ({} per layer) -> Beam artifact {}{}",
        r.files_per_layer.iter().sum::<usize>(),
        r.files_per_layer
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        r.artifact.digest,
        match r.exit_code {
            Some(0) => String::new(),
            Some(c) => format!(" (workload exited with {c})"),
            None => " (workload stopped at the timeout)".into(),
        }
    );
    if let Some(b) = &r.bound {
        println!("bound image {} (the tag names it now)", b.digest);
    }
    Ok(())
}
