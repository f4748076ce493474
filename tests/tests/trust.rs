//! Which Beam artifact may serve an image (issue 16): the one the pulled manifest binds, and
//! a referrer-found one only in a repository the node trusts. Real registry, containerd and
//! beam-snapshotter with its default settings.
//!
//! - `beam convert` binds by default: the tag moves to a manifest with the original's config
//!   and layers plus `dev.beam.artifact`; a Beam node mounts it lazily (by tag or pinned
//!   digest), a node without Beam runs it unchanged.
//! - A third party that attaches an unbound artifact to a digest-pinned image is ignored by
//!   default (the layers are downloaded, and `beam pull` says why and what to do), and used
//!   once the node trusts that repository.

use anyhow::{ensure, Context, Result};
use beam_tests::util;
use beam_tests::{beam, oci_layout};
use beam_tests::{BeamDaemon, Compression, Containerd, ContainerdOptions, LayerSpec, Registry};

/// A busybox image in an OCI layout (tag `v1`).
fn busybox_layout(dir: &std::path::Path) -> Result<oci_layout::BuiltImage> {
    let bb = dir.join("busybox.tar");
    util::run_fixture("make-busybox-layer.sh", &[&bb])?;
    oci_layout::build_with_config(
        &dir.join("layout"),
        "v1",
        &[LayerSpec::new(&bb, Compression::Gzip)],
        &Default::default(),
    )
}

fn pull_json(c: &Containerd, image: &str) -> Result<serde_json::Value> {
    let out = beam::pull(c, image, true)?;
    ensure!(out.status.success(), "beam pull failed: {out:?}");
    let s = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&s).with_context(|| format!("beam pull printed {s}"))
}

fn containerd_for(d: &BeamDaemon) -> Result<Containerd> {
    Containerd::start_with(ContainerdOptions {
        extra_config: d.containerd_config(),
        ..Default::default()
    })
}

/// The manifest a tag names, from the registry's own API: (digest, JSON).
fn manifest_at(registry: &str, repo: &str, tag: &str) -> Result<(String, serde_json::Value)> {
    let out = std::process::Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{registry}/{repo}:{tag}"),
        ])
        .output()?;
    ensure!(out.status.success(), "skopeo inspect: {out:?}");
    let digest = {
        use sha2::{Digest, Sha256};
        format!("sha256:{}", hex::encode(Sha256::digest(&out.stdout)))
    };
    Ok((digest, serde_json::from_slice(&out.stdout)?))
}

