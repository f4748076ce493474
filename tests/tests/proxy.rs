//! The recording, fault-injecting proxy against a real `docker-registry`, with a real skopeo
//! push through it and ureq as the client.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use beam_tests::oci_layout::{self, BuiltImage};
use beam_tests::proxy::Record;
use beam_tests::util;
use beam_tests::{Compression, Fault, Fixture, Proxy, Registry};

const REPO: &str = "proxy/img";

/// A registry, a proxy in front of it, and a two-layer image pushed through the proxy:
/// layer 0 is an uncompressed ~300 KB tar of noise, layer 1 a small gzip layer.
struct Setup {
    fx: Fixture,
    layout: PathBuf,
    image: BuiltImage,
}

impl Setup {
    fn new() -> Result<Setup> {
        let fx = Fixture::with_proxy()?;
        let image = fx
            .image("img")
            .files_as(
                Compression::None,
                &[("big.bin".into(), util::noise(1, 300_000))],
            )?
            .files(&[("small.txt".into(), b"small layer\n".to_vec())])?
            .build()?;
        image.push(&format!("{REPO}:v1"))?;
        Ok(Setup {
            fx,
            layout: image.layout,
            image: image.built,
        })
    }

    fn proxy(&self) -> &Proxy {
        self.fx.proxy()
    }

    fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        fs::read(self.layout.join("blobs/sha256").join(hex)).expect("reading a layout blob")
    }

    fn big(&self) -> String {
        self.image.layers[0].0.clone()
    }

    fn blob_url(&self, digest: &str) -> String {
        format!("{}/v2/{REPO}/blobs/{digest}", self.proxy().url())
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .redirects(0)
        .build()
}

/// `(status, body)`; non-2xx answers are results, transport and body errors are errors.
fn fetch(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Vec<u8>)> {
    let mut req = agent.request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(anyhow::Error::new(e)).context(format!("{method} {url}")),
    };
    let status = resp.status();
    let mut body = Vec::new();
    resp.into_reader()
        .read_to_end(&mut body)
        .with_context(|| format!("reading the body of {method} {url}"))?;
    Ok((status, body))
}

fn get(agent: &ureq::Agent, url: &str) -> Result<(u16, Vec<u8>)> {
    fetch(agent, "GET", url, &[])
}

#[test]
fn forwards_uploads_and_downloads_and_records_them() {
    let s = Setup::new().unwrap();
    let big = s.big();
    let big_bytes = s.blob(&big);
    assert!(big_bytes.len() > 300_000);

    // skopeo's upload went through the proxy: the upload Location was rewritten to it.
    let recs = s.proxy().records();
    let uploads: Vec<&Record> = recs
        .iter()
        .filter(|r| r.path.contains("/blobs/uploads/"))
        .collect();
    assert!(
        uploads.iter().any(|r| r.method == "PUT" && r.status == 201),
        "{recs:#?}"
    );
    assert!(
        uploads
            .iter()
            .any(|r| r.method == "POST" && r.status == 202),
        "{recs:#?}"
    );
    assert!(
        recs.iter().any(|r| r.method == "PUT"
            && r.path == format!("/v2/{REPO}/manifests/v1")
            && r.status == 201),
        "{recs:#?}"
    );
    assert!(
        recs.iter().all(|r| r.status != 0 && r.status < 500),
        "{recs:#?}"
    );
    // The registry really has the blob, byte for byte.
    let (status, direct) =
        s.fx.registry()
            .get(&format!("/v2/{REPO}/blobs/{big}"))
            .unwrap();
    assert_eq!(status, 200);
    assert_eq!(direct, big_bytes);

    s.proxy().clear();
    assert!(s.proxy().records().is_empty());
    let conns_before = s.proxy().connections();
    let a = agent();
    // Whole blob.
    let (status, body) = get(&a, &s.blob_url(&big)).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, big_bytes);
    // A range.
    let (status, body) = fetch(
        &a,
        "GET",
        &s.blob_url(&big),
        &[("Range", "bytes=1000-1999")],
    )
    .unwrap();
    assert_eq!(status, 206);
    assert_eq!(body, &big_bytes[1000..2000]);
    // HEAD keeps the Content-Length and sends no body (the connection stays usable).
    let resp = a.head(&s.blob_url(&big)).call().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.header("Content-Length"),
        Some(big_bytes.len().to_string().as_str())
    );
    drop(resp);
    // Manifest by tag, with Accept passed through.
    let (status, body) = fetch(
        &a,
        "GET",
        &format!("{}/v2/{REPO}/manifests/v1", s.proxy().url()),
        &[("Accept", oci_layout::MANIFEST_MEDIA_TYPE)],
    )
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, s.blob(&s.image.manifest_digest));
    // A missing blob is answered by the registry.
    let missing = format!("sha256:{}", "0".repeat(64));
    let (status, _) = get(&a, &s.blob_url(&missing)).unwrap();
    assert_eq!(status, 404);

    let recs = s.proxy().records();
    assert_eq!(recs.len(), 5, "{recs:#?}");
    assert_eq!(
        recs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 206, 200, 200, 404]
    );
    assert_eq!(recs[0].range, None);
    assert_eq!(recs[1].range, Some((1000, 1999)));
    assert_eq!(recs[1].body_bytes, 1000);
    assert_eq!(recs[2].method, "HEAD");
    assert_eq!(recs[2].body_bytes, 0);
    assert!(recs.iter().all(|r| !r.faulted));
    let blobs = s.proxy().blob_requests();
    assert_eq!(blobs.len(), 3, "{blobs:#?}");
    assert_eq!(s.proxy().blob_requests_for(&big).len(), 2);
    assert_eq!(
        s.proxy().blob_bytes_sent(),
        big_bytes.len() as u64 + 1000 + blobs[2].body_bytes
    );
    assert_eq!(s.proxy().range_requests_for(&big), [(1000, 1999)]);
    // Keep-alive: ureq reused one connection for all five requests.
    assert_eq!(s.proxy().connections() - conns_before, 1);
}

