//! A private containerd with its own root, state, socket, config and namespace, plus `ctr`
//! helpers. Dropping it kills its shims and their containers, then containerd, unmounts
//! everything under its directories and removes them.
//!
//! Beam must work with every containerd its users run, and their configuration differs between
//! versions (config `version = 2` for 1.6/1.7 and `version = 3` for 2.x, with other plugin ids
//! and, from 2.1, the transfer service). So the harness can start three: Debian bookworm's 1.6
//! from `/usr/bin` ([`ContainerdVersion::System`], the default), and 1.7 and 2.x unpacked from
//! Debian trixie's and sid's packages by `tests/fixtures/fetch-containerd.sh` (into
//! `<repo>/.work/containerd`, or `$BEAM_CONTAINERD_PREFIX`). A versioned containerd gets its own
//! `containerd-shim-runc-v2` first on its PATH and its own `ctr`; runc is always the system's.
//!
//! The configuration is generated as a TOML table and merged with what the caller adds (Beam's
//! proxy plugin rendered from `deploy/containerd/beam-v{2,3}.toml`, see [`beam_plugin_config`],
//! or anything else) so that no table is declared twice: containerd refuses such a file.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use toml::{Table, Value};

use crate::util::{self, ChildGuard};

/// How long [`Containerd::start`] waits for `ctr version` to succeed.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Default time limit for one `ctr` command.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(300);

/// The CRI plugin ids of containerd 2.x (config version 3); 1.x has only the first.
const CRI_PLUGINS_V3: [&str; 3] = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
];

/// Which containerd to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ContainerdVersion {
    /// The system's containerd (Debian bookworm: 1.6) found on PATH, or `$BEAM_CONTAINERD_BIN`
    /// and `$BEAM_CTR_BIN`.
    #[default]
    System,
    /// containerd 1.7 (Debian trixie) from `<prefix>/1.7/usr/bin`.
    V1_7,
    /// containerd 2.x (Debian sid) from `<prefix>/2/usr/bin`.
    V2,
}

impl ContainerdVersion {
    /// Every version the harness knows, oldest first.
    pub const ALL: [ContainerdVersion; 3] = [
        ContainerdVersion::System,
        ContainerdVersion::V1_7,
        ContainerdVersion::V2,
    ];

    /// A short name for messages: `system`, `1.7`, `2`.
    pub fn name(self) -> &'static str {
        match self {
            ContainerdVersion::System => "system",
            ContainerdVersion::V1_7 => "1.7",
            ContainerdVersion::V2 => "2",
        }
    }

    /// The directory holding `containerd`, `ctr` and `containerd-shim-runc-v2` of a fetched
    /// version; `None` for [`ContainerdVersion::System`] (whose binaries are found on PATH).
    pub fn bin_dir(self) -> Option<PathBuf> {
        match self {
            ContainerdVersion::System => None,
            v => Some(containerd_prefix().join(v.name()).join("usr").join("bin")),
        }
    }

    /// The containerd binary.
    pub fn containerd_bin(self) -> PathBuf {
        match self.bin_dir() {
            Some(dir) => dir.join("containerd"),
            None => util::tool_path("BEAM_CONTAINERD_BIN", "containerd", "/usr/bin/containerd"),
        }
    }

    /// The ctr binary matching [`ContainerdVersion::containerd_bin`].
    pub fn ctr_bin(self) -> PathBuf {
        match self.bin_dir() {
            Some(dir) => dir.join("ctr"),
            None => util::tool_path("BEAM_CTR_BIN", "ctr", "/usr/bin/ctr"),
        }
    }

    /// Why this version cannot run here, or `None` when it can.
    pub fn unavailable_reason(self) -> Option<String> {
        let mut bins = vec![self.containerd_bin(), self.ctr_bin()];
        if let Some(dir) = self.bin_dir() {
            bins.push(dir.join("containerd-shim-runc-v2"));
        }
        let hint = match self {
            ContainerdVersion::System => "install Debian's containerd (.ci/install-deps.sh)",
            _ => "run tests/fixtures/fetch-containerd.sh (.ci/install-deps.sh does)",
        };
        if let Some(missing) = bins.iter().find(|b| !b.is_file()) {
            return Some(format!(
                "containerd {}: {} does not exist; {hint}",
                self.name(),
                missing.display()
            ));
        }
        match self.detect() {
            Ok(_) => None,
            Err(e) => Some(format!("containerd {}: {e:#}; {hint}", self.name())),
        }
    }

    /// Runs `containerd --version` (once per binary and process) and parses it.
    pub fn detect(self) -> Result<DetectedVersion> {
        static CACHE: OnceLock<Mutex<HashMap<PathBuf, DetectedVersion>>> = OnceLock::new();
        let bin = self.containerd_bin();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(v) = cache.lock().ok().and_then(|c| c.get(&bin).cloned()) {
            return Ok(v);
        }
        let out = util::run_checked(Command::new(&bin).arg("--version"), Duration::from_secs(20))
            .with_context(|| format!("running {} --version", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v = DetectedVersion::parse(&text)
            .with_context(|| format!("parsing the output of {} --version", bin.display()))?;
        if let Ok(mut c) = cache.lock() {
            c.insert(bin, v.clone());
        }
        Ok(v)
    }
}

/// True when containerd `version` is installed here (see
/// [`ContainerdVersion::unavailable_reason`]).
pub fn available(version: ContainerdVersion) -> bool {
    version.unavailable_reason().is_none()
}

/// For tests that run against several versions: `Ok(true)` when `version` can run, `Ok(false)`
/// (after printing why, so the test can return early) when it is not installed, and an error
/// instead when `$CI` is set: CI installs every version, so a missing one there is a broken
/// install step that a skip would hide.
pub fn require_version(version: ContainerdVersion) -> Result<bool> {
    match version.unavailable_reason() {
        None => Ok(true),
        Some(reason) if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) => {
            bail!("{reason} (CI is set: every containerd version must be installed)")
        }
        Some(reason) => {
            eprintln!("SKIPPED: {reason}");
            Ok(false)
        }
    }
}

