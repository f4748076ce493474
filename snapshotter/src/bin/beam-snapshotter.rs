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
}

fn main() -> std::process::ExitCode {
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
    };
    beam::daemon::grpc::serve(
        beam::daemon::grpc::SnapshotService { snapshots },
        listener,
        shutdown,
    )
    .await?;
    let _ = std::fs::remove_file(&args.address);
    Ok(())
}
