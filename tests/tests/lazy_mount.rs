//! `beam mount`: the lazy FUSE mount of converted images, against a real registry behind a
//! recording, fault-injecting proxy (every byte Beam fetches is counted there).

use anyhow::{ensure, Context, Result};
use beam_tests::beam::{self, BeamMount};
use beam_tests::tree::{self, DiffOptions};
use beam_tests::util::{self, noise};
use beam_tests::{Fault, Fixture, Proxy};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A registry behind the recording, fault-injecting proxy, and a work directory.
struct Env {
    fx: Fixture,
}

impl Env {
    fn new() -> Result<Env> {
        util::require_root()?;
        Ok(Env {
            fx: Fixture::with_proxy()?,
        })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.fx.path(p)
    }

    fn proxy(&self) -> &Proxy {
        self.fx.proxy()
    }

    fn mount(&self, image: &str, target: &str, cache: &str, flags: &[&str]) -> Result<BeamMount> {
        let mut all = vec!["--plain-http"];
        all.extend_from_slice(flags);
        BeamMount::start(
            &all,
            image,
            &self.path(target),
            &self.path(cache),
            &self.path(&format!("{target}-work")),
        )
    }

    /// An image of `files` converted into the registry and mounted lazily without background
    /// fetch: the digest of its chunk blob and the mount.
    fn lazy(&self, name: &str, files: &[(String, Vec<u8>)]) -> Result<(String, BeamMount)> {
        let img = self.fx.image(name).files(files)?.build()?;
        let converted = img.convert(&format!("{name}:v1"), &["--json"])?;
        let (chunks_blob, _) = converted.layer_blobs(0)?;
        let m = self.mount(
            &converted.reference,
            "mnt",
            "cache",
            &["--no-background-fetch"],
        )?;
        Ok((chunks_blob, m))
    }

    /// Bytes of blob GETs (Range or not) for `digest` answered since the last clear.
    fn range_requests(&self) -> Vec<(u64, u64)> {
        self.proxy()
            .blob_requests()
            .iter()
            .filter_map(|r| r.range)
            .collect()
    }
}

#[test]
fn python_rootfs_reads_through_the_lazy_mount_equal_the_source() -> Result<()> {
    let env = Env::new()?;
    let layers_dir = env.path("layers");
    util::run_fixture("make-python-layers.sh", &[&layers_dir])?;
    let layers = util::layers_listed_in(&layers_dir)?;
    let image = env
        .fx
        .image("python")
        .tars(&layers)
        .build()?
        .convert("python:v1", &[])?
        .reference;

    // Reference: beam unpack of the same image.
    let unpacked = env.path("unpacked");
    beam::ok(&[
        "unpack",
        "--plain-http",
        &image,
        unpacked.to_str().context("utf-8")?,
    ])?;

    let m = env.mount(&image, "mnt", "cache", &["--no-background-fetch"])?;
    // Stat of everything fetches nothing but indexes.
    env.proxy().clear();
    let mut n = 0;
    for e in walk(&m.target)? {
        std::fs::symlink_metadata(&e)?;
        n += 1;
    }
    ensure!(n > 1000, "walked only {n} entries");
    ensure!(
        env.range_requests().is_empty(),
        "stat fetched file data: {:?}",
        env.range_requests()
    );

    // A program runs from the lazy mount.
    let out = Command::new("chroot")
        .arg(&m.target)
        .args(["/usr/bin/python3", "-c", "print(6 * 7)"])
        .output()?;
    ensure!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).trim() == "42");

    // Every file, byte for byte, and every attribute and xattr, as beam unpack has them.
    assert_same_as_unpacked(&m.target, &unpacked)?;
    m.stop()?;
    Ok(())
}

#[test]
fn special_layers_appear_through_overlay_as_unpack_has_them() -> Result<()> {
    util::require_root()?;
    let fx = Fixture::new()?;
    let layers_dir = fx.path("layers");
    util::run_fixture("make-special-layers.sh", &[&layers_dir])?;
    let layers = util::layers_listed_in(&layers_dir)?;
    let image = fx.image("special").tars(&layers).build()?.oci();
    beam::ok(&["convert", "--chunk-size", "65536", &image])?;
    let unpacked = fx.path("unpacked");
    beam::ok(&["unpack", &image, unpacked.to_str().context("utf-8")?])?;
    let m = BeamMount::start(
        &[],
        &image,
        &fx.path("mnt"),
        &fx.path("cache"),
        &fx.path("mnt-work"),
    )?;
    assert_same_as_unpacked(&m.target, &unpacked)?;
    m.stop()?;
    Ok(())
}

