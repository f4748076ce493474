//! A registry that answers with bodies that never end, or asks to be left alone for a while:
//! every body Beam reads has a bound, checked as it arrives (issue 16), and a `Retry-After` is
//! honoured (issue 15). A real docker-registry behind the tests' fault-injecting proxy, and
//! the `beam` command as users run it.

use anyhow::{ensure, Result};
use beam_tests::beam::{ok as beam_ok, run as beam};
use beam_tests::proxy::Record;
use beam_tests::{Fault, Fixture};
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