/// Where `tests/fixtures/fetch-containerd.sh` unpacks containerd 1.7 and 2.x:
/// `$BEAM_CONTAINERD_PREFIX`, else `<repo>/.work/containerd`.
pub fn containerd_prefix() -> PathBuf {
    match std::env::var_os("BEAM_CONTAINERD_PREFIX") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => util::workspace_root().join(".work").join("containerd"),
    }
}

/// What `containerd --version` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectedVersion {
    /// The version field as printed, e.g. `1.7.24~ds1` or `2.1.9+unknown`.
    pub text: String,
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl DetectedVersion {
    /// Parses `containerd github.com/containerd/containerd[/v2] 1.7.24~ds1 [revision]`.
    pub fn parse(output: &str) -> Result<DetectedVersion> {
        let field = output
            .split_whitespace()
            .find(|w| {
                let w = w.strip_prefix('v').unwrap_or(w);
                w.split('.').count() >= 3 && w.starts_with(|c: char| c.is_ascii_digit())
            })
            .with_context(|| format!("no version number in {output:?}"))?;
        let text = field.strip_prefix('v').unwrap_or(field).to_string();
        let mut nums = text.split('.').map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u32>()
        });
        let mut next = |what: &str| -> Result<u32> {
            nums.next()
                .with_context(|| format!("no {what} version in {text:?}"))?
                .with_context(|| format!("bad {what} version in {text:?}"))
        };
        let (major, minor, patch) = (next("major")?, next("minor")?, next("patch")?);
        Ok(DetectedVersion {
            text,
            major,
            minor,
            patch,
        })
    }

    /// True when this is `major.minor` or newer.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }

    /// The config file version this containerd reads natively: 2 for 1.x, 3 for 2.x.
    pub fn config_version(&self) -> u32 {
        if self.major >= 2 {
            3
        } else {
            2
        }
    }
}

/// CRI plugin settings ([`ContainerdOptions::cri`] must be true). `None` keeps containerd's
/// default.
#[derive(Debug, Clone, Default)]
pub struct CriConfig {
    /// The snapshotter CRI pulls and runs with (`overlayfs` by default).
    pub snapshotter: Option<String>,
    /// Whether CRI withholds the remote-snapshot labels from the snapshotter (containerd's
    /// default is true; Beam needs false).
    pub disable_snapshot_annotations: Option<bool>,
    /// The pod sandbox ("pause") image (`sandbox_image`, in 2.x `pinned_images.sandbox`).
    pub sandbox_image: Option<String>,
    /// A `certs.d`-style directory of `HOST:PORT/hosts.toml` files (registry `config_path`),
    /// e.g. to pull from a plain-HTTP registry.
    pub registry_config_path: Option<PathBuf>,
}

/// What to add to the generated configuration.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// TOML merged into the generated `config.toml` (tables are merged key by key, arrays of
    /// tables appended, other values replaced), e.g. a `[proxy_plugins.beam]` section or
    /// [`beam_plugin_config`]. One valid TOML document (join several with [`merge_configs`]),
    /// written for the config version of the chosen containerd.
    pub extra_config: String,
    /// Keep the CRI plugin enabled (it is disabled by default).
    pub cri: bool,
    /// CRI settings, used only when `cri` is true.
    pub cri_config: CriConfig,
    /// containerd's log level (`info` when empty).
    pub log_level: String,
    /// Which containerd to start.
    pub version: ContainerdVersion,
}

/// A running containerd. See the module documentation.
#[derive(Debug)]
pub struct Containerd {
    child: ChildGuard,
    dir: Option<tempfile::TempDir>,
    address: PathBuf,
    namespace: String,
    root: PathBuf,
    state: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    version: ContainerdVersion,
    detected: DetectedVersion,
    ctr: PathBuf,
}

/// Merges `extra` into `base`: tables key by key, arrays of tables appended (skipping entries
/// `base` already has), anything else replaced.
pub fn merge_toml(base: &mut Table, extra: Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(e)) => merge_toml(b, e),
            (Some(Value::Array(b)), Value::Array(e))
                if b.iter().chain(e.iter()).all(Value::is_table) =>
            {
                for item in e {
                    if !b.contains(&item) {
                        b.push(item);
                    }
                }
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Merges TOML documents with [`merge_toml`], in order: e.g. [`beam_plugin_config`] and a test's
/// own sections, for [`ContainerdOptions::extra_config`] (which must be one valid document).
pub fn merge_configs(parts: &[&str]) -> Result<String> {
    let mut all = Table::new();
    for (i, part) in parts.iter().enumerate() {
        let t: Table =
            toml::from_str(part).with_context(|| format!("parsing config part {i}:\n{part}"))?;
        merge_toml(&mut all, t);
    }
    toml::to_string(&all).context("serialising merged configuration")
}

/// The table at `path` in `t`, created (empty) where missing.
fn table_at<'a>(t: &'a mut Table, path: &[&str]) -> &'a mut Table {
    let mut cur = t;
    for key in path {
        let entry = cur
            .entry(key.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        cur = match entry {
            Value::Table(t) => t,
            _ => unreachable!("replaced by a table above"),
        };
    }
    cur
}

