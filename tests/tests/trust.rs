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
