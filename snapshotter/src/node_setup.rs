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

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};

/// What node setup is told.
#[derive(Debug, Clone)]
pub struct SetupTarget {
    /// The proxy plugin's name.
    pub snapshotter: String,
    /// beam-snapshotter's socket.
    pub beam_address: PathBuf,
    /// beam-snapshotter's root (exported to containerd 2.x).
    pub beam_root: PathBuf,
}

/// A key node setup set, and what it held before (None: absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replaced {
    pub path: Vec<String>,
    pub before: Option<String>,
}

/// What setup did to a config file, kept beside it for `--uninstall`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupState {
    /// Whether the config file existed before setup.
    pub existed: bool,
    /// sha256 of the file as setup wrote it: if unchanged since, uninstall restores the backup
    /// byte for byte.
    pub written_sha256: String,
    /// Keys set, with their former values (TOML text of the value).
    pub replaced: Vec<Replaced>,
    /// Whether `[proxy_plugins.NAME]` was added.
    pub added_proxy_plugin: bool,
    /// `unpack_config` entries added (snapshotter names).
    pub added_unpack: Vec<String>,
}

/// The result of merging Beam into a config.
#[derive(Debug, Clone)]
pub struct Merged {
    pub text: String,
    /// One line per change, for the user.
    pub changes: Vec<String>,
    pub state: SetupState,
}

/// The config version to write for containerd `major` (when there is no file yet).
pub fn config_version_for(major: u32) -> i64 {
    if major >= 2 {
        3
    } else {
        2
    }
}

/// Walk to (creating, as implicit tables) the table at `path`.
fn table_at<'a>(doc: &'a mut DocumentMut, path: &[&str]) -> Result<&'a mut Table> {
    let mut t: &mut Table = doc.as_table_mut();
    for (i, k) in path.iter().enumerate() {
        if !t.contains_key(k) {
            let mut new = Table::new();
            new.set_implicit(i + 1 < path.len());
            t.insert(k, Item::Table(new));
        }
        let item = t.get_mut(k).expect("inserted");
        if let Some(inline) = item.as_inline_table() {
            *item = Item::Table(inline.clone().into_table());
        }
        t = item
            .as_table_mut()
            .with_context(|| format!("{} is not a table", path[..=i].join(".")))?;
    }
    Ok(t)
}

