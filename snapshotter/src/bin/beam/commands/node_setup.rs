//! `beam node-setup`: merge Beam into containerd's config and install the daemon (or undo
//! both), then restart containerd when its config changed.

use anyhow::Result;
use std::path::PathBuf;

/// Flags of `beam node-setup`.
#[derive(clap::Args)]
pub struct Args {
    /// containerd's config file (made if missing, for the installed containerd's version).
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// Print what would change (a diff of the config) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not restart containerd (say that it must be, when its config changed).
    #[arg(long)]
    no_restart: bool,
    /// Undo node setup: restore containerd's config, remove the unit and binaries.
    #[arg(long)]
    uninstall: bool,
    /// Only containerd's config (e.g. in the DaemonSet, where the daemon runs in a pod).
    #[arg(long)]
    no_install: bool,
    /// beam-snapshotter's socket, as containerd should dial it.
    #[arg(long, default_value = "/run/beam/beam.sock")]
    beam_address: PathBuf,
    /// beam-snapshotter's state directory (exported to containerd 2.x).
    #[arg(long, default_value = "/var/lib/beam")]
    beam_root: PathBuf,
    /// The proxy plugin's name.
    #[arg(long, default_value = "beam")]
    snapshotter: String,
    /// containerd's binary (its version picks the config version of a new file).
    #[arg(long, default_value = "containerd")]
    containerd_bin: PathBuf,
    /// Where the binaries are installed.
    #[arg(long, default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// Where the systemd unit is installed.
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    /// beam-snapshotter's config file (the default one is written if missing).
    #[arg(long, default_value = "/etc/beam/config.toml")]
    beam_config: PathBuf,
}

pub async fn run(args: Args) -> Result<()> {
    let Args {
        containerd_config,
        dry_run,
        no_restart,
        uninstall,
        no_install,
        beam_address,
        beam_root,
        snapshotter,
        containerd_bin,
        bin_dir,
        unit_dir,
        beam_config,
    } = args;

    use beam::node_setup::{self as ns, Outcome};
    let install = ns::InstallPaths {
        bin_dir,
        unit_dir,
        config: beam_config,
        beam_address: beam_address.clone(),
        beam_root: beam_root.clone(),
        enabled: !no_install,
    };
    let path = &containerd_config;
    let outcome = if uninstall {
        let o = ns::uninstall_file(path, &snapshotter, dry_run)?;
        for line in ns::uninstall(&install, dry_run)? {
            println!("{line}");
        }
        o
    } else {
        let major = match ns::containerd_version(&containerd_bin) {
            Ok(version) => {
                println!("containerd {version} ({})", containerd_bin.display());
                Some(version.major)
            }
            Err(e) => {
                eprintln!("beam: warning: cannot tell containerd's version: {e:#}");
                None
            }
        };
        let target = ns::SetupTarget {
            snapshotter: snapshotter.clone(),
            beam_address,
            beam_root,
        };
        let o = ns::setup_file(path, major, &target, dry_run)?;
        for line in ns::install(&install, dry_run)? {
            println!("{line}");
        }
        o
    };
    let changed = match &outcome {
        Outcome::AlreadySetUp => {
            println!(
                "{}: already set up for Beam, nothing to change",
                path.display()
            );
            false
        }
        Outcome::NotSetUp => {
            println!(
                "{}: node setup has not changed it, nothing to undo",
                path.display()
            );
            false
        }
        Outcome::Changed { diff, changes } => {
            if dry_run {
                print!("{diff}");
                println!("(dry run: nothing written)");
            } else {
                for c in changes {
                    println!("{}: {c}", path.display());
                }
                println!(
                    "backup of the original: {}",
                    ns::backup_path(path).display()
                );
            }
            true
        }
        Outcome::Restored { how } => {
            println!("{how}");
            true
        }
    };
    if changed && !dry_run {
        if no_restart {
            println!("containerd must be restarted to apply its new config (--no-restart)");
        } else {
            println!("{}", ns::restart_containerd()?);
        }
    }
    Ok(())
}
