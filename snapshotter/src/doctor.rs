//! `beam doctor`: finds the configuration mistakes that make a lazy-pulling snapshotter
//! silently pull everything in full (the peers' most common complaint), and says which line to
//! change. It reads containerd's config file, asks the running containerd what it loaded, and
//! asks beam-snapshotter what it saw (layer requests that came without the remote-snapshot
//! labels are the tell-tale of a full pull).
//!
//! The config checks are pure functions of the file's text (tested below); the live checks
//! only add evidence.

use crate::containerd::{Containerd, PluginInfo};
use crate::daemon::control::DaemonStatus;
use std::fmt;
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

/// containerd's version as (major, minor), from strings like `1.7.24`, `v2.1.9`, `2.1.9~ds1`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let v = v.trim().trim_start_matches('v');
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Where a key is in a TOML file: the table path and the key, both as containerd writes them.
struct Located<'a> {
    text: &'a str,
}

/// Split a TOML table header or dotted key into its keys (quotes removed).
fn split_keys(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"') | (None, '\'') => quote = Some(c),
            (None, '.') => out.push(std::mem::take(&mut cur).trim().to_string()),
            (None, c) => cur.push(c),
        }
    }
    out.push(cur.trim().to_string());
    out
}

impl<'a> Located<'a> {
    /// 1-based line of the header of `table`, if the file has one.
    fn table_line(&self, table: &[&str]) -> Option<usize> {
        self.text.lines().enumerate().find_map(|(i, line)| {
            let t = line.trim();
            let inner = t
                .strip_prefix("[[")
                .and_then(|r| r.split("]]").next())
                .or_else(|| t.strip_prefix('[').and_then(|r| r.split(']').next()))?;
            (split_keys(inner) == table).then_some(i + 1)
        })
    }

    /// 1-based line where `key` is set inside `table`.
    fn key_line(&self, table: &[&str], key: &str) -> Option<usize> {
        let mut current: Vec<String> = Vec::new();
        for (i, line) in self.text.lines().enumerate() {
            let t = line.trim();
            if t.starts_with('[') {
                let inner = t.trim_start_matches('[');
                let inner = inner.split(']').next().unwrap_or("");
                current = split_keys(inner);
                continue;
            }
            let Some((k, _)) = t.split_once('=') else {
                continue;
            };
            if t.starts_with('#') {
                continue;
            }
            let mut full = current.clone();
            full.extend(split_keys(k));
            let want: Vec<String> = table
                .iter()
                .map(|s| s.to_string())
                .chain(std::iter::once(key.to_string()))
                .collect();
            if full == want {
                return Some(i + 1);
            }
        }
        None
    }
}

fn get<'v>(v: &'v toml::Value, path: &[&str]) -> Option<&'v toml::Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
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
    pub version: Option<(u32, u32)>,
}

