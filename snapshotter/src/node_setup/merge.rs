//! The pure half of node setup: merge Beam into containerd's config text (and take it out
//! again) with `toml_edit`, so that comments, order and formatting of everything else stay as
//! they were. No file is read or written here; see [`super::install`] for that.

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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::node_setup) fn target() -> SetupTarget {
        SetupTarget {
            snapshotter: "beam".into(),
            beam_address: "/run/beam/beam.sock".into(),
            beam_root: "/var/lib/beam".into(),
        }
    }

    pub(in crate::node_setup) const V2_USER: &str = r#"version = 2
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
                version: Some(crate::containerd::Version::new(1, 7)),
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
}