#[test]
fn reads_fetch_only_the_chunks_they_need_once() -> Result<()> {
    let env = Env::new()?;
    // A 200 MiB layer of incompressible files, 1 MiB each, plus a few small ones.
    let mut files: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| (format!("big/file-{i:03}"), noise(i, 1 << 20)))
        .collect();
    files.push(("small/hello.txt".into(), noise(999, 10_000)));
    files.push(("small/shared.bin".into(), noise(1000, 3 << 20)));
    let big = env.fx.image("big").files(&files)?.build()?;
    let converted = big.convert("big:v1", &["--json"])?;
    let image = converted.reference.clone();
    let (chunks_blob, index_blob) = converted.layer_blobs(0)?;

    let m = env.mount(&image, "mnt", "cache", &["--no-background-fetch"])?;
    env.proxy().clear();
    // One small file: at most that file's bytes (a chunk never spans files).
    let small = std::fs::read(m.target.join("small/hello.txt"))?;
    ensure!(small == files[200].1, "small file content differs");
    let ranges = env.proxy().range_requests_for(&chunks_blob);
    let fetched: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
    ensure!(
        ranges.len() == 1 && fetched <= 10_000,
        "reading a 10 kB file fetched {fetched} bytes in {ranges:?}"
    );
    ensure!(
        env.proxy().blob_requests_for(&index_blob).is_empty(),
        "the index was fetched again"
    );

    // 32 threads reading the same 3 MiB file: each chunk fetched once.
    env.proxy().clear();
    let path = m.target.join("small/shared.bin");
    let handles: Vec<_> = (0..32)
        .map(|_| {
            let p = path.clone();
            std::thread::spawn(move || std::fs::read(p))
        })
        .collect();
    for h in handles {
        let data = h.join().expect("reader thread")?;
        ensure!(data == files[201].1, "concurrent read returned wrong bytes");
    }
    let ranges = env.proxy().range_requests_for(&chunks_blob);
    let fetched: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
    ensure!(
        fetched == 3 << 20,
        "32 readers of a 3 MiB file fetched {fetched} bytes in {} requests: {ranges:?}",
        ranges.len()
    );
    let mut starts: Vec<u64> = ranges.iter().map(|r| r.0).collect();
    starts.sort();
    starts.dedup();
    ensure!(
        starts.len() == ranges.len(),
        "a range was fetched twice: {ranges:?}"
    );
    m.stop()?;

    // Restarted on the same cache: nothing fetched for data it had (not even the index).
    env.proxy().clear();
    let m = env.mount(&image, "mnt", "cache", &["--no-background-fetch"])?;
    ensure!(std::fs::read(m.target.join("small/shared.bin"))? == files[201].1);
    ensure!(std::fs::read(m.target.join("small/hello.txt"))? == files[200].1);
    let blob_gets = env.proxy().blob_requests();
    ensure!(
        blob_gets.is_empty(),
        "a restart fetched again: {blob_gets:?}"
    );
    m.stop()?;

    // A second image sharing files with the first fetches only the new chunks.
    let second = env
        .fx
        .image("second")
        .files(&[
            ("copy/shared.bin".into(), files[201].1.clone()),
            ("new/only-here.bin".into(), noise(4242, 700_000)),
        ])?
        .build()?;
    let converted2 = second.convert("second:v1", &["--json"])?;
    let image2 = converted2.reference.clone();
    let (chunks2, _) = converted2.layer_blobs(0)?;
    env.proxy().clear();
    let m = env.mount(&image2, "mnt2", "cache", &["--no-background-fetch"])?;
    ensure!(std::fs::read(m.target.join("copy/shared.bin"))? == files[201].1);
    ensure!(
        env.proxy().range_requests_for(&chunks2).is_empty(),
        "shared chunks were fetched again"
    );
    std::fs::read(m.target.join("new/only-here.bin"))?;
    let fetched: u64 = env
        .proxy()
        .range_requests_for(&chunks2)
        .iter()
        .map(|(a, b)| b - a + 1)
        .sum();
    ensure!(fetched == 700_000, "new file fetched {fetched} bytes");
    m.stop()?;
    Ok(())
}