#[test]
fn a_bound_conversion_serves_its_pinned_digest_and_runs_without_beam() -> Result<()> {
    util::require_root()?;
    let work = tempfile::tempdir()?;
    let built = busybox_layout(work.path())?;
    let reg = Registry::start()?;
    let image = format!("{}/trust/bb:v1", reg.addr());
    let out = beam::ok(&[
        "convert",
        "--plain-http",
        "--json",
        &format!("oci:{}:v1", work.path().join("layout").display()),
        &image,
    ])?;
    let converted: serde_json::Value = serde_json::from_str(&out)?;
    let artifact = converted[0]["artifact"].as_str().context("no artifact")?;
    let bound = converted[0]["bound"]
        .as_str()
        .context("no bound manifest")?;

    // The tag names the bound manifest: the original's config and layers, plus the artifact.
    let (digest, m) = manifest_at(&reg.addr(), "trust/bb", "v1")?;
    ensure!(digest == bound, "the tag names {digest}, not {bound}");
    ensure!(
        m["annotations"]["dev.beam.artifact"] == artifact,
        "bound manifest: {m}"
    );
    ensure!(m["config"]["digest"] == built.config_digest.as_str());
    let layers: Vec<&str> = m["layers"]
        .as_array()
        .context("no layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str())
        .collect();
    let original: Vec<&str> = built.layers.iter().map(|(d, ..)| d.as_str()).collect();
    ensure!(layers == original, "layers {layers:?} vs {original:?}");
    ensure!(bound != built.manifest_digest, "nothing was bound");

    // A Beam node with its defaults mounts the pinned digest lazily, by the binding.
    let d = BeamDaemon::start(&[])?;
    let c = containerd_for(&d)?;
    let pinned = format!("{}/trust/bb@{bound}", reg.addr());
    let r = pull_json(&c, &pinned)?;
    ensure!(r["lazy"] == 1 && r["downloaded"] == 0, "beam pull: {r}");
    ensure!(
        r["admitted"]
            .as_str()
            .is_some_and(|a| a.contains("bound by the image manifest")),
        "beam pull does not say the rule: {r}"
    );
    // beam status says it too, per layer.
    let st = beam::ok(&[
        "status",
        "--address",
        &d.socket().display().to_string(),
        "--json",
    ])?;
    let st: serde_json::Value = serde_json::from_str(&st)?;
    ensure!(
        st["layers"][0]["admitted"]
            .as_str()
            .is_some_and(|a| a.contains("bound by the image manifest")),
        "beam status: {st}"
    );
    drop(c);
    drop(d);

    // A node without Beam pulls and runs the same tag with its default snapshotter.
    let plain = Containerd::start()?;
    plain.ctr(&["images", "pull", "--plain-http", &image])?;
    let said = plain.run_with(&[], &image, "no-beam", &["/bin/echo", "ran"])?;
    ensure!(said == "ran\n", "container printed {said:?}");
    // Converting the bound image again changes nothing.
    let again = beam::ok(&["convert", "--plain-http", &image])?;
    ensure!(
        again.contains("already converted"),
        "second conversion: {again}"
    );
    ensure!(manifest_at(&reg.addr(), "trust/bb", "v1")?.0 == bound);
    Ok(())
}

#[test]
fn a_third_partys_unbound_artifact_is_used_only_once_the_repository_is_trusted() -> Result<()> {
    util::require_root()?;
    let work = tempfile::tempdir()?;
    let built = busybox_layout(work.path())?;
    let reg = Registry::start()?;
    let image = format!("{}/victim/bb:v1", reg.addr());
    oci_layout::push_with_skopeo(&work.path().join("layout"), "v1", &image)?;
    // Someone with push rights attaches an artifact to the image; the tag stays.
    beam::ok(&["convert", "--plain-http", "--unbound", &image])?;
    ensure!(manifest_at(&reg.addr(), "victim/bb", "v1")?.0 == built.manifest_digest);
    let pinned = format!("{}/victim/bb@{}", reg.addr(), built.manifest_digest);

    // Default: not used. The layer is downloaded, and beam pull says why and what to do.
    {
        let d = BeamDaemon::start(&[])?;
        let c = containerd_for(&d)?;
        let r = pull_json(&c, &pinned)?;
        ensure!(r["lazy"] == 0 && r["downloaded"] == 1, "beam pull: {r}");
        let why = r["layers"][0]["fallback_reason"].as_str().unwrap_or("");
        ensure!(
            why.contains("not a trusted repository") && why.contains("beam convert"),
            "fallback reason: {why:?}"
        );
    }
    // Trusted: used, and beam pull names the rule.
    let d = BeamDaemon::start(&["--trust-referrers", &format!("{}/victim/*", reg.addr())])?;
    let c = containerd_for(&d)?;
    let r = pull_json(&c, &pinned)?;
    ensure!(r["lazy"] == 1 && r["downloaded"] == 0, "beam pull: {r}");
    ensure!(
        r["admitted"]
            .as_str()
            .is_some_and(|a| a.contains("trusted repository")),
        "beam pull: {r}"
    );
    Ok(())
}

#[test]
fn a_referrer_made_from_another_images_layers_is_refused_even_where_trusted() -> Result<()> {
    util::require_root()?;
    let work = tempfile::tempdir()?;
    let victim = busybox_layout(work.path())?;
    let reg = Registry::start()?;
    let image = format!("{}/victim/bb:v1", reg.addr());
    oci_layout::push_with_skopeo(&work.path().join("layout"), "v1", &image)?;

    // Someone with push rights converts an image of their own into the victim's repository...
    let other_tar = work.path().join("other.tar");
    util::write_tar(
        &other_tar,
        &[("bin/sh".into(), b"#!/bin/false\n# not busybox\n".to_vec())],
    )?;
    oci_layout::build_with_config(
        &work.path().join("other"),
        "v1",
        &[LayerSpec::new(&other_tar, Compression::Gzip)],
        &Default::default(),
    )?;
    let other = format!("oci:{}:v1", work.path().join("other").display());
    let out = beam::ok(&[
        "convert",
        "--plain-http",
        "--unbound",
        "--json",
        &other,
        &format!("{}/victim/bb:other", reg.addr()),
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let artifact = v[0]["artifact"].as_str().context("artifact")?.to_string();
    // ...and re-labels its artifact as the victim's: subject and source layers rewritten,
    // its index and chunks (another layer's files) and their diff IDs kept.
    let mut m: serde_json::Value = serde_json::from_slice(&reg.stored_blob(&artifact)?)?;
    let victim_manifest = reg.stored_blob(&victim.manifest_digest)?;
    m["subject"] = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": victim.manifest_digest,
        "size": victim_manifest.len(),
    });
    for l in m["layers"].as_array_mut().context("layers")? {
        l["annotations"]["dev.beam.layer.source"] = victim.layers[0].0.clone().into();
    }
    let forged = serde_json::to_vec(&m)?;
    let forged_digest = {
        use sha2::{Digest, Sha256};
        format!("sha256:{}", hex::encode(Sha256::digest(&forged)))
    };
    reg.put_manifest(
        "victim/bb",
        &forged_digest,
        "application/vnd.oci.image.manifest.v1+json",
        &forged,
    )?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": forged_digest,
            "size": forged.len(),
            "artifactType": "application/vnd.beam.image.v1",
        }],
    });
    let referrers_tag = victim.manifest_digest.replace(':', "-");
    reg.put_manifest(
        "victim/bb",
        &referrers_tag,
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index)?,
    )?;

    // The node trusts the repository's referrers, and still does not serve the forged layer:
    // its diff ID is not the one the victim's config names. The layer is downloaded instead.
    let d = BeamDaemon::start(&["--trust-referrers", &format!("{}/victim/*", reg.addr())])?;
    let c = containerd_for(&d)?;
    let pinned = format!("{}/victim/bb@{}", reg.addr(), victim.manifest_digest);
    let r = pull_json(&c, &pinned)?;
    ensure!(r["lazy"] == 0 && r["downloaded"] == 1, "beam pull: {r}");
    let why = r["layers"][0]["fallback_reason"].as_str().unwrap_or("");
    ensure!(why.contains("diff ID"), "fallback reason: {why:?}");
    let out = c.run(&pinned, "victim-bb", &["/bin/echo", "the real busybox"])?;
    ensure!(out == "the real busybox\n", "{out:?}");
    Ok(())
}

