//! `beam doctor`: finds the configuration mistakes that make a lazy-pulling snapshotter
//! silently pull everything in full (the peers' most common complaint), and says which line to
//! change. It reads containerd's config file, asks the running containerd what it loaded, and
//! asks beam-snapshotter what it saw (layer requests that came without the remote-snapshot
//! labels are the tell-tale of a full pull).
//!
//! The config checks are pure functions of the file's text (tested below); the live checks
//! only add evidence.

use crate::containerd::{Containerd, PluginInfo, Version};
use crate::daemon::control::DaemonStatus;
use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Info,
    Warn,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Ok => "ok",
            Severity::Info => "info",
            Severity::Warn => "WARN",
            Severity::Error => "ERROR",
        })
    }
}

/// One thing `beam doctor` found, and how to fix it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn new(severity: Severity, what: impl Into<String>) -> Self {
        Finding {
            severity,
            what: what.into(),
            fix: None,
        }
    }
    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// What the config checks need to know besides the file.
#[derive(Debug, Clone)]
pub struct ConfigContext {
    /// The config file's path (for messages).
    pub path: PathBuf,
    /// The proxy plugin's name.
    pub snapshotter: String,
    /// Where beam-snapshotter listens.
    pub beam_address: PathBuf,
    /// containerd's version, when known.
    pub version: Option<Version>,
}

/// containerd's config file as the checks see it: its values (what containerd reads) and its
/// layout (where each key is written, so a fix can name the line to change).
struct ConfigFile<'a> {
    ctx: &'a ConfigContext,
    values: toml::Value,
    /// The same text parsed with spans; None only if toml_edit rejects what toml accepted.
    layout: Option<toml_edit::Document<&'a str>>,
    text: &'a str,
    /// `version = N`; containerd reads a file without it as version 1.
    version: i64,
}

/// One config check: adds its findings; `Break` when the checks after it would be meaningless
/// (an unsupported config version, CRI disabled).
type Check = fn(&ConfigFile, &mut Vec<Finding>) -> ControlFlow<()>;

/// The config checks, in the order their findings are reported.
const CONFIG_CHECKS: &[Check] = &[
    config_version,
    config_version_matches_containerd,
    proxy_plugin,
    cri_enabled,
    cri_snapshotter,
    transfer_unpack_config,
    remote_snapshot_labels,
];

/// Check containerd's config file text. See the module documentation.
pub fn check_config(text: &str, ctx: &ConfigContext) -> Vec<Finding> {
    let values = match text.parse::<toml::Table>() {
        Ok(t) => toml::Value::Table(t),
        Err(e) => {
            return vec![Finding::new(
                Severity::Error,
                format!("{} is not valid TOML: {e}", ctx.path.display()),
            )]
        }
    };
    let version = values
        .get("version")
        .and_then(|v| v.as_integer())
        .unwrap_or(1);
    let config = ConfigFile {
        ctx,
        values,
        layout: toml_edit::Document::parse(text).ok(),
        text,
        version,
    };
    let mut out = Vec::new();
    for check in CONFIG_CHECKS {
        if check(&config, &mut out).is_break() {
            break;
        }
    }
    out
}