/// A small read takes the next chunks of the blob along (up to 32 KiB, in the same request):
/// the next files of a package, which a starting program opens next, cost no round trip of
/// their own; a file past that bound is a request of its own.
#[test]
fn a_small_read_takes_its_neighbours_in_the_same_request() -> Result<()> {
    let env = Env::new()?;
    // Five 6 kB modules of a package (incompressible: 30 kB stored), then one past the bound.
    let mut files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("pkg/mod{i}.py"), noise(i, 6_000)))
        .collect();
    files.push(("pkg/zz-later.py".into(), noise(77, 20_000)));
    let (chunks_blob, m) = env.lazy("pkg", &files)?;
    env.proxy().clear();
    for (name, want) in &files[..5] {
        ensure!(
            std::fs::read(m.target.join(name))? == *want,
            "{name} differs"
        );
    }
    let ranges = env.proxy().range_requests_for(&chunks_blob);
    ensure!(
        ranges.len() == 1,
        "five neighbouring 6 kB files took {} requests: {ranges:?}",
        ranges.len()
    );
    let fetched: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
    ensure!(
        fetched <= 6_000 + (32 << 10),
        "{fetched} bytes for the first file and its neighbours"
    );
    ensure!(std::fs::read(m.target.join("pkg/zz-later.py"))? == files[5].1);
    ensure!(
        env.proxy().range_requests_for(&chunks_blob).len() == 2,
        "the file past the bound was not a request of its own"
    );
    m.stop()?;
    Ok(())
}

/// On a far registry (every blob request stalled 30 ms), opening a Python module fetches
/// what it imports, and what those import, before the program asks for them: the follows
/// `beam convert` wrote into the index. A module nothing imports is not fetched.
#[test]
fn on_a_far_registry_opening_a_module_fetches_what_it_imports() -> Result<()> {
    let env = Env::new()?;
    let lib = "usr/lib/python3.11";
    let module = |head: &str, seed: u64| {
        let mut b = head.as_bytes().to_vec();
        b.extend(noise(seed, 100_000));
        b
    };
    let files: Vec<(String, Vec<u8>)> = vec![
        (format!("{lib}/app/main.py"), module("import pkg_b\n", 1)),
        (
            format!("{lib}/pkg_b/__init__.py"),
            module("from pkg_c import mod\n", 2),
        ),
        (format!("{lib}/pkg_c/__init__.py"), b"\n".to_vec()),
        (format!("{lib}/pkg_c/mod.py"), module("x = 1\n", 3)),
        (
            format!("{lib}/unrelated/other.py"),
            module("import os\n", 4),
        ),
        ("warm/small.bin".into(), noise(5, 10_000)),
        ("warm/big.bin".into(), noise(6, 600_000)),
    ];
    let (chunks_blob, m) = env.lazy("py", &files)?;
    env.proxy()
        .set_fault(Fault::Stall(Duration::from_millis(30)));
    // The node learns the link: a small request shows the round trip, a large one the rate.
    for (name, want) in &files[5..] {
        ensure!(
            std::fs::read(m.target.join(name))? == *want,
            "{name} differs"
        );
    }
    ensure!(
        std::fs::read(m.target.join(&files[0].0))? == files[0].1,
        "main.py differs"
    );
    std::thread::sleep(Duration::from_millis(1500));
    env.proxy().clear();
    for (name, want) in &files[1..4] {
        ensure!(
            std::fs::read(m.target.join(name))? == *want,
            "{name} differs"
        );
    }
    let ranges = env.proxy().range_requests_for(&chunks_blob);
    ensure!(
        ranges.is_empty(),
        "the modules main.py imports were not fetched at its open: {ranges:?}"
    );
    ensure!(std::fs::read(m.target.join(&files[4].0))? == files[4].1);
    ensure!(
        !env.proxy().range_requests_for(&chunks_blob).is_empty(),
        "a module nothing imports was fetched ahead"
    );
    env.proxy().clear_fault();
    m.stop()?;
    Ok(())
}

