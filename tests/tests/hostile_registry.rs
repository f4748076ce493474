//! A registry that answers with bodies that never end, asks to be left alone for a while, or
//! changes its TLS certificate: every body Beam reads has a bound, checked as it arrives
//! (issue 16), a `Retry-After` is honoured, and a certificate the node does not trust is
//! refused while a renewed one is taken (issue 15). A real docker-registry behind the tests' fault-injecting proxy, and
//! the `beam` command as users run it.

use anyhow::{ensure, Context, Result};
use beam_tests::beam::{ok as beam_ok, run as beam, BeamMount};
use beam_tests::proxy::Record;
use beam_tests::tls::Ca;
use beam_tests::{oci_layout, util};
use beam_tests::{Compression, Fault, Fixture, LayerSpec, Registry};
use std::time::{Duration, Instant};

/// A converted busybox image in a registry behind a proxy; the image's reference through it.
fn converted_image() -> Result<(Fixture, String)> {
    let fx = Fixture::with_proxy()?;
    let image = fx.image("busybox").busybox()?.build()?;
    let reference = image.convert("hostile/busybox:1", &[])?.reference;
    Ok((fx, reference))
}

/// The proxy's records of GETs whose path contains `part`.
fn gets(fx: &Fixture, part: &str) -> Vec<Record> {
    fx.proxy()
        .records()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains(part))
        .collect()
}

#[test]
fn endless_bodies_are_cut_at_their_bound_with_a_clear_error() -> Result<()> {
    let (fx, reference) = converted_image()?;
    beam_ok(&["inspect", "--plain-http", &reference])?;

    // A manifest that never ends: refused once past 4 MiB, not read on into memory.
    fx.proxy().clear();
    fx.proxy()
        .set_fault_on_path("/manifests/", Fault::Endless(200));
    let started = Instant::now();
    let out = beam(&["inspect", "--plain-http", &reference])?;
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "an endless manifest was accepted");
    ensure!(
        err.contains("over the 4194304-byte limit"),
        "the error does not name the bound: {err}"
    );
    let sent: u64 = gets(&fx, "/manifests/").iter().map(|r| r.body_bytes).sum();
    // What the proxy got out before Beam hung up: the bound plus what sockets buffer.
    ensure!(
        sent < 64 << 20,
        "Beam read {sent} bytes of an endless manifest before giving up"
    );
    eprintln!("endless manifest: refused after {took:?}, {sent} bytes sent by the registry");

    // An error answer (500) whose body never ends: the status is what counts; the body is
    // read up to 64 KiB for the registry's error codes, then dropped.
    fx.proxy().clear();
    fx.proxy().set_fault_on_path("/blobs/", Fault::Endless(500));
    let out = beam(&["inspect", "--plain-http", &reference])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "inspect passed with every blob failing"
    );
    ensure!(
        err.contains("HTTP 500"),
        "the error does not say 500: {err}"
    );
    let blob_gets = gets(&fx, "/blobs/");
    ensure!(!blob_gets.is_empty(), "no blob was asked for");
    for r in &blob_gets {
        ensure!(
            r.body_bytes < 64 << 20,
            "Beam read {} bytes of an endless error body",
            r.body_bytes
        );
    }

    // The registry behaves again: so does Beam.
    fx.proxy().clear_fault();
    beam_ok(&["inspect", "--plain-http", &reference])?;
    Ok(())
}

#[test]
fn retry_after_is_honoured_on_429() -> Result<()> {
    let (fx, reference) = converted_image()?;
    fx.proxy().clear();
    fx.proxy()
        .set_fault_on_path("/manifests/", Fault::times(1, Fault::RetryAfter(429, 2)));
    let started = Instant::now();
    beam_ok(&["inspect", "--plain-http", &reference])?;
    let manifests = gets(&fx, "/manifests/");
    ensure!(
        manifests.first().is_some_and(|r| r.status == 429),
        "the first manifest GET was not the injected 429: {manifests:?}"
    );
    ensure!(
        started.elapsed() >= Duration::from_secs(2),
        "the retry came after {:?}, before the 2 s the registry asked for",
        started.elapsed()
    );
    Ok(())
}

/// The registry's TLS certificate changes under a lazy mount. Replaced by one the node does not
/// trust (as a man in the middle would present), reads fail with EIO at the fetch deadline and
/// no byte is served; renewed by the trusted CA, reads go on with the right bytes.
#[test]
fn a_changed_tls_certificate_is_refused_and_a_renewed_one_is_taken() -> Result<()> {
    util::require_root()?;
    let work = util::short_tempdir()?;
    let d = work.path();
    let _unmount = util::UnmountOnDrop(d.to_path_buf());
    let trusted = Ca::new(d, "trusted-ca")?;
    let stranger = Ca::new(d, "stranger-ca")?;
    let (cert, key) = (d.join("server.pem"), d.join("server.key"));
    trusted.issue_for_localhost(&cert, &key)?;
    let mut reg = Registry::start_with_tls(&cert, &key)?;

    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("f{i}"), util::noise(300 + i, 700_000)))
        .collect();
    let tar = d.join("files.tar");
    util::write_tar(&tar, &files)?;
    let layout = d.join("layout");
    oci_layout::build(&layout, "v1", &[LayerSpec::new(&tar, Compression::Gzip)])?;
    let image = format!("{}/tls/files:v1", reg.addr());
    let ca = trusted.pem.to_str().context("utf-8")?;
    beam_ok(&[
        "convert",
        "--ca-file",
        ca,
        &format!("oci:{}:v1", layout.display()),
        &image,
    ])?;
    let m = BeamMount::start(
        &[
            "--ca-file",
            ca,
            "--no-background-fetch",
            "--fetch-deadline",
            "3",
        ],
        &image,
        &d.join("mnt"),
        &d.join("cache"),
        &d.join("mnt-work"),
    )?;
    ensure!(std::fs::read(m.target.join("f0"))? == files[0].1, "f0");

    // A certificate from a CA the node does not trust, at the same address.
    stranger.issue_for_localhost(&cert, &key)?;
    reg.restart()?;
    let t = Instant::now();
    let r = std::fs::read(m.target.join("f1"));
    let took = t.elapsed();
    ensure!(
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(nix::libc::EIO),
        "a read through an untrusted certificate: {:?}",
        r.map(|b| b.len())
    );
    ensure!(
        took < Duration::from_millis(4500),
        "the read ended after {took:?}, past its 3 s deadline"
    );
    let log = m.stderr();
    ensure!(
        log.to_ascii_lowercase().contains("certificate"),
        "the log does not say the certificate was refused: {log}"
    );

    // Renewed by the trusted CA (a new key too): reads go on, with the right bytes.
    trusted.issue_for_localhost(&cert, &key)?;
    reg.restart()?;
    std::thread::sleep(Duration::from_millis(1100));
    ensure!(std::fs::read(m.target.join("f1"))? == files[1].1, "f1");
    ensure!(std::fs::read(m.target.join("f2"))? == files[2].1, "f2");
    m.stop()?;
    Ok(())
}
