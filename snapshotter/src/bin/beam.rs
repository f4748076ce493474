//! `beam`: the command line. Thin: parses flags, sets up logging, calls the library.

use anyhow::{bail, Context, Result};
use beam::convert::image::convert_image;
use beam::convert::ConvertOptions;
use beam::remote::RemoteOptions;
use beam::store::{Location, Store};
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "beam",
    version,
    about = "Beam: start containers before their image is downloaded"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Registry access flags shared by every command that talks to a registry.
#[derive(Args, Clone)]
struct RegistryFlags {
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
    fn options(&self) -> Result<RemoteOptions> {
        let mut o = RemoteOptions {
            plain_http: self.plain_http,
            plain_http_hosts: self.plain_http_hosts.clone(),
            ca_files: self.ca_files.clone(),
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

#[derive(Subcommand)]
enum Command {
    /// Convert an image's layers into Beam layers and publish the Beam artifact beside it.
    Convert {
        #[command(flatten)]
        registry: RegistryFlags,
        /// Chunk size in bytes (4 KiB to 16 MiB).
        #[arg(long, default_value_t = beam::format::DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
        /// Worker threads for hashing and compression (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Source image: `host[:port]/repo:tag` or `oci:DIR[:TAG]`.
        src: String,
        /// Destination (default: the source). The original image is copied there unchanged.
        dst: Option<String>,
    },
    /// Write a converted image's root filesystem into DIR from its Beam layers.
    Unpack {
        #[command(flatten)]
        registry: RegistryFlags,
        /// Image: `host[:port]/repo:tag` or `oci:DIR[:TAG]`.
        image: String,
        /// Directory to create (must be empty).
        dir: PathBuf,
    },
    /// Mount a converted image read-only at DIR, lazily; IMAGE@LAYER_DIGEST mounts one layer.
    /// Runs until Ctrl-C or SIGTERM, then unmounts.
    Mount {
        #[command(flatten)]
        registry: RegistryFlags,
        /// Do not fetch the rest of the layers in the background.
        #[arg(long)]
        no_background_fetch: bool,
        /// Serve every read from the daemon (no FUSE passthrough for cached files).
        #[arg(long)]
        no_passthrough: bool,
        #[command(flatten)]
        cache: CacheFlags,
        /// Give up on a chunk after this many seconds (reads then fail with EIO).
        #[arg(long, default_value_t = 60.0)]
        fetch_deadline: f64,
        /// Concurrent Range requests for reads (foreground) and background fetch.
        #[arg(long, default_value_t = 8)]
        fetch_concurrency: usize,
        #[arg(long, default_value_t = 2)]
        background_concurrency: usize,
        /// Cap background fetch at this many bytes per second (reads are never capped).
        #[arg(long)]
        background_rate: Option<u64>,
        /// FUSE threads per layer.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Where per-layer mountpoints are made.
        #[arg(long, default_value = "/run/beam/mounts")]
        work_dir: PathBuf,
        /// Image (`host[:port]/repo:tag` or `oci:DIR[:TAG]`), optionally `@LAYER_DIGEST`.
        image: String,
        dir: PathBuf,
    },
    /// Run CMD chrooted into a lazy mount of IMAGE, record the order in which it opens files,
    /// and publish a Beam artifact whose prefetch lists follow that order.
    Record {
        #[command(flatten)]
        registry: RegistryFlags,
        #[command(flatten)]
        cache: CacheFlags,
        /// Stop the workload after this many seconds (what it opened so far is kept).
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        #[arg(long, default_value = "/run/beam/mounts")]
        work_dir: PathBuf,
        image: String,
        /// The workload, after `--`.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Ask a running beam-snapshotter what it is doing: lazy layers and their fetch progress,
    /// cache use, fetch counters.
    Status {
        /// The daemon's socket.
        #[arg(long, default_value = "/run/beam/beam.sock")]
        address: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The local chunk cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Pull IMAGE into containerd with the remote-snapshot labels on every layer, so that
    /// beam-snapshotter mounts converted layers lazily (nothing but manifest and config is
    /// downloaded). Then `ctr run --snapshotter beam IMAGE ...` starts it.
    Pull {
        /// containerd's socket.
        #[arg(
            long,
            env = "CONTAINERD_ADDRESS",
            default_value = "/run/containerd/containerd.sock"
        )]
        address: PathBuf,
        /// containerd namespace (`default` is ctr's; CRI uses `k8s.io`).
        #[arg(
            long,
            short = 'n',
            env = "CONTAINERD_NAMESPACE",
            default_value = "default"
        )]
        namespace: String,
        /// The snapshotter's name in containerd's config (`[proxy_plugins.NAME]`).
        #[arg(long, default_value = "beam")]
        snapshotter: String,
        #[command(flatten)]
        registry: RegistryFlags,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Image: `host[:port]/repo:tag` or `...@sha256:...`.
        image: String,
    },
    /// Check that containerd and beam-snapshotter are set up so pulls are lazy: reads
    /// containerd's config, asks containerd and the daemon, and says which line to change.
    /// Exits with 1 when something is wrong.
    Doctor {
        /// containerd's config file.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        containerd_config: PathBuf,
        /// containerd's socket.
        #[arg(
            long,
            env = "CONTAINERD_ADDRESS",
            default_value = "/run/containerd/containerd.sock"
        )]
        address: PathBuf,
        /// beam-snapshotter's socket.
        #[arg(long, default_value = "/run/beam/beam.sock")]
        beam_address: PathBuf,
        /// The snapshotter's name in containerd's config.
        #[arg(long, default_value = "beam")]
        snapshotter: String,
        #[arg(long)]
        json: bool,
    },
    /// Set a node up for Beam: merge Beam into containerd's config (v2 or v3, detected; the
    /// user's settings, comments and layout kept; a backup kept), install the binaries and
    /// the systemd unit, restart containerd only when its config changed. Twice changes
    /// nothing; `--uninstall` puts everything back.
    NodeSetup {
        /// containerd's config file (made if missing, for the installed containerd's version).
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        containerd_config: PathBuf,
        /// Print what would change (a diff of the config) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not restart containerd (say that it must be, when its config changed).
        #[arg(long)]
        no_restart: bool,
        /// Undo node setup: restore containerd's config, remove the unit and binaries.
        #[arg(long)]
        uninstall: bool,
        /// Only containerd's config (e.g. in the DaemonSet, where the daemon runs in a pod).
        #[arg(long)]
        no_install: bool,
        /// beam-snapshotter's socket, as containerd should dial it.
        #[arg(long, default_value = "/run/beam/beam.sock")]
        beam_address: PathBuf,
        /// beam-snapshotter's state directory (exported to containerd 2.x).
        #[arg(long, default_value = "/var/lib/beam")]
        beam_root: PathBuf,
        /// The proxy plugin's name.
        #[arg(long, default_value = "beam")]
        snapshotter: String,
        /// containerd's binary (its version picks the config version of a new file).
        #[arg(long, default_value = "containerd")]
        containerd_bin: PathBuf,
        /// Where the binaries are installed.
        #[arg(long, default_value = "/usr/local/bin")]
        bin_dir: PathBuf,
        /// Where the systemd unit is installed.
        #[arg(long, default_value = "/etc/systemd/system")]
        unit_dir: PathBuf,
        /// beam-snapshotter's config file (the default one is written if missing).
        #[arg(long, default_value = "/etc/beam/config.toml")]
        beam_config: PathBuf,
    },
    /// Show an image's Beam conversion: artifact, layers, chunk counts.
    Inspect {
        #[command(flatten)]
        registry: RegistryFlags,
        image: String,
    },
}

