//! `beam node-setup`: put Beam into an existing containerd configuration without losing any of
//! the user's settings, the way an operator would by hand from `deploy/containerd/`.
//!
//! The file is edited with `toml_edit`, so comments, order and formatting of everything else
//! stay as they were. What is set, by config version (containerd 1.x writes version 2, 2.x
//! version 3):
//! - both: `[proxy_plugins.beam]` `type = "snapshot"`, `address = SOCKET`;
//! - version 2: `[plugins."io.containerd.grpc.v1.cri".containerd]` `snapshotter = "beam"`,
//!   `disable_snapshot_annotations = false`;
//! - version 3: `[plugins.'io.containerd.cri.v1.images']` the same two keys;
//!   `[proxy_plugins.beam.exports]` `root`, `enable_remote_snapshot_annotations = "true"`
//!   (containerd 2.1's transfer service), and `unpack_config` entries for beam and overlayfs.
//!
//! Every value it replaces is remembered in a state file beside the config
//! (`config.toml.beam-setup.json`) with a backup of the original, so `--uninstall` puts back
//! exactly what was there; running setup twice changes nothing the second time.
//!
//! Two halves: [`merge`](mod@merge) is the pure edit (config text in, merged text and a record of what
//! changed out; unit tested), [`install`](mod@install) acts on the host (the config file, its backup and
//! state, the binaries, the systemd unit, restarts).

pub mod install;
pub mod merge;

pub use install::{
    backup_path, containerd_version, install, restart_containerd, setup_file, state_path,
    text_sha256, uninstall, uninstall_file, InstallPaths, Outcome,
};
pub use merge::{
    config_version_for, diff, merge, unmerge, Merged, Replaced, SetupState, SetupTarget,
};