#[test]
fn injects_faults_into_blob_gets() {
    let s = Setup::new().unwrap();
    let big = s.big();
    let big_bytes = s.blob(&big);
    let small = s.image.layers[1].0.clone();
    let small_bytes = s.blob(&small);
    let a = agent();
    let manifest_url = format!("{}/v2/{REPO}/manifests/v1", s.proxy().url());
    let accept = [("Accept", oci_layout::MANIFEST_MEDIA_TYPE)];
    s.proxy().clear();

    // Status, for every blob; manifests and HEADs are untouched.
    s.proxy().set_fault(Fault::Status(500));
    assert_eq!(get(&a, &s.blob_url(&big)).unwrap().0, 500);
    assert_eq!(get(&a, &s.blob_url(&small)).unwrap().0, 500);
    assert_eq!(fetch(&a, "GET", &manifest_url, &accept).unwrap().0, 200);
    assert_eq!(a.head(&s.blob_url(&big)).call().unwrap().status(), 200);
    let recs = s.proxy().records();
    assert_eq!(
        recs.iter()
            .map(|r| (r.status, r.faulted))
            .collect::<Vec<_>>(),
        [(500, true), (500, true), (200, false), (200, false)]
    );

    // Status for one digest only.
    s.proxy()
        .set_fault_for(Some(big.clone()), Fault::Status(503));
    assert_eq!(get(&a, &s.blob_url(&big)).unwrap().0, 503);
    assert_eq!(get(&a, &s.blob_url(&small)).unwrap(), (200, small_bytes));

    // Corrupt: same length, every 97th byte of the body flipped (offsets relative to the body).
    s.proxy().set_fault(Fault::CorruptBody);
    let (status, body) = get(&a, &s.blob_url(&big)).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len(), big_bytes.len());
    let diffs: Vec<usize> = (0..body.len())
        .filter(|&i| body[i] != big_bytes[i])
        .collect();
    assert_eq!(diffs, (0..body.len()).step_by(97).collect::<Vec<_>>());
    let (status, body) =
        fetch(&a, "GET", &s.blob_url(&big), &[("Range", "bytes=500-1499")]).unwrap();
    assert_eq!(status, 206);
    assert_eq!(body.len(), 1000);
    assert_ne!(body, &big_bytes[500..1500]);
    assert_eq!(body[1..97], big_bytes[501..597]);

    // Truncate: full Content-Length, half the body, then close: the client sees an error.
    s.proxy().clear();
    s.proxy().set_fault(Fault::TruncateBody);
    let err = get(&a, &s.blob_url(&big)).unwrap_err();
    assert!(format!("{err:#}").contains("reading the body"), "{err:#}");
    let recs = s.proxy().blob_requests();
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0].status, 200);
    assert_eq!(recs[0].body_bytes, big_bytes.len() as u64 / 2);
    assert!(recs[0].faulted);

    // Stall, then a normal answer.
    s.proxy()
        .set_fault(Fault::Stall(Duration::from_millis(1200)));
    let t = Instant::now();
    let (status, body) = get(&a, &s.blob_url(&small)).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    assert_eq!((status, body.len()), (200, s.blob(&small).len()));

    // Fails twice, then succeeds; requests for other digests do not count.
    s.proxy()
        .set_fault_for(Some(big.clone()), Fault::times(2, Fault::Status(500)));
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(get(&a, &s.blob_url(&big)).unwrap().0);
        assert_eq!(get(&a, &s.blob_url(&small)).unwrap().0, 200);
    }
    for _ in 0..2 {
        statuses.push(get(&a, &s.blob_url(&big)).unwrap().0);
    }
    assert_eq!(statuses, [500, 500, 200, 200]);

    // Down: the connection closes without an answer.
    s.proxy().clear();
    s.proxy().set_fault(Fault::Down);
    assert!(get(&a, &s.blob_url(&big)).is_err());
    let recs = s.proxy().records();
    assert!(!recs.is_empty());
    assert!(recs.iter().all(|r| r.status == 0 && r.faulted), "{recs:#?}");
    assert_eq!(fetch(&a, "GET", &manifest_url, &accept).unwrap().0, 200);

    // The whole proxy down, then up again.
    s.proxy().clear_fault();
    s.proxy().set_down(true);
    assert!(get(&a, &format!("{}/v2/", s.proxy().url())).is_err());
    assert!(get(&agent(), &format!("{}/v2/", s.proxy().url())).is_err());
    s.proxy().set_down(false);
    assert_eq!(get(&a, &s.blob_url(&big)).unwrap(), (200, big_bytes));
}