fn path_value(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// The paths a generated configuration names.
#[derive(Debug, Clone)]
struct ConfigPaths {
    root: PathBuf,
    state: PathBuf,
    address: PathBuf,
    ttrpc: PathBuf,
    opt: PathBuf,
    /// An empty CNI configuration directory: pods use the host network, and the system's CNI
    /// setup (if any) is not ours to use.
    cni_conf: PathBuf,
    cni_bin: PathBuf,
    /// runc's `--root` for CRI containers.
    runc_root: PathBuf,
}

/// Renders the configuration of one containerd: ours, then `opts.extra_config` merged in.
fn render_config(
    opts: &ContainerdOptions,
    v: &DetectedVersion,
    paths: &ConfigPaths,
) -> Result<String> {
    let level = if opts.log_level.is_empty() {
        "info"
    } else {
        opts.log_level.as_str()
    };
    let v3 = v.config_version() == 3;
    let mut c = Table::new();
    c.insert("version".into(), Value::Integer(v.config_version().into()));
    c.insert("root".into(), path_value(&paths.root));
    c.insert("state".into(), path_value(&paths.state));
    if !opts.cri {
        let disabled: Vec<Value> = if v3 {
            CRI_PLUGINS_V3.iter().map(|p| Value::from(*p)).collect()
        } else {
            vec![Value::from(CRI_PLUGINS_V3[0])]
        };
        c.insert("disabled_plugins".into(), Value::Array(disabled));
    }
    table_at(&mut c, &["grpc"]).insert("address".into(), path_value(&paths.address));
    table_at(&mut c, &["ttrpc"]).insert("address".into(), path_value(&paths.ttrpc));
    table_at(&mut c, &["debug"]).insert("level".into(), level.into());
    table_at(&mut c, &["plugins", "io.containerd.internal.v1.opt"])
        .insert("path".into(), path_value(&paths.opt));
    if v.at_least(1, 7) {
        // NRI listens on /var/run/nri/nri.sock (enabled by default in 2.x): several instances
        // (or the system's containerd) would fight over it.
        table_at(&mut c, &["plugins", "io.containerd.nri.v1.nri"])
            .insert("disable".into(), true.into());
    }
    if opts.cri {
        cri_config(&mut c, &opts.cri_config, v, paths);
    }
    if !opts.extra_config.trim().is_empty() {
        let extra: Table = toml::from_str(&opts.extra_config)
            .with_context(|| format!("parsing extra_config:\n{}", opts.extra_config))?;
        merge_toml(&mut c, extra);
    }
    if v.at_least(2, 0) {
        keep_default_unpack(&mut c);
    }
    toml::to_string(&c).context("serialising the containerd configuration")
}

/// The CRI keys of [`CriConfig`], plus a random stream-server port (so instances do not fight
/// over 10010) and an empty CNI setup of this instance.
fn cri_config(c: &mut Table, cri: &CriConfig, v: &DetectedVersion, paths: &ConfigPaths) {
    // CRI gives pod sandboxes oom_score_adj -998, which needs CAP_SYS_RESOURCE; where we lack
    // it (some VMs and containers) runc fails with "can't get final child's PID from pipe".
    let restrict_oom = !has_capability(CAP_SYS_RESOURCE);
    if v.config_version() == 3 {
        let grpc = table_at(c, &["plugins", "io.containerd.grpc.v1.cri"]);
        grpc.insert("stream_server_port".into(), "0".into());
        let runtime = table_at(c, &["plugins", "io.containerd.cri.v1.runtime"]);
        if restrict_oom {
            runtime.insert("restrict_oom_score_adj".into(), true.into());
        }
        runc_root(runtime, paths);
        let images = table_at(c, &["plugins", "io.containerd.cri.v1.images"]);
        if let Some(s) = &cri.snapshotter {
            images.insert("snapshotter".into(), s.as_str().into());
        }
        if let Some(d) = cri.disable_snapshot_annotations {
            images.insert("disable_snapshot_annotations".into(), d.into());
        }
        if let Some(img) = &cri.sandbox_image {
            table_at(images, &["pinned_images"]).insert("sandbox".into(), img.as_str().into());
        }
        if let Some(dir) = &cri.registry_config_path {
            table_at(images, &["registry"]).insert("config_path".into(), path_value(dir));
        }
        let cni = table_at(c, &["plugins", "io.containerd.cri.v1.runtime", "cni"]);
        cni.insert("conf_dir".into(), path_value(&paths.cni_conf));
        if v.at_least(2, 1) {
            cni.insert(
                "bin_dirs".into(),
                Value::Array(vec![path_value(&paths.cni_bin)]),
            );
        } else {
            cni.insert("bin_dir".into(), path_value(&paths.cni_bin));
        }
        // 2.1+: CRI pulls unpack through the transfer service, which must know a non-default
        // snapshotter.
        if let Some(s) = cri.snapshotter.as_deref().filter(|s| *s != "overlayfs") {
            if v.at_least(2, 1) {
                add_unpack_config(c, "linux", s);
            }
        }
    } else {
        let grpc = table_at(c, &["plugins", "io.containerd.grpc.v1.cri"]);
        grpc.insert("stream_server_port".into(), "0".into());
        if restrict_oom {
            grpc.insert("restrict_oom_score_adj".into(), true.into());
        }
        runc_root(grpc, paths);
        if let Some(img) = &cri.sandbox_image {
            grpc.insert("sandbox_image".into(), img.as_str().into());
        }
        let ctd = table_at(grpc, &["containerd"]);
        if let Some(s) = &cri.snapshotter {
            ctd.insert("snapshotter".into(), s.as_str().into());
        }
        if let Some(d) = cri.disable_snapshot_annotations {
            ctd.insert("disable_snapshot_annotations".into(), d.into());
        }
        if let Some(dir) = &cri.registry_config_path {
            table_at(grpc, &["registry"]).insert("config_path".into(), path_value(dir));
        }
        let cni = table_at(grpc, &["cni"]);
        cni.insert("conf_dir".into(), path_value(&paths.cni_conf));
        cni.insert("bin_dir".into(), path_value(&paths.cni_bin));
    }
}

/// Keeps runc's state of CRI containers in our directory (`Root` of the default `runc`
/// runtime, under the CRI runtime table `cri`) instead of the shared
/// `/run/containerd/runc/k8s.io`, so a failed test leaves none behind.
fn runc_root(cri: &mut Table, paths: &ConfigPaths) {
    let runc = table_at(cri, &["containerd", "runtimes", "runc"]);
    runc.insert("runtime_type".into(), "io.containerd.runc.v2".into());
    table_at(runc, &["options"]).insert("Root".into(), path_value(&paths.runc_root));
}

/// `CAP_SYS_RESOURCE` (capability(7)).
const CAP_SYS_RESOURCE: u32 = 24;

/// True when this process has capability number `cap` in its effective set.
fn has_capability(cap: u32) -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1u64 << cap) != 0)
}