impl ConfigFile<'_> {
    fn get(&self, path: &[&str]) -> Option<&toml::Value> {
        path.iter().try_fold(&self.values, |v, k| v.get(*k))
    }

    fn snapshotter(&self) -> &str {
        &self.ctx.snapshotter
    }

    /// `PATH:LINE` of `key` in the table at `table`, else of the table's header, else `PATH`.
    fn line_of(&self, table: &[&str], key: &str) -> String {
        let path = self.ctx.path.display();
        match self.line(table, key) {
            Some(n) => format!("{path}:{n}"),
            None => path.to_string(),
        }
    }

    /// 1-based line where `key` is set in the table at `table`, else of the table's header.
    fn line(&self, table: &[&str], key: &str) -> Option<usize> {
        let item = table
            .iter()
            .try_fold(self.layout.as_ref()?.as_item(), |item, k| item.get(k))?;
        let at_key = item.as_table_like().and_then(|t| {
            t.key(key)
                .and_then(|k| k.span())
                .or_else(|| t.get(key)?.span())
        });
        let offset = at_key.or_else(|| item.span())?.start;
        Some(line_number(self.text, offset))
    }

    /// The CRI plugin's ID, the table its image settings sit in, and that table as a header.
    fn cri(&self) -> (&'static str, &'static [&'static str], &'static str) {
        if self.version == 2 {
            (
                "io.containerd.grpc.v1.cri",
                &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
                "[plugins.\"io.containerd.grpc.v1.cri\".containerd]",
            )
        } else {
            (
                "io.containerd.cri.v1.images",
                &["plugins", "io.containerd.cri.v1.images"],
                "[plugins.\"io.containerd.cri.v1.images\"]",
            )
        }
    }

    fn cri_setting(&self, key: &str) -> Option<&toml::Value> {
        self.get(self.cri().1)?.get(key)
    }

    /// The snapshotter CRI pulls use (containerd's default: overlayfs).
    fn cri_snapshotter(&self) -> &str {
        self.cri_setting("snapshotter")
            .and_then(|v| v.as_str())
            .unwrap_or("overlayfs")
    }

    /// containerd 2.1+ with a version 3 config: CRI pulls go through the transfer service,
    /// which passes the labels when the proxy plugin exports
    /// enable_remote_snapshot_annotations and unpack_config names us.
    fn transfer_era(&self) -> bool {
        self.version == 3 && self.ctx.version.is_none_or(|v| v >= Version::new(2, 1))
    }

    fn unpack_config_has_us(&self) -> bool {
        let sn = self.snapshotter();
        self.get(&[
            "plugins",
            "io.containerd.transfer.v1.local",
            "unpack_config",
        ])
        .and_then(|v| v.as_array())
        .is_some_and(|a| {
            a.iter()
                .any(|e| e.get("snapshotter").and_then(|s| s.as_str()) == Some(sn))
        })
    }
}