#[test]
fn registry_faults_never_serve_wrong_bytes_and_reads_recover() -> Result<()> {
    let env = Env::new()?;
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("f{i}"), noise(77 + i, 600_000)))
        .collect();
    let image = env
        .fx
        .image("faults")
        .files(&files)?
        .build()?
        .convert("faults:v1", &["--chunk-size", "262144"])?
        .reference;
    let m = env.mount(
        &image,
        "mnt",
        "cache",
        &["--no-background-fetch", "--fetch-deadline", "4"],
    )?;

    // 500s, then success: the read succeeds with the right bytes.
    env.proxy().set_fault(Fault::times(2, Fault::Status(500)));
    ensure!(
        std::fs::read(m.target.join("f0"))? == files[0].1,
        "f0 after 500s"
    );
    // Wrong bytes: never served, refetched.
    env.proxy().set_fault(Fault::times(1, Fault::CorruptBody));
    ensure!(
        std::fs::read(m.target.join("f1"))? == files[1].1,
        "f1 after corrupt answer"
    );
    // Truncated ranges.
    env.proxy().set_fault(Fault::times(1, Fault::TruncateBody));
    ensure!(
        std::fs::read(m.target.join("f2"))? == files[2].1,
        "f2 after truncation"
    );
    // Corrupt forever: EIO after the deadline, not a hang, and no wrong byte.
    env.proxy().set_fault(Fault::CorruptBody);
    let t = Instant::now();
    let r = std::fs::read(m.target.join("f3"));
    let took = t.elapsed();
    ensure!(r.is_err(), "a read of always-corrupt data succeeded");
    ensure!(
        r.unwrap_err().raw_os_error() == Some(nix::errno::Errno::EIO as i32)
            && took < Duration::from_secs(20),
        "expected EIO within the deadline, took {took:?}"
    );
    // Registry gone mid-read: EIO after the deadline; back again: the read succeeds.
    env.proxy().set_fault(Fault::None);
    env.proxy().set_down(true);
    let r = std::fs::read(m.target.join("f4"));
    ensure!(r.is_err(), "read succeeded with the registry down");
    env.proxy().set_down(false);
    // A chunk given up at its deadline fails new reads at once for 0.5 s (one deadline per
    // reader, not two: see fetch.rs); after that, reads go to the registry again.
    std::thread::sleep(Duration::from_millis(600));
    ensure!(
        std::fs::read(m.target.join("f4"))? == files[4].1,
        "f4 after the registry came back"
    );
    ensure!(
        std::fs::read(m.target.join("f3"))? == files[3].1,
        "f3 after the fault cleared"
    );
    let log = m.stop()?;
    ensure!(
        log.contains("corrupt answers discarded"),
        "no summary: {log}"
    );
    Ok(())
}

#[test]
fn background_fetch_makes_the_layer_independent_of_the_registry() -> Result<()> {
    let env = Env::new()?;
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("d/f{i}"), noise(500 + i, 300_000)))
        .collect();
    let image = env
        .fx
        .image("bg")
        .files(&files)?
        .build()?
        .convert("bg:v1", &[])?
        .reference;
    let m = env.mount(&image, "mnt", "cache", &["--fetch-deadline", "3"])?;
    let cache = env.path("cache");
    let done = util::wait_for(
        || {
            beam::ok(&[
                "cache",
                "stats",
                "--json",
                "--cache-dir",
                cache.to_str().unwrap_or(""),
            ])
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["chunk_bytes"].as_u64())
            .is_some_and(|b| b >= 20 * 300_000)
        },
        Duration::from_secs(60),
    );
    ensure!(done, "background fetch did not complete");
    // Wholly cached, the layer is read in the kernel's wider readahead windows.
    let widened = util::wait_for(
        || layer_read_ahead_kib(&m).is_ok_and(|kib| kib == [1024]),
        Duration::from_secs(10),
    );
    ensure!(
        widened,
        "readahead of the cached layer: {:?} KiB",
        layer_read_ahead_kib(&m)
    );
    env.proxy().set_down(true);
    for (name, data) in &files {
        ensure!(
            std::fs::read(m.target.join(name))? == *data,
            "{name} differs"
        );
    }
    env.proxy().set_down(false);
    m.stop()?;
    Ok(())
}

/// The kernel readahead window (KiB) of each layer mount of `m`, from its backing device (a
/// one-layer image is mounted at the target itself, a deeper one under the work directory).
fn layer_read_ahead_kib(m: &BeamMount) -> Result<Vec<u32>> {
    use std::os::unix::fs::MetadataExt;
    let mut layers = util::mounts_under(&m.work_dir)?;
    if layers.is_empty() {
        layers.push(m.target.clone());
    }
    layers
        .iter()
        .map(|layer| {
            let dev = std::fs::metadata(layer)?.dev();
            let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
            let kib =
                std::fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"))?;
            Ok(kib.trim().parse()?)
        })
        .collect()
}