/// Appends `{platform, snapshotter}` to the 2.x transfer service's `unpack_config`.
fn add_unpack_config(c: &mut Table, platform: &str, snapshotter: &str) {
    let mut entry = Table::new();
    entry.insert("platform".into(), platform.into());
    entry.insert("snapshotter".into(), snapshotter.into());
    let mut extra = Table::new();
    table_at(&mut extra, &["plugins", "io.containerd.transfer.v1.local"]).insert(
        "unpack_config".into(),
        Value::Array(vec![Value::Table(entry)]),
    );
    merge_toml(c, extra);
}

/// containerd 2.x uses its default unpack platform (this platform, `overlayfs`) only while
/// `unpack_config` is empty: once an entry for a remote snapshotter is configured, plain pulls
/// (`ctr image pull`, CRI with overlayfs) fail with "no unpack platforms defined" unless
/// overlayfs is listed too. Adds it when missing, as stargz-snapshotter's docs do.
fn keep_default_unpack(c: &mut Table) {
    let listed = c
        .get("plugins")
        .and_then(|p| p.get("io.containerd.transfer.v1.local"))
        .and_then(|t| t.get("unpack_config"))
        .and_then(Value::as_array);
    let Some(listed) = listed else {
        return;
    };
    if listed.is_empty()
        || listed
            .iter()
            .any(|e| e.get("snapshotter").and_then(Value::as_str) == Some("overlayfs"))
    {
        return;
    }
    add_unpack_config(c, "linux", "overlayfs");
}

/// How [`beam_plugin_config`] renders the CRI part of the checked-in snippet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BeamCri {
    /// As checked in: CRI pulls and runs with `beam`, `disable_snapshot_annotations = false`.
    #[default]
    AsDeployed,
    /// Without the CRI tables: only the proxy plugin (and, for 2.x, the transfer service).
    Without,
    /// `disable_snapshot_annotations = true` (and, for 2.x, no
    /// `enable_remote_snapshot_annotations` export either): the mistake that makes CRI pulls
    /// silently download everything (field notes, "silent fallback").
    AnnotationsDisabled,
}

/// Beam's containerd configuration for `version`, rendered from the checked-in
/// `deploy/containerd/beam-v2.toml` (1.x) or `beam-v3.toml` (2.x) with `/run/beam/beam.sock`
/// replaced by `socket` and `/var/lib/beam` by `root`, without its `version` line, ready for
/// [`ContainerdOptions::extra_config`]. Tests that use it test the files users copy.
pub fn beam_plugin_config(
    version: ContainerdVersion,
    socket: &Path,
    root: &Path,
    cri: BeamCri,
) -> Result<String> {
    let detected = version.detect()?;
    render_beam_plugin_config(detected.config_version(), socket, root, cri)
}

/// [`beam_plugin_config`] for a config version (2 or 3).
pub fn render_beam_plugin_config(
    config_version: u32,
    socket: &Path,
    root: &Path,
    cri: BeamCri,
) -> Result<String> {
    let file = util::workspace_root()
        .join("deploy")
        .join("containerd")
        .join(format!("beam-v{config_version}.toml"));
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let mut t: Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let declared = t.remove("version").and_then(|v| v.as_integer());
    if declared != Some(config_version.into()) {
        bail!(
            "{} declares version {declared:?}, expected {config_version}",
            file.display()
        );
    }
    let socket = socket.to_string_lossy().into_owned();
    let root = root.to_string_lossy().into_owned();
    let mut replaced = 0;
    replace_strings(&mut t, &mut |s: &str| match s {
        "/run/beam/beam.sock" => {
            replaced += 1;
            Some(socket.clone())
        }
        "/var/lib/beam" => Some(root.clone()),
        _ => None,
    });
    if replaced == 0 {
        bail!("{} names no /run/beam/beam.sock", file.display());
    }
    let cri_tables: &[&[&str]] = if config_version == 3 {
        &[
            &["io.containerd.cri.v1.images"],
            &["io.containerd.grpc.v1.cri"],
        ]
    } else {
        &[&["io.containerd.grpc.v1.cri", "containerd"]]
    };
    let plugins = t.get_mut("plugins").and_then(Value::as_table_mut);
    match (cri, plugins) {
        (BeamCri::AsDeployed, _) => {}
        (BeamCri::Without, Some(plugins)) => {
            plugins.remove("io.containerd.grpc.v1.cri");
            plugins.remove("io.containerd.cri.v1.images");
            plugins.remove("io.containerd.cri.v1.runtime");
        }
        (BeamCri::AnnotationsDisabled, Some(plugins)) => {
            let mut found = false;
            for path in cri_tables {
                let mut cur = Some(&mut *plugins);
                for key in *path {
                    cur = cur
                        .and_then(|c| c.get_mut(*key))
                        .and_then(Value::as_table_mut);
                }
                if let Some(table) = cur {
                    if table.contains_key("disable_snapshot_annotations") {
                        table.insert("disable_snapshot_annotations".into(), true.into());
                        found = true;
                    }
                }
            }
            if !found {
                bail!("{} sets no disable_snapshot_annotations", file.display());
            }
            if let Some(exports) = t
                .get_mut("proxy_plugins")
                .and_then(Value::as_table_mut)
                .and_then(|p| p.get_mut("beam"))
                .and_then(Value::as_table_mut)
                .and_then(|b| b.get_mut("exports"))
                .and_then(Value::as_table_mut)
            {
                exports.remove("enable_remote_snapshot_annotations");
            }
        }
        (_, None) => bail!("{} has no [plugins] tables", file.display()),
    }
    toml::to_string(&t).context("serialising the Beam plugin configuration")
}

