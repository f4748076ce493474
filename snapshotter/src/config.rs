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
//! whole_layer_max_bytes = 2097152   # layers this small are fetched whole while they mount
//!
//! metrics_address = "127.0.0.1:9465"  # Prometheus text on GET /metrics; off by default
//!
//! [remote]
//! enabled = true                    # false: ordinary snapshots only
//! accept_pull_settings = true       # false: ignore the registry settings `beam pull` sends
//! trust_referrers = []              # repositories whose unbound (referrer) artifacts are used:
//!                                   # "host:port/repo", "host:port/team/*", "*" (docs/security.md)
//! max_index_bytes = 268435456       # a layer's index past these limits: downloaded in full
//! max_index_inodes = 10000000
//! max_index_depth = 1024
//!
//! [takeover]
//! enabled = true                    # lazy layers' FUSE connections survive a daemon restart
//! holder_socket = "/var/lib/beam/holder.sock"   # default: ROOT/holder.sock
//! grace_secs = 180                  # no daemon for this long: the holder lets go (readers fail)
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
    /// A lazy layer whose chunks take at most this many bytes is fetched whole, in one
    /// request, while it mounts (lazy loading cannot win on a layer that small). 0 = never.
    pub whole_layer_max_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            deadline_secs: 60.0,
            concurrency: 8,
            background: true,
            background_concurrency: 2,
            background_bytes_per_sec: 0,
            whole_layer_max_bytes: crate::daemon::lazy::DEFAULT_WHOLE_LAYER_MAX_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    pub enabled: bool,
    /// Use the registry settings (`--plain-http`, `--ca-file`, `--hosts-dir`, the Docker config
    /// file) that `beam pull` sends with its layers (issue 12). `false` on a node whose
    /// registry access only its own configuration may decide (e.g. plain HTTP forbidden): such
    /// pulls then use the daemon's settings, and a layer they cannot reach is downloaded in
    /// full, with the reason and the fix in `beam pull`'s output.
    pub accept_pull_settings: bool,
    /// Repositories whose Beam artifacts found by referrers (not bound into the image the user
    /// pulled) are used: `host[:port]/repo`, `host[:port]/prefix/*` or `*`. Empty by default:
    /// only artifacts the pulled manifest binds serve an image (docs/security.md).
    pub trust_referrers: Vec<String>,
    /// Largest index a layer may have (bytes; it is held in memory while the layer is mounted).
    /// A layer past any of the three index limits is downloaded in full, with the reason.
    pub max_index_bytes: u64,
    /// Most inodes (files, directories, links) in one layer's index.
    pub max_index_inodes: u64,
    /// Deepest directory nesting in one layer.
    pub max_index_depth: u32,
}

/// Default of `[remote] max_index_bytes`: 256 MiB, about four million files.
pub const DEFAULT_MAX_INDEX_BYTES: u64 = 256 << 20;

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            enabled: true,
            accept_pull_settings: true,
            trust_referrers: Vec::new(),
            max_index_bytes: DEFAULT_MAX_INDEX_BYTES,
            max_index_inodes: crate::format::index::DEFAULT_MAX_INODES,
            max_index_depth: crate::format::index::DEFAULT_MAX_DEPTH,
        }
    }
}

impl RemoteConfig {
    /// The index limits these settings give.
    pub fn index_limits(&self) -> crate::format::ReadLimits {
        crate::format::ReadLimits {
            max_len: self
                .max_index_bytes
                .min(crate::format::index::MAX_INDEX_LEN as u64) as usize,
            max_inodes: self.max_index_inodes,
            max_depth: self.max_index_depth,
        }
    }
}

/// Keeping lazy layers' FUSE connections alive across daemon restarts (issue 7; see
/// `crate::takeover`). On by default (issue 12): a stopped or killed daemon leaves its lazy
/// layers mounted, held by the fd holder process, for its successor to take over, so running
/// containers keep reading. If no daemon comes back within `grace_secs`, the holder lets the
/// connections go (readers get ENOTCONN, never a hang) and detaches the mounts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TakeoverConfig {
    pub enabled: bool,
    /// The fd holder's socket. Default: `ROOT/holder.sock`.
    pub holder_socket: Option<PathBuf>,
    /// How long the holder keeps connections without a daemon (seconds; long enough for a
    /// package upgrade). 0 = for ever.
    pub grace_secs: f64,
}

/// Default of `[takeover] grace_secs`: three minutes.
pub const DEFAULT_TAKEOVER_GRACE_SECS: f64 = 180.0;

impl Default for TakeoverConfig {
    fn default() -> Self {
        TakeoverConfig {
            enabled: true,
            holder_socket: None,
            grace_secs: DEFAULT_TAKEOVER_GRACE_SECS,
        }
    }
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
pub type ConfigError = crate::hosts::TomlFileError;

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

    /// Create the state root and the cache directory, owner-only (0700), and tighten them if
    /// they exist with more. Through the lazy layers under them any local user could otherwise
    /// run an image's setuid binaries and read its 0600 files, and read cached chunks of them
    /// (the class of CVE-2021-41103); containerd's own roots are private the same way.
    pub fn prepare_private_dirs(&self) -> std::io::Result<()> {
        for dir in [self.root.clone(), self.cache_dir()] {
            private_dir(&dir)?;
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
    ) -> Result<(crate::registry::RegistryOptions, Vec<String>), crate::hosts::HostsError> {
        let mut o = self.registry_options();
        let warnings = match &self.hosts_dir {
            Some(dir) => crate::hosts::apply_hosts_dir(dir, &mut o)?,
            None => Vec::new(),
        };
        Ok((o, warnings))
    }

    fn registry_options(&self) -> crate::registry::RegistryOptions {
        crate::registry::RegistryOptions {
            plain_http: false,
            plain_http_hosts: self
                .registry
                .iter()
                .filter(|h| h.plain_http)
                .map(|h| h.host.clone())
                .collect(),
            ca_files: Vec::new(),
            // A registry's CA is trusted for it and the mirrors listed with it, nowhere else.
            host_ca_files: {
                let mut m = std::collections::BTreeMap::<String, Vec<PathBuf>>::new();
                for h in &self.registry {
                    if let Some(ca) = &h.ca_file {
                        for host in std::iter::once(&h.host).chain(&h.mirrors) {
                            m.entry(host.clone()).or_default().push(ca.clone());
                        }
                    }
                }
                m
            },
            mirrors: Vec::new(),
            host_mirrors: self
                .registry
                .iter()
                .filter(|h| !h.mirrors.is_empty())
                .map(|h| (h.host.clone(), h.mirrors.clone()))
                .collect(),
            docker_config: None,
        }
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// Make `dir` (and missing parents) and set it to mode 0700.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode != 0o700 {
        tracing::info!(dir = %dir.display(), "tightening mode {mode:o} to 700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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
        assert!(c.takeover.enabled, "takeover is on by default");
        assert_eq!(c.takeover.grace_secs, DEFAULT_TAKEOVER_GRACE_SECS);
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

    #[test]
    fn state_root_and_cache_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = Config {
            root: root.clone(),
            ..Config::default()
        };
        c.cache.dir = Some(tmp.path().join("elsewhere/cache"));
        c.prepare_private_dirs().unwrap();
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&tmp.path().join("elsewhere/cache")), 0o700);
    }
}
