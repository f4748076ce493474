//! `beam convert` and `beam unpack` on real layers, against a real registry and containerd.
//!
//! Each round trip compares the tree `beam unpack` writes with what GNU tar gives when it
//! applies the same layers with whiteouts (`tests/fixtures/reference-extract.sh`), on path,
//! type, mode, owner, size, mtime, xattrs, link target, device numbers and content digest.

use anyhow::{ensure, Context, Result};
use beam_tests::beam::{ok as beam_ok, run as beam};
use beam_tests::oci_layout::{self, ImageConfig};
use beam_tests::tree::{self, DiffOptions};
use beam_tests::util;
use beam_tests::{Compression, Containerd, LayerSpec, Registry};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Unpack `image` with beam and compare with GNU tar's extraction of `layers`.
fn assert_round_trip(image: &str, extra: &[&str], layers: &[PathBuf], work: &Path) -> Result<()> {
    let got = work.join("beam-unpack");
    let want = work.join("reference");
    let mut args = vec!["unpack"];
    args.extend_from_slice(extra);
    args.push(image);
    let got_s = got.to_str().context("utf-8 path")?;
    args.push(got_s);
    beam_ok(&args)?;
    let mut ref_args: Vec<&Path> = vec![&want];
    ref_args.extend(layers.iter().map(|p| p.as_path()));
    util::run_fixture("reference-extract.sh", &ref_args)?;
    let a = tree::snapshot(&got)?;
    let b = tree::snapshot(&want)?;
    // Directory times are changed by whiteouts applied at different moments in the two
    // extractions; the root directory is the extraction target itself.
    let opts = DiffOptions {
        ignore_dir_mtime: true,
        ignore_root: true,
        ..DiffOptions::default()
    };
    tree::assert_same_with(&a, &b, &opts);
    ensure!(
        a.len() > 3,
        "unpacked tree is suspiciously small: {} entries",
        a.len()
    );
    Ok(())
}

fn blob_gets_of(reg: &Registry, digest: &str) -> usize {
    reg.blob_gets()
        .iter()
        .filter(|e| e.path.ends_with(digest))
        .count()
}

#[test]
fn busybox_converts_in_place_unbound_and_the_original_still_runs() -> Result<()> {
    util::require_root()?;
    let work = tempfile::tempdir()?;
    let tar = work.path().join("busybox.tar");
    util::run_fixture("make-busybox-layer.sh", &[&tar])?;
    let layout = work.path().join("layout");
    let built = oci_layout::build_with_config(
        &layout,
        "v1",
        &[LayerSpec::new(&tar, Compression::Gzip)],
        &ImageConfig {
            cmd: Some(vec!["/bin/sh".into()]),
            ..Default::default()
        },
    )?;
    let reg = Registry::start()?;
    let image = format!("{}/busybox:v1", reg.addr());
    oci_layout::push_with_skopeo(&layout, "v1", &image)?;

    // Another tool's referrer (a signature, say) already in the referrers tag index must
    // survive Beam adding its own entry.
    let empty = put_blob(&reg, "busybox", b"{}")?;
    let sig = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.dev.cosign.simplesigning.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [],
        "subject": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": built.manifest_digest,
            "size": std::fs::metadata(layout.join("blobs/sha256").join(&built.manifest_digest[7..]))?.len()
        }
    });
    let sig_bytes = serde_json::to_vec(&sig)?;
    let sig_digest = format!("sha256:{}", hex_sha256(&sig_bytes));
    reg.put_manifest(
        "busybox",
        &sig_digest,
        "application/vnd.oci.image.manifest.v1+json",
        &sig_bytes,
    )?;
    let sig_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sig_digest,
            "size": sig_bytes.len(),
            "artifactType": "application/vnd.dev.cosign.simplesigning.v1+json"
        }]
    });
    reg.put_manifest(
        "busybox",
        &format!("sha256-{}", &built.manifest_digest[7..]),
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&sig_index)?,
    )?;

    let out = beam_ok(&["convert", "--plain-http", "--unbound", &image])?;
    ensure!(out.contains("Beam artifact"), "unexpected output: {out}");
    ensure!(
        !out.contains("already converted"),
        "first conversion: {out}"
    );

    // The artifact is found from the original reference, and the tag still names the
    // original manifest.
    let inspect = beam_ok(&["inspect", "--plain-http", &image])?;
    ensure!(
        inspect.contains(&built.manifest_digest),
        "inspect does not name the original manifest: {inspect}"
    );
    let (status, body) = reg.get_manifest("busybox", "v1")?;
    ensure!(status == 200);
    ensure!(
        format!("sha256:{}", hex_sha256(&body)) == built.manifest_digest,
        "the tag no longer names the original manifest"
    );
    let refs_tag = format!("sha256-{}", &built.manifest_digest[7..]);
    let (_, refs) = reg.get_manifest("busybox", &refs_tag)?;
    let refs: serde_json::Value = serde_json::from_slice(&refs)?;
    let types: Vec<&str> = refs["manifests"]
        .as_array()
        .context("referrers index has no manifests")?
        .iter()
        .filter_map(|m| m["artifactType"].as_str())
        .collect();
    ensure!(
        types.contains(&"application/vnd.dev.cosign.simplesigning.v1+json")
            && types
                .iter()
                .filter(|t| **t == "application/vnd.beam.image.v1")
                .count()
                == 1,
        "referrers index lost an entry or has duplicates: {types:?}"
    );

    // Converting twice changes nothing.
    let again = beam_ok(&["convert", "--plain-http", "--unbound", &image])?;
    ensure!(
        again.contains("already converted"),
        "second conversion: {again}"
    );
    let (_, refs2) = reg.get_manifest("busybox", &refs_tag)?;
    ensure!(
        serde_json::from_slice::<serde_json::Value>(&refs2)? == refs,
        "referrers index changed on the second conversion"
    );

    assert_round_trip(
        &image,
        &["--plain-http"],
        std::slice::from_ref(&tar),
        work.path(),
    )?;

    // The unchanged image runs with containerd's default snapshotter.
    let ctd = Containerd::start()?;
    ctd.pull_plain_http(&image)?;
    let hello = ctd.run(
        &image,
        "bb-plain",
        &[
            "/bin/sh",
            "-c",
            "echo hello from $(busybox | head -1 | cut -d' ' -f1)",
        ],
    )?;
    ensure!(
        hello.trim() == "hello from BusyBox",
        "container printed {hello:?}"
    );
    for (digest, ..) in &built.layers {
        ensure!(
            blob_gets_of(&reg, digest) >= 1,
            "containerd did not fetch layer {digest}"
        );
    }
    Ok(())
}