/// Names of this process's threads belonging to the proxy on `port`.
fn proxy_threads(port: &str) -> Vec<String> {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("proxy-") && n.ends_with(&format!("-{port}")))
        .collect()
}

#[test]
fn passes_auth_through_and_stops_on_drop() {
    let reg = Registry::start_with_basic_auth("alice", "s3cret").unwrap();
    let proxy = Proxy::start(&reg.addr()).unwrap();
    let a = agent();
    let url = format!("{}/v2/", proxy.url());
    match a.get(&url).call() {
        Err(ureq::Error::Status(401, r)) => {
            assert!(r
                .header("WWW-Authenticate")
                .is_some_and(|v| v.contains("Basic")));
        }
        other => panic!("expected 401, got {other:?}"),
    }
    // "alice:s3cret"
    let (status, _) = fetch(
        &a,
        "GET",
        &url,
        &[("Authorization", "Basic YWxpY2U6czNjcmV0")],
    )
    .unwrap();
    assert_eq!(status, 200);

    // An idle keep-alive connection and a request stalled for a minute do not hold Drop up.
    let addr = proxy.addr();
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // Its answer is on the way before the proxy goes (under load the upstream round trip can
    // take longer than the steps below).
    assert!(beam_tests::util::wait_for(
        || proxy
            .records()
            .iter()
            .filter(|r| r.path == "/v2/" && r.status == 401)
            .count()
            >= 2,
        Duration::from_secs(10)
    ));
    proxy.set_fault(Fault::Stall(Duration::from_secs(60)));
    let stalled_url = format!("{}/v2/r/blobs/sha256:{}", proxy.url(), "1".repeat(64));
    let stalled = std::thread::spawn(move || get(&agent(), &stalled_url));
    assert!(beam_tests::util::wait_for(
        || proxy.records().iter().any(|r| r.faulted),
        Duration::from_secs(5)
    ));
    let port = addr.rsplit(':').next().unwrap().to_string();
    let threads = proxy_threads(&port);
    assert!(threads.contains(&format!("proxy-a-{port}")), "{threads:?}");
    assert!(threads.contains(&format!("proxy-c-{port}")), "{threads:?}");
    let t = Instant::now();
    drop(proxy);
    assert_eq!(proxy_threads(&port), Vec::<String>::new());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(stalled.join().unwrap().is_err());
    assert!(TcpStream::connect(&addr).is_err());
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let _ = idle.read_to_end(&mut rest);
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 401"));
}
