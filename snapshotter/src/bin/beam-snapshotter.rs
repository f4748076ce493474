//! `beam-snapshotter`: the daemon containerd talks to as a proxy snapshotter plugin.

use anyhow::{Context, Result};
use clap::Parser;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "beam-snapshotter",
    version,
    about = "Beam's containerd snapshotter daemon"
)]
struct Args {
    /// State directory (snapshots, metadata).
    #[arg(long, default_value = "/var/lib/beam")]
    root: PathBuf,
    /// Unix socket to serve containerd's snapshots API on (mode 0600).
    #[arg(long, default_value = "/run/beam/beam.sock")]
    address: PathBuf,
    /// Chunk cache directory (default: ROOT/cache).
    #[arg(long, env = "BEAM_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Cache size budget in bytes (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    cache_budget: u64,
    /// Serve only ordinary snapshots (no lazy layers).
    #[arg(long)]
    no_remote: bool,
    /// Do not fetch the rest of lazy layers in the background.
    #[arg(long)]
    no_background_fetch: bool,
    /// Plain HTTP for every registry.
    #[arg(long)]
    plain_http: bool,
    /// Plain HTTP for this registry host (repeatable).
    #[arg(long = "plain-http-host", value_name = "HOST[:PORT]")]
    plain_http_hosts: Vec<String>,
    /// Give up on a chunk after this many seconds (reads then fail with EIO).
    #[arg(long, default_value_t = 60.0)]
    fetch_deadline: f64,
}

fn main() -> std::process::ExitCode {
    // Each FUSE thread allocates a 16 MiB zeroed request buffer. With glibc's dynamic mmap
    // threshold such a buffer can come from a heap arena, where zeroing touches every page
    // (about 4 MiB resident per thread here); a fixed threshold keeps large buffers in mmap'd
    // memory whose untouched pages are never resident.
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BEAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("beam-snapshotter: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("beam-snapshotter: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let snapshots = Arc::new(
        beam::snapshot::Snapshots::open(&args.root.join("snapshotter"))
            .with_context(|| format!("opening snapshots under {}", args.root.display()))?,
    );
    if let Some(dir) = args.address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&args.address) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", args.address.display())),
    }
    let listener = tokio::net::UnixListener::bind(&args.address)
        .with_context(|| format!("listening on {}", args.address.display()))?;
    std::fs::set_permissions(&args.address, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(address = %args.address.display(), root = %args.root.display(), "serving");
    beam::daemon::notify_ready();
    let remote = if args.no_remote {
        None
    } else {
        let cache_dir = args.cache_dir.clone().unwrap_or(args.root.join("cache"));
        let cache = Arc::new(
            beam::cache::ChunkCache::open(&cache_dir, args.cache_budget)
                .with_context(|| format!("opening cache {}", cache_dir.display()))?,
        );
        let fetcher = Arc::new(beam::fetch::Fetcher::new(
            cache,
            beam::fetch::FetchOptions {
                deadline: std::time::Duration::from_secs_f64(args.fetch_deadline),
                ..Default::default()
            },
        ));
        let registry = beam::remote::RemoteOptions {
            plain_http: args.plain_http,
            plain_http_hosts: args.plain_http_hosts.clone(),
            ..Default::default()
        }
        .with_env();
        let mount = beam::mount::MountOptions {
            background_fetch: !args.no_background_fetch,
            passthrough: true,
            threads: 4,
            work_dir: args.root.join("mounts"),
            record: false,
        };
        let r = Arc::new(beam::daemon::remote::RemoteLayers::new(
            fetcher, registry, mount,
        ));
        let n = r.recover(&snapshots).await;
        if n > 0 {
            tracing::info!(layers = n, "remounted lazy layers");
        }
        Some(r)
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
    };
    beam::daemon::grpc::serve(
        beam::daemon::grpc::SnapshotService {
            snapshots,
            remote: remote.clone(),
        },
        listener,
        shutdown,
    )
    .await?;
    if let Some(r) = remote {
        tokio::task::block_in_place(|| r.unmount_all());
    }
    let _ = std::fs::remove_file(&args.address);
    Ok(())
}
