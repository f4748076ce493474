//! The Debian package built by `deploy/deb/build.sh`, from build to purge, without touching the
//! machine's own system: the package's fields and file list; `dpkg -i` into a throwaway root
//! (`dpkg --root=DIR --force-script-chrootless`, an empty dpkg database, dependencies forced:
//! the root holds no fuse3 or containerd); the installed unit accepted by `systemd-analyze
//! verify --root` with no warning; the tmpfiles.d entry; the installed binaries and default
//! config run; `dpkg --purge` leaves nothing but dpkg's own database. A second root checks
//! remove (the conffile stays) and that purge keeps a state directory a mount still uses.
//!
//! The release build inside the script takes minutes on 2 cores the first time; it runs once
//! per test binary and reuses `target/`.

use anyhow::{bail, ensure, Context, Result};
use beam_tests::util;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

const UNIT: &str = "beam-snapshotter.service";
const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() => d,
        Some(d) => util::workspace_root().join(d),
        None => util::workspace_root().join("target"),
    }
}

/// The workspace version (`[workspace.package] version` of the root Cargo.toml).
fn workspace_version() -> Result<String> {
    let text = std::fs::read_to_string(util::workspace_root().join("Cargo.toml"))?;
    let doc: toml::Table = toml::from_str(&text)?;
    doc.get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .map(String::from)
        .context("no [workspace.package] version")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = util::run_checked(cmd, TOOL_TIMEOUT)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `deploy/deb/build.sh OUTDIR`, once per test binary; the .deb's path.
fn deb() -> Result<PathBuf> {
    static DEB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DEB.get_or_init(|| {
        let build = || -> Result<PathBuf> {
            let outdir = target_dir().join("package-test");
            let script = util::workspace_root().join("deploy/deb/build.sh");
            let started = std::time::Instant::now();
            let out = util::run_checked(
                Command::new("bash").arg(&script).arg(&outdir),
                BUILD_TIMEOUT,
            )?;
            eprintln!("build.sh took {:.1?}", started.elapsed());
            let stdout = String::from_utf8_lossy(&out.stdout);
            let path = PathBuf::from(stdout.lines().last().context("build.sh printed nothing")?);
            ensure!(
                path.is_file(),
                "build.sh named {}, which is no file",
                path.display()
            );
            ensure!(
                path.starts_with(&outdir),
                "{} is not in OUTDIR",
                path.display()
            );
            Ok(path)
        };
        build().map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A throwaway root with an empty dpkg database. Dropping it purges the package if it is
/// still installed, unmounts anything left under it and removes it, also when a test fails.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Result<Root> {
        let dir = tempfile::Builder::new()
            .prefix("beam-dpkg-root-")
            .tempdir()?;
        let admin = dir.path().join("var/lib/dpkg");
        for d in ["info", "updates"] {
            std::fs::create_dir_all(admin.join(d))?;
        }
        std::fs::create_dir_all(dir.path().join("var/log"))?;
        for f in ["status", "available"] {
            std::fs::write(admin.join(f), "")?;
        }
        Ok(Root { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `ROOT/rel` (`rel` relative, as a path inside the root without its leading slash).
    fn join(&self, rel: &str) -> PathBuf {
        self.path().join(rel.trim_start_matches('/'))
    }

    /// dpkg acting on this root only: its database, its files, its log; maintainer scripts
    /// run outside a chroot with DPKG_ROOT set (the root has no shell to chroot into).
    fn dpkg_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", self.path().display()))
            .arg(format!("--log={}", self.join("var/log/dpkg.log").display()))
            .args([
                "--force-not-root",
                "--force-script-chrootless",
                "--force-depends",
            ])
            .args(args);
        cmd
    }

    fn dpkg(&self, args: &[&str]) -> Result<String> {
        let out = util::run_checked(&mut self.dpkg_command(args), TOOL_TIMEOUT)?;
        Ok(text(&out))
    }

    /// dpkg's status of `beam` in this root ("install ok installed", ...; empty: unknown).
    fn status(&self) -> String {
        let out = Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                self.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f=${Status}", "beam"])
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            _ => String::new(),
        }
    }

    /// Every file, symlink or other non-directory in the root outside dpkg's own database and
    /// log, relative to the root.
    fn leftovers(&self) -> Result<Vec<PathBuf>> {
        let mut left = Vec::new();
        let mut stack = vec![self.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let rel = entry.path().strip_prefix(self.path())?.to_path_buf();
                if rel.starts_with("var/lib/dpkg") || rel.starts_with("var/log") {
                    continue;
                }
                if entry.file_type()?.is_dir() {
                    stack.push(entry.path());
                } else {
                    left.push(rel);
                }
            }
        }
        left.sort();
        Ok(left)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Err(e) = util::unmount_all_under(self.path()) {
            eprintln!("cleanup: {e:#}");
        }
        if !self.status().is_empty() && !self.status().starts_with("unknown") {
            let _ = util::output_with_timeout(
                &mut self.dpkg_command(&["--purge", "beam"]),
                TOOL_TIMEOUT,
            );
        }
    }
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// The package's fields and files, as dpkg-deb reports them.
fn check_package_metadata(deb: &Path, version: &str) -> Result<()> {
    let field = |name: &str| -> Result<String> {
        Ok(
            run_ok(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name))?
                .trim()
                .to_string(),
        )
    };
    let arch = run_ok(Command::new("dpkg").arg("--print-architecture"))?;
    ensure!(field("Package")? == "beam");
    ensure!(
        field("Version")? == version.replace('-', "~"),
        "Version {}",
        field("Version")?
    );
    ensure!(
        field("Architecture")? == arch.trim(),
        "Architecture {}",
        field("Architecture")?
    );
    let depends = field("Depends")?;
    for d in ["fuse3", "containerd | containerd.io"] {
        ensure!(
            depends.split(", ").any(|x| x == d),
            "Depends lacks {d}: {depends}"
        );
    }
    ensure!(!field("Maintainer")?.is_empty(), "no Maintainer");
    ensure!(!field("Description")?.is_empty(), "no Description");

    let info = run_ok(Command::new("dpkg-deb").arg("--info").arg(deb))?;
    for script in ["postinst", "prerm", "postrm", "conffiles", "md5sums"] {
        ensure!(
            info.contains(script),
            "dpkg-deb --info lists no {script}:\n{info}"
        );
    }
    let conffiles = run_ok(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(deb)
            .arg("conffiles"),
    )?;
    ensure!(
        conffiles.trim() == "/etc/beam/config.toml",
        "conffiles: {conffiles}"
    );

    // "-rwxr-xr-x root/root 1234 2026-01-01 00:00 ./usr/bin/beam"
    let contents = run_ok(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    let listed: Vec<(&str, &str, &str)> = contents
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6).then(|| (f[0], f[1], f[5]))
        })
        .collect();
    let expected = [
        ("./usr/bin/beam", "-rwxr-xr-x"),
        ("./usr/bin/beam-snapshotter", "-rwxr-xr-x"),
        (
            "./lib/systemd/system/beam-snapshotter.service",
            "-rw-r--r--",
        ),
        ("./usr/lib/tmpfiles.d/beam.conf", "-rw-r--r--"),
        ("./etc/beam/config.toml", "-rw-r--r--"),
        ("./usr/share/doc/beam/README.md", "-rw-r--r--"),
        ("./usr/share/doc/beam/copyright", "-rw-r--r--"),
        (
            "./lib/systemd/system/beam-autoconvert.service",
            "-rw-r--r--",
        ),
        (
            "./usr/share/doc/beam/examples/autoconvert.toml",
            "-rw-r--r--",
        ),
    ];
    for (path, perms) in expected {
        let found = listed.iter().find(|(_, _, p)| *p == path);
        let Some((m, owner, _)) = found else {
            bail!("dpkg-deb --contents lists no {path}:\n{contents}");
        };
        ensure!(*m == perms, "{path} has mode {m}, want {perms}");
        ensure!(*owner == "root/root", "{path} is owned by {owner}");
    }
    let files = listed
        .iter()
        .filter(|(m, _, _)| !m.starts_with('d'))
        .count();
    ensure!(
        files == expected.len(),
        "the package holds {files} files, want exactly {}:\n{contents}",
        expected.len()
    );
    Ok(())
}