/// 1-based line number of byte `offset` in `text`.
fn line_number(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Beam's settings exist for config versions 2 (containerd 1.x) and 3 (2.x) only.
fn config_version(c: &ConfigFile, out: &mut Vec<Finding>) -> ControlFlow<()> {
    let path = c.ctx.path.display();
    let version = c.version;
    if version == 2 || version == 3 {
        out.push(Finding::new(
            Severity::Ok,
            format!("{path}: config version {version}"),
        ));
        return ControlFlow::Continue(());
    }
    out.push(
        Finding::new(
            Severity::Error,
            format!("{path}: config version {version}; Beam's settings are for versions 2 (containerd 1.x) and 3 (2.x)"),
        )
        .fix(format!("convert it with `containerd config migrate > {path}.new`, review, and replace")),
    );
    ControlFlow::Break(())
}

/// containerd 2.x migrates a version 2 file on every start: it works, but say so.
fn config_version_matches_containerd(c: &ConfigFile, out: &mut Vec<Finding>) -> ControlFlow<()> {
    if let Some(v) = c.ctx.version {
        if v.major >= 2 && c.version != 3 {
            out.push(Finding::new(
                Severity::Info,
                format!(
                    "containerd {}.x reads config version {} by migrating it on every start; `containerd config migrate` writes version 3",
                    v.major, c.version
                ),
            ));
        }
    }
    ControlFlow::Continue(())
}

/// `[proxy_plugins.NAME]`: containerd must know the snapshotter, as a snapshot plugin, at the
/// socket beam-snapshotter listens on.
fn proxy_plugin(c: &ConfigFile, out: &mut Vec<Finding>) -> ControlFlow<()> {
    let path = c.ctx.path.display();
    let sn = c.snapshotter();
    let beam_address = c.ctx.beam_address.display();
    let plugin_table = ["proxy_plugins", sn];
    let header = format!("[proxy_plugins.{sn}]");
    let Some(p) = c.get(&plugin_table) else {
        out.push(
            Finding::new(
                Severity::Error,
                format!("{path} has no {header}: containerd does not know the snapshotter {sn:?}"),
            )
            .fix(format!(
                "add to {path}:\n  {header}\n    type = \"snapshot\"\n    address = \"{beam_address}\"\nthen restart containerd"
            )),
        );
        return ControlFlow::Continue(());
    };
    let kind = p.get("type").and_then(|v| v.as_str()).unwrap_or("");
    let addr = p.get("address").and_then(|v| v.as_str()).unwrap_or("");
    if kind != "snapshot" {
        out.push(
            Finding::new(
                Severity::Error,
                format!("{header} has type = {kind:?}, not \"snapshot\""),
            )
            .fix(format!(
                "{}: set type = \"snapshot\"",
                c.line_of(&plugin_table, "type")
            )),
        );
    }
    if Path::new(addr) != c.ctx.beam_address {
        out.push(
            Finding::new(
                Severity::Error,
                format!(
                    "containerd talks to {sn} at {addr:?}, but beam-snapshotter listens on {beam_address}"
                ),
            )
            .fix(format!(
                "{}: set address = \"{beam_address}\" (or start beam-snapshotter with --address {addr})",
                c.line_of(&plugin_table, "address"),
            )),
        );
    } else if kind == "snapshot" {
        out.push(Finding::new(
            Severity::Ok,
            format!("{header} type = \"snapshot\", address = {addr:?}"),
        ));
    }
    ControlFlow::Continue(())
}

/// With the CRI plugin disabled only `beam pull` and ctr pull; the CRI checks do not apply.
fn cri_enabled(c: &ConfigFile, out: &mut Vec<Finding>) -> ControlFlow<()> {
    let (cri_plugin, _, _) = c.cri();
    let disabled = c
        .get(&["disabled_plugins"])
        .and_then(|v| v.as_array())
        .is_some_and(|a| {
            a.iter().any(|p| {
                p.as_str().is_some_and(|p| {
                    p == cri_plugin || p == "io.containerd.grpc.v1.cri" || p == "cri"
                })
            })
        });
    if !disabled {
        return ControlFlow::Continue(());
    }
    out.push(Finding::new(
        Severity::Info,
        format!(
            "the CRI plugin is disabled in {}: only `beam pull` and ctr use Beam",
            c.ctx.path.display()
        ),
    ));
    ControlFlow::Break(())
}

/// CRI (kubelet's) pulls must use our snapshotter for pods to start lazily.
fn cri_snapshotter(c: &ConfigFile, out: &mut Vec<Finding>) -> ControlFlow<()> {
    let sn = c.snapshotter();
    let (_, cri_table, cri_header) = c.cri();
    let cri_snapshotter = c.cri_snapshotter();
    if cri_snapshotter != sn {
        out.push(
            Finding::new(
                Severity::Warn,
                format!("CRI (kubelet) pulls use the {cri_snapshotter:?} snapshotter, not {sn:?}: pods do not start lazily"),
            )
            .fix(format!(
                "{}: set snapshotter = \"{sn}\" under {cri_header}",
                c.line_of(cri_table, "snapshotter")
            )),
        );
    } else {
        out.push(Finding::new(
            Severity::Ok,
            format!("CRI pulls use the {sn:?} snapshotter"),
        ));
    }
    ControlFlow::Continue(())
}

/// containerd 2.1+'s transfer service unpacks only for the snapshotters unpack_config names.
fn transfer_unpack_config(c: &ConfigFile, out: &mut Vec<Finding>) -> ControlFlow<()> {
    if c.transfer_era() && !c.unpack_config_has_us() {
        let sn = c.snapshotter();
        out.push(
            Finding::new(
                Severity::Warn,
                format!("containerd 2.1+'s transfer service does not list {sn:?} in unpack_config: `ctr image pull --snapshotter {sn}` fails with \"no unpack platforms defined\""),
            )
            .fix(format!(
                "add to {}:\n  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n    platform = \"linux\"\n    snapshotter = \"{sn}\"",
                c.ctx.path.display()
            )),
        );
    }
    ControlFlow::Continue(())
}

/// Without the remote-snapshot labels every CRI pull downloads every layer in full: they flow
/// when `disable_snapshot_annotations = false`, or on 2.1+ through the transfer service.
fn remote_snapshot_labels(c: &ConfigFile, out: &mut Vec<Finding>) -> ControlFlow<()> {
    let sn = c.snapshotter();
    let (_, cri_table, cri_header) = c.cri();
    let annotations_value = c
        .cri_setting("disable_snapshot_annotations")
        .and_then(|v| v.as_bool());
    // true is containerd's default since 1.4.2, in 2.x too.
    let annotations_off = annotations_value.unwrap_or(true);
    let exports_on = c
        .get(&[
            "proxy_plugins",
            sn,
            "exports",
            "enable_remote_snapshot_annotations",
        ])
        .and_then(|v| v.as_str().map(|s| s == "true").or(v.as_bool()))
        .unwrap_or(false);
    let labels_flow =
        !annotations_off || (c.transfer_era() && exports_on && c.unpack_config_has_us());
    if labels_flow {
        out.push(Finding::new(
            Severity::Ok,
            if !annotations_off {
                format!("CRI passes the remote-snapshot labels (disable_snapshot_annotations = false in {cri_header})")
            } else {
                "the transfer service passes the remote-snapshot labels (enable_remote_snapshot_annotations)".to_string()
            },
        ));
    } else if c.cri_snapshotter() == sn {
        let why = match annotations_value {
            Some(true) => "disable_snapshot_annotations = true".to_string(),
            _ => "disable_snapshot_annotations is not set, and containerd's default is true"
                .to_string(),
        };
        let mut fix = format!(
            "{}: set `disable_snapshot_annotations = false` under {cri_header}, then restart containerd",
            c.line_of(cri_table, "disable_snapshot_annotations")
        );
        if c.version == 3 {
            fix.push_str(&format!(
                "\n(or, on 2.1+, set enable_remote_snapshot_annotations = \"true\" under [proxy_plugins.{sn}.exports])"
            ));
        }
        out.push(
            Finding::new(
                Severity::Error,
                format!("CRI pulls pass no remote-snapshot labels to {sn}, so every layer is downloaded in full: {why}"),
            )
            .fix(fix),
        );
    }
    ControlFlow::Continue(())
}

/// What `beam doctor` is asked to look at.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub containerd_config: PathBuf,
    pub containerd_address: PathBuf,
    pub beam_address: PathBuf,
    pub snapshotter: String,
}

