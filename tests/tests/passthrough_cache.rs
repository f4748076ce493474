//! The chunk cache under a live `beam mount`, and what happens to it: passthrough backing files
//! are built without holding a file in memory, checked before the kernel gets them, shared by
//! concurrent first opens; a cache damaged or deleted from outside recovers by fetching again.

use anyhow::{ensure, Context, Result};
use beam_tests::beam::{self, BeamMount};
use beam_tests::oci_layout;
use beam_tests::util;
use beam_tests::{Compression, LayerSpec, Proxy, Registry};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Deterministic incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Env {
    work: tempfile::TempDir,
    _reg: Registry,
    proxy: Proxy,
}

impl Env {
    fn new() -> Result<Env> {
        util::require_root()?;
        let reg = Registry::start()?;
        let proxy = Proxy::start(&reg.addr())?;
        Ok(Env {
            work: tempfile::tempdir()?,
            _reg: reg,
            proxy,
        })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.work.path().join(p)
    }

    /// Push a one-layer image of `tar` (as it is: no compression) through `beam convert`.
    fn image(&self, name: &str, tar: &Path, extra: &[&str]) -> Result<String> {
        let layout = self.path(&format!("layout-{name}"));
        oci_layout::build(&layout, "v1", &[LayerSpec::new(tar, Compression::None)])?;
        let image = format!("{}/{name}:v1", self.proxy.addr());
        let src = format!("oci:{}:v1", layout.display());
        let mut args = vec!["convert", "--plain-http"];
        args.extend_from_slice(extra);
        args.push(&src);
        args.push(&image);
        beam::ok(&args)?;
        Ok(image)
    }

    /// An image of `files` (path, contents) mounted with background fetch, once every chunk
    /// is in the cache (at least `chunks` of them).
    fn mount_cached(
        &self,
        image: &str,
        target: &str,
        chunks: u64,
        flags: &[&str],
    ) -> Result<BeamMount> {
        let mut all = vec!["--plain-http", "--fetch-deadline", "10"];
        all.extend_from_slice(flags);
        let m = BeamMount::start(
            &all,
            image,
            &self.path(target),
            &self.cache(),
            &self.path(&format!("{target}-work")),
        )?;
        ensure!(
            util::wait_for(
                || cache_stats(&self.cache()).is_some_and(|v| v["chunks"].as_u64() >= Some(chunks)),
                Duration::from_secs(120),
            ),
            "background fetch did not cache {chunks} chunks: {:?}",
            cache_stats(&self.cache())
        );
        Ok(m)
    }

    fn cache(&self) -> PathBuf {
        self.path("cache")
    }
}

/// `beam cache stats --json` of `cache` (a separate process: it makes the cache's
/// directories, so it is never called between damaging the cache and the read that must
/// recover from it).
fn cache_stats(cache: &Path) -> Option<serde_json::Value> {
    let out = beam::ok(&["cache", "stats", "--json", "--cache-dir", cache.to_str()?]).ok()?;
    serde_json::from_str(&out).ok()
}

/// The files under `dir`'s two-level shards (`chunks/` or `files/` of a cache).
fn sharded_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for shard in std::fs::read_dir(dir)? {
        for e in std::fs::read_dir(shard?.path())? {
            out.push(e?.path());
        }
    }
    Ok(out)
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kb * 1024)
}

#[test]
fn opening_a_huge_sparse_cached_file_keeps_the_daemon_small() -> Result<()> {
    let env = Env::new()?;
    // 1 TiB is what the issue names. The converter still reads every zero of it (the tar
    // reader expands holes), which takes 133 s with release binaries and far longer with the
    // debug ones CI runs, so the default is 16 GiB. BEAM_TEST_SPARSE_GIB=1024 runs the real
    // one (with BEAM_BIN_DIR=target/release).
    let gib: u64 = std::env::var("BEAM_TEST_SPARSE_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let size = gib << 30;
    let (head, tail) = (noise(1, 65536), noise(2, 65536));
    let src = env.path("src");
    std::fs::create_dir_all(&src)?;
    {
        let f = std::fs::File::create(src.join("huge.img"))?;
        f.set_len(size)?;
        f.write_all_at(&head, 0)?;
        f.write_all_at(&tail, size - tail.len() as u64)?;
    }
    let tar = env.path("sparse.tar");
    util::run_checked(
        Command::new("tar")
            .arg("--sparse")
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&tar)
            .arg("huge.img"),
        Duration::from_secs(60),
    )?;
    let t = Instant::now();
    let image = env.image("sparse", &tar, &[])?;
    eprintln!("converted a {gib} GiB sparse file in {:?}", t.elapsed());

    // Three distinct chunks: the head, zeros, the tail.
    let m = env.mount_cached(&image, "mnt", 3, &[])?;
    let path = m.target.join("huge.img");
    for round in 0..2 {
        let f = std::fs::File::open(&path)?;
        ensure!(f.metadata()?.len() == size, "size differs");
        let mut buf = vec![0u8; 65536];
        f.read_exact_at(&mut buf, 0)?;
        ensure!(buf == head, "head differs (round {round})");
        f.read_exact_at(&mut buf, size - 65536)?;
        ensure!(buf == tail, "tail differs (round {round})");
        f.read_exact_at(&mut buf, size / 2)?;
        ensure!(buf.iter().all(|b| *b == 0), "middle is not zeros");
    }
    let peak = peak_rss(m.pid())?;
    eprintln!("beam mount peak RSS {} MiB", peak >> 20);
    // The backing file was made (the opens were passthrough) and its holes take no disk.
    let assembled = sharded_files(&env.cache().join("files"))?;
    ensure!(assembled.len() == 1, "assembled files: {assembled:?}");
    let on_disk = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&assembled[0])?.blocks() * 512
    };
    ensure!(
        on_disk < 64 << 20,
        "the backing file takes {on_disk} bytes of disk"
    );
    ensure!(
        peak < 128 << 20,
        "beam mount peaked at {} MiB opening a {gib} GiB sparse file",
        peak >> 20
    );
    m.stop()?;
    Ok(())
}