#[test]
fn python_rootfs_from_debian_packages_round_trips_through_a_registry() -> Result<()> {
    util::require_root()?;
    let work = tempfile::tempdir()?;
    let layers_dir = work.path().join("layers");
    util::run_fixture("make-python-layers.sh", &[&layers_dir])?;
    let layers = util::layers_listed_in(&layers_dir)?;
    ensure!(layers.len() >= 3, "expected several layers, got {layers:?}");
    // One of each compression.
    let specs: Vec<LayerSpec> = layers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = [Compression::Gzip, Compression::Zstd, Compression::None][i % 3];
            LayerSpec::new(p, c)
        })
        .collect();
    let layout = work.path().join("layout");
    oci_layout::build(&layout, "3.11", &specs)?;
    let reg = Registry::start()?;
    let image = format!("{}/python:3.11", reg.addr());
    // Beam pushes the original image itself, then the artifact.
    let src = format!("oci:{}:3.11", layout.display());
    beam_ok(&["convert", "--plain-http", &src, &image])?;
    assert_round_trip(&image, &["--plain-http"], &layers, work.path())?;
    Ok(())
}

#[test]
fn every_tar_special_case_round_trips_through_an_oci_layout() -> Result<()> {
    util::require_root()?;
    let work = tempfile::tempdir()?;
    let layers_dir = work.path().join("layers");
    util::run_fixture("make-special-layers.sh", &[&layers_dir])?;
    let layers = util::layers_listed_in(&layers_dir)?;
    let layout = work.path().join("layout");
    oci_layout::build_gzip(&layout, "special", &layers)?;
    let image = format!("oci:{}:special", layout.display());
    // Small chunks so that files span several chunks.
    beam_ok(&["convert", "--chunk-size", "65536", &image])?;
    // Conversion streams: 4 GiB of sparse-file content passed through within 512 MiB. The
    // largest resident size of any child this test process has waited for bounds beam's.
    let max_rss_kib = children_max_rss_kib();
    ensure!(
        max_rss_kib < 512 * 1024,
        "a child (beam convert or a fixture tool) peaked at {max_rss_kib} KiB"
    );
    assert_round_trip(&image, &[], &layers, work.path())?;
    Ok(())
}