/// `systemd-analyze verify --root=ROOT UNIT` (systemd's standard units copied into the root
/// for the duration: default dependencies need sysinit.target and friends); every line it
/// prints.
fn systemd_verify(root: &Root, unit: &str) -> Result<(bool, String)> {
    let units = root.join("usr/lib/systemd/system");
    ensure!(!units.exists(), "{} exists already", units.display());
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists())
        .context("this machine has no systemd unit directory with sysinit.target")?;
    std::fs::create_dir_all(root.join("usr/lib/systemd"))?;
    run_ok(Command::new("cp").arg("-a").arg(host_units).arg(&units))?;
    let out = util::output_with_timeout(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg(unit),
        TOOL_TIMEOUT,
    );
    std::fs::remove_dir_all(root.join("usr/lib/systemd"))?;
    let out = out?;
    Ok((out.status.success(), text(&out)))
}

#[test]
fn deb_installs_verifies_runs_and_purges_in_a_throwaway_root() -> Result<()> {
    util::require_root()?;
    let version = workspace_version()?;
    let deb = deb()?;
    check_package_metadata(&deb, &version)?;

    let host_link = Path::new("/etc/systemd/system/multi-user.target.wants").join(UNIT);
    let host_link_before = host_link.symlink_metadata().is_ok();

    let root = Root::new()?;
    let out = root.dpkg(&["-i", deb.to_str().context("utf-8")?])?;
    eprintln!("dpkg -i:\n{out}");
    ensure!(
        root.status() == "install ok installed",
        "status {:?}",
        root.status()
    );
    for (rel, want) in [
        ("usr/bin/beam", 0o755),
        ("usr/bin/beam-snapshotter", 0o755),
        ("lib/systemd/system/beam-snapshotter.service", 0o644),
        ("lib/systemd/system/beam-autoconvert.service", 0o644),
        ("usr/share/doc/beam/examples/autoconvert.toml", 0o644),
        ("usr/lib/tmpfiles.d/beam.conf", 0o644),
        ("etc/beam/config.toml", 0o644),
        ("usr/share/doc/beam/README.md", 0o644),
        ("usr/share/doc/beam/copyright", 0o644),
    ] {
        let m = mode(&root.join(rel))?;
        ensure!(m == want, "{rel}: mode {m:o}, want {want:o}");
        ensure!(
            std::fs::metadata(root.join(rel))?.uid() == 0,
            "{rel} not owned by root"
        );
    }
    // postinst enabled the unit inside the root (deb-systemd-helper honours DPKG_ROOT) and
    // left the machine's own systemd configuration alone.
    let link = root
        .join("etc/systemd/system/multi-user.target.wants")
        .join(UNIT);
    ensure!(
        std::fs::read_link(&link)? == Path::new("/lib/systemd/system").join(UNIT),
        "enable link {} -> {:?}",
        link.display(),
        std::fs::read_link(&link)
    );
    ensure!(
        host_link.symlink_metadata().is_ok() == host_link_before,
        "installing into the throwaway root changed {}",
        host_link.display()
    );

    // systemd 252 accepts the unit: exit 0 and not one line of output. verify exits 0 even
    // for unknown keys, so the output is what counts; the canary shows it would be printed.
    let (ok, report) = systemd_verify(&root, UNIT)?;
    eprintln!("systemd-analyze verify --root: ok={ok}, output:\n{report}");
    ensure!(ok, "systemd-analyze verify failed:\n{report}");
    ensure!(
        report.trim().is_empty(),
        "systemd-analyze verify warned:\n{report}"
    );
    // The autoconvert unit too; it is shipped but not enabled (it runs beside a registry).
    let (ok, report) = systemd_verify(&root, "beam-autoconvert.service")?;
    ensure!(
        ok && report.trim().is_empty(),
        "systemd-analyze verify beam-autoconvert.service:\n{report}"
    );
    ensure!(
        !root
            .join("etc/systemd/system/multi-user.target.wants/beam-autoconvert.service")
            .exists(),
        "postinst enabled beam-autoconvert"
    );
    let canary = root.join("etc/systemd/system/beam-canary.service");
    let unit_text = std::fs::read_to_string(root.join("lib/systemd/system").join(UNIT))?;
    std::fs::write(
        &canary,
        unit_text.replace("KillMode=process", "KillMode=process\nNoSuchKey=1"),
    )?;
    let canary_result = systemd_verify(&root, "beam-canary.service");
    std::fs::remove_file(&canary)?;
    let (_, canary_report) = canary_result?;
    ensure!(
        canary_report.contains("NoSuchKey"),
        "systemd-analyze verify did not report an unknown key: {canary_report}"
    );

    // The tmpfiles.d entry is valid and makes the two directories root-only.
    run_ok(
        Command::new("systemd-tmpfiles")
            .arg(format!("--root={}", root.path().display()))
            .args(["--create", "beam.conf"]),
    )?;
    for rel in ["run/beam", "var/lib/beam"] {
        let m = mode(&root.join(rel))?;
        ensure!(m == 0o700, "{rel}: mode {m:o}, want 700");
    }

    // The installed binaries run; the installed config is valid and is exactly the defaults.
    let snapshotter = root.join("usr/bin/beam-snapshotter");
    let v = run_ok(Command::new(&snapshotter).arg("--version"))?;
    ensure!(v.trim() == format!("beam-snapshotter {version}"), "{v}");
    let v = run_ok(Command::new(root.join("usr/bin/beam")).arg("--version"))?;
    ensure!(v.trim() == format!("beam {version}"), "{v}");
    let config = root.join("etc/beam/config.toml");
    let printed = run_ok(
        Command::new(&snapshotter)
            .arg("--config")
            .arg(&config)
            .arg("--print-config")
            .env_remove("BEAM_CONFIG"),
    )?;
    let defaults = run_ok(
        Command::new(&snapshotter)
            .arg("--print-config")
            .env_remove("BEAM_CONFIG"),
    )?;
    // Every setting of the shipped file is the default (takeover included, issue 12).
    ensure!(
        defaults.contains("[takeover]\nenabled = true"),
        "takeover is not on by default:\n{defaults}"
    );
    ensure!(
        printed == defaults,
        "the shipped config is not the defaults:\n{printed}\nvs\n{defaults}"
    );
    // Its commented-out examples are valid keys too.
    let examples = uncomment_examples(&std::fs::read_to_string(&config)?);
    let scratch = tempfile::tempdir()?;
    let all = scratch.path().join("all.toml");
    std::fs::write(&all, &examples)?;
    let printed = run_ok(
        Command::new(&snapshotter)
            .arg("--config")
            .arg(&all)
            .arg("--print-config")
            .env_remove("BEAM_CONFIG"),
    )
    .with_context(|| format!("the config's examples, uncommented:\n{examples}"))?;
    for key in [
        "metrics_address",
        "hosts_dir",
        "\ndir = ",
        "[[registry]]",
        "ca_file",
        "holder_socket",
    ] {
        ensure!(printed.contains(key), "{key} not in effect:\n{printed}");
    }

    // State the daemon would have made; purge removes it with everything else.
    std::fs::create_dir_all(root.join("var/lib/beam/cache"))?;
    std::fs::write(root.join("var/lib/beam/cache/chunk"), b"x")?;
    let out = root.dpkg(&["--purge", "beam"])?;
    eprintln!("dpkg --purge:\n{out}");
    ensure!(root.status().is_empty() || root.status().starts_with("unknown"));
    let left = root.leftovers()?;
    ensure!(left.is_empty(), "left after purge: {left:?}");
    for rel in ["var/lib/beam", "run/beam", "etc/beam", "usr/share/doc/beam"] {
        ensure!(!root.join(rel).exists(), "{rel} is left after purge");
    }
    Ok(())
}

