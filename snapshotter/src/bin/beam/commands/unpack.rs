//! `beam unpack`: write a converted image's root filesystem into a directory from its Beam
//! layers (no FUSE, no lazy loading).

use super::RegistryFlags;
use anyhow::Result;
use beam::store::{Location, Store};
use std::path::PathBuf;

/// Flags of `beam unpack`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    registry: RegistryFlags,
    /// Image: `host[:port]/repo:tag` or `oci:DIR[:TAG]`.
    image: String,
    /// Skip what needs root (owners, device nodes, `trusted.*`/`security.*` xattrs) with a
    /// warning instead of failing. On by itself when not running as root.
    #[arg(long)]
    rootless: bool,
    /// Directory to create (must be empty).
    dir: PathBuf,
}

pub async fn run(args: Args) -> Result<()> {
    let Args {
        registry,
        image,
        rootless,
        dir,
    } = args;

    let store = Store::open(Location::parse(&image)?, &registry.options()?, false)?;
    let mut opts = beam::unpack::UnpackOptions::default();
    opts.rootless |= rootless;
    let s = beam::unpack::unpack_image(&store, &dir, opts).await?;
    eprintln!(
        "unpacked {} layers, {} entries, {:.1} MB into {}",
        s.layers,
        s.entries,
        s.bytes as f64 / 1e6,
        dir.display()
    );
    if s.skipped_owners + s.skipped_devices + s.skipped_xattrs > 0 {
        eprintln!(
            "beam: warning: rootless: {} owners not set, {} device nodes and {} trusted/security \
             xattrs skipped",
            s.skipped_owners, s.skipped_devices, s.skipped_xattrs
        );
    }
    Ok(())
}