/// Run every check: the live ones first (they tell the containerd version the config checks
/// depend on).
pub async fn run(opts: &DoctorOptions) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut version = None;
    let mut plugins: Option<Vec<PluginInfo>> = None;
    match Containerd::connect(&opts.containerd_address, "default").await {
        Ok(c) => match c.version().await {
            Ok((v, _)) => {
                version = Version::parse(&v);
                out.push(Finding::new(
                    Severity::Ok,
                    format!("containerd {v} at {}", opts.containerd_address.display()),
                ));
                plugins = c.plugins("type==io.containerd.snapshotter.v1").await.ok();
            }
            Err(e) => out.push(Finding::new(
                Severity::Warn,
                format!(
                    "containerd at {} did not answer: {e:#}",
                    opts.containerd_address.display()
                ),
            )),
        },
        Err(e) => out.push(Finding::new(
            Severity::Warn,
            format!("cannot reach containerd ({e:#}); checking its config file only"),
        )),
    }
    match std::fs::read_to_string(&opts.containerd_config) {
        Ok(text) => out.extend(check_config(
            &text,
            &ConfigContext {
                path: opts.containerd_config.clone(),
                snapshotter: opts.snapshotter.clone(),
                beam_address: opts.beam_address.clone(),
                version,
            },
        )),
        Err(e) => out.push(
            Finding::new(
                Severity::Error,
                format!(
                    "cannot read containerd's config {}: {e}",
                    opts.containerd_config.display()
                ),
            )
            .fix("pass its path with --containerd-config, or run `beam node-setup`"),
        ),
    }
    if let Some(plugins) = plugins {
        match plugins.iter().find(|p| p.id == opts.snapshotter) {
            None => out.push(
                Finding::new(
                    Severity::Error,
                    format!(
                        "the running containerd has no snapshotter {:?}",
                        opts.snapshotter
                    ),
                )
                .fix("restart containerd after changing its config"),
            ),
            Some(p) => match &p.error {
                Some(e) => out.push(Finding::new(
                    Severity::Error,
                    format!(
                        "containerd failed to load snapshotter {:?}: {e}",
                        opts.snapshotter
                    ),
                )),
                None => out.push(Finding::new(
                    Severity::Ok,
                    format!("containerd has loaded snapshotter {:?}", opts.snapshotter),
                )),
            },
        }
    }
    match crate::daemon::control::fetch_status(&opts.beam_address).await {
        Ok(s) => out.extend(check_daemon(&s, &opts.beam_address)),
        Err(e) => out.push(
            Finding::new(
                Severity::Error,
                format!(
                    "beam-snapshotter is not answering at {}: {e:#}",
                    opts.beam_address.display()
                ),
            )
            .fix("start it (`systemctl start beam-snapshotter`) before containerd uses it"),
        ),
    }
    out
}