/// The tree seen through a lazy mount equals `beam unpack`'s, but for what overlayfs itself
/// changes: merged directories report 1 link, and it keeps lower layers' `trusted.overlay.*`
/// xattrs to itself.
fn assert_same_as_unpacked(mount: &Path, unpacked: &Path) -> Result<()> {
    let strip = |mut t: std::collections::BTreeMap<Vec<u8>, tree::Entry>| {
        for e in t.values_mut() {
            e.xattrs.retain(|k, _| !k.starts_with(b"trusted.overlay."));
        }
        t
    };
    tree::assert_same_with(
        &strip(tree::snapshot(mount)?),
        &strip(tree::snapshot(unpacked)?),
        &DiffOptions {
            ignore_root: true,
            ignore_dir_nlink: true,
            ..DiffOptions::default()
        },
    );
    Ok(())
}

/// Every path under `root` (not following symlinks).
fn walk(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    Ok(out)
}

#[test]
fn recorded_access_order_leads_background_fetch() -> Result<()> {
    let env = Env::new()?;
    // 50 incompressible files of 100,000 bytes: each is one raw chunk, in tar order, so file
    // fNN sits at offset NN * 100,000 of the chunk blob.
    let files: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| (format!("data/f{i:02}"), noise(3000 + i, 100_000)))
        .collect();
    let rec = env.fx.image("rec").busybox()?.files(&files)?.build()?;
    let converted = rec.convert("rec:v1", &["--json"])?;
    let image = converted.reference.clone();
    let (data_chunks, _) = converted.layer_blobs(1)?;

    let cache = env.path("rec-cache");
    let out = beam::ok(&[
        "record",
        "--plain-http",
        "--cache-dir",
        cache.to_str().context("utf-8")?,
        "--work-dir",
        env.path("rec-work").to_str().context("utf-8")?,
        &image,
        "--",
        "/bin/cat",
        "/data/f40",
    ])?;
    ensure!(out.contains("recorded"), "record said: {out}");
    let inspect = beam::ok(&["inspect", "--plain-http", &image])?;
    ensure!(
        inspect.contains("1 files to prefetch"),
        "the data layer should list f40 for prefetch: {inspect}"
    );

    // A fresh node: background fetch starts with f40.
    env.proxy().clear();
    let m = env.mount(
        &image,
        "mnt",
        "fresh-cache",
        &["--background-concurrency", "1"],
    )?;
    let got = util::wait_for(
        || env.proxy().range_requests_for(&data_chunks).len() >= 2,
        Duration::from_secs(60),
    );
    ensure!(got, "background fetch did not start");
    let ranges = env.proxy().range_requests_for(&data_chunks);
    ensure!(
        ranges[0] == (4_000_000, 4_099_999),
        "first background request should be f40's chunk: {ranges:?}"
    );
    m.stop()?;

    // Background fill off: the recorded list is still fetched as the layer mounts, and
    // nothing else.
    env.proxy().clear();
    let m = env.mount(&image, "mnt2", "fresh-cache-2", &["--no-background-fetch"])?;
    ensure!(
        util::wait_for(
            || !env.proxy().range_requests_for(&data_chunks).is_empty(),
            Duration::from_secs(30)
        ),
        "the recorded prefetch list was not fetched without background fill"
    );
    std::thread::sleep(Duration::from_millis(500));
    let ranges = env.proxy().range_requests_for(&data_chunks);
    ensure!(
        ranges == vec![(4_000_000, 4_099_999)],
        "only f40's chunk should be fetched: {ranges:?}"
    );
    m.stop()?;
    Ok(())
}

