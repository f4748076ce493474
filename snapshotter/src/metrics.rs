//! Prometheus metrics of beam-snapshotter, served as text on `GET /metrics`.
//!
//! The daemon's counters live where the work happens (the fetcher, the cache, the snapshot
//! service) as atomics; a scrape reads them into a fresh registry, so there is one source of
//! truth and no second set of counters to keep in step.

use crate::fetch::Fetcher;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Serve `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, sources: Arc<Sources>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", render(&sources))
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}