#[test]
fn hostile_and_corrupt_inputs_give_clear_errors() -> Result<()> {
    util::require_root()?;
    let work = tempfile::tempdir()?;
    // A layer with a `..` entry is refused, naming the entry.
    for (name, path) in [("dotdot", "../../etc/evil"), ("absolute", "/etc/evil")] {
        let tar_path = work.path().join(format!("{name}.tar"));
        write_raw_tar(&tar_path, path)?;
        let layout = work.path().join(format!("layout-{name}"));
        oci_layout::build(
            &layout,
            "bad",
            &[LayerSpec::new(&tar_path, Compression::None)],
        )?;
        let out = beam(&["convert", &format!("oci:{}:bad", layout.display())])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{name}: conversion should fail");
        ensure!(
            err.contains(path),
            "{name}: error does not name the entry: {err}"
        );
    }

    // A chunk blob altered after conversion is never unpacked.
    let tar = work.path().join("ok.tar");
    util::run_fixture("make-busybox-layer.sh", &[&tar])?;
    let layout = work.path().join("layout-ok");
    oci_layout::build(&layout, "ok", &[LayerSpec::new(&tar, Compression::Gzip)])?;
    let image = format!("oci:{}:ok", layout.display());
    let json = beam_ok(&["convert", "--json", &image])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let chunks = v[0]["layers"][0]["chunks"]
        .as_str()
        .context("chunks digest")?;
    let blob = layout.join("blobs/sha256").join(&chunks[7..]);
    let mut bytes = std::fs::read(&blob)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, &bytes)?;
    let dest = work.path().join("unpacked");
    let out = beam(&["unpack", &image, dest.to_str().context("utf-8")?])?;
    ensure!(!out.status.success(), "unpack of a corrupt blob succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("does not match"), "unclear error: {err}");

    // A corrupt index is refused with the reason.
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, &bytes)?;
    let index = v[0]["layers"][0]["index"]
        .as_str()
        .context("index digest")?;
    let index_path = layout.join("blobs/sha256").join(&index[7..]);
    let mut idx = std::fs::read(&index_path)?;
    idx[0] = b'X';
    std::fs::write(&index_path, &idx)?;
    let dest2 = work.path().join("unpacked2");
    let out = beam(&["unpack", &image, dest2.to_str().context("utf-8")?])?;
    ensure!(
        !out.status.success(),
        "unpack with a corrupt index succeeded"
    );
    Ok(())
}