#[test]
fn mirrors_are_tried_first_and_the_origin_backs_them_up() -> Result<()> {
    let env = Env::new()?;
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("m/f{i}"), noise(900 + i, 200_000)))
        .collect();
    let image = env
        .fx
        .image("mirrored")
        .files(&files)?
        .build()?
        .convert("mirrored:v1", &[])?
        .reference;
    // A second proxy in front of the same registry plays the mirror.
    let mirror = Proxy::start(&env.proxy().upstream())?;
    let m = env.mount(
        &image,
        "mnt",
        "cache",
        &[
            "--no-background-fetch",
            "--fetch-deadline",
            "5",
            "--mirror",
            &mirror.addr(),
        ],
    )?;
    env.proxy().clear();
    ensure!(std::fs::read(m.target.join("m/f0"))? == files[0].1);
    ensure!(
        !mirror.blob_requests().is_empty() && env.range_requests().is_empty(),
        "the read did not go to the mirror (mirror {:?}, origin {:?})",
        mirror.blob_requests(),
        env.range_requests()
    );
    // The mirror fails: the origin serves.
    mirror.set_down(true);
    ensure!(std::fs::read(m.target.join("m/f1"))? == files[1].1);
    ensure!(!env.range_requests().is_empty(), "the origin was not used");
    m.stop()?;
    Ok(())
}

#[test]
fn one_layer_can_be_mounted_alone() -> Result<()> {
    let env = Env::new()?;
    let two = env
        .fx
        .image("two")
        .files(&[("only-in-a".into(), b"A".to_vec())])?
        .files(&[("only-in-b".into(), b"B".to_vec())])?
        .build()?;
    let image = two.convert("two:v1", &[])?.reference;
    let (layer_b, ..) = &two.built.layers[1];
    let m = env.mount(
        &format!("{image}@{layer_b}"),
        "mnt",
        "cache",
        &["--no-background-fetch"],
    )?;
    ensure!(std::fs::read(m.target.join("only-in-b"))? == b"B");
    ensure!(
        !m.target.join("only-in-a").exists(),
        "layer a is visible in a one-layer mount"
    );
    m.stop()?;
    let m = env.mount(&image, "mnt", "cache", &["--no-background-fetch"])?;
    ensure!(m.target.join("only-in-a").exists() && m.target.join("only-in-b").exists());
    m.stop()?;
    Ok(())
}

#[test]
fn a_full_cache_disk_is_a_clear_error_and_leaves_the_cache_whole() -> Result<()> {
    let env = Env::new()?;
    // Two incompressible 3 MiB files in one layer, and a cache disk of 4 MiB: the second
    // cannot be cached while the first is (the mounted layer pins its chunks).
    let files = vec![
        ("data/a".to_string(), noise(41, 3 << 20)),
        ("data/b".to_string(), noise(42, 3 << 20)),
    ];
    let image = env
        .fx
        .image("full")
        .files(&files)?
        .build()?
        .convert("full:v1", &[])?
        .reference;
    let cache = env.path("small-cache");
    std::fs::create_dir_all(&cache)?;
    nix::mount::mount(
        Some("tmpfs"),
        &cache,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m"),
    )?;
    let _unmount = util::UnmountOnDrop(cache.clone());
    let m = env.mount(
        &image,
        "full-mnt",
        "small-cache",
        &["--no-background-fetch", "--no-passthrough"],
    )?;
    let mnt = env.path("full-mnt");
    ensure!(std::fs::read(mnt.join("data/a"))? == files[0].1, "a");
    let started = Instant::now();
    let b = std::fs::read(mnt.join("data/b"));
    let took = started.elapsed();
    // Either it was served (room was made) or it is a plain I/O error, at once, not at the
    // 60 s fetch deadline; never wrong bytes.
    match &b {
        Ok(bytes) => ensure!(*bytes == files[1].1, "b: wrong bytes"),
        Err(e) => ensure!(
            e.raw_os_error() == Some(nix::libc::EIO) && took < Duration::from_secs(20),
            "b: {e} after {took:?}"
        ),
    }
    // The cache holds no temporary leftovers, and the first file still reads.
    ensure!(std::fs::read(mnt.join("data/a"))? == files[0].1, "a again");
    let tmp_left: Vec<_> = std::fs::read_dir(cache.join("tmp"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    ensure!(tmp_left.is_empty(), "temp files left: {tmp_left:?}");
    eprintln!(
        "second file: {:?} after {took:?}",
        b.as_ref().map(|v| v.len())
    );
    m.stop()?;
    Ok(())
}

#[test]
fn a_registry_that_ignores_range_still_serves_the_right_bytes() -> Result<()> {
    let env = Env::new()?;
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("g{i}"), noise(90 + i, 600_000)))
        .collect();
    let converted = env
        .fx
        .image("norange")
        .files(&files)?
        .build()?
        .convert("norange:v1", &["--chunk-size", "262144", "--json"])?;
    let (chunks, _) = converted.layer_blobs(0)?;
    let m = env.mount(
        &converted.reference,
        "nr-mnt",
        "nr-cache",
        &["--no-background-fetch"],
    )?;
    // Every request for the chunk blob reaches the registry without its Range header, so
    // the registry answers 200 with the whole blob.
    env.proxy()
        .set_fault_for(Some(chunks.clone()), Fault::IgnoreRange);
    ensure!(std::fs::read(m.target.join("g2"))? == files[2].1, "g2");
    ensure!(std::fs::read(m.target.join("g0"))? == files[0].1, "g0");
    let whole: Vec<_> = env
        .fx
        .registry()
        .blob_gets()
        .into_iter()
        .filter(|e| e.path.ends_with(&chunks) && e.status == 200)
        .collect();
    ensure!(
        !whole.is_empty(),
        "the registry never answered a whole-blob 200: {:?}",
        env.fx.registry().blob_gets()
    );
    m.stop()?;
    Ok(())
}

