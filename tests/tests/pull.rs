//! `beam pull` + `ctr run --snapshotter beam` through a real containerd, registry and
//! beam-snapshotter: converted layers are never downloaded, only the chunks the container
//! reads; unconverted images are pulled in full; removing the image leaves nothing behind.
//!
//! The registry is plain HTTP and the daemon is given no registry settings at all: `beam pull
//! --plain-http` carries the setting to it (issue 12). A daemon that does not take the pull's
//! settings falls back, and `beam pull` and `beam doctor` say why and what to change.

use anyhow::{ensure, Context, Result};
use beam_tests::util;
use beam_tests::{beam, oci_layout};
use beam_tests::{BeamDaemon, Containerd, ContainerdOptions, Fixture};
use std::time::Duration;

/// `beam pull --address ... --namespace ... --plain-http IMAGE --json`.
fn beam_pull(c: &Containerd, image: &str) -> Result<serde_json::Value> {
    let out = beam::pull(c, image, true)?;
    ensure!(out.status.success(), "beam pull failed: {out:?}");
    let out = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&out).with_context(|| format!("beam pull printed {out}"))
}

fn snapshot_names(c: &Containerd) -> Result<Vec<String>> {
    let out = c.ctr(&["snapshots", "--snapshotter", "beam", "ls"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect())
}

/// A two-layer image (busybox, then a data layer with a small file the test reads and a big
/// one it does not), converted; and the same image unconverted under another name; in a
/// registry behind the recording proxy.
struct Images {
    converted: String,
    plain: String,
    built: oci_layout::BuiltImage,
    fx: Fixture,
}

fn build_images() -> Result<Images> {
    let fx = Fixture::with_proxy()?;
    let image = fx
        .image("bb")
        .busybox()?
        .files(&[
            (
                "data/hello.txt".into(),
                b"hello from a lazy layer\n".to_vec(),
            ),
            ("data/big.bin".into(), util::noise(1, 16 << 20)),
        ])?
        .build()?;
    Ok(Images {
        converted: image.convert("pull/bb:v1", &[])?.reference,
        plain: image.push("plain/bb:v1")?,
        built: image.built,
        fx,
    })
}

/// The test images, a beam-snapshotter started with `daemon_args`, and a containerd using
/// it. Dropped in reverse order: containerd first.
fn start(daemon_args: &[&str]) -> Result<(Images, BeamDaemon, Containerd)> {
    util::require_root()?;
    let images = build_images()?;
    let d = BeamDaemon::start(daemon_args)?;
    let c = Containerd::start_with(ContainerdOptions {
        extra_config: d.containerd_config(),
        ..Default::default()
    })?;
    Ok((images, d, c))
}

/// Remove `images` and wait until containerd's GC removed every snapshot.
fn remove_images(c: &Containerd, images: &[&str]) -> Result<()> {
    let mut args = vec!["images", "rm", "--sync"];
    args.extend_from_slice(images);
    c.ctr(&args)?;
    ensure!(
        util::wait_for(
            || snapshot_names(c).is_ok_and(|s| s.is_empty()),
            Duration::from_secs(20)
        ),
        "snapshots left after image removal: {:?}",
        snapshot_names(c)?
    );
    Ok(())
}

#[test]
fn beam_pull_then_ctr_run_fetches_only_what_is_read() -> Result<()> {
    // No registry settings: the daemon learns plain HTTP from `beam pull --plain-http`.
    let (images, d, c) = start(&["--no-background-fetch"])?;
    let proxy = images.fx.proxy();

    // The Beam blobs of the image, from `beam inspect`: per layer an index and a chunks blob.
    let inspect = beam::ok(&["inspect", "--plain-http", &images.converted])?;
    let blob_of = |kind: &str| -> Vec<String> {
        inspect
            .lines()
            .filter_map(|l| l.trim().strip_prefix(kind))
            .filter_map(|rest| rest.split_whitespace().next().map(String::from))
            .collect()
    };
    let (indexes, chunk_blobs) = (blob_of("index "), blob_of("chunks "));
    ensure!(
        indexes.len() == 2 && chunk_blobs.len() == 2,
        "beam inspect: {inspect}"
    );

    proxy.clear();
    let r = beam_pull(&c, &images.converted)?;
    ensure!(
        r["lazy"] == 2 && r["downloaded"] == 0 && r["converted"] == true,
        "beam pull: {r}"
    );
    for (digest, ..) in &images.built.layers {
        ensure!(
            proxy.blob_requests_for(digest).is_empty(),
            "layer {digest} was downloaded by the pull"
        );
    }
    // The image is an ordinary containerd image: listed, and runnable with ctr.
    let ls = String::from_utf8_lossy(&c.ctr(&["images", "ls", "-q"])?.stdout).into_owned();
    ensure!(
        ls.lines().any(|l| l == images.converted),
        "ctr images ls: {ls}"
    );
    let out = c.run_with(
        &["--snapshotter", "beam"],
        &images.converted,
        "pull-lazy",
        &["/bin/cat", "/data/hello.txt"],
    )?;
    ensure!(
        out == "hello from a lazy layer\n",
        "container printed {out:?}"
    );
    // Neither layer was downloaded whole; the 16 MiB file that nobody read was not fetched.
    for (digest, _, size) in &images.built.layers {
        ensure!(
            proxy.blob_requests_for(digest).is_empty(),
            "original layer {digest} ({size} bytes) was downloaded"
        );
    }
    let fetched = proxy.blob_bytes_sent();
    ensure!(
        fetched < 8 << 20,
        "{fetched} bytes fetched to print one small file"
    );
    // The registry saw only the config, the Beam indexes whole, and Range reads of chunks.
    for rec in proxy.blob_requests() {
        let digest = rec.digest().unwrap_or_default().to_string();
        let whole_ok = digest == images.built.config_digest || indexes.contains(&digest);
        let range_ok = rec.range.is_some() && chunk_blobs.contains(&digest);
        ensure!(
            whole_ok || range_ok,
            "unexpected blob request {} {} (range {:?})",
            rec.method,
            rec.path,
            rec.range
        );
    }
    let st = d.status()?;
    ensure!(st["lazy_mounts"] == 2, "beam status: {st}");

    // Pulling again finds everything there.
    let again = beam_pull(&c, &images.converted)?;
    ensure!(again["present"] == 2, "second pull: {again}");

    // An image without a Beam conversion is pulled in full and runs the same.
    let p = beam_pull(&c, &images.plain)?;
    ensure!(
        p["downloaded"] == 0 && p["present"] == 2,
        "same layers are shared by chain ID: {p}"
    );

    // Removing the images and letting containerd collect garbage removes every snapshot,
    // lazy mount and cache pin.
    remove_images(&c, &[&images.converted, &images.plain])?;
    ensure!(
        util::wait_for(
            || d.status()
                .is_ok_and(|s| s["layers"].as_array().is_some_and(|a| a.is_empty())),
            Duration::from_secs(20)
        ),
        "lazy layers left after image removal: {}",
        d.status()?
    );
    ensure!(
        util::mounts_under(d.root())?.is_empty(),
        "mounts left: {:?}",
        util::mounts_under(d.root())?
    );
    drop(c);
    d.stop()
}

#[test]
fn beam_pull_of_an_unconverted_image_downloads_and_runs() -> Result<()> {
    let (images, d, c) = start(&["--no-background-fetch"])?;
    let proxy = images.fx.proxy();
    proxy.clear();
    let r = beam_pull(&c, &images.plain)?;
    ensure!(
        r["lazy"] == 0 && r["downloaded"] == 2 && r["converted"] == false,
        "beam pull: {r}"
    );
    for (digest, ..) in &images.built.layers {
        ensure!(
            !proxy.blob_requests_for(digest).is_empty(),
            "layer {digest} was not downloaded"
        );
    }
    ensure!(
        d.log().contains("no lazy mount"),
        "the fallback was not logged"
    );
    let out = c.run_with(
        &["--snapshotter", "beam"],
        &images.plain,
        "pull-plain",
        &["/bin/cat", "/data/hello.txt"],
    )?;
    ensure!(
        out == "hello from a lazy layer\n",
        "container printed {out:?}"
    );
    remove_images(&c, &[&images.plain])?;
    drop(c);
    d.stop()
}

/// A daemon that cannot reach the registry the way the pull does (it ignores the pull's
/// settings and tries HTTPS on a plain-HTTP registry): every layer is downloaded in full, and
/// `beam pull` says per layer why and what to change; `beam doctor` fails with the same fix.
#[test]
fn beam_pull_names_the_cause_and_fix_of_a_fallback() -> Result<()> {
    let (images, d, c) = start(&["--no-background-fetch", "--ignore-pull-settings"])?;
    let out = beam::pull(&c, &images.converted, false)?;
    ensure!(out.status.success(), "beam pull failed: {out:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let fix = "pass --plain-http to beam pull, or add it to hosts.toml";
    for i in 1..=2 {
        let line = format!("layer {i}/2 ");
        let at = text
            .find(&line)
            .with_context(|| format!("no line for layer {i}:\n{text}"))?;
        let rest = &text[at..];
        let block: String = rest.lines().take(3).collect::<Vec<_>>().join("\n");
        ensure!(
            block.contains("downloaded")
                && block.contains("not lazy:")
                && block.contains("plain HTTP")
                && block.contains(fix),
            "layer {i}: no reason and fix in beam pull's output:\n{block}\n---\n{text}"
        );
    }
    // The JSON report says the same per layer (pulled again once containerd collected the
    // first pull's snapshots).
    remove_images(&c, &[&images.converted])?;
    let r = beam_pull(&c, &images.converted)?;
    let layers = r["layers"].as_array().context("no layers")?;
    ensure!(
        layers.len() == 2
            && layers.iter().all(|l| l["how"] == "downloaded"
                && l["fallback_reason"].is_string()
                && l["fallback_fix"].as_str().is_some_and(|f| f.contains(fix))),
        "beam pull --json: {r}"
    );
    // `beam doctor` fails and names the same fix.
    let (doctor_ok, report) = beam::doctor(&c, d.socket())?;
    ensure!(!doctor_ok, "beam doctor passed after a fallback:\n{report}");
    ensure!(
        report.contains("last fallback") && report.contains(fix),
        "beam doctor does not name the fix:\n{report}"
    );
    drop(c);
    d.stop()
}

#[test]
fn cache_prune_beside_a_running_daemon_keeps_what_its_layers_use() -> Result<()> {
    let (images, d, c) = start(&["--no-background-fetch"])?;
    let r = beam_pull(&c, &images.converted)?;
    ensure!(r["lazy"] == 2, "beam pull: {r}");
    let out = c.run_with(
        &["--snapshotter", "beam"],
        &images.converted,
        "prune-1",
        &["/bin/cat", "/data/hello.txt"],
    )?;
    ensure!(out == "hello from a lazy layer\n", "{out:?}");
    let cache = d.root().join("cache");
    let cache = cache.to_str().context("utf-8")?;
    let socket = d.socket().display().to_string();
    let stats = |what: &str| -> Result<u64> {
        let s = beam::ok(&["cache", "stats", "--cache-dir", cache, "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&s)?;
        v[what].as_u64().context("stats")
    };
    let prune = || {
        beam::ok(&[
            "cache",
            "prune",
            "--cache-dir",
            cache,
            "--to",
            "0",
            "--address",
            &socket,
        ])
    };
    let before = stats("chunks")?;
    ensure!(before > 0, "nothing cached");
    // Through the daemon: the chunks its mounted layers pin stay.
    let said = prune()?;
    ensure!(said.contains("through beam-snapshotter"), "{said}");
    let after = stats("chunks")?;
    ensure!(
        after > 0,
        "the prune removed chunks mounted layers use: {said}"
    );
    // Once the image is gone, nothing pins them: the same prune empties the cache.
    remove_images(&c, &[&images.converted])?;
    let said = prune()?;
    ensure!(said.contains("through beam-snapshotter"), "{said}");
    ensure!(stats("chunks")? == 0, "{said}");
    Ok(())
}

/// containerd restarts (an upgrade, a crash) while a container runs on lazily mounted layers:
/// the container keeps running and reading them, beam-snapshotter keeps its mounts (the same
/// process), and the restarted containerd starts new containers of the image and removes it.
#[test]
fn containerd_restarted_while_layers_are_mounted() -> Result<()> {
    let (images, mut d, mut c) = start(&["--no-background-fetch"])?;
    let r = beam_pull(&c, &images.converted)?;
    ensure!(r["lazy"] == 2, "beam pull: {r}");
    c.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "beam",
        &images.converted,
        "sleeper",
        "/bin/sleep",
        "600",
    ])?;
    ensure!(
        util::wait_for(|| !c.shims().is_empty(), Duration::from_secs(10)),
        "no shim for the detached container"
    );
    let layers_before = d.lazy_layers()?;

    c.restart()?;

    let tasks = String::from_utf8_lossy(&c.ctr(&["task", "ls"])?.stdout).into_owned();
    ensure!(
        tasks
            .lines()
            .any(|l| l.starts_with("sleeper") && l.contains("RUNNING")),
        "the container did not survive the restart: {tasks}"
    );
    // It still reads its lazy layer (a file it had not read before).
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "reader",
        "sleeper",
        "/bin/cat",
        "/data/hello.txt",
    ])?;
    ensure!(
        out.stdout == b"hello from a lazy layer\n",
        "exec after the restart printed {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        d.is_running() && d.lazy_layers()? == layers_before,
        "beam-snapshotter changed across containerd's restart"
    );
    // New containers of the image, on the same snapshots.
    let out = c.run_with(
        &["--snapshotter", "beam"],
        &images.converted,
        "after",
        &["/bin/cat", "/data/hello.txt"],
    )?;
    ensure!(
        out == "hello from a lazy layer\n",
        "new container printed {out:?}"
    );

    c.ctr(&["task", "kill", "-s", "SIGKILL", "sleeper"])?;
    ensure!(
        util::wait_for(
            || c.ctr(&["task", "ls"])
                .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("RUNNING")),
            Duration::from_secs(20)
        ),
        "the killed task is still running"
    );
    c.ctr(&["task", "delete", "sleeper"])?;
    c.ctr(&["containers", "delete", "sleeper"])?;
    remove_images(&c, &[&images.converted])?;
    drop(c);
    d.stop()?;
    Ok(())
}