/// Replaces every string value for which `f` returns a replacement.
fn replace_strings(t: &mut Table, f: &mut impl FnMut(&str) -> Option<String>) {
    fn walk(v: &mut Value, f: &mut impl FnMut(&str) -> Option<String>) {
        match v {
            Value::String(s) => {
                if let Some(new) = f(s) {
                    *s = new;
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|v| walk(v, f)),
            Value::Table(t) => t.iter_mut().for_each(|(_, v)| walk(v, f)),
            _ => {}
        }
    }
    t.iter_mut().for_each(|(_, v)| walk(v, f));
}

impl Containerd {
    /// Starts the system's containerd with the default options (CRI disabled, nothing extra).
    pub fn start() -> Result<Containerd> {
        Self::start_with(ContainerdOptions::default())
    }

    /// Starts containerd with `opts`.
    pub fn start_with(opts: ContainerdOptions) -> Result<Containerd> {
        let version = opts.version;
        let bin = version.containerd_bin();
        if let Some(reason) = version.unavailable_reason() {
            bail!("{reason}");
        }
        let detected = version.detect()?;
        let dir = util::short_tempdir()?;
        let base = dir.path().to_path_buf();
        let paths = ConfigPaths {
            root: base.join("root"),
            state: base.join("state"),
            address: base.join("c.sock"),
            ttrpc: base.join("c.sock.ttrpc"),
            opt: base.join("opt"),
            cni_conf: base.join("cni").join("net.d"),
            cni_bin: base.join("cni").join("bin"),
            runc_root: base.join("runc"),
        };
        for d in [
            &paths.root,
            &paths.state,
            &paths.opt,
            &paths.cni_conf,
            &paths.cni_bin,
        ] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        if paths.address.as_os_str().len() >= 100 {
            bail!(
                "containerd socket path {} is too long",
                paths.address.display()
            );
        }
        // A namespace of our own keeps runc's state dirs and cgroups apart from other instances.
        let suffix = base
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("bct-"))
            .unwrap_or("x")
            .to_string();
        let namespace = format!("bct-{suffix}");

        let config = render_config(&opts, &detected, &paths)?;
        let config_path = base.join("config.toml");
        fs::write(&config_path, &config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log_path = base.join("containerd.log");

        let child = spawn_containerd(
            version,
            &bin,
            &config_path,
            &paths.address,
            &paths.root,
            &paths.state,
            &log_path,
        )?;
        let mut c = Containerd {
            child,
            dir: Some(dir),
            address: paths.address,
            namespace,
            root: paths.root,
            state: paths.state,
            config_path,
            log_path,
            version,
            detected,
            ctr: version.ctr_bin(),
        };
        c.wait_ready()?;
        Ok(c)
    }

    /// Stops containerd (by PID, SIGTERM then SIGKILL) and starts it again with the same
    /// config, address, root and state, as a node's containerd restarts (an upgrade, a
    /// crash): running containers keep running under their shims.
    pub fn restart(&mut self) -> Result<()> {
        self.child.stop(Duration::from_secs(10));
        self.child = spawn_containerd(
            self.version,
            &self.version.containerd_bin(),
            &self.config_path,
            &self.address,
            &self.root,
            &self.state,
            &self.log_path,
        )?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "containerd {} exited early ({status}); log tail:\n{}",
                    self.detected.text,
                    util::tail_file(&self.log_path, 40)
                );
            }
            if self.address.exists() {
                let mut cmd = Command::new(&self.ctr);
                cmd.arg("--address").arg(&self.address).arg("version");
                match util::output_with_timeout(&mut cmd, Duration::from_secs(5)) {
                    Ok(out) if out.status.success() => return Ok(()),
                    Ok(out) => last = String::from_utf8_lossy(&out.stderr).into_owned(),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd {} at {} not ready within {READY_TIMEOUT:?} (last ctr error: \
                     {last}); log tail:\n{}",
                    self.detected.text,
                    self.address.display(),
                    util::tail_file(&self.log_path, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Which containerd this is.
    pub fn selected_version(&self) -> ContainerdVersion {
        self.version
    }

    /// What its `containerd --version` said.
    pub fn version(&self) -> &DetectedVersion {
        &self.detected
    }

    /// Its version as printed, e.g. `1.6.20~ds1`, `1.7.24~ds1`, `2.1.9+unknown`.
    pub fn version_string(&self) -> &str {
        &self.detected.text
    }

    /// The generated configuration.
    pub fn config(&self) -> String {
        fs::read_to_string(&self.config_path).unwrap_or_default()
    }

    /// The configuration as this containerd understands it (`containerd --config FILE config
    /// dump`: its defaults with our file applied), and what it warned about on stderr (2.x
    /// names keys it ignores there). Shows whether a key in our file is spelled right for
    /// this version: a misplaced key leaves the default in the dump.
    pub fn config_dump(&self) -> Result<(Table, String)> {
        let bin = self.version.containerd_bin();
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&self.config_path)
            .args(["config", "dump"]);
        let out = util::run_checked(&mut cmd, Duration::from_secs(30))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let table: Table = toml::from_str(&text)
            .with_context(|| format!("parsing `{} config dump`:\n{text}", bin.display()))?;
        Ok((table, String::from_utf8_lossy(&out.stderr).into_owned()))
    }

    /// The gRPC socket path.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The namespace the `ctr` helpers use (unique to this instance, `bct-XXXXXX`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// containerd's `--root`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// containerd's `--state`.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The temporary directory that holds root, state, socket, config and log.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(Path::new(""))
    }

    /// The generated config.toml.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The log file (containerd's stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The process id of containerd.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// A `ctr` command with `--address` and `--namespace` of this instance, not yet run.
    pub fn ctr_command(&self) -> Command {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace);
        cmd
    }

    /// Runs `ctr --address SOCK --namespace NS ARGS...` (time limit [`CTR_TIMEOUT`]); a non-zero
    /// exit is an error that shows ctr's output and the tail of containerd's log.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        self.ctr_with_timeout(args, CTR_TIMEOUT)
    }

    /// [`Containerd::ctr`] with an explicit time limit.
    pub fn ctr_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let out = self.ctr_unchecked(args, timeout)?;
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}):\nstdout:\n{}\nstderr:\n{}\ncontainerd log tail:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                util::tail_file(&self.log_path, 30)
            );
        }
        Ok(out)
    }

    /// Runs ctr and returns its output whatever the exit status (errors only if it could not run
    /// or timed out).
    pub fn ctr_unchecked(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = self.ctr_command();
        cmd.args(args);
        util::output_with_timeout(&mut cmd, timeout)
            .with_context(|| format!("running ctr {}", args.join(" ")))
    }

    /// `ctr images pull --plain-http IMAGE` (and unpack into the default snapshotter).
    pub fn pull_plain_http(&self, image: &str) -> Result<()> {
        self.ctr(&["images", "pull", "--plain-http", image])?;
        Ok(())
    }

    /// `ctr images pull --plain-http --user USER:PASS IMAGE`.
    pub fn pull_plain_http_with_auth(&self, image: &str, user: &str, pass: &str) -> Result<()> {
        let creds = format!("{user}:{pass}");
        self.ctr(&["images", "pull", "--plain-http", "--user", &creds, image])?;
        Ok(())
    }

    /// `ctr run --rm IMAGE ID CMD...`, returning the container's stdout.
    pub fn run(&self, image: &str, id: &str, cmd: &[&str]) -> Result<String> {
        self.run_with(&[], image, id, cmd)
    }

    /// `ctr run --rm FLAGS... IMAGE ID CMD...` (e.g. `--snapshotter beam`), returning stdout.
    pub fn run_with(&self, flags: &[&str], image: &str, id: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(flags);
        args.push(image);
        args.push(id);
        args.extend_from_slice(cmd);
        let out = self.ctr(&args)?;
        String::from_utf8(out.stdout).context("container output is not UTF-8")
    }

    /// The shim processes serving this instance (their command line names our socket).
    pub fn shims(&self) -> Vec<util::ProcInfo> {
        let address = self.address.to_string_lossy().into_owned();
        util::processes()
            .into_iter()
            .filter(|p| {
                let is_shim = p
                    .cmdline
                    .first()
                    .and_then(|a| Path::new(a).file_name())
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("containerd-shim"));
                is_shim
                    && p.cmdline
                        .windows(2)
                        .any(|w| (w[0] == "-address" || w[0] == "--address") && w[1] == address)
            })
            .collect()
    }

    /// Kills every shim of this instance and all processes below them (the containers),
    /// then removes what they leave behind outside our directories: shim sockets, runc state
    /// and cgroups of their containers.
    fn kill_shims(&self) {
        let shims = self.shims();
        if shims.is_empty() {
            return;
        }
        let all = util::processes();
        let pids: Vec<u32> = shims.iter().map(|s| s.pid).collect();
        let sockets: Vec<PathBuf> = pids
            .iter()
            .flat_map(|p| listening_unix_sockets(*p))
            .collect();
        // ctr's stdio FIFOs for detached containers (`ctr run -d`), which only `ctr task delete`
        // would remove: the shim holds them open.
        let fifo_dirs: Vec<PathBuf> = pids
            .iter()
            .flat_map(|p| open_files(*p))
            .filter(|f| f.starts_with(FIFO_DIR))
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .filter(|d| d.parent() == Some(Path::new(FIFO_DIR)))
            .collect();
        let order = util::descendants_first(&pids, &all);
        let left = util::kill_pids(&order);
        if !left.is_empty() {
            eprintln!("beam-tests: processes still alive after SIGKILL: {left:?}");
        }
        for s in sockets {
            if s.starts_with("/run/containerd/s") || s.starts_with(self.dir()) {
                let _ = fs::remove_file(&s);
            }
        }
        for d in fifo_dirs {
            let _ = fs::remove_dir_all(d);
        }
        for shim in &shims {
            let arg = |name: &str| {
                shim.cmdline
                    .windows(2)
                    .find(|w| w[0] == name || w[0] == format!("-{name}"))
                    .map(|w| w[1].clone())
            };
            let (Some(ns), Some(id)) = (arg("-namespace"), arg("-id")) else {
                continue;
            };
            if ns.contains('/') || id.contains('/') || ns.starts_with('.') || id.starts_with('.') {
                continue;
            }
            let runc_state = Path::new("/run/containerd/runc").join(&ns).join(&id);
            let _ = fs::remove_dir_all(&runc_state);
            let _ = fs::remove_dir(Path::new("/run/containerd/runc").join(&ns));
            remove_cgroups(&ns);
        }
    }
}

