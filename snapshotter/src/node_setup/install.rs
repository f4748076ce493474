//! The host half of node setup: apply a [`merge`](mod@super::merge) to the config file (with a
//! backup and a state file for `--uninstall`), install or remove the binaries and the systemd
//! unit, restart containerd. Run as root on the node (or in a privileged pod that reaches the
//! host's systemd).

use super::merge::{diff, merge, unmerge, SetupState, SetupTarget};
use crate::containerd::Version;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where setup keeps its state for a config file.
pub fn state_path(config: &Path) -> PathBuf {
    let mut s = config.as_os_str().to_owned();
    s.push(".beam-setup.json");
    PathBuf::from(s)
}

/// Where setup keeps the original config.
pub fn backup_path(config: &Path) -> PathBuf {
    let mut s = config.as_os_str().to_owned();
    s.push(".beam-backup");
    PathBuf::from(s)
}

/// sha256 hex of text.
pub fn text_sha256(text: &str) -> String {
    crate::oci::sha256_digest(text.as_bytes())
}

/// What a setup run did.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing to change.
    AlreadySetUp,
    /// Changed (or would change, in a dry run); the diff and the changes.
    Changed { diff: String, changes: Vec<String> },
    /// Uninstalled: what was restored.
    Restored { how: String },
    /// Nothing to uninstall.
    NotSetUp,
}

/// Apply setup to the config file at `path` (writes it, its backup and the state file, unless
/// `dry_run`).
pub fn setup_file(
    path: &Path,
    major: Option<u32>,
    target: &SetupTarget,
    dry_run: bool,
) -> Result<Outcome> {
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut merged = merge(&old, major, target)
        .with_context(|| format!("merging Beam into {}", path.display()))?;
    if merged.changes.is_empty() {
        return Ok(Outcome::AlreadySetUp);
    }
    let d = diff(path, &old, &merged.text);
    if dry_run {
        return Ok(Outcome::Changed {
            diff: d,
            changes: merged.changes,
        });
    }
    let state_file = state_path(path);
    // A second setup on top of a first (e.g. a new socket path): keep the first state's
    // record of the original values and the original backup.
    if let Ok(prev) = std::fs::read_to_string(&state_file) {
        if let Ok(prev) = serde_json::from_str::<SetupState>(&prev) {
            let mut replaced = prev.replaced.clone();
            for r in merged.state.replaced {
                if !replaced.iter().any(|p| p.path == r.path) {
                    replaced.push(r);
                }
            }
            merged.state.replaced = replaced;
            merged.state.existed = prev.existed;
            merged.state.added_proxy_plugin |= prev.added_proxy_plugin;
            merged.state.added_unpack.extend(prev.added_unpack);
            merged.state.added_unpack.sort();
            merged.state.added_unpack.dedup();
        }
    } else if merged.state.existed {
        write_atomic(&backup_path(path), &old)?;
    }
    merged.state.written_sha256 = text_sha256(&merged.text);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_atomic(path, &merged.text)?;
    write_atomic(&state_file, &serde_json::to_string_pretty(&merged.state)?)?;
    Ok(Outcome::Changed {
        diff: d,
        changes: merged.changes,
    })
}

