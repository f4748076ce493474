//! One module per `beam` command: each has its flags (`Args`) and `run(args)`, which calls the
//! library and prints the result. The flag groups several commands share live here.

pub mod autoconvert;
pub mod cache;
pub mod convert;
pub mod doctor;
pub mod inspect;
pub mod mount;
pub mod node_setup;
pub mod pull;
pub mod record;
pub mod status;
pub mod unpack;

use anyhow::Result;
use beam::registry::RegistryOptions;
use std::path::PathBuf;

/// Registry access flags shared by every command that talks to a registry.
#[derive(clap::Args, Clone)]
pub struct RegistryFlags {
    /// Use plain HTTP (no TLS) for every registry.
    #[arg(long)]
    plain_http: bool,
    /// Use plain HTTP for this host (repeatable); also `BEAM_PLAIN_HTTP_HOSTS=h1,h2`.
    #[arg(long = "plain-http-host", value_name = "HOST[:PORT]")]
    plain_http_hosts: Vec<String>,
    /// Trust this PEM CA certificate for HTTPS registries (repeatable).
    #[arg(long = "ca-file", value_name = "FILE")]
    ca_files: Vec<PathBuf>,
    /// Read blobs from this mirror host first (repeatable, tried in order, then the origin).
    #[arg(long = "mirror", value_name = "HOST[:PORT]")]
    mirrors: Vec<String>,
    /// containerd's registry hosts directory (`HOST/hosts.toml` files: mirrors, plain HTTP,
    /// CAs), e.g. /etc/containerd/certs.d; also `BEAM_HOSTS_DIR`.
    #[arg(long, env = "BEAM_HOSTS_DIR", value_name = "DIR")]
    hosts_dir: Option<PathBuf>,
}

impl RegistryFlags {
    /// The library's registry options: these flags, the environment, and the hosts directory.
    pub fn options(&self) -> Result<RegistryOptions> {
        let mut o = RegistryOptions {
            plain_http: self.plain_http,
            plain_http_hosts: self.plain_http_hosts.clone(),
            ca_files: self.ca_files.clone(),
            host_ca_files: Default::default(),
            mirrors: self.mirrors.clone(),
            host_mirrors: Default::default(),
            docker_config: None,
        }
        .with_env();
        if let Some(dir) = &self.hosts_dir {
            for w in beam::hosts::apply_hosts_dir(dir, &mut o)? {
                eprintln!("beam: warning: {w}");
            }
        }
        Ok(o)
    }
}

/// The chunk cache flags of the commands that open the cache.
#[derive(clap::Args, Clone)]
pub struct CacheFlags {
    /// Chunk cache directory.
    #[arg(long, env = "BEAM_CACHE_DIR", default_value = "/var/lib/beam/cache")]
    pub cache_dir: PathBuf,
    /// Cache size budget in bytes; 0 = unlimited. Chunks no mounted layer needs are evicted
    /// beyond it.
    #[arg(long, default_value_t = 0)]
    pub cache_budget: u64,
}