/// Where ctr makes the stdio FIFOs of containers.
const FIFO_DIR: &str = "/run/containerd/fifo";

/// The paths that process `pid` has open.
fn open_files(pid: u32) -> Vec<PathBuf> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| fs::read_link(fd.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the (empty) cgroups runc made for containers of namespace `ns` (cgroupsPath
/// `/NS/ID`), under every cgroup v1 controller and the v2 root. Only `rmdir`: a cgroup that
/// still has processes stays.
fn remove_cgroups(ns: &str) {
    if ns.is_empty() || ns.contains('/') || ns.starts_with('.') {
        return;
    }
    let base = Path::new("/sys/fs/cgroup");
    let mut roots = vec![base.to_path_buf()];
    if let Ok(ctrls) = fs::read_dir(base) {
        roots.extend(ctrls.flatten().map(|c| c.path()).filter(|p| p.is_dir()));
    }
    for root in roots {
        let ns_dir = root.join(ns);
        if !ns_dir.is_dir() {
            continue;
        }
        if let Ok(children) = fs::read_dir(&ns_dir) {
            for child in children.flatten() {
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(child.path());
                }
            }
        }
        let _ = fs::remove_dir(&ns_dir);
    }
}

/// Paths of the unix sockets that process `pid` has open (from /proc/PID/fd and /proc/net/unix).
fn listening_unix_sockets(pid: u32) -> Vec<PathBuf> {
    let mut inodes = Vec::new();
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    inodes.push(inode.to_string());
                }
            }
        }
    }
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path
            let inode = fields.get(6)?;
            let path = fields.get(7)?;
            (inodes.iter().any(|i| i == inode) && path.starts_with('/'))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.kill_shims();
        self.child.stop(Duration::from_secs(5));
        // A shim could have been starting while we looked: look again now containerd is gone.
        self.kill_shims();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = util::cleanup_dir(&path) {
                eprintln!("beam-tests: cleaning up containerd dir: {e:#}");
                // Never let TempDir delete through a mount that is still there.
                let _ = dir.keep();
            }
        }
        let _ = fs::remove_dir(Path::new("/run/containerd/runc").join(&self.namespace));
        remove_cgroups(&self.namespace);
    }
}