fn show_path(path: &[&str]) -> String {
    path.iter()
        .map(|k| {
            if k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                k.to_string()
            } else {
                format!("\"{k}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Put `v` at `key` of `t`, keeping the layout: an existing value keeps its decoration
/// (spacing, trailing comment), a new key gets the indentation of its siblings.
fn put_value(t: &mut Table, key: &str, v: toml_edit::Value) {
    if let Some(old) = t.get_mut(key).and_then(Item::as_value_mut) {
        let decor = old.decor().clone();
        *old = v;
        *old.decor_mut() = decor;
        return;
    }
    let indent = t
        .iter()
        .next()
        .and_then(|(k, _)| t.key(k))
        .and_then(|k| k.leaf_decor().prefix())
        .and_then(|p| p.as_str())
        .map(String::from);
    t.insert(key, value(v));
    if let (Some(indent), Some(mut k)) = (indent, t.key_mut(key)) {
        k.leaf_decor_mut().set_prefix(indent);
    }
}

/// Set `key` in the table at `table` to `v` unless it already is; records the change.
fn set_key(
    doc: &mut DocumentMut,
    table: &[&str],
    key: &str,
    v: toml_edit::Value,
    merged: &mut Merged,
) -> Result<()> {
    let t = table_at(doc, table)?;
    let before = t.get(key).and_then(|i| i.as_value()).cloned();
    let want = v.to_string().trim().to_string();
    if before.as_ref().map(|b| b.to_string().trim().to_string()) == Some(want.clone()) {
        return Ok(());
    }
    let mut path: Vec<String> = table.iter().map(|s| s.to_string()).collect();
    path.push(key.to_string());
    let before_text = before.map(|b| b.clone().decorated("", "").to_string());
    merged.changes.push(match &before_text {
        Some(b) => format!("{}.{key} = {want} (was {b})", show_path(table)),
        None => format!("{}.{key} = {want}", show_path(table)),
    });
    if !merged.state.replaced.iter().any(|r| r.path == path) {
        merged.state.replaced.push(Replaced {
            path,
            before: before_text,
        });
    }
    put_value(t, key, v);
    Ok(())
}

/// Merge Beam into config `text` (empty: no file yet; `major` picks the version then).
pub fn merge(text: &str, major: Option<u32>, target: &SetupTarget) -> Result<Merged> {
    let mut doc: DocumentMut = text
        .parse()
        .context("containerd's config is not valid TOML")?;
    let version = match doc.get("version").and_then(|v| v.as_integer()) {
        Some(v) => v,
        None if text.trim().is_empty() => {
            let v = config_version_for(major.unwrap_or(1));
            doc.insert("version", value(v));
            v
        }
        None => 1,
    };
    if version != 2 && version != 3 {
        bail!(
            "containerd config version {version} is not supported: run `containerd config \
             migrate` (containerd 1.7+) to convert it to version {}, then node setup again",
            config_version_for(major.unwrap_or(1))
        );
    }
    let mut merged = Merged {
        text: String::new(),
        changes: Vec::new(),
        state: SetupState {
            existed: !text.trim().is_empty(),
            ..Default::default()
        },
    };
    let sn = target.snapshotter.as_str();
    let address = target.beam_address.to_string_lossy().into_owned();
    let had_proxy = doc.get("proxy_plugins").and_then(|p| p.get(sn)).is_some();
    if !had_proxy {
        merged.state.added_proxy_plugin = true;
        merged.changes.push(format!("[proxy_plugins.{sn}] added"));
        let mut t = Table::new();
        t.insert("type", value("snapshot"));
        t.insert("address", value(address.clone()));
        let plugins = table_at(&mut doc, &["proxy_plugins"])?;
        if plugins.is_empty() {
            // Only `[proxy_plugins.NAME]` is written, no empty `[proxy_plugins]` header.
            plugins.set_implicit(true);
        }
        plugins.insert(sn, Item::Table(t));
    }
    let plugin = ["proxy_plugins", sn];
    set_key(&mut doc, &plugin, "type", "snapshot".into(), &mut merged)?;
    set_key(
        &mut doc,
        &plugin,
        "address",
        address.as_str().into(),
        &mut merged,
    )?;
    let cri: Vec<&str> = if version == 2 {
        vec!["plugins", "io.containerd.grpc.v1.cri", "containerd"]
    } else {
        vec!["plugins", "io.containerd.cri.v1.images"]
    };
    set_key(&mut doc, &cri, "snapshotter", sn.into(), &mut merged)?;
    set_key(
        &mut doc,
        &cri,
        "disable_snapshot_annotations",
        false.into(),
        &mut merged,
    )?;
    if version == 3 {
        let exports = ["proxy_plugins", sn, "exports"];
        let root = target.beam_root.to_string_lossy().into_owned();
        set_key(
            &mut doc,
            &exports,
            "root",
            root.as_str().into(),
            &mut merged,
        )?;
        set_key(
            &mut doc,
            &exports,
            "enable_remote_snapshot_annotations",
            "true".into(),
            &mut merged,
        )?;
        let transfer = table_at(&mut doc, &["plugins", "io.containerd.transfer.v1.local"])?;
        if !transfer.contains_key("unpack_config") {
            transfer.insert("unpack_config", Item::ArrayOfTables(ArrayOfTables::new()));
        }
        let arr = transfer
            .get_mut("unpack_config")
            .and_then(Item::as_array_of_tables_mut)
            .context("plugins.\"io.containerd.transfer.v1.local\".unpack_config is not an array of tables")?;
        // beam for lazy pulls; overlayfs too, or clients that do not ask for beam (plain
        // `ctr image pull`) would unpack into beam as well.
        for name in [sn, "overlayfs"] {
            let present = arr
                .iter()
                .any(|t| t.get("snapshotter").and_then(|s| s.as_str()) == Some(name));
            if !present {
                let mut t = Table::new();
                t.insert("platform", value("linux"));
                t.insert("snapshotter", value(name));
                arr.push(t);
                merged.state.added_unpack.push(name.to_string());
                merged.changes.push(format!(
                    "[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]] snapshotter = \"{name}\" added"
                ));
            }
        }
    }
    merged.text = doc.to_string();
    Ok(merged)
}

/// Undo what `state` records on config `text` (used when the file changed after setup, so
/// the backup cannot simply be put back).
pub fn unmerge(text: &str, state: &SetupState, snapshotter: &str) -> Result<String> {
    let mut doc: DocumentMut = text
        .parse()
        .context("containerd's config is not valid TOML")?;
    for r in state.replaced.iter().rev() {
        let (key, table) = r.path.split_last().context("empty key path")?;
        let table: Vec<&str> = table.iter().map(String::as_str).collect();
        let Ok(t) = table_at(&mut doc, &table) else {
            continue;
        };
        match &r.before {
            None => {
                t.remove(key);
            }
            Some(v) => {
                let parsed: toml_edit::Value = v
                    .parse()
                    .with_context(|| format!("recorded value {v:?} of {key}"))?;
                put_value(t, key, parsed);
            }
        }
    }
    if state.added_proxy_plugin {
        if let Some(p) = doc.get_mut("proxy_plugins").and_then(Item::as_table_mut) {
            p.remove(snapshotter);
        }
    }
    if !state.added_unpack.is_empty() {
        if let Some(arr) = doc
            .get_mut("plugins")
            .and_then(|p| p.get_mut("io.containerd.transfer.v1.local"))
            .and_then(|t| t.get_mut("unpack_config"))
            .and_then(Item::as_array_of_tables_mut)
        {
            arr.retain(|t| {
                !t.get("snapshotter")
                    .and_then(|s| s.as_str())
                    .is_some_and(|s| state.added_unpack.iter().any(|a| a == s))
            });
        }
    }
    prune_empty(doc.as_table_mut());
    Ok(doc.to_string())
}

/// Drop tables left empty by an uninstall (implicit or not), bottom up.
fn prune_empty(t: &mut Table) {
    let keys: Vec<String> = t.iter().map(|(k, _)| k.to_string()).collect();
    for k in keys {
        let empty = match t.get_mut(&k) {
            Some(Item::Table(inner)) => {
                prune_empty(inner);
                inner.is_empty()
            }
            Some(Item::ArrayOfTables(a)) => a.is_empty(),
            _ => false,
        };
        if empty {
            t.remove(&k);
        }
    }
}

/// A unified diff of `old` and `new` (for `--dry-run`).
pub fn diff(path: &Path, old: &str, new: &str) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(
            &path.display().to_string(),
            &format!("{} (with Beam)", path.display()),
        )
        .to_string()
}

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
const UNIT: &str = include_str!("../../deploy/systemd/beam-snapshotter.service");
const UNIT_NAME: &str = "beam-snapshotter.service";
/// beam-snapshotter's default configuration shipped in `deploy/beam/`.
const DEFAULT_CONFIG: &str = include_str!("../../deploy/beam/config.toml");
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

/// containerd's major and minor version from `BIN --version`.
pub fn containerd_version(bin: &Path) -> Result<(u32, u32)> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "containerd github.com/containerd/containerd 1.7.24~ds1 ..." or "containerd containerd.io 2.1.9 ..."
    text.split_whitespace()
        .find_map(crate::doctor::parse_version)
        .with_context(|| format!("no version in {:?}", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> SetupTarget {
        SetupTarget {
            snapshotter: "beam".into(),
            beam_address: "/run/beam/beam.sock".into(),
            beam_root: "/var/lib/beam".into(),
        }
    }

    const V2_USER: &str = r#"version = 2
# my settings
root = "/data/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  max_concurrent_downloads = 5  # keep this

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
"#;

    #[test]
    fn v2_merge_keeps_the_users_settings_and_comments() {
        let m = merge(V2_USER, None, &target()).unwrap();
        let t = &m.text;
        for keep in [
            "# my settings",
            "root = \"/data/containerd\"",
            "max_concurrent_downloads = 5  # keep this",
            "default_runtime_name = \"runc\"",
            "config_path = \"/etc/containerd/certs.d\"",
        ] {
            assert!(t.contains(keep), "lost {keep:?}:\n{t}");
        }
        let v: toml::Table = t.parse().unwrap();
        let c = &v["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        assert_eq!(c["snapshotter"].as_str(), Some("beam"));
        assert_eq!(c["disable_snapshot_annotations"].as_bool(), Some(false));
        assert_eq!(
            v["proxy_plugins"]["beam"]["address"].as_str(),
            Some("/run/beam/beam.sock")
        );
        assert!(
            !t.contains("[proxy_plugins]\n"),
            "no empty parent header:\n{t}"
        );
        // The doctor is happy with the result.
        let f = crate::doctor::check_config(
            t,
            &crate::doctor::ConfigContext {
                path: "c.toml".into(),
                snapshotter: "beam".into(),
                beam_address: "/run/beam/beam.sock".into(),
                version: Some((1, 7)),
            },
        );
        assert!(
            f.iter().all(|f| f.severity < crate::doctor::Severity::Warn),
            "{}",
            crate::doctor::render(&f)
        );
        // Twice: nothing more to do.
        let again = merge(&m.text, None, &target()).unwrap();
        assert!(again.changes.is_empty(), "{:?}", again.changes);
        // Undo: the original back (modulo nothing).
        let undone = unmerge(&m.text, &m.state, "beam").unwrap();
        assert_eq!(undone, V2_USER);
    }

    #[test]
    fn a_missing_config_becomes_the_right_version() {
        let m = merge("", Some(2), &target()).unwrap();
        let v: toml::Table = m.text.parse().unwrap();
        assert_eq!(v["version"].as_integer(), Some(3));
        assert_eq!(
            v["plugins"]["io.containerd.cri.v1.images"]["snapshotter"].as_str(),
            Some("beam")
        );
        let unpack = v["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
            .as_array()
            .unwrap();
        let names: Vec<_> = unpack
            .iter()
            .map(|u| u["snapshotter"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["beam", "overlayfs"]);
        assert_eq!(
            v["proxy_plugins"]["beam"]["exports"]["enable_remote_snapshot_annotations"].as_str(),
            Some("true")
        );
        let m = merge("", Some(1), &target()).unwrap();
        assert!(m.text.starts_with("version = 2"), "{}", m.text);
        assert!(merge("version = 1\n", None, &target()).is_err());
        assert!(merge("[plugins\n", None, &target()).is_err());
    }

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
