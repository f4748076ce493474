//! `beam`: the command line. Thin: parses flags, sets up logging, and hands each command to
//! its module under `commands/`, which calls the library.
//!
//! One module per command (as youki's `commands/` does): a command's flags and what it does
//! with them sit in one file, and this file only knows their names.

mod commands;

use clap::{Parser, Subcommand};
use commands::{
    autoconvert, cache, convert, doctor, inspect, mount, node_setup, pull, record, status, unpack,
};

#[derive(Parser)]
#[command(
    name = "beam",
    version,
    about = "Beam: start containers before their image is downloaded"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image's layers into Beam layers and publish the Beam artifact beside it.
    Convert(convert::Args),
    /// Write a converted image's root filesystem into DIR from its Beam layers.
    Unpack(unpack::Args),
    /// Mount a converted image read-only at DIR, lazily; IMAGE@LAYER_DIGEST mounts one layer.
    /// Runs until Ctrl-C or SIGTERM, then unmounts.
    Mount(mount::Args),
    /// Run CMD isolated in a lazy mount of IMAGE (own namespaces, nosuid/nodev, no new
    /// privileges, container capabilities), record the order in which it opens files,
    /// and publish a Beam artifact whose prefetch lists follow that order.
    Record(record::Args),
    /// Ask a running beam-snapshotter what it is doing: lazy layers and their fetch progress,
    /// cache use, fetch counters.
    Status(status::Args),
    /// The local chunk cache.
    Cache(cache::Args),
    /// Pull IMAGE into containerd with the remote-snapshot labels on every layer, so that
    /// beam-snapshotter mounts converted layers lazily (nothing but manifest and config is
    /// downloaded). Then `ctr run --snapshotter beam IMAGE ...` starts it.
    Pull(pull::Args),
    /// Check that containerd and beam-snapshotter are set up so pulls are lazy: reads
    /// containerd's config, asks containerd and the daemon, and says which line to change.
    /// Exits with 1 when something is wrong.
    Doctor(doctor::Args),
    /// Set a node up for Beam: merge Beam into containerd's config (v2 or v3, detected; the
    /// user's settings, comments and layout kept; a backup kept), install the binaries and
    /// the systemd unit, restart containerd only when its config changed. Twice changes
    /// nothing; `--uninstall` puts everything back.
    NodeSetup(node_setup::Args),
    /// Show an image's Beam conversion: artifact, layers, chunk counts.
    Inspect(inspect::Args),
    /// Run the service that converts every image pushed to a registry: it receives the
    /// registry's push notifications (Distribution, Harbor) at `POST /events`, queues them
    /// durably, converts with the bound conversion of `beam convert`, and scans the registry
    /// for images it missed. `beam autoconvert status` asks a running one.
    Autoconvert(autoconvert::Args),
}

// mallopt and the SIGPIPE reset are libc calls made before any thread starts.
#[allow(unsafe_code)]
fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BEAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // SAFETY: mallopt only adjusts allocator parameters, before any thread starts. It keeps
    // each FUSE thread's 16 MiB zeroed request buffer in mmap'd memory, so that it is not
    // resident until used (see beam-snapshotter).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    // SAFETY: restoring the default SIGPIPE action before any thread starts, so that
    // `beam ... | head` ends quietly like other command-line tools instead of panicking.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("beam: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("beam: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Convert(args) => convert::run(args).await,
        Command::Unpack(args) => unpack::run(args).await,
        Command::Mount(args) => mount::run(args).await,
        Command::Record(args) => record::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Cache(args) => cache::run(args).await,
        Command::Pull(args) => pull::run(args).await,
        Command::Doctor(args) => doctor::run(args).await,
        Command::NodeSetup(args) => node_setup::run(args).await,
        Command::Inspect(args) => inspect::run(args).await,
        Command::Autoconvert(args) => autoconvert::run(args).await,
    }
}