/// Starts `bin` (containerd of `version`) with its config, address, root and state, logging
/// to `log_path`.
fn spawn_containerd(
    version: ContainerdVersion,
    bin: &Path,
    config_path: &Path,
    address: &Path,
    root: &Path,
    state: &Path,
    log_path: &Path,
) -> Result<ChildGuard> {
    let (stdout, stderr) = util::log_stdio(log_path)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config_path)
        .arg("--address")
        .arg(address)
        .arg("--root")
        .arg(root)
        .arg("--state")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    if let Some(bin_dir) = version.bin_dir() {
        // containerd finds `containerd-shim-runc-v2` on its PATH: make it this version's.
        let mut path = vec![bin_dir];
        if let Some(old) = std::env::var_os("PATH") {
            path.extend(std::env::split_paths(&old));
        }
        cmd.env(
            "PATH",
            std::env::join_paths(path).context("building PATH for containerd")?,
        );
    }
    ChildGuard::spawn("containerd", &mut cmd).with_context(|| {
        format!(
            "is {} installed (containerd {})?",
            bin.display(),
            version.name()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> DetectedVersion {
        DetectedVersion::parse(text).unwrap()
    }

    fn paths() -> ConfigPaths {
        let p = |s: &str| PathBuf::from(format!("/tmp/bct-test/{s}"));
        ConfigPaths {
            root: p("root"),
            state: p("state"),
            address: p("c.sock"),
            ttrpc: p("c.sock.ttrpc"),
            opt: p("opt"),
            cni_conf: p("cni/net.d"),
            cni_bin: p("cni/bin"),
            runc_root: p("runc"),
        }
    }

    fn get<'a>(t: &'a Table, path: &[&str]) -> Option<&'a Value> {
        let (last, init) = path.split_last()?;
        let mut cur = t;
        for k in init {
            cur = cur.get(*k)?.as_table()?;
        }
        cur.get(*last)
    }

    #[test]
    fn versions_parse() {
        let d = v("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n");
        assert_eq!((d.major, d.minor, d.patch), (1, 6, 20));
        assert_eq!(d.text, "1.6.20~ds1");
        assert_eq!(d.config_version(), 2);
        let d = v("containerd github.com/containerd/containerd/v2 2.1.9+unknown \n");
        assert_eq!((d.major, d.minor, d.patch), (2, 1, 9));
        assert!(d.at_least(2, 1) && !d.at_least(2, 2) && d.at_least(1, 7));
        assert_eq!(d.config_version(), 3);
        assert_eq!(v("containerd containerd.io v1.7.3 abc").text, "1.7.3");
        assert!(DetectedVersion::parse("containerd, no number").is_err());
    }

    #[test]
    fn merge_keeps_tables_unique() {
        let mut a: Table = toml::from_str(
            "[plugins.x]\na = 1\n[[plugins.t.list]]\nn = 1\n[proxy_plugins.beam]\ntype = \"snapshot\"\n",
        )
        .unwrap();
        let b: Table = toml::from_str(
            "[plugins.x]\nb = 2\n[[plugins.t.list]]\nn = 1\n[[plugins.t.list]]\nn = 2\n\
             [proxy_plugins.beam]\naddress = \"/s\"\n",
        )
        .unwrap();
        merge_toml(&mut a, b);
        let text = toml::to_string(&a).unwrap();
        let back: Table = toml::from_str(&text).unwrap();
        assert_eq!(get(&back, &["plugins", "x", "a"]), Some(&Value::Integer(1)));
        assert_eq!(get(&back, &["plugins", "x", "b"]), Some(&Value::Integer(2)));
        assert_eq!(
            get(&back, &["plugins", "t", "list"])
                .and_then(Value::as_array)
                .map(Vec::len),
            Some(2)
        );
        assert_eq!(
            get(&back, &["proxy_plugins", "beam", "type"]).and_then(Value::as_str),
            Some("snapshot")
        );
    }

    #[test]
    fn configs_per_version() {
        let beam_v2 = render_beam_plugin_config(
            2,
            Path::new("/tmp/b/beam.sock"),
            Path::new("/tmp/b/root"),
            BeamCri::AsDeployed,
        )
        .unwrap();
        let beam_v3 = render_beam_plugin_config(
            3,
            Path::new("/tmp/b/beam.sock"),
            Path::new("/tmp/b/root"),
            BeamCri::AsDeployed,
        )
        .unwrap();
        // The same sections again (as older tests write them) must not duplicate tables.
        let extra_proxy =
            "[proxy_plugins]\n  [proxy_plugins.beam]\n    type = \"snapshot\"\n    address = \"/tmp/b/beam.sock\"\n";
        for (version, beam) in [
            ("1.6.20~ds1", &beam_v2),
            ("1.7.24", &beam_v2),
            ("2.1.9", &beam_v3),
        ] {
            let d = v(&format!("containerd x {version}"));
            let opts = ContainerdOptions {
                extra_config: merge_configs(&[beam, extra_proxy]).unwrap(),
                cri: true,
                cri_config: CriConfig {
                    snapshotter: Some("beam".into()),
                    disable_snapshot_annotations: Some(false),
                    sandbox_image: Some("127.0.0.1:1/pause:1".into()),
                    registry_config_path: Some("/tmp/certs.d".into()),
                },
                ..Default::default()
            };
            let text = render_config(&opts, &d, &paths()).unwrap();
            let t: Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(
                get(&t, &["version"]),
                Some(&Value::Integer(d.config_version().into()))
            );
            assert!(t.get("disabled_plugins").is_none(), "{text}");
            assert_eq!(
                get(&t, &["proxy_plugins", "beam", "address"]).and_then(Value::as_str),
                Some("/tmp/b/beam.sock"),
                "{text}"
            );
            let (images, grpc): (&[&str], &[&str]) = if d.major >= 2 {
                (
                    &["plugins", "io.containerd.cri.v1.images"],
                    &["plugins", "io.containerd.grpc.v1.cri"],
                )
            } else {
                (
                    &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
                    &["plugins", "io.containerd.grpc.v1.cri"],
                )
            };
            let key = |base: &[&str], k: &str| {
                let mut p = base.to_vec();
                p.push(k);
                get(&t, &p).cloned()
            };
            assert_eq!(key(images, "snapshotter"), Some("beam".into()), "{text}");
            assert_eq!(
                key(images, "disable_snapshot_annotations"),
                Some(false.into()),
                "{text}"
            );
            assert_eq!(key(grpc, "stream_server_port"), Some("0".into()), "{text}");
            if d.major >= 2 {
                let unpack = get(
                    &t,
                    &[
                        "plugins",
                        "io.containerd.transfer.v1.local",
                        "unpack_config",
                    ],
                )
                .and_then(Value::as_array)
                .unwrap_or_else(|| panic!("no unpack_config:\n{text}"));
                let snaps: Vec<&str> = unpack
                    .iter()
                    .filter_map(|e| e.get("snapshotter").and_then(Value::as_str))
                    .collect();
                assert_eq!(snaps, ["beam", "overlayfs"], "{text}");
                assert_eq!(
                    get(
                        &t,
                        &[
                            "proxy_plugins",
                            "beam",
                            "exports",
                            "enable_remote_snapshot_annotations"
                        ]
                    )
                    .and_then(Value::as_str),
                    Some("true")
                );
                assert_eq!(
                    key(
                        &["plugins", "io.containerd.cri.v1.images", "pinned_images"],
                        "sandbox"
                    ),
                    Some("127.0.0.1:1/pause:1".into())
                );
            } else {
                assert_eq!(
                    key(grpc, "sandbox_image"),
                    Some("127.0.0.1:1/pause:1".into())
                );
            }
        }
        // Without CRI every CRI plugin is disabled.
        for (version, n) in [("1.6.20", 1), ("2.1.9", 3)] {
            let text = render_config(
                &ContainerdOptions::default(),
                &v(&format!("c x {version}")),
                &paths(),
            )
            .unwrap();
            let t: Table = toml::from_str(&text).unwrap();
            assert_eq!(
                t["disabled_plugins"].as_array().map(Vec::len),
                Some(n),
                "{text}"
            );
        }
    }

    #[test]
    fn beam_snippet_variants() {
        let sock = Path::new("/tmp/x/beam.sock");
        let root = Path::new("/tmp/x/root");
        for cv in [2, 3] {
            let without = render_beam_plugin_config(cv, sock, root, BeamCri::Without).unwrap();
            assert!(
                !without.contains("disable_snapshot_annotations"),
                "{without}"
            );
            assert!(without.contains("/tmp/x/beam.sock"), "{without}");
            assert!(!without.contains("/run/beam"), "{without}");
            let bad =
                render_beam_plugin_config(cv, sock, root, BeamCri::AnnotationsDisabled).unwrap();
            assert!(bad.contains("disable_snapshot_annotations = true"), "{bad}");
            let t: Table = toml::from_str(&bad).unwrap();
            assert!(t.get("version").is_none());
        }
        let v3 = render_beam_plugin_config(3, sock, root, BeamCri::Without).unwrap();
        assert!(v3.contains("unpack_config"), "{v3}");
        assert!(v3.contains("/tmp/x/root"), "{v3}");
    }
}
