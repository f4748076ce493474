//! containerd's registry host configuration: a directory (containerd's `config_path`, usually
//! `/etc/containerd/certs.d`) with one `HOST[:PORT]/hosts.toml` per registry, or `_default/`
//! for all of them. Beam reads the same files so mirrors, plain HTTP and CAs are configured
//! once, for containerd and Beam alike (one of the peers' users' pains is configuring them
//! twice).
//!
//! ```toml
//! server = "http://127.0.0.1:5000"        # http:// = plain HTTP for this registry
//! [host."http://mirror.local:5000"]       # tried in file order before the server
//!   capabilities = ["pull", "resolve"]
//!   ca = "/etc/certs/mirror.pem"          # or a list
//! ```
//!
//! What Beam does not support is named in a warning, never silently ignored: `skip_verify`
//! (Beam will not turn TLS verification off), client certificates, custom headers, and
//! `override_path`.

use crate::registry::RegistryOptions;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A `hosts.toml` file.
#[derive(Debug, Deserialize, Default)]
struct HostsFile {
    server: Option<String>,
    ca: Option<OneOrMany>,
    #[serde(default)]
    skip_verify: Option<bool>,
    /// Kept in file order (toml's preserve_order).
    #[serde(default)]
    host: toml::Table,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl OneOrMany {
    fn paths(&self) -> Vec<PathBuf> {
        match self {
            OneOrMany::One(p) => vec![p.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// One `[host."URL"]` entry.
#[derive(Debug, Deserialize, Default)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    skip_verify: Option<bool>,
    client: Option<toml::Value>,
    header: Option<toml::Value>,
    override_path: Option<bool>,
}

/// Why a hosts directory could not be read.
pub type HostsError = TomlFileError;

/// Why a TOML file (a `hosts.toml`, beam-snapshotter's configuration) could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TomlFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Split `scheme://host[:port][/path]` into (plain_http, host[:port]).
fn split_url(url: &str) -> Option<(bool, String)> {
    let (plain, rest) = if let Some(r) = url.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (false, r)
    } else {
        (false, url)
    };
    let host = rest.split('/').next().unwrap_or("");
    (!host.is_empty()).then(|| (plain, host.to_string()))
}

/// Registry names as containerd writes its directory names: `docker.io` for Docker Hub.
fn canonical_host(h: &str) -> String {
    match h {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        h => h.to_string(),
    }
}

/// Read every `*/hosts.toml` under `dir` into `opts` (mirrors, plain-HTTP hosts, CAs).
/// Returns warnings for settings Beam does not follow. A missing directory is no error.
pub fn apply_hosts_dir(dir: &Path, opts: &mut RegistryOptions) -> Result<Vec<String>, HostsError> {
    let mut warnings = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(warnings),
        Err(source) => {
            return Err(HostsError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join("hosts.toml").is_file())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name).join("hosts.toml");
        let text = std::fs::read_to_string(&path).map_err(|source| HostsError::Read {
            path: path.clone(),
            source,
        })?;
        let file: HostsFile = toml::from_str(&text).map_err(|source| HostsError::Parse {
            path: path.clone(),
            source: Box::new(source),
        })?;
        let is_default = name == "_default";
        let registry = canonical_host(&name);
        if let Some(server) = &file.server {
            let Some((plain, host)) = split_url(server) else {
                return Err(HostsError::Invalid {
                    path,
                    reason: format!("server {server:?} is not a URL"),
                });
            };
            if plain && !is_default {
                opts.plain_http_hosts.push(registry.clone());
                if host != registry {
                    opts.plain_http_hosts.push(host.clone());
                }
            }
            if canonical_host(&host) != registry && !is_default {
                // A server elsewhere than the name: reads go there first.
                opts.host_mirrors
                    .entry(registry.clone())
                    .or_default()
                    .push(host);
            }
        }
        // A CA vouches for the hosts of its file: the registry and its server.
        if let Some(ca) = &file.ca {
            let server = file
                .server
                .as_deref()
                .and_then(split_url)
                .map(|(_, h)| h)
                .filter(|_| !is_default);
            let hosts: Vec<String> = if is_default {
                // `_default`: every host without a directory of its own; scoping it to one is
                // impossible, so it stays global (as containerd treats it).
                Vec::new()
            } else {
                std::iter::once(registry.clone()).chain(server).collect()
            };
            if hosts.is_empty() {
                opts.ca_files.extend(ca.paths());
            }
            for h in hosts {
                opts.host_ca_files.entry(h).or_default().extend(ca.paths());
            }
        }
        if file.skip_verify == Some(true) {
            warnings.push(format!(
                "{}: skip_verify is not followed: Beam always verifies TLS (add the CA with `ca`)",
                path.display()
            ));
        }
        for (url, v) in &file.host {
            let entry: HostEntry =
                v.clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| HostsError::Invalid {
                        path: path.clone(),
                        reason: format!("[host.{url:?}]: {e}"),
                    })?;
            let Some((plain, host)) = split_url(url) else {
                return Err(HostsError::Invalid {
                    path,
                    reason: format!("host {url:?} is not a URL"),
                });
            };
            let pulls = entry
                .capabilities
                .as_ref()
                .is_none_or(|c| c.iter().any(|c| c == "pull"));
            if !pulls {
                continue;
            }
            if plain {
                opts.plain_http_hosts.push(host.clone());
            }
            if let Some(ca) = &entry.ca {
                opts.host_ca_files
                    .entry(host.clone())
                    .or_default()
                    .extend(ca.paths());
            }
            for (what, set) in [
                ("skip_verify", entry.skip_verify == Some(true)),
                ("client certificates", entry.client.is_some()),
                ("header", entry.header.is_some()),
                ("override_path", entry.override_path == Some(true)),
            ] {
                if set {
                    warnings.push(format!(
                        "{}: [host.{url:?}] {what} is not followed by Beam",
                        path.display()
                    ));
                }
            }
            if host == registry {
                continue;
            }
            if is_default {
                opts.mirrors.push(host);
            } else {
                opts.host_mirrors
                    .entry(registry.clone())
                    .or_default()
                    .push(host);
            }
        }
    }
    opts.plain_http_hosts.sort();
    opts.plain_http_hosts.dedup();
    opts.ca_files.sort();
    opts.ca_files.dedup();
    for cas in opts.host_ca_files.values_mut() {
        cas.sort();
        cas.dedup();
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, host: &str, text: &str) {
        std::fs::create_dir_all(dir.join(host)).unwrap();
        std::fs::write(dir.join(host).join("hosts.toml"), text).unwrap();
    }

    #[test]
    fn mirrors_plain_http_and_cas_come_from_hosts_toml() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "127.0.0.1:5000",
            r#"server = "http://127.0.0.1:5000"
[host."http://mirror-b:5000"]
  capabilities = ["pull", "resolve"]
[host."https://mirror-a:5000"]
  capabilities = ["pull"]
  ca = "/etc/certs/a.pem"
[host."https://push-only:5000"]
  capabilities = ["push"]
"#,
        );
        write(
            d.path(),
            "docker.io",
            r#"server = "https://registry-1.docker.io"
[host."https://hub-mirror.local"]
  skip_verify = true
"#,
        );
        write(
            d.path(),
            "_default",
            "[host.\"https://everything.local\"]\n",
        );
        let mut o = RegistryOptions::default();
        let warnings = apply_hosts_dir(d.path(), &mut o).unwrap();
        assert_eq!(
            o.host_mirrors.get("127.0.0.1:5000").unwrap(),
            &vec!["mirror-b:5000".to_string(), "mirror-a:5000".to_string()],
            "file order kept, push-only hosts left out"
        );
        assert_eq!(
            o.host_mirrors.get("docker.io").unwrap(),
            &vec!["hub-mirror.local".to_string()]
        );
        assert_eq!(o.mirrors, vec!["everything.local".to_string()]);
        assert_eq!(
            o.plain_http_hosts,
            vec!["127.0.0.1:5000".to_string(), "mirror-b:5000".to_string()]
        );
        // The CA is for mirror-a only: it vouches for no other host.
        assert!(o.ca_files.is_empty(), "{:?}", o.ca_files);
        assert_eq!(
            o.host_ca_files,
            [(
                "mirror-a:5000".to_string(),
                vec![PathBuf::from("/etc/certs/a.pem")]
            )]
            .into()
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("skip_verify"));
    }

    #[test]
    fn a_missing_dir_is_nothing_and_a_bad_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let mut o = RegistryOptions::default();
        assert!(apply_hosts_dir(&d.path().join("none"), &mut o)
            .unwrap()
            .is_empty());
        write(d.path(), "r:5000", "server = = 1");
        let e = apply_hosts_dir(d.path(), &mut o).unwrap_err().to_string();
        assert!(e.contains("r:5000/hosts.toml"), "{e}");
    }
}