#[derive(Args, Clone)]
struct CacheFlags {
    /// Chunk cache directory.
    #[arg(long, env = "BEAM_CACHE_DIR", default_value = "/var/lib/beam/cache")]
    cache_dir: PathBuf,
    /// Cache size budget in bytes; 0 = unlimited. Chunks no mounted layer needs are evicted
    /// beyond it.
    #[arg(long, default_value_t = 0)]
    cache_budget: u64,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Chunks, files and indexes in the cache, and their sizes.
    Stats {
        #[command(flatten)]
        cache: CacheFlags,
        #[arg(long)]
        json: bool,
    },
    /// Remove cached chunks, oldest first, down to `--to` bytes (default: everything). A
    /// running `beam mount` fetches again what it needs.
    Prune {
        #[command(flatten)]
        cache: CacheFlags,
        #[arg(long, default_value_t = 0)]
        to: u64,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BEAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // SAFETY: mallopt only adjusts allocator parameters, before any thread starts. It keeps
    // each FUSE thread's 16 MiB zeroed request buffer in mmap'd memory, so that it is not
    // resident until used (see beam-snapshotter).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    // SAFETY: restoring the default SIGPIPE action before any thread starts, so that
    // `beam ... | head` ends quietly like other command-line tools instead of panicking.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("beam: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("beam: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert {
            registry,
            chunk_size,
            jobs,
            json,
            src,
            dst,
        } => {
            let opts = registry.options()?;
            let src_loc = Location::parse(&src)?;
            let same_place = dst.is_none();
            let dst_loc = match &dst {
                Some(d) => Location::parse(d)?,
                None => src_loc.clone(),
            };
            let src_store = Store::open(src_loc, &opts, false)?;
            let dst_store = Store::open(dst_loc, &opts, true)?;
            let mut copts = ConvertOptions {
                chunk_size,
                ..ConvertOptions::default()
            };
            if let Some(j) = jobs {
                copts.workers = j.max(1);
            }
            let progress = std::io::stderr().is_terminal() && !json;
            let started = std::time::Instant::now();
            let results =
                convert_image(&src_store, &dst_store, same_place, &copts, progress).await?;
            let secs = started.elapsed().as_secs_f64();
            if json {
                let v: Vec<_> = results
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "subject": r.subject.digest,
                            "artifact": r.artifact.digest,
                            "already_converted": r.already,
                            "layers": r.layers.iter().zip(&r.stats).map(|(l, s)| serde_json::json!({
                                "source": l.source,
                                "diff_id": l.diff_id,
                                "index": l.index.digest,
                                "index_size": l.index.size,
                                "chunks": l.chunks.digest,
                                "chunks_size": l.chunks.size,
                                "files": s.files,
                                "file_bytes": s.file_bytes,
                                "tar_bytes": s.tar_bytes,
                                "chunks_total": s.chunks_total,
                                "chunks_unique": s.chunks_unique,
                            })).collect::<Vec<_>>(),
                            "seconds": secs,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for r in &results {
                    let tar: u64 = r.stats.iter().map(|s| s.tar_bytes).sum();
                    let beam: u64 = r.layers.iter().map(|l| l.index.size + l.chunks.size).sum();
                    println!(
                        "{} {} -> Beam artifact {} ({} layers, {:.1} MB of tar -> {:.1} MB, {:.1}s){}",
                        dst_store.location,
                        r.subject.digest,
                        r.artifact.digest,
                        r.layers.len(),
                        tar as f64 / 1e6,
                        beam as f64 / 1e6,
                        secs,
                        if r.already { " (already converted)" } else { "" }
                    );
                }
            }
            Ok(())
        }
        Command::Pull {
            address,
            namespace,
            snapshotter,
            registry,
            json,
            image,
        } => {
            let opts = beam::pull::PullOptions {
                address,
                namespace,
                snapshotter,
                registry: registry.options()?,
                progress: !json,
            };
            let r = beam::pull::pull(&image, &opts).await?;
            let lazy = r.count(|o| *o == beam::pull::LayerOutcome::Lazy);
            let downloaded = r.count(|o| matches!(o, beam::pull::LayerOutcome::Downloaded(..)));
            let present = r.count(|o| *o == beam::pull::LayerOutcome::Present);
            if json {
                let layers: Vec<_> = r
                    .layers
                    .iter()
                    .map(|(digest, chain, o)| {
                        let (how, bytes, why) = match o {
                            beam::pull::LayerOutcome::Lazy => ("lazy", 0, None),
                            beam::pull::LayerOutcome::Present => ("present", 0, None),
                            beam::pull::LayerOutcome::Downloaded(n, why) => {
                                ("downloaded", *n, why.as_ref())
                            }
                        };
                        serde_json::json!({
                            "digest": digest, "chain_id": chain, "how": how, "bytes": bytes,
                            "fallback_reason": why.map(|w| &w.reason),
                            "fallback_fix": why.and_then(|w| w.fix.as_ref()),
                        })
                    })
                    .collect();
                let v = serde_json::json!({
                    "image": r.name,
                    "target": r.target,
                    "manifest": r.manifest,
                    "converted": r.converted,
                    "layers": layers,
                    "lazy": lazy,
                    "downloaded": downloaded,
                    "present": present,
                    "downloaded_bytes": r.downloaded_bytes(),
                    "seconds": r.seconds,
                    "steps": r.steps.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                        .collect::<serde_json::Map<String, serde_json::Value>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{}: {} layers, {lazy} lazy, {downloaded} downloaded ({:.1} MB), {present} \
                     already present, {:.2}s",
                    r.name,
                    r.layers.len(),
                    r.downloaded_bytes() as f64 / 1e6,
                    r.seconds
                );
                let steps: Vec<String> = r
                    .steps
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.2}s"))
                    .collect();
                println!("steps: {}", steps.join(", "));
            }
            if r.converted && downloaded > 0 {
                let mut fixes: Vec<&str> = r
                    .layers
                    .iter()
                    .filter_map(|(_, _, o)| match o {
                        beam::pull::LayerOutcome::Downloaded(_, Some(w)) => w.fix.as_deref(),
                        _ => None,
                    })
                    .collect();
                fixes.dedup();
                if fixes.is_empty() {
                    eprintln!(
                        "beam: {} has a Beam conversion, yet {downloaded} layer(s) were \
                         downloaded in full (reasons above; `beam doctor` checks the setup)",
                        r.name
                    );
                } else {
                    eprintln!(
                        "beam: {} has a Beam conversion, yet {downloaded} layer(s) were \
                         downloaded in full. Fix: {}",
                        r.name,
                        fixes.join("; ")
                    );
                }
            } else if !r.converted && downloaded > 0 {
                eprintln!(
                    "beam: {} has no Beam conversion (run `beam convert {}`): its layers were \
                     downloaded in full",
                    r.name, r.name
                );
            }
            Ok(())
        }
        Command::Doctor {
            containerd_config,
            address,
            beam_address,
            snapshotter,
            json,
        } => {
            let findings = beam::doctor::run(&beam::doctor::DoctorOptions {
                containerd_config,
                containerd_address: address,
                beam_address,
                snapshotter,
            })
            .await;
            if json {
                println!("{}", serde_json::to_string_pretty(&findings)?);
            } else {
                print!("{}", beam::doctor::render(&findings));
            }
            let errors = findings
                .iter()
                .filter(|f| f.severity == beam::doctor::Severity::Error)
                .count();
            if errors > 0 {
                bail!("{errors} problem(s) found");
            }
            Ok(())
        }
        Command::NodeSetup {
            containerd_config,
            dry_run,
            no_restart,
            uninstall,
            no_install,
            beam_address,
            beam_root,
            snapshotter,
            containerd_bin,
            bin_dir,
            unit_dir,
            beam_config,
        } => {
            use beam::node_setup::{self as ns, Outcome};
            let install = ns::InstallPaths {
                bin_dir,
                unit_dir,
                config: beam_config,
                beam_address: beam_address.clone(),
                beam_root: beam_root.clone(),
                enabled: !no_install,
            };
            let path = &containerd_config;
            let outcome = if uninstall {
                let o = ns::uninstall_file(path, &snapshotter, dry_run)?;
                for line in ns::uninstall(&install, dry_run)? {
                    println!("{line}");
                }
                o
            } else {
                let major = match ns::containerd_version(&containerd_bin) {
                    Ok(version) => {
                        println!("containerd {version} ({})", containerd_bin.display());
                        Some(version.major)
                    }
                    Err(e) => {
                        eprintln!("beam: warning: cannot tell containerd's version: {e:#}");
                        None
                    }
                };
                let target = ns::SetupTarget {
                    snapshotter: snapshotter.clone(),
                    beam_address,
                    beam_root,
                };
                let o = ns::setup_file(path, major, &target, dry_run)?;
                for line in ns::install(&install, dry_run)? {
                    println!("{line}");
                }
                o
            };
            let changed = match &outcome {
                Outcome::AlreadySetUp => {
                    println!(
                        "{}: already set up for Beam, nothing to change",
                        path.display()
                    );
                    false
                }
                Outcome::NotSetUp => {
                    println!(
                        "{}: node setup has not changed it, nothing to undo",
                        path.display()
                    );
                    false
                }
                Outcome::Changed { diff, changes } => {
                    if dry_run {
                        print!("{diff}");
                        println!("(dry run: nothing written)");
                    } else {
                        for c in changes {
                            println!("{}: {c}", path.display());
                        }
                        println!(
                            "backup of the original: {}",
                            ns::backup_path(path).display()
                        );
                    }
                    true
                }
                Outcome::Restored { how } => {
                    println!("{how}");
                    true
                }
            };
            if changed && !dry_run {
                if no_restart {
                    println!("containerd must be restarted to apply its new config (--no-restart)");
                } else {
                    println!("{}", ns::restart_containerd()?);
                }
            }
            Ok(())
        }
        Command::Unpack {
            registry,
            image,
            dir,
        } => {
            let store = Store::open(Location::parse(&image)?, &registry.options()?, false)?;
            let s = beam::unpack::unpack_image(&store, &dir).await?;
            eprintln!(
                "unpacked {} layers, {} entries, {:.1} MB into {}",
                s.layers,
                s.entries,
                s.bytes as f64 / 1e6,
                dir.display()
            );
            Ok(())
        }
        Command::Mount {
            registry,
            no_background_fetch,
            no_passthrough,
            cache,
            fetch_deadline,
            fetch_concurrency,
            background_concurrency,
            background_rate,
            threads,
            work_dir,
            image,
            dir,
        } => {
            let opts = registry.options()?;
            let (store, layer) = resolve_mount_target(&image, &opts).await?;
            let chunk_cache = std::sync::Arc::new(
                beam::cache::ChunkCache::open(&cache.cache_dir, cache.cache_budget)
                    .with_context(|| format!("opening cache {}", cache.cache_dir.display()))?,
            );
            let fetcher = std::sync::Arc::new(beam::fetch::Fetcher::new(
                chunk_cache,
                beam::fetch::FetchOptions {
                    deadline: std::time::Duration::from_secs_f64(fetch_deadline),
                    attempt_timeout: std::time::Duration::from_secs_f64(
                        (fetch_deadline / 2.0).clamp(1.0, 20.0),
                    ),
                    foreground_concurrency: fetch_concurrency,
                    background_concurrency,
                    background_bytes_per_sec: background_rate,
                    ..Default::default()
                },
            ));
            let mopts = beam::mount::MountOptions {
                background_fetch: !no_background_fetch,
                passthrough: !no_passthrough,
                threads,
                work_dir,
                record: false,
            };
            let mounted =
                beam::mount::mount_image(&store, fetcher.clone(), &dir, layer.as_deref(), &mopts)
                    .await?;
            println!(
                "mounted {} ({} layers) at {}",
                image,
                mounted.layers.len(),
                dir.display()
            );
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tokio::task::block_in_place(move || drop(mounted));
            let c = &fetcher.counters;
            use std::sync::atomic::Ordering::Relaxed;
            eprintln!(
                "unmounted {}; fetched {} bytes in {} requests ({} chunks, {} retries, {} corrupt answers discarded)",
                dir.display(),
                c.bytes.load(Relaxed),
                c.requests.load(Relaxed),
                c.chunks.load(Relaxed),
                c.retries.load(Relaxed),
                c.corrupt.load(Relaxed),
            );
            Ok(())
        }
        Command::Record {
            registry,
            cache,
            timeout,
            work_dir,
            image,
            cmd,
        } => {
            let store = Store::open(Location::parse(&image)?, &registry.options()?, false)?;
            let chunk_cache = std::sync::Arc::new(
                beam::cache::ChunkCache::open(&cache.cache_dir, cache.cache_budget)
                    .with_context(|| format!("opening cache {}", cache.cache_dir.display()))?,
            );
            let fetcher = std::sync::Arc::new(beam::fetch::Fetcher::new(
                chunk_cache,
                beam::fetch::FetchOptions::default(),
            ));
            let r = beam::record::record(
                &store,
                fetcher,
                &cmd,
                std::time::Duration::from_secs_f64(timeout),
                &work_dir,
            )
            .await?;
            println!(
                "recorded {} files ({} per layer) -> Beam artifact {}{}",
                r.files_per_layer.iter().sum::<usize>(),
                r.files_per_layer
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join("/"),
                r.artifact.digest,
                match r.exit_code {
                    Some(0) => String::new(),
                    Some(c) => format!(" (workload exited with {c})"),
                    None => " (workload stopped at the timeout)".into(),
                }
            );
            Ok(())
        }
        Command::Status { address, json } => {
            let s = beam::daemon::control::fetch_status(&address).await?;
            if json {
                let layers: Vec<_> = s
                    .layers
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "snapshot": l.snapshot, "image": l.image, "layer": l.layer,
                            "mountpoint": l.mountpoint, "chunks_total": l.chunks_total,
                            "chunks_cached": l.chunks_cached, "reads": l.reads,
                            "read_errors": l.read_errors, "held": l.held,
                            "passthrough_opens": l.passthrough_opens,
                            "taken_over_unix_ms": (l.taken_over_unix_ms > 0)
                                .then_some(l.taken_over_unix_ms),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "version": s.version, "layers": layers,
                        "cache_bytes": s.cache_bytes, "cache_budget_bytes": s.cache_budget_bytes,
                        "fetch_requests": s.fetch_requests, "fetch_bytes": s.fetch_bytes,
                        "fetch_failures": s.fetch_failures, "lazy_mounts": s.lazy_mounts,
                        "fallbacks": s.fallbacks,
                        "unlabelled_layer_prepares": s.unlabelled_layer_prepares,
                        "last_fallback": s.last_fallback,
                        "last_fallback_fix": s.last_fallback_fix,
                        "takeover": s.takeover,
                        "takeover_grace_secs": s.takeover_grace_secs,
                    })
                );
            } else {
                println!("beam-snapshotter {}", s.version);
                println!(
                    "lazy mounts {} (fallbacks {}); fetched {:.1} MB in {} requests ({} failed)",
                    s.lazy_mounts,
                    s.fallbacks,
                    s.fetch_bytes as f64 / 1e6,
                    s.fetch_requests,
                    s.fetch_failures
                );
                if !s.last_fallback.is_empty() {
                    println!("last fallback: {}", s.last_fallback);
                    if !s.last_fallback_fix.is_empty() {
                        println!("  fix: {}", s.last_fallback_fix);
                    }
                }
                if s.unlabelled_layer_prepares > 0 {
                    println!(
                        "{} layer(s) came without the remote-snapshot labels and were pulled in \
                         full: run `beam doctor`",
                        s.unlabelled_layer_prepares
                    );
                }
                println!(
                    "cache {:.1} MB (budget {})",
                    s.cache_bytes as f64 / 1e6,
                    if s.cache_budget_bytes == 0 {
                        "unlimited".to_string()
                    } else {
                        format!("{:.1} MB", s.cache_budget_bytes as f64 / 1e6)
                    }
                );
                if s.takeover {
                    let grace = if s.takeover_grace_secs > 0.0 {
                        format!(
                            "a stopped daemon's layers are kept {:.0} s for a successor, then \
                             let go (readers get errors)",
                            s.takeover_grace_secs
                        )
                    } else {
                        "a stopped daemon's layers are kept until a successor comes".to_string()
                    };
                    println!("takeover on: lazy layers survive a daemon restart; {grace}");
                } else {
                    println!(
                        "takeover off: a daemon restart breaks containers reading lazy layers"
                    );
                }
                for l in &s.layers {
                    let connection = if l.taken_over_unix_ms > 0 {
                        let at = std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(l.taken_over_unix_ms);
                        let at: chrono::DateTime<chrono::Utc> = at.into();
                        format!(
                            "taken over from the previous daemon at {}",
                            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                        )
                    } else if l.held {
                        "mounted by this daemon, held for takeover".to_string()
                    } else {
                        "mounted by this daemon".to_string()
                    };
                    println!(
                        "layer {} ({})\n  snapshot {}\n  connection {connection}\n  fetched {}/{} chunks, {} reads, {} errors, at {}",
                        l.layer,
                        l.image,
                        l.snapshot,
                        l.chunks_cached,
                        l.chunks_total,
                        l.reads,
                        l.read_errors,
                        if l.mountpoint.is_empty() { "(not mounted)" } else { &l.mountpoint }
                    );
                }
            }
            Ok(())
        }
        Command::Cache { command } => match command {
            CacheCommand::Stats { cache, json } => {
                let c = beam::cache::ChunkCache::open(&cache.cache_dir, cache.cache_budget)?;
                let s = c.stats()?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "dir": cache.cache_dir,
                            "chunks": s.chunks, "chunk_bytes": s.chunk_bytes,
                            "files": s.files, "file_bytes": s.file_bytes,
                            "indexes": s.indexes, "index_bytes": s.index_bytes,
                            "total_bytes": s.total_bytes(),
                        })
                    );
                } else {
                    println!("cache     {}", cache.cache_dir.display());
                    println!(
                        "chunks    {} ({:.1} MB)",
                        s.chunks,
                        s.chunk_bytes as f64 / 1e6
                    );
                    println!(
                        "files     {} ({:.1} MB, passthrough backing)",
                        s.files,
                        s.file_bytes as f64 / 1e6
                    );
                    println!(
                        "indexes   {} ({:.1} MB)",
                        s.indexes,
                        s.index_bytes as f64 / 1e6
                    );
                    println!("total     {:.1} MB", s.total_bytes() as f64 / 1e6);
                }
                Ok(())
            }
            CacheCommand::Prune { cache, to } => {
                let c = beam::cache::ChunkCache::open(&cache.cache_dir, cache.cache_budget)?;
                let p = c.prune(to)?;
                println!(
                    "removed {} chunks and {} files, freed {:.1} MB",
                    p.removed_chunks,
                    p.removed_files,
                    p.freed_bytes as f64 / 1e6
                );
                Ok(())
            }
        },
        Command::Inspect { registry, image } => {
            let store = Store::open(Location::parse(&image)?, &registry.options()?, false)?;
            let m = store.platform_manifest().await?;
            let Some((artifact, layers)) = store.find_beam(&m.desc.digest).await? else {
                bail!("{image} ({}) has no Beam conversion", m.desc.digest);
            };
            println!("image    {}", m.desc.digest);
            println!("artifact {artifact}");
            for l in layers {
                let idx = store
                    .blob_bytes(&l.index, beam::format::index::MAX_INDEX_LEN as u64)
                    .await?;
                let r = beam::format::IndexReader::new(idx)
                    .with_context(|| format!("index of layer {}", l.source))?;
                println!(
                    "layer {}\n  index {} ({} bytes, {} inodes, chunk size {}, {} files to prefetch)\n  chunks {} ({} bytes, {} unique chunks)",
                    l.source,
                    l.index.digest,
                    l.index.size,
                    r.inode_count(),
                    r.chunk_size(),
                    r.prefetch().count(),
                    l.chunks.digest,
                    l.chunks.size,
                    r.chunk_count()
                );
            }
            Ok(())
        }
    }
}

/// `IMAGE` or `IMAGE@LAYER_DIGEST`: when the part after the last `@` is the digest of one of
/// the image's layers, mount that layer alone; otherwise the whole string names the image.
async fn resolve_mount_target(
    image: &str,
    opts: &RemoteOptions,
) -> Result<(Store, Option<String>)> {
    if let Some((base, digest)) = image.rsplit_once('@') {
        if beam::oci::is_sha256_digest(digest) {
            if let Ok(loc) = Location::parse(base) {
                if let Ok(store) = Store::open(loc, opts, false) {
                    if let Ok(m) = store.platform_manifest().await {
                        if m.manifest.layers.iter().any(|l| l.digest == digest) {
                            return Ok((store, Some(digest.to_string())));
                        }
                    }
                }
            }
        }
    }
    Ok((Store::open(Location::parse(image)?, opts, false)?, None))
}