#[test]
fn a_slowloris_registry_ends_reads_at_their_deadline_and_they_recover() -> Result<()> {
    let env = Env::new()?;
    let files: Vec<(String, Vec<u8>)> = (0..2)
        .map(|i| (format!("s{i}"), noise(120 + i, 300_000)))
        .collect();
    let converted = env
        .fx
        .image("slow")
        .files(&files)?
        .build()?
        .convert("slow:v1", &["--json"])?;
    let (chunks, _) = converted.layer_blobs(0)?;
    let m = env.mount(
        &converted.reference,
        "slow-mnt",
        "slow-cache",
        &["--no-background-fetch", "--fetch-deadline", "3"],
    )?;
    // One byte every 100 ms: a 300 KB range would take over 8 hours.
    env.proxy().set_fault_for(
        Some(chunks.clone()),
        Fault::Dribble(Duration::from_millis(100)),
    );
    let t = Instant::now();
    let r = std::fs::read(m.target.join("s0"));
    let took = t.elapsed();
    ensure!(
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(nix::libc::EIO),
        "a read behind a slowloris registry: {:?}",
        r.map(|b| b.len())
    );
    // Each FUSE request ends at the 3 s deadline, and one read() at one deadline: after the
    // kernel's readahead request fails, its follow-up request for the page the reader needs
    // fails at once (the fetcher remembers the chunk it just gave up for 0.5 s). Before that
    // memory the read took two deadlines (6.0 s).
    ensure!(
        took < Duration::from_millis(4500),
        "the read ended after {took:?}, past one 3 s deadline"
    );
    // The registry recovers: so do reads, with the right bytes, once the 0.5 s memory passed.
    env.proxy().clear_fault();
    std::thread::sleep(Duration::from_millis(600));
    ensure!(std::fs::read(m.target.join("s0"))? == files[0].1, "s0");
    eprintln!("slowloris: EIO after {took:?}");
    m.stop()?;
    Ok(())
}

/// Packed indexes (the default) and plain ones (`--index-compression none`, for nodes whose
/// daemon predates packing) both mount and read the image's bytes; `beam inspect` says which
/// an image has.
#[test]
fn packed_and_plain_indexes_both_mount() -> Result<()> {
    let env = Env::new()?;
    let files: Vec<(String, Vec<u8>)> = vec![
        ("d/a".into(), noise(1, 700_000)),
        ("d/b".into(), noise(2, 3_000)),
    ];
    let img = env.fx.image("packing").files(&files)?.build()?;
    let no_flags: &[&str] = &[];
    for (tag, flags, packed) in [
        ("packed:v1", no_flags, true),
        ("plain:v1", &["--index-compression", "none"][..], false),
    ] {
        let reference = img.convert(tag, flags)?.reference;
        let inspect = beam::ok(&["inspect", "--plain-http", &reference])?;
        ensure!(
            inspect.contains(", lz4 of ") == packed,
            "{tag}: inspect says {inspect}"
        );
        let m = env.mount(&reference, "mnt", tag, &["--no-background-fetch"])?;
        for (name, data) in &files {
            ensure!(
                std::fs::read(m.target.join(name))? == *data,
                "{tag}: {name} differs"
            );
        }
        m.stop()?;
    }
    Ok(())
}
