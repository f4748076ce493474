//! A private containerd (Debian bookworm's 1.6 by default) with its own root, state, socket,
//! config and namespace, plus `ctr` helpers. Dropping it kills its shims and their containers,
//! then containerd, unmounts everything under its directories and removes them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{self, ChildGuard};

/// How long [`Containerd::start`] waits for `ctr version` to succeed.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Default time limit for one `ctr` command.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(300);

/// What to add to the generated configuration.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// TOML appended verbatim at the end of the generated `config.toml` (version 2), e.g. a
    /// `[proxy_plugins.beam]` section. Must consist of tables only.
    pub extra_config: String,
    /// Keep the CRI plugin enabled (it is disabled by default).
    pub cri: bool,
    /// containerd's log level (`info` when empty).
    pub log_level: String,
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
}

/// Quotes a string as a TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn ctr_bin() -> PathBuf {
    util::tool_path("BEAM_CTR_BIN", "ctr", "/usr/bin/ctr")
}

impl Containerd {
    /// Starts containerd with the default options (CRI disabled, nothing extra).
    pub fn start() -> Result<Containerd> {
        Self::start_with(ContainerdOptions::default())
    }

    /// Starts containerd with `opts`.
    pub fn start_with(opts: ContainerdOptions) -> Result<Containerd> {
        let bin = util::tool_path("BEAM_CONTAINERD_BIN", "containerd", "/usr/bin/containerd");
        let dir = util::short_tempdir()?;
        let base = dir.path().to_path_buf();
        let root = base.join("root");
        let state = base.join("state");
        let opt = base.join("opt");
        for d in [&root, &state, &opt] {
            fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let address = base.join("c.sock");
        let ttrpc = base.join("c.sock.ttrpc");
        if address.as_os_str().len() >= 100 {
            bail!("containerd socket path {} is too long", address.display());
        }
        // A namespace of our own keeps runc's state dirs and cgroups apart from other instances.
        let suffix = base
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("bct-"))
            .unwrap_or("x")
            .to_string();
        let namespace = format!("bct-{suffix}");
        let level = if opts.log_level.is_empty() {
            "info"
        } else {
            opts.log_level.as_str()
        };

        let mut config = String::from("version = 2\n");
        config.push_str(&format!("root = {}\n", toml_str(&root.to_string_lossy())));
        config.push_str(&format!("state = {}\n", toml_str(&state.to_string_lossy())));
        if !opts.cri {
            config.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n");
        }
        config.push_str(&format!(
            "\n[grpc]\n  address = {}\n\n[ttrpc]\n  address = {}\n\n[debug]\n  level = {}\n\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {}\n",
            toml_str(&address.to_string_lossy()),
            toml_str(&ttrpc.to_string_lossy()),
            toml_str(level),
            toml_str(&opt.to_string_lossy()),
        ));
        if !opts.extra_config.is_empty() {
            config.push('\n');
            config.push_str(&opts.extra_config);
            config.push('\n');
        }
        let config_path = base.join("config.toml");
        fs::write(&config_path, &config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log_path = base.join("containerd.log");

        let (stdout, stderr) = util::log_stdio(&log_path)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--address")
            .arg(&address)
            .arg("--root")
            .arg(&root)
            .arg("--state")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = ChildGuard::spawn("containerd", &mut cmd).with_context(|| {
            format!(
                "is {} installed (Debian package containerd)?",
                bin.display()
            )
        })?;
        let mut c = Containerd {
            child,
            dir: Some(dir),
            address,
            namespace,
            root,
            state,
            config_path,
            log_path,
        };
        c.wait_ready()?;
        Ok(c)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "containerd exited early ({status}); log tail:\n{}",
                    util::tail_file(&self.log_path, 40)
                );
            }
            if self.address.exists() {
                let mut cmd = Command::new(ctr_bin());
                cmd.arg("--address").arg(&self.address).arg("version");
                match util::output_with_timeout(&mut cmd, Duration::from_secs(5)) {
                    Ok(out) if out.status.success() => return Ok(()),
                    Ok(out) => last = String::from_utf8_lossy(&out.stderr).into_owned(),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd at {} not ready within {READY_TIMEOUT:?} (last ctr error: {last}); \
                     log tail:\n{}",
                    self.address.display(),
                    util::tail_file(&self.log_path, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
        let mut cmd = Command::new(ctr_bin());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