/// containerd's garbage collector runs again and again while `beam pull` works (a slow
/// registry stretches the pull): the pull's lease keeps every snapshot it made, the image
/// runs afterwards, and nothing is left once it is removed.
#[test]
fn gc_running_during_a_pull_removes_nothing_the_pull_needs() -> Result<()> {
    let (images, d, c) = start(&["--no-background-fetch"])?;
    // Every index and chunk fetch of the pull waits 300 ms.
    images
        .fx
        .proxy()
        .set_fault(beam_tests::Fault::Stall(Duration::from_millis(300)));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let collections = std::sync::atomic::AtomicU32::new(0);
    let pulled = std::thread::scope(|s| {
        s.spawn(|| {
            // Each synchronous lease delete runs a full GC.
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let id = format!(
                    "gc-{}",
                    collections.load(std::sync::atomic::Ordering::SeqCst)
                );
                if c.ctr(&["leases", "create", "--id", &id]).is_ok()
                    && c.ctr(&["leases", "delete", "--sync", &id]).is_ok()
                {
                    collections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        let r = beam_pull(&c, &images.converted);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    })?;
    images.fx.proxy().clear_fault();
    let collections = collections.into_inner();
    ensure!(
        collections >= 3,
        "only {collections} GC runs during the pull"
    );
    ensure!(pulled["lazy"] == 2, "beam pull: {pulled}");
    let out = c.run_with(
        &["--snapshotter", "beam"],
        &images.converted,
        "after-gc",
        &["/bin/cat", "/data/hello.txt"],
    )?;
    ensure!(
        out == "hello from a lazy layer\n",
        "the container printed {out:?}"
    );
    eprintln!("{collections} GC runs during the pull");
    remove_images(&c, &[&images.converted])?;
    ensure!(
        d.lazy_layers()? == 0,
        "lazy layers left after the image was removed"
    );
    drop(c);
    d.stop()?;
    Ok(())
}

/// The pull's lease expires while the pull still works (a 1 s `--lease-secs`, a registry that
/// takes 1.5 s per blob, containerd's GC running all along): containerd's GC removes what the
/// pull had made, the pull fails saying its lease expired and what to do, nothing is left
/// mounted for it, and the same pull asked again with the default lease succeeds and runs.
#[test]
fn a_lease_expiring_mid_pull_fails_clearly_and_a_new_pull_succeeds() -> Result<()> {
    let (images, d, c) = start(&["--no-background-fetch"])?;
    images
        .fx
        .proxy()
        .set_fault(beam_tests::Fault::Stall(Duration::from_millis(1500)));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let id = format!("gc-{n}");
                let _ = c.ctr(&["leases", "create", "--id", &id]);
                let _ = c.ctr(&["leases", "delete", "--sync", &id]);
            }
        });
        let out = beam::pull_with(&c, &images.converted, &["--lease-secs", "1"]);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        out
    })?;
    images.fx.proxy().clear_fault();
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the pull outlived its lease and succeeded"
    );
    ensure!(
        err.contains("past its lease of 1 s") && err.contains("--lease-secs"),
        "the error does not say the lease expired: {err}"
    );
    ensure!(
        util::wait_for(
            || d.lazy_layers().is_ok_and(|n| n == 0),
            Duration::from_secs(20)
        ),
        "lazy layers of the failed pull left mounted"
    );

    let r = beam_pull(&c, &images.converted)?;
    ensure!(r["lazy"] == 2, "the pull asked again: {r}");
    let out = c.run_with(
        &["--snapshotter", "beam"],
        &images.converted,
        "after-lease",
        &["/bin/cat", "/data/hello.txt"],
    )?;
    ensure!(
        out == "hello from a lazy layer\n",
        "the container printed {out:?}"
    );
    remove_images(&c, &[&images.converted])?;
    drop(c);
    d.stop()?;
    Ok(())
}

