//! `beam-snapshotter`: the daemon containerd talks to as a proxy snapshotter plugin.

use anyhow::{Context, Result};
use beam::config::Config;
use clap::Parser;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "beam-snapshotter",
    version,
    about = "Beam's containerd snapshotter daemon"
)]
struct Args {
    /// Configuration file (TOML); flags override it.
    #[arg(long, env = "BEAM_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
    /// State directory (snapshots, metadata, cache). Default /var/lib/beam.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket to serve containerd's snapshots API on (mode 0600). Default
    /// /run/beam/beam.sock.
    #[arg(long)]
    address: Option<PathBuf>,
    /// Chunk cache directory (default: ROOT/cache).
    #[arg(long, env = "BEAM_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Cache size budget in bytes (0 = unlimited).
    #[arg(long)]
    cache_budget: Option<u64>,
    /// Serve only ordinary snapshots (no lazy layers).
    #[arg(long)]
    no_remote: bool,
    /// Ignore the registry settings `beam pull` sends with its layers (its --plain-http,
    /// --ca-file, --hosts-dir, Docker config); use only this daemon's own.
    #[arg(long)]
    ignore_pull_settings: bool,
    /// Also use Beam artifacts found by referrers, not bound into the pulled image, in these
    /// repositories (repeatable): HOST[:PORT]/REPO, HOST[:PORT]/PREFIX/* or * (docs/security.md).
    #[arg(long = "trust-referrers", value_name = "REPOSITORY")]
    trust_referrers: Vec<String>,
    /// Do not fetch the rest of lazy layers in the background.
    #[arg(long)]
    no_background_fetch: bool,
    /// Plain HTTP for every registry.
    #[arg(long)]
    plain_http: bool,
    /// Plain HTTP for this registry host (repeatable).
    #[arg(long = "plain-http-host", value_name = "HOST[:PORT]")]
    plain_http_hosts: Vec<String>,
    /// Give up on a chunk after this many seconds (reads then fail with EIO).
    #[arg(long)]
    fetch_deadline: Option<f64>,
    /// Serve Prometheus metrics on HOST:PORT (`GET /metrics`).
    #[arg(long)]
    metrics_address: Option<String>,
    /// containerd's registry hosts directory (hosts.toml files), e.g. /etc/containerd/certs.d.
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
    /// Keep lazy layers' FUSE connections alive across restarts (fd holder, docs/takeover.md).
    /// On by default; the flag is kept for scripts that pass it.
    #[arg(long, conflicts_with = "no_takeover")]
    takeover: bool,
    /// Do not keep lazy layers alive across restarts: a stopped daemon unmounts them, and
    /// running containers reading them get errors.
    #[arg(long)]
    no_takeover: bool,
    /// Seconds the fd holder keeps lazy layers of a stopped daemon for a successor before it
    /// lets them go (readers then get errors instead of waiting). 0 = for ever. Default 180.
    #[arg(long, value_name = "SECS")]
    takeover_grace: Option<f64>,
    /// Stop the daemon on this root for good: SIGTERM it, wait for it to exit, then have the
    /// fd holder let every lazy layer go at once (a plain SIGTERM leaves them to a successor).
    #[arg(long)]
    stop: bool,
    /// Internal: run as the fd holder on this socket (started by the daemon itself).
    #[arg(long, hide = true, value_name = "SOCKET")]
    fd_holder: Option<PathBuf>,
}

impl Args {
    /// The configuration file (or defaults) with the flags applied.
    fn config(&self) -> Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        if let Some(r) = &self.root {
            c.root = r.clone();
        }
        if let Some(a) = &self.address {
            c.address = a.clone();
        }
        if let Some(d) = &self.cache_dir {
            c.cache.dir = Some(d.clone());
        }
        if let Some(b) = self.cache_budget {
            c.cache.budget_bytes = b;
        }
        if self.no_remote {
            c.remote.enabled = false;
        }
        if self.ignore_pull_settings {
            c.remote.accept_pull_settings = false;
        }
        c.remote
            .trust_referrers
            .extend(self.trust_referrers.iter().cloned());
        if self.no_background_fetch {
            c.fetch.background = false;
        }
        if let Some(d) = self.fetch_deadline {
            c.fetch.deadline_secs = d;
        }
        if let Some(m) = &self.metrics_address {
            c.metrics_address = Some(m.clone());
        }
        if let Some(d) = &self.hosts_dir {
            c.hosts_dir = Some(d.clone());
        }
        if self.takeover {
            c.takeover.enabled = true;
        }
        if self.no_takeover {
            c.takeover.enabled = false;
        }
        if let Some(g) = self.takeover_grace {
            anyhow::ensure!(
                g.is_finite() && g >= 0.0,
                "--takeover-grace takes seconds >= 0"
            );
            c.takeover.grace_secs = g;
        }
        for h in &self.plain_http_hosts {
            match c.registry.iter_mut().find(|r| r.host == *h) {
                Some(r) => r.plain_http = true,
                None => c.registry.push(beam::config::RegistryHost {
                    host: h.clone(),
                    plain_http: true,
                    mirrors: Vec::new(),
                    ca_file: None,
                }),
            }
        }
        Ok(c)
    }
}