/// Check containerd's config file text. See the module documentation.
pub fn check_config(text: &str, ctx: &ConfigContext) -> Vec<Finding> {
    let mut out = Vec::new();
    let path = ctx.path.display();
    let sn = ctx.snapshotter.as_str();
    let doc: toml::Value = match text.parse::<toml::Table>() {
        Ok(t) => toml::Value::Table(t),
        Err(e) => {
            out.push(Finding::new(
                Severity::Error,
                format!("{path} is not valid TOML: {e}"),
            ));
            return out;
        }
    };
    let at = Located { text };
    let line_of = |table: &[&str], key: &str| -> String {
        match at.key_line(table, key).or_else(|| at.table_line(table)) {
            Some(n) => format!("{path}:{n}"),
            None => path.to_string(),
        }
    };
    let version = doc.get("version").and_then(|v| v.as_integer()).unwrap_or(1);
    match version {
        2 | 3 => out.push(Finding::new(
            Severity::Ok,
            format!("{path}: config version {version}"),
        )),
        v => {
            out.push(
                Finding::new(
                    Severity::Error,
                    format!("{path}: config version {v}; Beam's settings are for versions 2 (containerd 1.x) and 3 (2.x)"),
                )
                .fix(format!("convert it with `containerd config migrate > {path}.new`, review, and replace")),
            );
            return out;
        }
    }
    if let Some((major, _)) = ctx.version {
        if (major >= 2) != (version == 3) && major >= 2 {
            out.push(Finding::new(
                Severity::Info,
                format!("containerd {major}.x reads config version {version} by migrating it on every start; `containerd config migrate` writes version 3"),
            ));
        }
    }

    // The proxy plugin.
    let plugin_table = ["proxy_plugins", sn];
    let header = format!("[proxy_plugins.{sn}]");
    match get(&doc, &plugin_table) {
        None => out.push(
            Finding::new(
                Severity::Error,
                format!("{path} has no {header}: containerd does not know the snapshotter {sn:?}"),
            )
            .fix(format!(
                "add to {path}:\n  {header}\n    type = \"snapshot\"\n    address = \"{}\"\nthen restart containerd",
                ctx.beam_address.display()
            )),
        ),
        Some(p) => {
            let kind = p.get("type").and_then(|v| v.as_str()).unwrap_or("");
            let addr = p.get("address").and_then(|v| v.as_str()).unwrap_or("");
            if kind != "snapshot" {
                out.push(
                    Finding::new(
                        Severity::Error,
                        format!("{header} has type = {kind:?}, not \"snapshot\""),
                    )
                    .fix(format!("{}: set type = \"snapshot\"", line_of(&plugin_table, "type"))),
                );
            }
            if Path::new(addr) != ctx.beam_address {
                out.push(
                    Finding::new(
                        Severity::Error,
                        format!(
                            "containerd talks to {sn} at {addr:?}, but beam-snapshotter listens on {}",
                            ctx.beam_address.display()
                        ),
                    )
                    .fix(format!(
                        "{}: set address = \"{}\" (or start beam-snapshotter with --address {addr})",
                        line_of(&plugin_table, "address"),
                        ctx.beam_address.display()
                    )),
                );
            } else if kind == "snapshot" {
                out.push(Finding::new(
                    Severity::Ok,
                    format!("{header} type = \"snapshot\", address = {addr:?}"),
                ));
            }
        }
    }

    // The CRI plugin (kubelet's pulls).
    let (cri_plugin, cri_table): (&str, Vec<&str>) = if version == 2 {
        (
            "io.containerd.grpc.v1.cri",
            vec!["plugins", "io.containerd.grpc.v1.cri", "containerd"],
        )
    } else {
        (
            "io.containerd.cri.v1.images",
            vec!["plugins", "io.containerd.cri.v1.images"],
        )
    };
    let cri_header = format!(
        "[{}]",
        cri_table
            .iter()
            .map(|k| if k.contains('.') {
                format!("\"{k}\"")
            } else {
                k.to_string()
            })
            .collect::<Vec<_>>()
            .join(".")
    );
    let disabled = doc
        .get("disabled_plugins")
        .and_then(|v| v.as_array())
        .is_some_and(|a| {
            a.iter().any(|p| {
                p.as_str().is_some_and(|p| {
                    p == cri_plugin || p == "io.containerd.grpc.v1.cri" || p == "cri"
                })
            })
        });
    if disabled {
        out.push(Finding::new(
            Severity::Info,
            format!("the CRI plugin is disabled in {path}: only `beam pull` and ctr use Beam"),
        ));
        return out;
    }
    let cri = get(&doc, &cri_table);
    let cri_snapshotter = cri
        .and_then(|t| t.get("snapshotter"))
        .and_then(|v| v.as_str())
        .unwrap_or("overlayfs");
    if cri_snapshotter != sn {
        out.push(
            Finding::new(
                Severity::Warn,
                format!("CRI (kubelet) pulls use the {cri_snapshotter:?} snapshotter, not {sn:?}: pods do not start lazily"),
            )
            .fix(format!(
                "{}: set snapshotter = \"{sn}\" under {cri_header}",
                line_of(&cri_table, "snapshotter")
            )),
        );
    } else {
        out.push(Finding::new(
            Severity::Ok,
            format!("CRI pulls use the {sn:?} snapshotter"),
        ));
    }
    let annotations_value = cri
        .and_then(|t| t.get("disable_snapshot_annotations"))
        .and_then(|v| v.as_bool());
    // true is containerd's default since 1.4.2, in 2.x too.
    let annotations_off = annotations_value.unwrap_or(true);

    // containerd 2.1+: CRI pulls go through the transfer service, which passes the labels when
    // the proxy plugin exports enable_remote_snapshot_annotations and unpack_config names us.
    let transfer_era = version == 3 && ctx.version.is_none_or(|v| v >= (2, 1));
    let exports_on = get(
        &doc,
        &[
            "proxy_plugins",
            sn,
            "exports",
            "enable_remote_snapshot_annotations",
        ],
    )
    .and_then(|v| v.as_str().map(|s| s == "true").or(v.as_bool()))
    .unwrap_or(false);
    let unpack_has_us = get(
        &doc,
        &[
            "plugins",
            "io.containerd.transfer.v1.local",
            "unpack_config",
        ],
    )
    .and_then(|v| v.as_array())
    .is_some_and(|a| {
        a.iter()
            .any(|e| e.get("snapshotter").and_then(|s| s.as_str()) == Some(sn))
    });
    if transfer_era && !unpack_has_us {
        out.push(
            Finding::new(
                Severity::Warn,
                format!("containerd 2.1+'s transfer service does not list {sn:?} in unpack_config: `ctr image pull --snapshotter {sn}` fails with \"no unpack platforms defined\""),
            )
            .fix(format!(
                "add to {path}:\n  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n    platform = \"linux\"\n    snapshotter = \"{sn}\""
            )),
        );
    }
    let labels_flow = !annotations_off || (transfer_era && exports_on && unpack_has_us);
    if labels_flow {
        out.push(Finding::new(
            Severity::Ok,
            if !annotations_off {
                format!("CRI passes the remote-snapshot labels (disable_snapshot_annotations = false in {cri_header})")
            } else {
                "the transfer service passes the remote-snapshot labels (enable_remote_snapshot_annotations)".to_string()
            },
        ));
    } else if cri_snapshotter == sn {
        let why = match annotations_value {
            Some(true) => "disable_snapshot_annotations = true".to_string(),
            _ => "disable_snapshot_annotations is not set, and containerd's default is true"
                .to_string(),
        };
        let mut fix = format!(
            "{}: set `disable_snapshot_annotations = false` under {cri_header}, then restart containerd",
            line_of(&cri_table, "disable_snapshot_annotations")
        );
        if version == 3 {
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
    out
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
                version = parse_version(&v);
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
            version,
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
    fn versions_and_keys_parse() {
        assert_eq!(parse_version("v2.1.9"), Some((2, 1)));
        assert_eq!(parse_version("1.7.24~ds1"), Some((1, 7)));
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(
            split_keys(r#"plugins."io.containerd.grpc.v1.cri".containerd"#),
            vec!["plugins", "io.containerd.grpc.v1.cri", "containerd"]
        );
        assert_eq!(
            split_keys("plugins.'io.containerd.cri.v1.images'"),
            vec!["plugins", "io.containerd.cri.v1.images"]
        );
    }

    #[test]
    fn invalid_toml_is_one_error() {
        let f = check_config("version = = 2", &ctx(None));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Error);
    }
}
