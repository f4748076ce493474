//! `beam doctor`: print what `beam::doctor` finds; fails (exit code 1) when any finding is an
//! error, so scripts can gate on it.

use anyhow::{bail, Result};
use std::path::PathBuf;

/// Flags of `beam doctor`.
#[derive(clap::Args)]
pub struct Args {
    /// containerd's config file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// containerd's socket.
    #[arg(
        long,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    address: PathBuf,
    /// beam-snapshotter's socket.
    #[arg(long, default_value = "/run/beam/beam.sock")]
    beam_address: PathBuf,
    /// The snapshotter's name in containerd's config.
    #[arg(long, default_value = "beam")]
    snapshotter: String,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let Args {
        containerd_config,
        address,
        beam_address,
        snapshotter,
        json,
    } = args;

    let findings = beam::doctor::run(&beam::doctor::DoctorOptions {
        containerd_config,
        containerd_address: address,
        beam_address,
        snapshotter,
    })
    .await;
    if json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        print!("{}", beam::doctor::render(&findings));
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == beam::doctor::Severity::Error)
        .count();
    if errors > 0 {
        bail!("{errors} problem(s) found");
    }
    Ok(())
}
