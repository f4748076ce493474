//! `beam autoconvert` beside a real `docker-registry` configured with notifications (the
//! endpoint block of docs/autoconvert.md): pushes made with skopeo are converted without
//! anyone running `beam convert`, through a `kill -9` of the service, and while it was down.

use anyhow::{ensure, Context, Result};
use beam_tests::autoconvert::{beam_artifacts_in_storage, AutoConvert};
use beam_tests::{
    beam, util, BeamDaemon, Containerd, ContainerdOptions, Fault, Fixture, Proxy, Registry,
};
use std::path::Path;
use std::time::{Duration, Instant};

const TOKEN: &str = "push-events-token-0123456789";

/// A port for the service, a token file, and a registry that notifies `http://PORT/events`.
struct Setup {
    listen: String,
    token_file: std::path::PathBuf,
    state: std::path::PathBuf,
    fx: Fixture,
}

fn setup(notify: bool) -> Result<Setup> {
    let listen = format!("127.0.0.1:{}", util::free_port()?);
    let registry = if notify {
        Registry::start_with_notifications(&format!("http://{listen}/events"), Some(TOKEN))?
    } else {
        Registry::start()?
    };
    let fx = Fixture::with_this_registry(registry)?;
    let token_file = fx.path("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let state = fx.path("autoconvert-state");
    Ok(Setup {
        listen,
        token_file,
        state,
        fx,
    })
}

impl Setup {
    fn start(&self, extra: &[&str]) -> Result<AutoConvert> {
        AutoConvert::start(
            &self.listen,
            &self.fx.addr(),
            &self.state,
            Some(&self.token_file),
            extra,
        )
    }

    /// The service, reaching the registry through `registry` (a proxy in front of it).
    fn start_via(&self, registry: &str) -> Result<AutoConvert> {
        AutoConvert::start(
            &self.listen,
            registry,
            &self.state,
            Some(&self.token_file),
            &["--scan-interval", "0"],
        )
    }

    /// The manifest `repo:tag` names, read from the registry's storage.
    fn tagged_manifest(&self, repo: &str, tag: &str) -> Result<serde_json::Value> {
        let reg = self.fx.registry();
        Ok(serde_json::from_slice(
            &reg.stored_blob(&reg.stored_tag(repo, tag)?)?,
        )?)
    }

    /// Whether `repo:tag` names a bound Beam image, and its repository holds exactly one Beam
    /// artifact.
    fn bound_once(&self, repo: &str, tag: &str) -> Result<bool> {
        let m = self.tagged_manifest(repo, tag)?;
        let Some(artifact) = m["annotations"]["dev.beam.artifact"].as_str() else {
            return Ok(false);
        };
        let stored = beam_artifacts_in_storage(self.fx.registry(), repo)?;
        ensure!(
            stored == [artifact.to_string()],
            "{repo}: the bound manifest names {artifact}, the storage holds Beam artifacts {stored:?}"
        );
        Ok(true)
    }
}

/// A proxy in front of the setup's registry that stalls every request `ms` milliseconds.
fn stalling_proxy(s: &Setup, ms: u64) -> Result<Proxy> {
    let p = Proxy::start(&s.fx.addr())?;
    p.set_fault(Fault::Stall(Duration::from_millis(ms)));
    Ok(p)
}

/// Push a small distinct image (one file layer) to `repo:v1` with skopeo.
fn push_small(fx: &Fixture, name: &str, repo: &str) -> Result<String> {
    let image = fx
        .image(name)
        .files(&[(
            format!("data/{name}.txt"),
            format!("hello from {name}\n").into_bytes(),
        )])?
        .build()?;
    image.push(&format!("{repo}:v1"))
}

#[test]
fn a_pushed_image_is_converted_and_starts_lazily_and_still_runs_without_beam() -> Result<()> {
    util::require_root()?;
    let s = setup(true)?;
    let svc = s.start(&["--scan-interval", "0"])?;
    let image =
        s.fx.image("web")
            .busybox()?
            .files(&[(
                "data/hello.txt".into(),
                b"hello, converted on push\n".to_vec(),
            )])?
            .build()?;
    let pushed = Instant::now();
    let reference = image.push("apps/web:v1")?;
    // Within 10 s of the push, the tag names the bound image and one artifact exists.
    util::wait_until("conversion after the push", Duration::from_secs(10), || {
        s.bound_once("apps/web", "v1")
    })
    .map_err(|e| e.context(svc.log()))?;
    let took = pushed.elapsed();
    let result = svc
        .result("apps/web", "v1")?
        .context("no result recorded")?;
    ensure!(result["state"] == "converted", "result: {result}");
    eprintln!(
        "converted {:.2}s after the push: {result}",
        took.as_secs_f64()
    );

    // A Beam node: `beam pull` of the tag mounts every layer lazily (defaults, no settings).
    let d = BeamDaemon::start(&[])?;
    let c = Containerd::start_with(ContainerdOptions {
        extra_config: d.containerd_config(),
        ..Default::default()
    })?;
    let out = beam::pull(&c, &reference, true)?;
    ensure!(out.status.success(), "beam pull: {out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        r["lazy"] == 2 && r["downloaded"] == 0 && r["converted"] == true,
        "beam pull: {r}"
    );
    let printed = c.run_with(
        &["--snapshotter", "beam"],
        &reference,
        "autoconvert-lazy",
        &["/bin/cat", "/data/hello.txt"],
    )?;
    ensure!(printed == "hello, converted on push\n", "{printed:?}");
    drop(c);
    drop(d);

    // A node without Beam pulls the same tag in full and runs it.
    let plain = Containerd::start()?;
    plain.pull_plain_http(&reference)?;
    let printed = plain.run(
        &reference,
        "autoconvert-plain",
        &["/bin/cat", "/data/hello.txt"],
    )?;
    ensure!(printed == "hello, converted on push\n", "{printed:?}");

    // The service ignored its own pushes (the bound tag, the artifact, the referrers tag):
    // one conversion, nothing queued, nothing failed.
    let st = svc.status()?;
    ensure!(
        st["queue_depth"] == 0 && st["counters"]["converted"] == 1 && st["counters"]["failed"] == 0,
        "status: {st}"
    );
    let (code, metrics) = svc.get("/metrics")?;
    ensure!(
        code == 200
            && metrics.contains("beam_autoconvert_conversions_total 1")
            && metrics.contains("beam_autoconvert_queue_depth 0"),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn a_burst_of_20_pushes_survives_a_kill_9_midway() -> Result<()> {
    let s = setup(true)?;
    // The first service reaches the registry through a proxy that stalls every request, so
    // that when it is killed, acknowledged pushes are still waiting in its queue.
    let slow = stalling_proxy(&s, 300)?;
    let first = s.start_via(&slow.addr())?;
    let repos: Vec<String> = (0..20).map(|i| format!("burst/img{i:02}")).collect();
    for (i, repo) in repos[..10].iter().enumerate() {
        push_small(&s.fx, &format!("img{i:02}"), repo)?;
    }
    // Every push so far acknowledged (in the queue or converting), most not converted yet.
    let mut waiting = 0;
    util::wait_until("10 pushes acknowledged", Duration::from_secs(20), || {
        let st = first.status()?;
        let done = st["results"].as_array().map_or(0, |r| r.len());
        let queued = st["queue_depth"].as_u64().unwrap_or(0) as usize;
        waiting = queued;
        Ok(done + queued >= 10)
    })?;
    ensure!(waiting >= 5, "only {waiting} jobs were waiting at the kill");
    first.kill9();
    // While it is down: ten more pushes (the registry keeps retrying their events).
    for (i, repo) in repos.iter().enumerate().skip(10) {
        push_small(&s.fx, &format!("img{i:02}"), repo)?;
    }
    slow.clear_fault();
    let svc = s.start(&["--scan-interval", "0"])?;
    util::wait_until("all 20 converted", Duration::from_secs(90), || {
        for repo in &repos {
            if !s.bound_once(repo, "v1")? {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .map_err(|e| e.context(svc.log()))?;
    util::wait_until("nothing left queued", Duration::from_secs(20), || {
        let st = svc.status()?;
        Ok(st["queue_depth"] == 0 && st["converting"].as_array().is_some_and(|c| c.is_empty()))
    })?;
    // Once more after the queue drained: still exactly one artifact per image.
    for repo in &repos {
        ensure!(s.bound_once(repo, "v1")?, "{repo} lost its binding");
    }
    let st = svc.status()?;
    ensure!(st["counters"]["failed"] == 0, "status: {st}");
    // The ten acknowledged before the kill came from the durable queue, not from the scan at
    // start (which skips queued tags): it found only pushes made while the service was down.
    ensure!(
        st["counters"]["scan_queued"]
            .as_u64()
            .is_some_and(|n| n <= 10),
        "the scan had to find pushes the queue had acknowledged: {st}"
    );
    eprintln!(
        "{waiting} jobs were queued at the kill; after the restart: {}",
        st["counters"]
    );
    Ok(())
}

#[test]
fn a_push_made_while_the_service_was_stopped_is_converted_by_the_catch_up() -> Result<()> {
    // A registry without notifications: only the scan at start can find the image.
    let s = setup(false)?;
    push_small(&s.fx, "late", "late/app")?;
    let svc = s.start(&["--scan-interval", "0"])?;
    util::wait_until("catch-up conversion", Duration::from_secs(20), || {
        s.bound_once("late/app", "v1")
    })
    .map_err(|e| e.context(svc.log()))?;
    let st = svc.status()?;
    ensure!(st["counters"]["scan_queued"] == 1, "status: {st}");
    // A second scan (a restart) finds nothing more to do.
    drop(svc);
    let svc = s.start(&["--scan-interval", "0"])?;
    std::thread::sleep(Duration::from_secs(1));
    let st = svc.status()?;
    ensure!(
        st["counters"]["scan_queued"] == 0 && st["queue_depth"] == 0,
        "status: {st}"
    );
    ensure!(s.bound_once("late/app", "v1")?);
    Ok(())
}

/// Rewrite the layout's manifest so that its layer has a media type Beam does not know.
fn foreign_layer(layout: &Path) -> Result<()> {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    let old = index["manifests"][0]["digest"]
        .as_str()
        .context("index digest")?
        .to_string();
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&old))?)?;
    m["layers"][0]["mediaType"] = "application/vnd.example.foreign.layer.v1".into();
    let bytes = serde_json::to_vec(&m)?;
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    std::fs::write(blob(&digest), &bytes)?;
    index["manifests"][0]["digest"] = digest.into();
    index["manifests"][0]["size"] = bytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;
    Ok(())
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn bad_requests_change_nothing_and_an_unconvertible_image_does_not_block_the_queue() -> Result<()> {
    let s = setup(true)?;
    let svc = s.start(&["--scan-interval", "0"])?;
    let event = r#"{"events":[{"action":"push","target":{
        "mediaType":"application/vnd.oci.image.manifest.v1+json",
        "digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "repository":"forged/repo","tag":"v1"}}]}"#;
    for (auth, body, want) in [
        (None, event, 401),
        (Some("Bearer not-the-token"), event, 401),
        (Some(&*format!("Basic {TOKEN}")), event, 401),
        (Some(&*format!("Bearer {TOKEN}")), "{\"events\": 7}", 400),
        (Some(&*format!("Bearer {TOKEN}")), "not json at all", 400),
    ] {
        let (code, text) = svc.post_event(body, auth)?;
        ensure!(code == want, "{auth:?} {body:?}: {code} {text}");
    }
    let st = svc.status()?;
    ensure!(
        st["queue_depth"] == 0
            && st["results"].as_array().is_some_and(|r| r.is_empty())
            && st["counters"]["refused_requests"] == 5,
        "refused requests changed something: {st}"
    );
    ensure!(
        svc.log().contains("refused a malformed event body"),
        "no log line for the bad body: {}",
        svc.log()
    );

    // An image with a layer of a foreign media type, pushed before a good one.
    let bad =
        s.fx.image("foreign")
            .files(&[("x".into(), b"x".to_vec())])?
            .build()?;
    foreign_layer(&bad.layout)?;
    bad.push("odd/foreign:v1")?;
    push_small(&s.fx, "good", "fine/good")?;
    util::wait_until("the good image converted", Duration::from_secs(20), || {
        s.bound_once("fine/good", "v1")
    })
    .map_err(|e| e.context(svc.log()))?;
    util::wait_until(
        "the foreign image reported",
        Duration::from_secs(20),
        || Ok(svc.result("odd/foreign", "v1")?.is_some()),
    )?;
    let r = svc.result("odd/foreign", "v1")?.expect("a result");
    ensure!(
        r["state"] == "failed"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("application/vnd.example.foreign.layer.v1")),
        "result: {r}"
    );
    ensure!(
        !s.bound_once("odd/foreign", "v1")?,
        "the foreign image was bound"
    );
    // The text status names it and its reason.
    let text = beam::ok(&[
        "autoconvert",
        "status",
        "--listen",
        svc.url().trim_start_matches("http://"),
        "--token-file",
        &s.token_file.display().to_string(),
    ])?;
    ensure!(
        text.contains("failed")
            && text.contains("odd/foreign:v1")
            && text.contains("foreign.layer"),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_push_to_the_tag_during_its_conversion_wins() -> Result<()> {
    let s = setup(true)?;
    // Slow conversions (every registry request of the service stalls), so that the second
    // push lands while the first is being converted.
    let slow = stalling_proxy(&s, 200)?;
    let svc = s.start_via(&slow.addr())?;
    let first =
        s.fx.image("first")
            .files(&[("data/which.txt".into(), b"first\n".to_vec())])?
            .build()?;
    let second =
        s.fx.image("second")
            .files(&[("data/which.txt".into(), b"second\n".to_vec())])?
            .build()?;
    first.push("race/app:v1")?;
    util::wait_until(
        "the first conversion running",
        Duration::from_secs(10),
        || {
            Ok(svc.status()?["converting"]
                .as_array()
                .is_some_and(|c| !c.is_empty()))
        },
    )?;
    second.push("race/app:v1")?;
    util::wait_until("the second push bound", Duration::from_secs(60), || {
        let m = s.tagged_manifest("race/app", "v1")?;
        Ok(m["annotations"]["dev.beam.artifact"].is_string()
            && m["layers"][0]["digest"] == second.built.layers[0].0)
    })
    .map_err(|e| e.context(svc.log()))?;
    // The tag never went back to the first image, and stays on the second.
    std::thread::sleep(Duration::from_secs(2));
    let m = s.tagged_manifest("race/app", "v1")?;
    ensure!(
        m["layers"][0]["digest"] == second.built.layers[0].0,
        "the tag names the first image again: {m}\n{}",
        svc.log()
    );
    Ok(())
}

#[test]
fn two_replicas_scanning_one_registry_make_one_artifact_per_image() -> Result<()> {
    let s = setup(false)?;
    let repos: Vec<String> = (0..5).map(|i| format!("replicas/img{i}")).collect();
    for (i, repo) in repos.iter().enumerate() {
        push_small(&s.fx, &format!("rep{i}"), repo)?;
    }
    // Two services, each with its own queue, scanning the same registry at the same moment.
    let other_state = s.fx.path("autoconvert-state-2");
    let other_listen = format!("127.0.0.1:{}", util::free_port()?);
    let a = s.start(&["--scan-interval", "0"])?;
    let b = AutoConvert::start(
        &other_listen,
        &s.fx.addr(),
        &other_state,
        Some(&s.token_file),
        &["--scan-interval", "0"],
    )?;
    util::wait_until("all converted", Duration::from_secs(30), || {
        for repo in &repos {
            if !s.bound_once(repo, "v1")? {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .map_err(|e| e.context(format!("{}\n{}", a.log(), b.log())))?;
    for svc in [&a, &b] {
        util::wait_until("queue drained", Duration::from_secs(20), || {
            Ok(svc.status()?["queue_depth"] == 0)
        })?;
    }
    let (sa, sb) = (a.status()?, b.status()?);
    for repo in &repos {
        ensure!(s.bound_once(repo, "v1")?, "{repo}");
    }
    eprintln!(
        "replica a: {}\nreplica b: {}",
        sa["counters"], sb["counters"]
    );
    ensure!(
        sa["counters"]["failed"] == 0 && sb["counters"]["failed"] == 0,
        "{sa}\n{sb}"
    );
    Ok(())
}

#[test]
fn registry_errors_are_retried_with_backoff() -> Result<()> {
    let s = setup(true)?;
    // The service's first requests are answered 503 (a registry restarting), then it recovers.
    let flaky = Proxy::start(&s.fx.addr())?;
    let svc = s.start_via(&flaky.addr())?;
    flaky.set_fault(Fault::times(3, Fault::Status(503)));
    push_small(&s.fx, "flaky", "flaky/app")?;
    util::wait_until(
        "converted after the retries",
        Duration::from_secs(40),
        || s.bound_once("flaky/app", "v1"),
    )
    .map_err(|e| e.context(svc.log()))?;
    let r = svc.result("flaky/app", "v1")?.context("a result")?;
    ensure!(
        r["state"] == "converted" && r["attempts"].as_u64().is_some_and(|a| a >= 2),
        "result: {r}"
    );
    ensure!(
        svc.status()?["counters"]["retries"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "no retry counted"
    );
    Ok(())
}