/// The shipped config with its commented-out `key = value` lines and `[[registry]]` enabled.
fn uncomment_examples(config: &str) -> String {
    config
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest == "[[registry]]"
                    || rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn remove_keeps_the_conffile_and_purge_keeps_state_a_mount_uses() -> Result<()> {
    util::require_root()?;
    let deb = deb()?;
    let root = Root::new()?;
    root.dpkg(&["-i", deb.to_str().context("utf-8")?])?;
    root.dpkg(&["--remove", "beam"])?;
    ensure!(
        root.status() == "deinstall ok config-files",
        "status {:?}",
        root.status()
    );
    ensure!(
        root.join("etc/beam/config.toml").is_file(),
        "remove took the conffile"
    );
    ensure!(
        !root.join("usr/bin/beam-snapshotter").exists(),
        "remove left the binary"
    );

    // A container's overlay whose upper directory lives in Beam's state directory, as one
    // started on a Beam snapshot has while it runs.
    let state = root.join("var/lib/beam");
    for d in ["lower", "upper", "work"] {
        std::fs::create_dir_all(state.join(d))?;
    }
    std::fs::write(state.join("upper/container-file"), b"data")?;
    let merged = tempfile::tempdir()?;
    let _unmount = util::UnmountOnDrop(merged.path().to_path_buf());
    run_ok(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                state.join("lower").display(),
                state.join("upper").display(),
                state.join("work").display()
            ))
            .arg(merged.path()),
    )?;

    let out = root.dpkg(&["--purge", "beam"])?;
    ensure!(
        out.contains("not removing"),
        "purge did not say it kept the state directory:\n{out}"
    );
    ensure!(
        std::fs::read(state.join("upper/container-file"))? == b"data",
        "purge deleted a file a mount still uses"
    );
    ensure!(
        !root.join("etc/beam/config.toml").exists(),
        "purge kept the conffile"
    );
    Ok(())
}