/// Undo setup on the config file at `path`.
pub fn uninstall_file(path: &Path, snapshotter: &str, dry_run: bool) -> Result<Outcome> {
    let state_file = state_path(path);
    let state: SetupState = match std::fs::read_to_string(&state_file) {
        Ok(s) => {
            serde_json::from_str(&s).with_context(|| format!("parsing {}", state_file.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Outcome::NotSetUp),
        Err(e) => return Err(e).with_context(|| format!("reading {}", state_file.display())),
    };
    let current = std::fs::read_to_string(path).unwrap_or_default();
    let backup = backup_path(path);
    let unchanged = text_sha256(&current) == state.written_sha256;
    let how = if unchanged && !state.existed {
        if !dry_run {
            remove_if_exists(path)?;
        }
        format!("removed {} (node setup had created it)", path.display())
    } else if unchanged && backup.is_file() {
        if !dry_run {
            std::fs::copy(&backup, path)
                .with_context(|| format!("restoring {}", backup.display()))?;
        }
        format!("restored {} from {}", path.display(), backup.display())
    } else {
        let text = unmerge(&current, &state, snapshotter)?;
        if !dry_run {
            write_atomic(path, &text)?;
        }
        format!(
            "{} changed since setup: put back the {} value(s) setup had replaced, kept the rest",
            path.display(),
            state.replaced.len()
        )
    };
    if !dry_run {
        remove_if_exists(&backup)?;
        remove_if_exists(&state_file)?;
    }
    Ok(Outcome::Restored { how })
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

/// Write through a temporary file in the same directory, then rename.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(tmp.path(), meta.permissions());
    }
    tmp.persist(path)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Where node setup installs Beam itself.
#[derive(Debug, Clone)]
pub struct InstallPaths {
    pub bin_dir: PathBuf,
    pub unit_dir: PathBuf,
    /// beam-snapshotter's config file (written from the default if missing).
    pub config: PathBuf,
    /// Socket and root written into a new config file.
    pub beam_address: PathBuf,
    pub beam_root: PathBuf,
    /// false: leave binaries and unit alone (`--no-install`).
    pub enabled: bool,
}

/// The systemd unit shipped in `deploy/systemd/`.
const UNIT: &str = include_str!("../../../deploy/systemd/beam-snapshotter.service");
const UNIT_NAME: &str = "beam-snapshotter.service";
/// beam-snapshotter's default configuration shipped in `deploy/beam/`.
const DEFAULT_CONFIG: &str = include_str!("../../../deploy/beam/config.toml");
const BINARIES: [&str; 2] = ["beam", "beam-snapshotter"];

/// Whether systemd manages this host (in a privileged pod with the host's PID namespace: the
/// host's systemd, reached with nsenter).
enum Systemd {
    Here,
    Host,
    None,
}

fn systemd() -> Systemd {
    if Path::new("/run/systemd/system").is_dir() {
        Systemd::Here
    } else if Path::new("/proc/1/root/run/systemd/system").is_dir() {
        Systemd::Host
    } else {
        Systemd::None
    }
}

fn systemctl(args: &[&str]) -> Result<()> {
    let mut cmd = match systemd() {
        Systemd::Here => std::process::Command::new("systemctl"),
        Systemd::Host => {
            let mut c = std::process::Command::new("nsenter");
            c.args(["-t", "1", "-m", "-u", "-i", "-n", "-p", "--", "systemctl"]);
            c
        }
        Systemd::None => bail!("systemd does not run this host"),
    };
    let out = cmd
        .args(args)
        .output()
        .with_context(|| format!("running systemctl {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Install the binaries next to the running `beam` and the unit (its ExecStart pointed at
/// them); with systemd, enable and start the daemon. Returns what was done.
pub fn install(paths: &InstallPaths, dry_run: bool) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if !paths.enabled {
        return Ok(done);
    }
    let exe = std::env::current_exe().context("finding the running beam binary")?;
    let from = exe.parent().context("beam's directory")?;
    for name in BINARIES {
        let src = from.join(name);
        let dst = paths.bin_dir.join(name);
        if !src.is_file() {
            bail!(
                "{} is missing: install needs both binaries side by side",
                src.display()
            );
        }
        let same = std::fs::read(&src).ok() == std::fs::read(&dst).ok();
        if same {
            continue;
        }
        done.push(format!("install {} -> {}", src.display(), dst.display()));
        if !dry_run {
            std::fs::create_dir_all(&paths.bin_dir)
                .with_context(|| format!("creating {}", paths.bin_dir.display()))?;
            let tmp = dst.with_extension("beam-new");
            std::fs::copy(&src, &tmp).with_context(|| format!("copying {}", src.display()))?;
            std::fs::rename(&tmp, &dst).with_context(|| format!("installing {}", dst.display()))?;
        }
    }
    if !paths.config.exists() {
        done.push(format!("install {} (defaults)", paths.config.display()));
        if !dry_run {
            let text = DEFAULT_CONFIG
                .replace(
                    "address = \"/run/beam/beam.sock\"",
                    &format!("address = {:?}", paths.beam_address.display().to_string()),
                )
                .replace(
                    "root = \"/var/lib/beam\"",
                    &format!("root = {:?}", paths.beam_root.display().to_string()),
                );
            if let Some(dir) = paths.config.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            write_atomic(&paths.config, &text)?;
        }
    }
    let unit = UNIT
        .replace(
            "/usr/bin/beam-snapshotter",
            &paths.bin_dir.join("beam-snapshotter").to_string_lossy(),
        )
        .replace("/etc/beam/config.toml", &paths.config.to_string_lossy());
    let unit_path = paths.unit_dir.join(UNIT_NAME);
    if std::fs::read_to_string(&unit_path).ok().as_deref() != Some(unit.as_str()) {
        done.push(format!("install {}", unit_path.display()));
        if !dry_run {
            std::fs::create_dir_all(&paths.unit_dir)
                .with_context(|| format!("creating {}", paths.unit_dir.display()))?;
            write_atomic(&unit_path, &unit)?;
        }
    }
    if !done.is_empty() && !dry_run {
        match systemd() {
            Systemd::None => done.push(format!(
                "systemd is not running: start {} yourself before containerd uses it",
                paths.bin_dir.join("beam-snapshotter").display()
            )),
            _ => {
                systemctl(&["daemon-reload"])?;
                systemctl(&["enable", UNIT_NAME])?;
                // restart, not start: a new binary must replace a running old one.
                systemctl(&["restart", UNIT_NAME])?;
                done.push(format!("enabled and (re)started {UNIT_NAME}"));
            }
        }
    }
    Ok(done)
}

/// Remove what [`install`] installed (the daemon is stopped first, with systemd).
pub fn uninstall(paths: &InstallPaths, dry_run: bool) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if !paths.enabled {
        return Ok(done);
    }
    let unit_path = paths.unit_dir.join(UNIT_NAME);
    if unit_path.exists() {
        if !dry_run && !matches!(systemd(), Systemd::None) {
            systemctl(&["disable", "--now", UNIT_NAME])?;
        }
        done.push(format!("remove {}", unit_path.display()));
        if !dry_run {
            remove_if_exists(&unit_path)?;
        }
    }
    for name in BINARIES {
        let p = paths.bin_dir.join(name);
        if p.exists() {
            done.push(format!("remove {}", p.display()));
            if !dry_run {
                remove_if_exists(&p)?;
            }
        }
    }
    Ok(done)
}

/// Restart containerd so it reads its new config (systemd here or on the host), or say how.
pub fn restart_containerd() -> Result<String> {
    match systemd() {
        Systemd::None => Ok(
            "systemd is not running: restart containerd yourself to apply its new config".into(),
        ),
        _ => {
            systemctl(&["restart", "containerd"])?;
            Ok("restarted containerd".into())
        }
    }
}

/// containerd's version from `BIN --version`.
pub fn containerd_version(bin: &Path) -> Result<Version> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "containerd github.com/containerd/containerd 1.7.24~ds1 ..." or "containerd containerd.io 2.1.9 ..."
    text.split_whitespace()
        .find_map(Version::parse)
        .with_context(|| format!("no version in {:?}", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_setup::merge::tests::{target, V2_USER};

    #[test]
    fn setup_and_uninstall_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        std::fs::write(&p, V2_USER).unwrap();
        let out = setup_file(&p, None, &target(), true).unwrap();
        assert!(
            matches!(out, Outcome::Changed { ref diff, .. } if diff.contains("+    snapshotter = \"beam\"")),
            "{out:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            V2_USER,
            "dry run wrote"
        );
        assert!(matches!(
            setup_file(&p, None, &target(), false).unwrap(),
            Outcome::Changed { .. }
        ));
        assert_eq!(std::fs::read_to_string(backup_path(&p)).unwrap(), V2_USER);
        let written = std::fs::read_to_string(&p).unwrap();
        assert!(matches!(
            setup_file(&p, None, &target(), false).unwrap(),
            Outcome::AlreadySetUp
        ));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), written);
        assert!(matches!(
            uninstall_file(&p, "beam", false).unwrap(),
            Outcome::Restored { .. }
        ));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), V2_USER);
        assert!(!backup_path(&p).exists() && !state_path(&p).exists());
        assert!(matches!(
            uninstall_file(&p, "beam", false).unwrap(),
            Outcome::NotSetUp
        ));

        // Edited after setup: uninstall reverts only setup's keys and keeps the edit.
        setup_file(&p, None, &target(), false).unwrap();
        let edited = std::fs::read_to_string(&p).unwrap().replace(
            "max_concurrent_downloads = 5",
            "max_concurrent_downloads = 7",
        );
        std::fs::write(&p, &edited).unwrap();
        uninstall_file(&p, "beam", false).unwrap();
        let back = std::fs::read_to_string(&p).unwrap();
        assert_eq!(back, V2_USER.replace("= 5", "= 7"));

        // Created by setup: removed by uninstall.
        let q = d.path().join("new.toml");
        setup_file(&q, Some(2), &target(), false).unwrap();
        assert!(q.exists());
        uninstall_file(&q, "beam", false).unwrap();
        assert!(!q.exists());
    }
}