#[test]
fn a_damaged_assembled_file_is_rebuilt_not_served() -> Result<()> {
    let env = Env::new()?;
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("f{i}"), noise(10 + i, 600_000)))
        .collect();
    let tar = env.path("files.tar");
    util::write_tar(&tar, &files)?;
    let image = env.image("damaged", &tar, &["--chunk-size", "262144"])?;
    let m = env.mount_cached(&image, "mnt", 9, &[])?;
    let f0 = m.target.join("f0");
    ensure!(std::fs::read(&f0)? == files[0].1, "first read differs");
    let assembled = sharded_files(&env.cache().join("files"))?;
    ensure!(
        assembled.len() == 1,
        "expected one backing file: {assembled:?}"
    );
    // Torn (a power loss before the data reached the disk), then empty. Each time after the
    // kernel's RELEASE of the last open has reached the daemon (it follows close(2)
    // asynchronously): a backing id still live is the kernel's until then, whatever the disk says.
    for len in [100_000, 0] {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&assembled[0])?
            .set_len(len)?;
        ensure!(
            std::fs::read(&f0)? == files[0].1,
            "read after the backing file was cut to {len} bytes differs"
        );
    }
    m.stop()?;

    // The right length with a wrong byte: a new process checks the digests before use.
    let assembled = sharded_files(&env.cache().join("files"))?;
    ensure!(assembled.len() == 1, "backing files: {assembled:?}");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&assembled[0])?;
    ensure!(
        f.metadata()?.len() == 600_000,
        "the backing file was not rebuilt whole"
    );
    f.write_all_at(b"X", 300_000)?;
    drop(f);
    let m = env.mount_cached(&image, "mnt", 9, &[])?;
    ensure!(
        std::fs::read(m.target.join("f0"))? == files[0].1,
        "read after a byte of the backing file changed differs"
    );
    m.stop()?;
    Ok(())
}

#[test]
fn concurrent_first_opens_of_cached_files_never_fail() -> Result<()> {
    let env = Env::new()?;
    let files: Vec<(String, Vec<u8>)> = (0..24)
        .map(|i| (format!("d/f{i:02}"), noise(100 + i, 200_000)))
        .collect();
    let tar = env.path("many.tar");
    util::write_tar(&tar, &files)?;
    let image = env.image("many", &tar, &[])?;
    let m = env.mount_cached(&image, "mnt", files.len() as u64, &["--threads", "8"])?;
    let mut failures = Vec::new();
    for (name, data) in &files {
        let path = m.target.join(name);
        let start = std::sync::Arc::new(std::sync::Barrier::new(16));
        let readers: Vec<_> = (0..16)
            .map(|_| {
                let (p, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    std::fs::read(p)
                })
            })
            .collect();
        for r in readers {
            match r.join().expect("reader thread") {
                Ok(got) if got == *data => {}
                Ok(_) => failures.push(format!("{name}: wrong bytes")),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} concurrent opens failed: {failures:?}",
        failures.len(),
        16 * files.len()
    );
    m.stop()?;
    Ok(())
}

#[test]
fn a_cache_damaged_from_outside_recovers_by_fetching_again() -> Result<()> {
    let env = Env::new()?;
    let files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("f{i}"), noise(300 + i, 300_000)))
        .collect();
    let tar = env.path("files.tar");
    util::write_tar(&tar, &files)?;
    let image = env.image("outside", &tar, &[])?;
    let m = env.mount_cached(&image, "mnt", files.len() as u64, &[])?;
    let cache = env.cache();
    // Each step reads a file not read before (nothing of it in the page cache), twice: the
    // second open is passthrough once the first has cached it again.
    let read = |i: usize, step: &str| -> Result<()> {
        for _ in 0..2 {
            let got = std::fs::read(m.target.join(&files[i].0))
                .with_context(|| format!("reading {} after {step}", files[i].0))?;
            ensure!(got == files[i].1, "{} differs after {step}", files[i].0);
        }
        Ok(())
    };

    for chunk in sharded_files(&cache.join("chunks"))? {
        std::fs::remove_file(chunk)?;
    }
    read(0, "the chunk files were deleted")?;

    std::fs::remove_dir_all(cache.join("tmp"))?;
    for chunk in sharded_files(&cache.join("chunks"))? {
        std::fs::remove_file(chunk)?;
    }
    // Cache files are written as unnamed files in their own directory (O_TMPFILE, then a
    // link): tmp/ is only needed where the filesystem has no O_TMPFILE.
    read(1, "tmp/ and the chunk files were deleted")?;

    std::fs::remove_dir_all(&cache)?;
    read(2, "the cache directory was deleted")?;
    std::fs::remove_dir_all(&cache)?;
    read(3, "the cache directory was deleted again")?;
    // The earlier files still read right (from the kernel's cache or the daemon).
    read(0, "all of it")?;
    m.stop()?;
    Ok(())
}