// mallopt (allocator tuning before any thread starts) is a libc call.
#[allow(unsafe_code)]
fn main() -> std::process::ExitCode {
    // Each FUSE thread allocates a 16 MiB zeroed request buffer. With glibc's dynamic mmap
    // threshold such a buffer can come from a heap arena, where zeroing touches every page
    // (about 4 MiB resident per thread here); a fixed threshold keeps large buffers in mmap'd
    // memory whose untouched pages are never resident.
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BEAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(socket) = &args.fd_holder {
        // The fd holder process: no runtime, no config, just the held fds (see takeover::holder).
        let grace = std::time::Duration::from_secs_f64(
            args.takeover_grace
                .filter(|g| g.is_finite() && *g >= 0.0)
                .unwrap_or(beam::config::DEFAULT_TAKEOVER_GRACE_SECS),
        );
        return match beam::takeover::run_holder(socket, grace) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("beam-snapshotter --fd-holder: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("beam-snapshotter: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return std::process::ExitCode::SUCCESS;
    }
    if args.stop {
        return match stop(&config) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("beam-snapshotter --stop: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("beam-snapshotter: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // One daemon per root. A successor started while its predecessor is still exiting waits
    // for this lock: taking a FUSE connection over while the old process still reads it would
    // race. It is let go only once the runtime, and with it every fetch task still writing to
    // the cache, has stopped (`--stop` and successors go by it).
    if let Err(e) = config.prepare_private_dirs() {
        eprintln!(
            "beam-snapshotter: preparing {} and {}: {e}",
            config.root.display(),
            config.cache_dir().display()
        );
        return std::process::ExitCode::FAILURE;
    }
    let root_lock = match rt.block_on(lock_root(&config.root)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("beam-snapshotter: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(config, args.plain_http));
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    drop(root_lock);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("beam-snapshotter: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, plain_http_everywhere: bool) -> Result<()> {
    let snapshots = Arc::new(
        beam::snapshot::Snapshots::open(&config.root.join("snapshotter"))
            .with_context(|| format!("opening snapshots under {}", config.root.display()))?,
    );
    let address = config.address.clone();
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&address) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", address.display())),
    }
    let remote = if !config.remote.enabled {
        None
    } else {
        let cache_dir = config.cache_dir();
        let cache = Arc::new(
            beam::cache::ChunkCache::open(&cache_dir, config.cache.budget_bytes)
                .with_context(|| format!("opening cache {}", cache_dir.display()))?,
        );
        let fetcher = Arc::new(beam::fetch::Fetcher::new(
            cache,
            beam::fetch::FetchOptions {
                deadline: std::time::Duration::from_secs_f64(config.fetch.deadline_secs),
                foreground_concurrency: config.fetch.concurrency,
                background_concurrency: config.fetch.background_concurrency,
                background_bytes_per_sec: Some(config.fetch.background_bytes_per_sec)
                    .filter(|r| *r > 0),
                ..Default::default()
            },
        ));
        let (registry, warnings) = config
            .remote_options()
            .context("reading registry hosts configuration")?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        let mut registry = registry.with_env();
        registry.plain_http = plain_http_everywhere;
        let mount = beam::mount::MountOptions {
            background_fetch: config.fetch.background,
            // With takeover, backing ids are written down per mount for the successor
            // (takeover::OpenTable).
            passthrough: true,
            threads: 4,
            work_dir: config.root.join("mounts"),
            trace_access: false,
            mounter: beam::mounter::system(),
            layers: Default::default(),
        };
        let mut r = beam::daemon::lazy::LazyLayers::new(fetcher, registry, mount)?
            .accept_pull_settings(config.remote.accept_pull_settings)
            .trust(beam::store::Trust {
                referrer_repositories: config.remote.trust_referrers.clone(),
            })
            .whole_layer_max_bytes(config.fetch.whole_layer_max_bytes)
            .index_limits(config.remote.index_limits());
        if config.takeover.enabled {
            let socket = config.holder_socket();
            let grace = std::time::Duration::from_secs_f64(config.takeover.grace_secs);
            let attached = ensure_holder(&socket, &config.root, grace)?;
            r = r.with_holder(socket, attached, grace);
        } else {
            release_held(&config.holder_socket());
        }
        let r = Arc::new(r);
        let n = r.recover(&snapshots).await;
        if n > 0 {
            tracing::info!(layers = n, "remounted lazy layers");
        }
        Some(r)
    };
    let counters = Arc::new(beam::metrics::ServiceCounters::default());
    if let Some(addr) = &config.metrics_address {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics address {addr}"))?;
        let r = remote.clone();
        let sources = Arc::new(beam::metrics::Sources {
            fetcher: remote.as_ref().map(|r| r.fetcher.clone()),
            service: counters.clone(),
            mounted_layers: Box::new(move || r.as_ref().map(|r| r.mounted_count()).unwrap_or(0)),
        });
        tokio::spawn(beam::metrics::serve(l, sources));
        tracing::info!(address = %addr, "serving metrics");
    }
    let listener = tokio::net::UnixListener::bind(&address)
        .with_context(|| format!("listening on {}", address.display()))?;
    std::fs::set_permissions(&address, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(address = %address.display(), root = %config.root.display(), "serving");
    beam::daemon::notify_ready();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
    };
    let control = beam::daemon::control::ControlService {
        snapshots: snapshots.clone(),
        remote: remote.clone(),
        counters: counters.clone(),
        cache_budget: config.cache.budget_bytes,
    };
    beam::daemon::grpc::serve(
        beam::daemon::grpc::SnapshotService {
            snapshots,
            remote: remote.clone(),
            counters,
        },
        control,
        listener,
        shutdown,
    )
    .await?;
    if let Some(r) = remote {
        if r.takeover_enabled() {
            // The successor takes the lazy layers over; running containers keep reading.
            tokio::task::block_in_place(|| r.leave_all_mounted());
            tracing::info!("lazy layers left mounted for the next daemon (takeover)");
        } else {
            tokio::task::block_in_place(|| r.unmount_all());
        }
    }
    let _ = std::fs::remove_file(&address);
    Ok(())
}

/// Connect to the fd holder on `socket`, or start one, and attach to it as the serving daemon
/// (the returned client stays open for this daemon's lifetime: once it closes, the holder waits
/// `grace` for a successor before it lets the layers go). `None`: a holder that predates the
/// grace period, used without it.
fn ensure_holder(
    socket: &std::path::Path,
    root: &std::path::Path,
    grace: std::time::Duration,
) -> Result<Option<beam::takeover::HolderClient>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        start_holder(socket, root, grace)?;
        let attached =
            beam::takeover::HolderClient::connect(socket).and_then(|c| c.attach(grace).map(|()| c));
        match attached {
            Ok(c) => return Ok(Some(c)),
            Err(beam::takeover::TakeoverError::Refused(m)) if m == beam::takeover::RELEASING => {
                // Its grace period ran out just now: it is exiting. Start a new one.
                if std::time::Instant::now() > deadline {
                    anyhow::bail!("the fd holder on {} keeps releasing", socket.display());
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(beam::takeover::TakeoverError::Refused(m)) => {
                tracing::warn!(
                    "the running fd holder predates the takeover grace period ({m}): if this \
                     daemon stops for good, readers of lazy layers wait until the holder is \
                     stopped (`beam-snapshotter --stop`); restart the holder on a drained node \
                     to get the grace period"
                );
                return Ok(None);
            }
            Err(e) => return Err(e).context("attaching to the fd holder"),
        }
    }
}

/// Make sure an fd holder listens on `socket`: the running one, or this binary started with
/// `--fd-holder SOCKET`, detached (its own session, stdio to ROOT/holder.log) so that it
/// outlives this daemon, which never stops it. Its PID goes to ROOT/holder.pid (for operators,
/// `--stop` and tests).
// pre_exec (setsid in the child) is unsafe by signature.
#[allow(unsafe_code)]
fn start_holder(
    socket: &std::path::Path,
    root: &std::path::Path,
    grace: std::time::Duration,
) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let ping = || beam::takeover::HolderClient::connect(socket).and_then(|c| c.ping());
    match ping() {
        Ok(_) => {
            tracing::info!(socket = %socket.display(), "using the running fd holder");
            return Ok(());
        }
        Err(e @ beam::takeover::TakeoverError::Version { .. }) => anyhow::bail!(
            "the running fd holder on {} cannot be used by this version ({e}): drain the node, \
             stop the holder (PID in {}), then start again (docs/takeover.md)",
            socket.display(),
            root.join("holder.pid").display()
        ),
        Err(_) => {}
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let log_path = root.join("holder.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--fd-holder")
        .arg(socket)
        .arg("--takeover-grace")
        .arg(grace.as_secs_f64().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2), which
    // is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the fd holder")?;
    let pid = child.id();
    // Not waited for: the holder must outlive this process (it is reparented when we exit).
    drop(child);
    std::fs::write(root.join("holder.pid"), format!("{pid}\n"))
        .with_context(|| format!("writing {}", root.join("holder.pid").display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match ping() {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() > deadline => {
                anyhow::bail!(
                    "the fd holder (pid {pid}) did not answer on {}: {e}",
                    socket.display()
                )
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    tracing::info!(socket = %socket.display(), pid, "started the fd holder");
    Ok(())
}

/// Take ROOT/daemon.lock (flock, released by the kernel when this process is gone), waiting up
/// to a minute for a previous daemon on the same root to exit.
async fn lock_root(root: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let path = root.join("daemon.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut logged = false;
    loop {
        // Opened with O_CLOEXEC (std's default): the fd holder this daemon starts does not
        // inherit the lock.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                // The PID of the daemon holding the lock, for `--stop`.
                use std::io::Write;
                let mut f: &std::fs::File = &lock;
                f.set_len(0)
                    .and_then(|()| f.write_all(format!("{}\n", std::process::id()).as_bytes()))
                    .with_context(|| format!("writing {}", path.display()))?;
                return Ok(lock);
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                if std::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "another beam-snapshotter holds {} (same --root) and did not exit within \
                         a minute",
                        path.display()
                    );
                }
                if !logged {
                    tracing::info!(lock = %path.display(), "waiting for the previous daemon on this root to exit");
                    logged = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err((_, e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
    }
}

/// Takeover is off, but a holder from a run with it on may still hold connections: let them
/// go, so that the lazy layers remounted below are the only ones (a held connection nobody
/// serves would make its readers wait forever instead of failing).
fn release_held(socket: &std::path::Path) {
    if !socket.exists() {
        return;
    }
    let Ok(client) = beam::takeover::HolderClient::connect(socket) else {
        return;
    };
    match client.list() {
        Ok(entries) => {
            for e in entries {
                tracing::warn!(
                    entry = %e.name,
                    "takeover is off: releasing a connection the fd holder kept from an earlier run"
                );
                let dropped = beam::takeover::HolderClient::connect(socket)
                    .and_then(|c| c.drop_entry(&e.name));
                if let Err(err) = dropped {
                    tracing::warn!(entry = %e.name, "releasing: {err}");
                }
            }
        }
        Err(e) => tracing::warn!("listing the fd holder on {}: {e}", socket.display()),
    }
}

/// `beam-snapshotter --stop`: SIGTERM the daemon that holds ROOT/daemon.lock, wait for it to
/// exit, then have the fd holder release every held connection at once and exit. Safe when
/// nothing runs.
fn stop(config: &Config) -> Result<()> {
    let lock_path = config.root.join("daemon.lock");
    let held = |path: &std::path::Path| -> Result<bool> {
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) else {
            return Ok(false);
        };
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(_) => Ok(false),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(true),
            Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    };
    if held(&lock_path)? {
        let text = std::fs::read_to_string(&lock_path)
            .with_context(|| format!("reading {}", lock_path.display()))?;
        let pid: i32 = text.trim().parse().with_context(|| {
            format!(
                "{} holds no PID ({text:?}): a daemon of an older version runs; stop it by hand",
                lock_path.display()
            )
        })?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM)
            .with_context(|| format!("sending SIGTERM to beam-snapshotter (pid {pid})"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while held(&lock_path)? {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("beam-snapshotter (pid {pid}) did not exit within a minute");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        println!("stopped beam-snapshotter (pid {pid})");
    } else {
        println!("no beam-snapshotter runs on {}", config.root.display());
    }
    let socket = config.holder_socket();
    match beam::takeover::HolderClient::connect(&socket) {
        Ok(c) => {
            let n = c.list().map(|l| l.len()).unwrap_or(0);
            c.release().with_context(|| {
                format!(
                    "asking the fd holder on {} to release (a holder of an older version: kill \
                     the PID in {})",
                    socket.display(),
                    config.root.join("holder.pid").display()
                )
            })?;
            println!("the fd holder released {n} lazy layer(s) and exited");
        }
        Err(_) => println!("no fd holder runs on {}", socket.display()),
    }
    Ok(())
}