/// An image index, the form of most images in public registries: `beam pull` fetches the
/// entry for this node's platform and nothing of the others (before, it asked for the tag
/// twice, then for every platform's manifest and config in turn, and took the first config
/// that said amd64), and the image runs lazily from that entry.
#[test]
fn beam_pull_of_an_index_fetches_only_this_platforms_manifest() -> Result<()> {
    util::require_root()?;
    let fx = Fixture::with_proxy()?;
    let this = fx.image("this").busybox()?.build()?;
    // Another platform's image: no busybox in it, so a container from it could not start.
    let other = fx
        .image("other")
        .files(&[("data/other.txt".into(), b"another platform\n".to_vec())])?
        .build()?;
    this.push("multi/bb:this")?;
    other.push("multi/bb:other")?;
    let (host_arch, other_arch) = match std::env::consts::ARCH {
        "aarch64" => ("arm64", "amd64"),
        _ => ("amd64", "arm64"),
    };
    let entry = |img: &beam_tests::fixture::Image, arch: &str| -> Result<serde_json::Value> {
        let d = &img.built.manifest_digest;
        let size = std::fs::metadata(img.layout.join("blobs/sha256").join(&d[7..]))?.len();
        Ok(serde_json::json!({
            "mediaType": oci_layout::MANIFEST_MEDIA_TYPE,
            "digest": d,
            "size": size,
            "platform": {"architecture": arch, "os": "linux"},
        }))
    };
    // The other platform first, as a registry may list it.
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci_layout::INDEX_MEDIA_TYPE,
        "manifests": [entry(&other, other_arch)?, entry(&this, host_arch)?],
    });
    let reg = fx.registry();
    reg.put_manifest(
        "multi/bb",
        "v1",
        oci_layout::INDEX_MEDIA_TYPE,
        &serde_json::to_vec(&index)?,
    )?;
    let image = format!("{}/multi/bb:v1", fx.addr());
    beam::ok(&["convert", "--plain-http", &image])?;
    // The converted index: each platform's entry now names its bound manifest.
    let (status, body) = reg.get_manifest("multi/bb", "v1")?;
    ensure!(status == 200, "GET the converted index: {status}");
    let converted: serde_json::Value = serde_json::from_slice(&body)?;
    let bound_of = |arch: &str| -> Result<String> {
        converted["manifests"]
            .as_array()
            .and_then(|m| {
                m.iter()
                    .find(|e| e["platform"]["architecture"] == arch)
                    .and_then(|e| e["digest"].as_str())
            })
            .map(String::from)
            .with_context(|| format!("no {arch} entry in {converted}"))
    };
    let (this_bound, other_bound) = (bound_of(host_arch)?, bound_of(other_arch)?);

    let d = BeamDaemon::start(&[])?;
    let c = Containerd::start_with(ContainerdOptions {
        extra_config: d.containerd_config(),
        ..Default::default()
    })?;
    let proxy = fx.proxy();
    proxy.clear();
    let r = beam_pull(&c, &image)?;
    ensure!(
        r["lazy"] == 1 && r["downloaded"] == 0 && r["manifest"] == this_bound.as_str(),
        "beam pull: {r}"
    );
    let manifest_gets = |reference: &str| {
        proxy
            .records()
            .iter()
            .filter(|rec| rec.path.ends_with(&format!("/manifests/{reference}")))
            .count()
    };
    ensure!(
        manifest_gets("v1") == 1,
        "the tag was asked {} times: {:?}",
        manifest_gets("v1"),
        proxy.records()
    );
    ensure!(
        manifest_gets(&other_bound) == 0,
        "the other platform's manifest was fetched: {:?}",
        proxy.records()
    );
    let out = c.run_with(
        &["--snapshotter", "beam"],
        &image,
        "multi",
        &["/bin/echo", "from this platform"],
    )?;
    ensure!(out == "from this platform\n", "container printed {out:?}");
    remove_images(&c, &[&image])?;
    drop(c);
    d.stop()
}