/// What the daemon's own counters say.
pub fn check_daemon(s: &DaemonStatus, address: &Path) -> Vec<Finding> {
    let mut out = vec![Finding::new(
        Severity::Ok,
        format!(
            "beam-snapshotter {} at {}: {} lazy layer(s) mounted, {} lazy mounts, {} fallbacks",
            s.version,
            address.display(),
            s.layers.len(),
            s.lazy_mounts,
            s.fallbacks
        ),
    )];
    if s.unlabelled_layer_prepares > 0 {
        out.push(
            Finding::new(
                Severity::Error,
                format!(
                    "beam-snapshotter received {} layer(s) without the remote-snapshot labels: they were downloaded in full",
                    s.unlabelled_layer_prepares
                ),
            )
            .fix("containerd is not passing the annotations: see the disable_snapshot_annotations finding above (CRI), or pull with `beam pull` (ctr users)"),
        );
    }
    if !s.last_fallback.is_empty() {
        if s.last_fallback_fix.is_empty() {
            out.push(Finding::new(
                Severity::Info,
                format!("last fallback to a full pull: {}", s.last_fallback),
            ));
        } else {
            // A setting made the daemon fall back: every pull like it downloads in full.
            out.push(
                Finding::new(
                    Severity::Error,
                    format!("last fallback to a full pull: {}", s.last_fallback),
                )
                .fix(&s.last_fallback_fix),
            );
        }
    }
    out
}