/// A one-entry tar whose name is written into the header as is (the tar crate refuses to
/// build such names, which is the point).
fn write_raw_tar(path: &Path, name: &str) -> Result<()> {
    let mut h = tar::Header::new_old();
    {
        let raw = h.as_mut_bytes();
        raw[..name.len()].copy_from_slice(name.as_bytes());
    }
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(4);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = Vec::new();
    out.extend_from_slice(h.as_bytes());
    let mut data = b"evil".to_vec();
    data.resize(512, 0);
    out.extend_from_slice(&data);
    out.extend_from_slice(&[0u8; 1024]);
    std::fs::write(path, out)?;
    Ok(())
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

/// Upload a blob (POST, then PUT with the digest) and return its digest.
fn put_blob(reg: &Registry, repo: &str, data: &[u8]) -> Result<String> {
    let digest = format!("sha256:{}", hex_sha256(data));
    let resp = ureq::post(&format!("{}/v2/{repo}/blobs/uploads/", reg.url()))
        .call()
        .context("POST blob upload")?;
    let location = resp
        .header("Location")
        .context("no upload location")?
        .to_string();
    let url = if location.starts_with("http") {
        location
    } else {
        format!("{}{location}", reg.url())
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let resp = ureq::put(&format!("{url}{sep}digest={digest}"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(data)
        .context("PUT blob")?;
    ensure!(resp.status() == 201, "PUT blob: {}", resp.status());
    Ok(digest)
}

/// Peak resident set size, in KiB, of the largest child process waited for so far.
fn children_max_rss_kib() -> i64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage")
        .max_rss()
}

#[test]
fn credentials_come_from_the_docker_config() -> Result<()> {
    util::require_root()?;
    let work = tempfile::tempdir()?;
    let tar = work.path().join("busybox.tar");
    util::run_fixture("make-busybox-layer.sh", &[&tar])?;
    let layout = work.path().join("layout");
    oci_layout::build(&layout, "v1", &[LayerSpec::new(&tar, Compression::Gzip)])?;
    let reg = Registry::start_with_basic_auth("beam", "s3cret-pass")?;
    let image = format!("{}/private/busybox:v1", reg.addr());
    let src = format!("oci:{}:v1", layout.display());

    // No credentials: a clear refusal, and the password of another registry never leaks.
    let empty = work.path().join("empty-docker");
    std::fs::create_dir_all(&empty)?;
    std::fs::write(empty.join("config.json"), "{}")?;
    let out = beam_with_env(&["convert", "--plain-http", &src, &image], &empty)?;
    ensure!(!out.status.success(), "push without credentials succeeded");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    ensure!(
        err.contains("401") || err.contains("unauthorized") || err.contains("authentication"),
        "unclear error: {err}"
    );

    // Basic auth from $DOCKER_CONFIG/config.json.
    let cfg = work.path().join("docker");
    std::fs::create_dir_all(&cfg)?;
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("beam:s3cret-pass");
    std::fs::write(
        cfg.join("config.json"),
        serde_json::to_vec(&serde_json::json!({"auths": {reg.addr(): {"auth": auth}}}))?,
    )?;
    let out = beam_with_env(&["convert", "--plain-http", &src, &image], &cfg)?;
    ensure!(
        out.status.success(),
        "convert with credentials failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !all.contains("s3cret-pass"),
        "the password appears in beam's output"
    );
    let out = beam_with_env(&["inspect", "--plain-http", &image], &cfg)?;
    ensure!(out.status.success(), "inspect with credentials failed");
    Ok(())
}

fn beam_with_env(args: &[&str], docker_config: &Path) -> Result<Output> {
    let bin = util::cargo_bin("beam")?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("BEAM_LOG", "debug")
        .env("DOCKER_CONFIG", docker_config);
    util::output_with_timeout(&mut cmd, Duration::from_secs(300))
}

#[test]
fn https_registry_with_a_custom_ca() -> Result<()> {
    util::require_root()?;
    let work = tempfile::tempdir()?;
    let d = work.path();
    // A private CA and a server certificate for 127.0.0.1 signed by it.
    let ca = beam_tests::tls::Ca::new(d, "beam-test-ca")?;
    ca.issue_for_localhost(&d.join("server.pem"), &d.join("server.key"))?;
    let reg = Registry::start_with_tls(&d.join("server.pem"), &d.join("server.key"))?;

    let tar = d.join("busybox.tar");
    util::run_fixture("make-busybox-layer.sh", &[&tar])?;
    let layout = d.join("layout");
    oci_layout::build(&layout, "v1", &[LayerSpec::new(&tar, Compression::Gzip)])?;
    let src = format!("oci:{}:v1", layout.display());
    let image = format!("{}/tls/busybox:v1", reg.addr());

    // Without the CA the certificate is refused; plain HTTP is never tried unasked.
    let out = beam(&["convert", &src, &image])?;
    ensure!(
        !out.status.success(),
        "an untrusted certificate was accepted"
    );
    let ca = ca.pem.to_str().context("utf-8")?;
    beam_ok(&["convert", "--ca-file", ca, &src, &image])?;
    let inspect = beam_ok(&["inspect", "--ca-file", ca, &image])?;
    ensure!(
        inspect.contains("artifact"),
        "inspect over HTTPS: {inspect}"
    );

    // A CA in containerd's hosts directory is trusted for its own host only (issue 16): given
    // for another registry it does not vouch for this one; given for this one it does.
    let hosts_for = |name: &str, host: &str| -> Result<std::path::PathBuf> {
        let dir = d.join(format!("hosts-{name}"));
        std::fs::create_dir_all(dir.join(host))?;
        std::fs::write(
            dir.join(host).join("hosts.toml"),
            format!("server = \"https://{host}\"\nca = \"{ca}\"\n"),
        )?;
        Ok(dir)
    };
    let elsewhere = hosts_for("elsewhere", "other.example:5000")?;
    let out = beam(&[
        "inspect",
        "--hosts-dir",
        elsewhere.to_str().context("utf-8")?,
        &image,
    ])?;
    ensure!(
        !out.status.success(),
        "a CA given for other.example:5000 vouched for {}",
        reg.addr()
    );
    let here = hosts_for("here", &reg.addr())?;
    let inspect = beam_ok(&[
        "inspect",
        "--hosts-dir",
        here.to_str().context("utf-8")?,
        &image,
    ])?;
    ensure!(inspect.contains("artifact"), "inspect: {inspect}");

    // A plain-HTTP registry that sends every read on to an HTTPS store: Beam's plain-HTTP
    // client loads no CAs, and the read is taken over by the TLS client, which trusts the CA.
    let front = redirect_to_https(&reg.addr())?;
    let behind = format!("{front}/tls/busybox:v1");
    let inspect = beam_ok(&["inspect", "--plain-http", "--ca-file", ca, &behind])?;
    ensure!(
        inspect.contains("artifact"),
        "inspect through a redirect: {inspect}"
    );
    Ok(())
}

/// A plain-HTTP server on 127.0.0.1 that answers every request with a redirect to the same
/// path on `https://{to}` (as a registry whose blobs sit in an HTTPS store does); its address.
fn redirect_to_https(to: &str) -> Result<String> {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let to = to.to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(&conn);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            // The headers, up to the blank line.
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let _ = write!(
                &conn,
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: https://{to}{path}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    Ok(addr)
}
