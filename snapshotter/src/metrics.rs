//! Prometheus metrics of beam-snapshotter, served as OpenMetrics text on `GET /metrics`.
//!
//! The daemon's counters live where the work happens (the fetcher, the cache, the snapshot
//! service) as atomics; a scrape reads them into a fresh registry, so there is one source of
//! truth and no second set of counters to keep in step.
//!
//! HTTP is hyper's (HTTP/1.1 with keep-alive and a header read timeout) rather than a parser
//! of our own, so a scraper's request is read whole, however it arrives in packets.

use crate::fetch::Fetcher;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Counters of the snapshot service itself.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    /// Layers mounted lazily on Prepare.
    pub lazy_mounts: AtomicU64,
    /// Prepares that asked for a lazy layer and fell back to an ordinary snapshot.
    pub fallbacks: AtomicU64,
    /// Of the fallbacks, those whose Prepare had no image labels at all (containerd is not
    /// passing the remote-snapshot annotations).
    pub unlabelled: AtomicU64,
    /// The reason of the last fallback, for `beam status` and `beam doctor`.
    pub last_fallback: std::sync::Mutex<String>,
    /// What to change so the last fallback does not recur (empty: not a setting).
    pub last_fallback_fix: std::sync::Mutex<String>,
    /// Requests answered with an error.
    pub errors: AtomicU64,
}

/// What a scrape reads.
pub struct Sources {
    pub fetcher: Option<Arc<Fetcher>>,
    pub service: Arc<ServiceCounters>,
    /// Lazy layers currently mounted.
    pub mounted_layers: Box<dyn Fn() -> u64 + Send + Sync>,
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// The metrics text for one scrape.
pub fn render(s: &Sources) -> String {
    let mut reg = Registry::with_prefix("beam");
    if let Some(f) = &s.fetcher {
        let c = &f.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut reg,
            "fetch_requests",
            "Range requests sent to registries",
            get(&c.requests),
        );
        counter(
            &mut reg,
            "fetch_bytes",
            "Bytes received from registries",
            get(&c.bytes),
        );
        counter(
            &mut reg,
            "fetch_chunks",
            "Chunks fetched, verified and cached",
            get(&c.chunks),
        );
        counter(
            &mut reg,
            "fetch_retries",
            "Range requests retried",
            get(&c.retries),
        );
        counter(
            &mut reg,
            "fetch_corrupt",
            "Fetched chunks discarded for a wrong digest",
            get(&c.corrupt),
        );
        counter(
            &mut reg,
            "fetch_failures",
            "Fetches given up after the deadline",
            get(&c.failures),
        );
        reg.register(
            "fetch_latency_seconds",
            "Latency of successful Range requests",
            f.latency.clone(),
        );
        let (hits, misses) = f.cache.hit_miss();
        counter(
            &mut reg,
            "cache_hits",
            "Chunk reads served from the cache",
            hits,
        );
        counter(
            &mut reg,
            "cache_misses",
            "Chunk reads that found no cached chunk",
            misses,
        );
        let used: Gauge = Gauge::default();
        used.set(f.cache.used() as i64);
        reg.register(
            "cache_bytes",
            "Bytes of chunks and assembled files in the cache",
            used,
        );
    }
    let sc = &s.service;
    counter(
        &mut reg,
        "lazy_mounts",
        "Layers mounted lazily",
        sc.lazy_mounts.load(Ordering::Relaxed),
    );
    counter(
        &mut reg,
        "fallbacks",
        "Lazy-layer requests that fell back to an ordinary snapshot",
        sc.fallbacks.load(Ordering::Relaxed),
    );
    counter(
        &mut reg,
        "unlabelled_layer_prepares",
        "Layer requests without the remote-snapshot labels (containerd passes no annotations)",
        sc.unlabelled.load(Ordering::Relaxed),
    );
    counter(
        &mut reg,
        "errors",
        "Snapshot requests answered with an error",
        sc.errors.load(Ordering::Relaxed),
    );
    let mounted: Gauge = Gauge::default();
    mounted.set((s.mounted_layers)() as i64);
    reg.register("mounted_layers", "Lazy layers mounted now", mounted);
    let mut out = String::new();
    let _ = encode(&mut out, &reg);
    out
}

/// The content type of [`render`]'s text: prometheus-client writes OpenMetrics 1.0.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (out of file descriptors, say): retrying at once would spin
/// a core until the condition passes.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serve `GET /metrics` on `listener` until the task is dropped; every other request is 404.
pub async fn serve(listener: tokio::net::TcpListener, sources: Arc<Sources>) {
    serve_http(listener, "metrics", move |req| {
        let response = respond(&req, &sources);
        async move { response }
    })
    .await
}

/// Serve HTTP/1.1 on `listener` until the task is dropped, `handle` answering each request
/// (`what` names the endpoint in logs). Used by the metrics endpoint and `beam autoconvert`.
pub async fn serve_http<H, F>(listener: tokio::net::TcpListener, what: &'static str, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "{what}: accepting a connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = handle(req);
                async move { Ok::<_, std::convert::Infallible>(response.await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "{what}: connection ended with an error");
            }
        });
    }
}

/// The answer to one request: the metrics on `GET /metrics`, 404 otherwise.
fn respond(req: &Request<Incoming>, sources: &Sources) -> Response<Full<Bytes>> {
    let (status, content_type, body) =
        if req.method() == Method::GET && req.uri().path() == "/metrics" {
            (StatusCode::OK, CONTENT_TYPE_OPENMETRICS, render(sources))
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found\n".to_string(),
            )
        };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Arc<Sources> {
        let service = Arc::new(ServiceCounters::default());
        service.lazy_mounts.store(3, Ordering::Relaxed);
        Arc::new(Sources {
            fetcher: None,
            service,
            mounted_layers: Box::new(|| 2),
        })
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics_and_other_paths_are_404() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, sources()));
        // reqwest is built without a default TLS provider (see remote.rs), even for plain HTTP.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();

        let r = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let text = r.text().await.unwrap();
        assert!(text.contains("beam_lazy_mounts_total 3"), "{text}");
        assert!(text.contains("beam_mounted_layers 2"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");

        for path in ["/", "/metricsx", "/other"] {
            let r = client
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 404, "{path}");
        }
        let r = client
            .post(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
        server.abort();
    }
}