#[test]
fn a_layer_past_the_nodes_index_limit_is_downloaded_and_the_others_stay_lazy() -> Result<()> {
    util::require_root()?;
    let fx = beam_tests::Fixture::with_registry()?;
    let image = fx
        .image("limits")
        .busybox()?
        .files(&[("data/hello.txt".into(), b"still lazy\n".to_vec())])?
        .build()?;
    let reference = image.convert("limits/app:v1", &[])?.reference;
    // The busybox layer has about 280 inodes, the data layer 3: a node that takes 50 at most.
    let config = fx.path("beam.toml");
    std::fs::write(&config, "[remote]\nmax_index_inodes = 50\n")?;
    let d = BeamDaemon::start(&["--config", &config.display().to_string()])?;
    let c = containerd_for(&d)?;
    let r = pull_json(&c, &reference)?;
    ensure!(r["lazy"] == 1 && r["downloaded"] == 1, "beam pull: {r}");
    let busybox_layer = &image.built.layers[0].0;
    let refused = r["layers"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["digest"] == *busybox_layer))
        .context("the busybox layer in beam pull's report")?;
    let why = refused["fallback_reason"].as_str().unwrap_or("");
    ensure!(
        why.contains("too many inodes")
            && why.contains("limit 50")
            && why.contains(busybox_layer.as_str())
            && why.contains("max_index_inodes"),
        "fallback reason: {why:?}"
    );
    // Both layers serve the container: the downloaded one and the lazy one.
    let out = c.run_with(
        &["--snapshotter", "beam"],
        &reference,
        "limits",
        &["/bin/cat", "/data/hello.txt"],
    )?;
    ensure!(out == "still lazy\n", "{out:?}");
    Ok(())
}

#[test]
fn beam_record_runs_the_workload_isolated() -> Result<()> {
    util::require_root()?;
    let fx = beam_tests::Fixture::with_registry()?;
    // An image that ships a device node (1,3: the null device, harmless if it were opened).
    let dev_tar = fx.path("dev.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&dev_tar)?);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_mode(0o666);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        h.set_device_major(1)?;
        h.set_device_minor(3)?;
        b.append_data(&mut h, "hostdev", &[][..])?;
        b.finish()?;
    }
    let image = fx.image("iso").busybox()?.tars(&[dev_tar]).build()?;
    let reference = image.convert("iso/app:v1", &[])?.reference;
    let script = "echo pid=$$; \
                  if cat /hostdev >/dev/null 2>&1; then echo dev=opened; else echo dev=refused; fi; \
                  echo links=$(ip -o link | wc -l)";
    let out = beam::ok(&[
        "record",
        "--plain-http",
        "--cache-dir",
        &fx.path("cache").display().to_string(),
        "--work-dir",
        &fx.path("work").display().to_string(),
        &reference,
        "--",
        "/bin/sh",
        "-c",
        script,
    ])?;
    // PID 1 of its own PID namespace; the image's device node opens nothing (nodev); a network
    // namespace of its own, with the loopback interface only.
    ensure!(out.contains("pid=1\n"), "{out}");
    ensure!(out.contains("dev=refused\n"), "{out}");
    ensure!(out.contains("links=1\n"), "{out}");
    ensure!(out.contains("recorded"), "{out}");
    Ok(())
}