/// The findings as text, one per line (fixes indented below).
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        s.push_str(&format!("{:<5} {}\n", f.severity.to_string(), f.what));
        if let Some(fix) = &f.fix {
            for (i, line) in fix.lines().enumerate() {
                let lead = if i == 0 { "      fix: " } else { "           " };
                s.push_str(lead);
                s.push_str(line);
                s.push('\n');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(version: Option<(u32, u32)>) -> ConfigContext {
        ConfigContext {
            path: "/etc/containerd/config.toml".into(),
            snapshotter: "beam".into(),
            beam_address: "/run/beam/beam.sock".into(),
            version: version.map(|(major, minor)| Version::new(major, minor)),
        }
    }

    fn errors(f: &[Finding]) -> Vec<&Finding> {
        f.iter().filter(|f| f.severity == Severity::Error).collect()
    }

    const V2_GOOD: &str = r#"version = 2

[proxy_plugins]
  [proxy_plugins.beam]
    type = "snapshot"
    address = "/run/beam/beam.sock"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "beam"
  disable_snapshot_annotations = false
"#;

    #[test]
    fn a_good_v2_config_has_no_errors() {
        let f = check_config(V2_GOOD, &ctx(Some((1, 7))));
        assert!(errors(&f).is_empty(), "{}", render(&f));
        assert!(
            f.iter().all(|f| f.severity <= Severity::Info),
            "{}",
            render(&f)
        );
    }

    #[test]
    fn annotations_left_on_are_an_error_naming_the_line() {
        let text = V2_GOOD.replace(
            "disable_snapshot_annotations = false",
            "disable_snapshot_annotations = true",
        );
        let f = check_config(&text, &ctx(Some((1, 7))));
        let e = errors(&f);
        assert_eq!(e.len(), 1, "{}", render(&f));
        assert!(e[0].what.contains("downloaded in full"));
        let fix = e[0].fix.as_deref().unwrap();
        assert!(
            fix.starts_with(
                "/etc/containerd/config.toml:10: set `disable_snapshot_annotations = false`"
            ),
            "{fix}"
        );
    }

    #[test]
    fn annotations_missing_default_to_off_and_point_at_the_table() {
        let text = V2_GOOD.replace("  disable_snapshot_annotations = false\n", "");
        let f = check_config(&text, &ctx(None));
        let e = errors(&f);
        assert_eq!(e.len(), 1, "{}", render(&f));
        assert!(e[0].what.contains("default is true"));
        assert!(e[0]
            .fix
            .as_deref()
            .unwrap()
            .starts_with("/etc/containerd/config.toml:8:"));
    }

    #[test]
    fn a_missing_or_wrong_proxy_plugin_is_an_error() {
        let f = check_config("version = 2\n", &ctx(None));
        assert!(
            errors(&f)
                .iter()
                .any(|e| e.what.contains("no [proxy_plugins.beam]")),
            "{}",
            render(&f)
        );
        let text = V2_GOOD.replace("/run/beam/beam.sock", "/tmp/other.sock");
        let f = check_config(&text, &ctx(None));
        let e = errors(&f);
        assert!(
            e.iter().any(|e| e.what.contains("/tmp/other.sock")
                && e.fix.as_deref().unwrap().contains("config.toml:6")),
            "{}",
            render(&f)
        );
    }

    #[test]
    fn cri_on_another_snapshotter_is_a_warning() {
        let text = V2_GOOD.replace("snapshotter = \"beam\"", "snapshotter = \"overlayfs\"");
        let f = check_config(&text, &ctx(None));
        assert!(
            f.iter()
                .any(|f| f.severity == Severity::Warn && f.what.contains("overlayfs")),
            "{}",
            render(&f)
        );
    }

    const V3_TRANSFER: &str = r#"version = 3
[proxy_plugins.beam]
  type = "snapshot"
  address = "/run/beam/beam.sock"
  [proxy_plugins.beam.exports]
    enable_remote_snapshot_annotations = "true"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "beam"
[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = "linux"
  snapshotter = "beam"
"#;

    #[test]
    fn v3_with_the_transfer_service_exports_is_fine_on_2_1() {
        let f = check_config(V3_TRANSFER, &ctx(Some((2, 1))));
        assert!(errors(&f).is_empty(), "{}", render(&f));
        // 2.0 has no transfer-service CRI pulls: the annotations must be on.
        let f = check_config(V3_TRANSFER, &ctx(Some((2, 0))));
        assert_eq!(errors(&f).len(), 1, "{}", render(&f));
        // Without unpack_config, 2.1 says so.
        let cut = V3_TRANSFER.split("[[plugins").next().unwrap();
        let f = check_config(cut, &ctx(Some((2, 1))));
        assert!(
            f.iter().any(|f| f.what.contains("no unpack platforms")),
            "{}",
            render(&f)
        );
        assert_eq!(errors(&f).len(), 1, "{}", render(&f));
    }

    #[test]
    fn fixes_name_the_line_however_the_file_spells_the_key() {
        // A commented-out key, a dotted key under a parent table, single-quoted and inline
        // tables: the line is where containerd reads the setting from.
        let text = r#"version = 2
# disable_snapshot_annotations = false
[proxy_plugins]
  beam = { type = "snapshot", address = "/tmp/other.sock" }
[plugins]
  'io.containerd.grpc.v1.cri'.containerd.snapshotter = "beam"

  "io.containerd.grpc.v1.cri".containerd.disable_snapshot_annotations = true
"#;
        let f = check_config(text, &ctx(Some((1, 7))));
        let fixes: Vec<&str> = errors(&f).iter().filter_map(|e| e.fix.as_deref()).collect();
        assert_eq!(fixes.len(), 2, "{}", render(&f));
        assert!(
            fixes[0].starts_with("/etc/containerd/config.toml:4: set address"),
            "{}",
            fixes[0]
        );
        assert!(
            fixes[1].starts_with("/etc/containerd/config.toml:8: set `disable_snapshot"),
            "{}",
            fixes[1]
        );
        // No key: the line where its table is written (here by a dotted key).
        let without_key = text.replace(
            "  \"io.containerd.grpc.v1.cri\".containerd.disable_snapshot_annotations = true\n",
            "",
        );
        let f = check_config(&without_key, &ctx(None));
        let labels = f
            .iter()
            .find(|f| f.what.contains("no remote-snapshot labels"))
            .unwrap_or_else(|| panic!("{}", render(&f)));
        assert!(
            labels
                .fix
                .as_deref()
                .unwrap()
                .starts_with("/etc/containerd/config.toml:6: set `disable"),
            "{}",
            render(&f)
        );
        // Neither the key nor its table: the file alone.
        let f = check_config("version = 2\n", &ctx(None));
        let cri = f
            .iter()
            .find(|f| f.what.contains("CRI (kubelet) pulls use the \"overlayfs\""))
            .unwrap_or_else(|| panic!("{}", render(&f)));
        assert!(
            cri.fix
                .as_deref()
                .unwrap()
                .starts_with("/etc/containerd/config.toml: set snapshotter"),
            "{}",
            render(&f)
        );
    }

    #[test]
    fn line_numbers_count_from_one() {
        assert_eq!(line_number("a\nb\nc", 0), 1);
        assert_eq!(line_number("a\nb\nc", 2), 2);
        assert_eq!(line_number("a\nb\nc", 4), 3);
        assert_eq!(line_number("a\nb\nc", 99), 3);
    }

    #[test]
    fn invalid_toml_is_one_error() {
        let f = check_config("version = = 2", &ctx(None));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Error);
    }
}
