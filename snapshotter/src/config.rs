//! beam-snapshotter's configuration: one TOML file with working defaults, overridden by
//! command-line flags. `beam-snapshotter --print-config` prints the effective configuration.
//!
//! ```toml
//! root = "/var/lib/beam"
//! address = "/run/beam/beam.sock"
//!
//! [cache]
//! dir = "/var/lib/beam/cache"      # default: ROOT/cache
//! budget_bytes = 0                  # 0 = unlimited
//!
//! [fetch]
//! deadline_secs = 60.0
//! concurrency = 8
//! background = true
//! background_concurrency = 2
//! background_bytes_per_sec = 0      # 0 = no cap
//!
//! metrics_address = "127.0.0.1:9465"  # Prometheus text on GET /metrics; off by default
//!
//! [remote]
//! enabled = true                    # false: ordinary snapshots only
//!
//! [takeover]
//! enabled = false                   # lazy layers' FUSE connections survive a daemon restart
//! holder_socket = "/var/lib/beam/holder.sock"   # default: ROOT/holder.sock
//!
//! hosts_dir = "/etc/containerd/certs.d"   # containerd's hosts.toml files; none by default
//!
//! [[registry]]
//! host = "registry.local:5000"
//! plain_http = true
//! mirrors = ["mirror.local:5000"]
//! ca_file = "/etc/beam/ca.pem"
//! ```

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub root: PathBuf,
    pub address: PathBuf,
    pub cache: CacheConfig,
    pub fetch: FetchConfig,
    pub remote: RemoteConfig,
    pub takeover: TakeoverConfig,
    /// `HOST:PORT` to serve Prometheus metrics on (`GET /metrics`); none by default.
    pub metrics_address: Option<String>,
    /// containerd's registry host directory (`config_path`, e.g. `/etc/containerd/certs.d`):
    /// mirrors, plain HTTP and CAs of its `hosts.toml` files apply to Beam too.
    pub hosts_dir: Option<PathBuf>,
    pub registry: Vec<RegistryHost>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Default: `ROOT/cache`.
    pub dir: Option<PathBuf>,
    pub budget_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    pub deadline_secs: f64,
    pub concurrency: usize,
    pub background: bool,
    pub background_concurrency: usize,
    pub background_bytes_per_sec: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            deadline_secs: 60.0,
            concurrency: 8,
            background: true,
            background_concurrency: 2,
            background_bytes_per_sec: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    pub enabled: bool,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig { enabled: true }
    }
}

/// Keeping lazy layers' FUSE connections alive across daemon restarts (issue 7; see
/// `crate::takeover`). Off by default: with it on, a stopped daemon leaves its lazy layers
/// mounted (held by the fd holder process) for its successor to take over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TakeoverConfig {
    pub enabled: bool,
    /// The fd holder's socket. Default: `ROOT/holder.sock`.
    pub holder_socket: Option<PathBuf>,
}

/// Settings of one registry host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryHost {
    pub host: String,
    #[serde(default)]
    pub plain_http: bool,
    #[serde(default)]
    pub mirrors: Vec<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: "/var/lib/beam".into(),
            address: "/run/beam/beam.sock".into(),
            cache: CacheConfig::default(),
            fetch: FetchConfig::default(),
            remote: RemoteConfig::default(),
            takeover: TakeoverConfig::default(),
            metrics_address: None,
            hosts_dir: None,
            registry: Vec::new(),
        }
    }
}

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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

impl Config {
    /// Read `path`; keys it leaves out keep their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let c: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        c.validate().map_err(|reason| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), String> {
        if self.fetch.deadline_secs.is_nan() || self.fetch.deadline_secs <= 0.0 {
            return Err("fetch.deadline_secs must be positive".into());
        }
        if self.fetch.concurrency == 0 || self.fetch.background_concurrency == 0 {
            return Err("fetch concurrencies must be at least 1".into());
        }
        if let Some(h) = self.registry.iter().find(|h| h.host.is_empty()) {
            return Err(format!("a [[registry]] entry has an empty host: {h:?}"));
        }
        Ok(())
    }

    /// The cache directory in effect.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache
            .dir
            .clone()
            .unwrap_or_else(|| self.root.join("cache"))
    }

    /// The fd holder's socket in effect.
    pub fn holder_socket(&self) -> PathBuf {
        self.takeover
            .holder_socket
            .clone()
            .unwrap_or_else(|| self.root.join("holder.sock"))
    }

    /// Registry access options: plain-HTTP hosts, mirrors, CAs, from `[[registry]]` and the
    /// hosts directory; warnings name hosts.toml settings Beam does not follow.
    pub fn remote_options(
        &self,
    ) -> Result<(crate::remote::RemoteOptions, Vec<String>), crate::hosts::HostsError> {
        let mut o = self.registry_options();
        let warnings = match &self.hosts_dir {
            Some(dir) => crate::hosts::apply_hosts_dir(dir, &mut o)?,
            None => Vec::new(),
        };
        Ok((o, warnings))
    }

    fn registry_options(&self) -> crate::remote::RemoteOptions {
        crate::remote::RemoteOptions {
            plain_http: false,
            plain_http_hosts: self
                .registry
                .iter()
                .filter(|h| h.plain_http)
                .map(|h| h.host.clone())
                .collect(),
            ca_files: self
                .registry
                .iter()
                .filter_map(|h| h.ca_file.clone())
                .collect(),
            mirrors: Vec::new(),
            host_mirrors: self
                .registry
                .iter()
                .filter(|h| !h.mirrors.is_empty())
                .map(|h| (h.host.clone(), h.mirrors.clone()))
                .collect(),
        }
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_partial_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "root = \"/srv/beam\"\n[fetch]\nconcurrency = 3\n[[registry]]\nhost = \"r:5000\"\nplain_http = true\nmirrors = [\"m:5000\"]\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.root, PathBuf::from("/srv/beam"));
        assert_eq!(c.cache_dir(), PathBuf::from("/srv/beam/cache"));
        assert_eq!(c.fetch.concurrency, 3);
        assert_eq!(c.fetch.background_concurrency, 2, "default kept");
        assert!(!c.takeover.enabled, "takeover is off by default");
        assert_eq!(c.holder_socket(), PathBuf::from("/srv/beam/holder.sock"));
        let (o, _) = c.remote_options().unwrap();
        assert_eq!(o.plain_http_hosts, vec!["r:5000".to_string()]);
        assert_eq!(
            o.host_mirrors.get("r:5000"),
            Some(&vec!["m:5000".to_string()])
        );
        // What --print-config prints reads back to the same configuration.
        std::fs::write(&p, c.to_toml()).unwrap();
        assert_eq!(Config::load(&p).unwrap(), c);
    }

    #[test]
    fn mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[fetch]\nconcurency = 3\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("concurency"), "{e}");
        std::fs::write(&p, "[fetch]\nconcurrency = 0\n").unwrap();
        assert!(Config::load(&p)
            .unwrap_err()
            .to_string()
            .contains("at least 1"));
    }
}
