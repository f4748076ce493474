//! The running service: the HTTP endpoint, the conversion workers and the catch-up scan.
//!
//! `POST /events` answers 200 only after the pushes it carries are committed to the queue: a
//! registry that got 200 can forget the event. Everything else is refused without touching
//! the queue: a missing or wrong bearer token (401), a body that is not an event (400, and a
//! log line), a body over 1 MiB (413). `GET /status` (token required when one is set) is what
//! `beam autoconvert status` prints; `GET /metrics` is OpenMetrics; `GET /healthz` is 200.

use super::events;
use super::queue::{Job, Outcome, Queue, State};
use super::{Attempt, Converter, Settings};
use crate::oci::{self, ImageManifest};
use crate::store::Store;
use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest event body read (Distribution batches events; Harbor sends one artifact).
const MAX_BODY: usize = 1 << 20;
/// A worker with nothing due looks again after this long (a retry may have come due).
const IDLE_POLL: Duration = Duration::from_millis(500);

/// Counters since the service started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Tagged pushes received and queued.
    pub events: AtomicU64,
    /// Requests refused: no or a wrong token, a bad body.
    pub refused: AtomicU64,
    pub converted: AtomicU64,
    pub already: AtomicU64,
    pub skipped: AtomicU64,
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    /// Tags the catch-up scans queued.
    pub scan_queued: AtomicU64,
    pub scans: AtomicU64,
    /// Milliseconds spent converting, and the tar bytes converted in them.
    pub convert_ms: AtomicU64,
    pub convert_bytes: AtomicU64,
}

impl Counters {
    /// Every counter: its key in `GET /status`, its metric name, the metric's help, its value.
    fn table(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "events",
                "events",
                "Tagged pushes received and queued",
                get(&self.events),
            ),
            (
                "refused_requests",
                "refused_requests",
                "Event requests refused (token or body)",
                get(&self.refused),
            ),
            (
                "converted",
                "conversions",
                "Images converted and bound",
                get(&self.converted),
            ),
            (
                "already_converted",
                "already_converted",
                "Jobs whose tag already named a bound image",
                get(&self.already),
            ),
            (
                "skipped",
                "skipped",
                "Jobs not converted on purpose (artifacts, rules)",
                get(&self.skipped),
            ),
            (
                "failed",
                "failures",
                "Images that could not be converted",
                get(&self.failed),
            ),
            (
                "retries",
                "retries",
                "Attempts retried after a registry error",
                get(&self.retries),
            ),
            (
                "scans",
                "scans",
                "Catch-up scans of the registry",
                get(&self.scans),
            ),
            (
                "scan_queued",
                "scan_queued",
                "Tags the catch-up scans queued",
                get(&self.scan_queued),
            ),
            (
                "converted_bytes",
                "converted_bytes",
                "Uncompressed layer bytes converted",
                get(&self.convert_bytes),
            ),
        ]
    }
}

/// The shared state of one running service.
pub struct Service {
    pub converter: Converter,
    pub queue: Queue,
    pub counters: Counters,
    /// Jobs being converted now (keys).
    busy: Mutex<HashSet<String>>,
    wake: tokio::sync::Notify,
    /// The last scan's error, if it failed.
    last_scan_error: Mutex<String>,
}

/// What `GET /status` answers.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Status {
    pub registry: String,
    pub queue_depth: u64,
    pub queued: Vec<Job>,
    pub converting: Vec<String>,
    pub results: Vec<Outcome>,
    pub counters: std::collections::BTreeMap<String, u64>,
    pub last_scan_error: String,
}

impl Service {
    pub fn open(settings: Settings) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&settings.state_dir)
            .with_context(|| format!("creating the state dir {}", settings.state_dir.display()))?;
        // The queue holds repository names and results, no secrets: 0700 where we may set it
        // (a volume mounted for a non-root pod belongs to root and its group).
        if let Err(e) = crate::config::private_dir(&settings.state_dir) {
            tracing::warn!(dir = %settings.state_dir.display(), error = %e, "autoconvert: could not make the state dir 0700");
        }
        let queue = Queue::open(&settings.state_dir.join("queue.redb"))?;
        Ok(Arc::new(Service {
            converter: Converter::new(settings)?,
            queue,
            counters: Counters::default(),
            busy: Mutex::new(HashSet::new()),
            wake: tokio::sync::Notify::new(),
            last_scan_error: Mutex::new(String::new()),
        }))
    }

    fn settings(&self) -> &Settings {
        &self.converter.settings
    }

    /// Serve on `listener`, convert with the configured workers, and scan; runs until dropped.
    pub async fn run(self: Arc<Self>, listener: tokio::net::TcpListener) {
        for _ in 0..self.settings().workers.max(1) {
            tokio::spawn(self.clone().worker());
        }
        tokio::spawn(self.clone().scanner());
        crate::metrics::serve_http(listener, "autoconvert", move |req| {
            let me = self.clone();
            async move { me.respond(req).await }
        })
        .await
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.settings().token else {
            return true;
        };
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(given.trim().as_bytes(), token.as_bytes())
    }

    async fn respond(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::POST, "/events") => {
                if !self.authorized(&req) {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("autoconvert: refused an event without a valid bearer token");
                    return text(
                        StatusCode::UNAUTHORIZED,
                        "a valid bearer token is required\n",
                    );
                }
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "autoconvert: event body not read");
                        return text(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            &format!(
                                "the body could not be read (at most {MAX_BODY} bytes): {e}\n"
                            ),
                        );
                    }
                };
                self.receive(&body)
            }
            (Method::GET, "/status") => {
                if !self.authorized(&req) {
                    return text(
                        StatusCode::UNAUTHORIZED,
                        "a valid bearer token is required\n",
                    );
                }
                match self.status() {
                    Ok(s) => {
                        let mut r = text(
                            StatusCode::OK,
                            &serde_json::to_string_pretty(&s).unwrap_or_default(),
                        );
                        r.headers_mut()
                            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                        r
                    }
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}\n")),
                }
            }
            (Method::GET, "/metrics") => {
                let mut r = text(StatusCode::OK, &self.metrics());
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(crate::metrics::CONTENT_TYPE_OPENMETRICS),
                );
                r
            }
            (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Queue the pushes of one event body; 200 only once they are durable.
    fn receive(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let parsed = match events::parse(body) {
            Ok(p) => p,
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "autoconvert: refused a malformed event body");
                return text(StatusCode::BAD_REQUEST, &format!("{e}\n"));
            }
        };
        let mut items = Vec::new();
        for p in parsed.pushes {
            if self.is_own_output(&p.repository, &p.tag, p.digest.as_deref()) {
                continue;
            }
            if let Some(why) = self.settings().rules.refuses(&p.repository, &p.tag) {
                tracing::debug!(repository = %p.repository, tag = %p.tag, %why, "autoconvert: push not converted");
                continue;
            }
            items.push((p.repository, p.tag, p.digest));
        }
        if let Err(e) = self.queue.push(&items) {
            tracing::error!(error = %e, "autoconvert: queueing failed; the registry will resend");
            return text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n"));
        }
        self.counters
            .events
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        if !items.is_empty() {
            tracing::info!(
                format = parsed.format,
                queued = items.len(),
                ignored = parsed.ignored,
                "autoconvert: event received"
            );
            self.wake.notify_waiters();
        }
        text(
            StatusCode::OK,
            &format!("queued {}, ignored {}\n", items.len(), parsed.ignored),
        )
    }

    /// The queue, what is being converted, and the last results.
    pub fn status(&self) -> Result<Status> {
        let counters = self
            .counters
            .table()
            .into_iter()
            .map(|(key, _, _, v)| (key.to_string(), v))
            .collect();
        let mut converting: Vec<String> = self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        converting.sort();
        let queued = self.queue.pending()?;
        Ok(Status {
            registry: self.settings().registry.clone(),
            queue_depth: queued.len() as u64,
            queued,
            converting,
            results: self.queue.results(100)?,
            counters,
            last_scan_error: self
                .last_scan_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        })
    }

    fn metrics(&self) -> String {
        let mut reg = prometheus_client::registry::Registry::with_prefix("beam_autoconvert");
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (_, name, help, v) in c.table() {
            let x: Counter = Counter::default();
            x.inc_by(v);
            reg.register(name, help, x);
        }
        let ms = get(&c.convert_ms);
        let bytes = get(&c.convert_bytes);
        let secs: Counter<f64, std::sync::atomic::AtomicU64> = Counter::default();
        secs.inc_by(ms as f64 / 1000.0);
        reg.register("convert_seconds", "Seconds spent converting", secs);
        let per_mb: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        if bytes > 0 {
            per_mb.set(ms as f64 / 1000.0 / (bytes as f64 / 1e6));
        }
        reg.register(
            "seconds_per_mb",
            "Seconds per MB of uncompressed layers, over all conversions",
            per_mb,
        );
        let depth: Gauge = Gauge::default();
        depth.set(self.queue.depth().unwrap_or(0) as i64);
        reg.register("queue_depth", "Tags queued for conversion", depth);
        let mut out = String::new();
        let _ = encode(&mut out, &reg);
        out
    }

    /// Take the oldest due job nobody converts, mark it busy.
    fn take(&self) -> Option<Job> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        match self.queue.next_due(&busy) {
            Ok(Some(job)) => {
                busy.insert(job.key());
                Some(job)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "autoconvert: reading the queue failed");
                None
            }
        }
    }

    async fn worker(self: Arc<Self>) {
        loop {
            let Some(job) = self.take() else {
                let _ = tokio::time::timeout(IDLE_POLL, self.wake.notified()).await;
                continue;
            };
            let key = job.key();
            let recorded = if self.is_own_output(&job.repository, &job.tag, job.digest.as_deref()) {
                // The event of our own push of the bound manifest (it may arrive before the
                // conversion that pushed it recorded its result, so it is checked here too).
                tracing::debug!(job = %key, "autoconvert: our own bound manifest, ignored");
                self.queue.finish(&job, None)
            } else {
                tracing::info!(job = %key, attempt = job.attempts + 1, "autoconvert: converting");
                self.record(&job, self.converter.run(&job).await)
            };
            if let Err(e) = recorded {
                // The job stays queued and is converted again (idempotent).
                tracing::error!(job = %key, error = %e, "autoconvert: recording the result failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            self.busy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
    }

    /// Whether `digest`, pushed to `repository:tag`, is the bound manifest our last conversion
    /// of that tag pushed.
    fn is_own_output(&self, repository: &str, tag: &str, digest: Option<&str>) -> bool {
        let Some(d) = digest else {
            return false;
        };
        matches!(
            self.queue.result(repository, tag),
            Ok(Some(last)) if last.bound.as_deref() == Some(d)
        )
    }

    fn record(&self, job: &Job, attempt: Attempt) -> Result<(), super::queue::QueueError> {
        let key = job.key();
        {
            let recorded = match attempt {
                Attempt::Again(outcome) => {
                    self.count(&outcome);
                    tracing::info!(job = %key, detail = %outcome.detail, "autoconvert: converting the tag again");
                    self.queue.finish(job, Some(&outcome)).and_then(|()| {
                        self.queue
                            .push(&[(job.repository.clone(), job.tag.clone(), None)])
                            .map(|_| ())
                    })
                }
                Attempt::Done(outcome) => {
                    self.count(&outcome);
                    tracing::info!(job = %key, state = ?outcome.state, detail = %outcome.detail, seconds = outcome.seconds, "autoconvert: done");
                    self.queue.finish(job, Some(&outcome))
                }
                Attempt::Retry(error) => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    let delay = super::backoff(job.attempts);
                    tracing::warn!(job = %key, %error, retry_in = ?delay, "autoconvert: registry error, will retry");
                    self.queue
                        .retry_later(job, delay.as_millis() as u64, &error)
                }
            };
            recorded
        }
    }

    fn count(&self, o: &Outcome) {
        let c = &self.counters;
        match o.state {
            State::Converted => {
                c.converted.fetch_add(1, Ordering::Relaxed);
                c.convert_ms
                    .fetch_add((o.seconds * 1000.0) as u64, Ordering::Relaxed);
                c.convert_bytes.fetch_add(o.bytes, Ordering::Relaxed);
            }
            State::AlreadyConverted => {
                c.already.fetch_add(1, Ordering::Relaxed);
            }
            State::Skipped => {
                c.skipped.fetch_add(1, Ordering::Relaxed);
            }
            State::Failed => {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn scanner(self: Arc<Self>) {
        loop {
            self.counters.scans.fetch_add(1, Ordering::Relaxed);
            let error = match self.scan().await {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(queued = n, "autoconvert: catch-up scan queued tags");
                        self.wake.notify_waiters();
                    }
                    String::new()
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "autoconvert: catch-up scan failed");
                    format!("{e:#}")
                }
            };
            *self
                .last_scan_error
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = error;
            let interval = self.settings().scan_interval;
            if interval.is_zero() {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Walk the registry (the configured repositories, or its catalog) and queue every tag
    /// that names an image without a bound Beam artifact, unless its last result for that
    /// same digest says there is nothing to do (skipped or failed: a failed image is tried
    /// again when it is pushed again, not on every scan).
    pub async fn scan(&self) -> Result<usize> {
        let settings = self.settings();
        let repositories = if settings.repositories.is_empty() {
            self.converter
                .registry()
                .catalog(&settings.registry)
                .await?
        } else {
            settings.repositories.clone()
        };
        // In an order of our own: replicas scanning one registry at once then mostly convert
        // different images, and each finds the others' work done (bound) when it gets there.
        let mut repositories = repositories;
        fastrand::shuffle(&mut repositories);
        let queued: HashSet<String> = self.queue.pending()?.iter().map(|j| j.key()).collect();
        let mut queued_now = 0;
        for repo in repositories {
            let store = self.converter.store(&repo, "latest")?;
            let Store::Registry {
                reference,
                registry,
                ..
            } = &store
            else {
                continue;
            };
            let tags = match registry.tags(reference).await {
                Ok(mut t) => {
                    fastrand::shuffle(&mut t);
                    t
                }
                Err(e) => {
                    tracing::warn!(repository = %repo, error = %format!("{e:#}"), "autoconvert: listing tags failed");
                    continue;
                }
            };
            let mut items = Vec::new();
            for tag in tags {
                if queued.contains(&format!("{repo}:{tag}"))
                    || settings.rules.refuses(&repo, &tag).is_some()
                {
                    continue;
                }
                match self.needs_conversion(&repo, &tag).await {
                    Ok(Some(digest)) => items.push((repo.clone(), tag, Some(digest))),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(repository = %repo, %tag, error = %format!("{e:#}"), "autoconvert: reading a tag failed")
                    }
                }
            }
            queued_now += items.len();
            self.queue.push(&items)?;
        }
        self.counters
            .scan_queued
            .fetch_add(queued_now as u64, Ordering::Relaxed);
        Ok(queued_now)
    }

    /// The digest `repo:tag` names when it is an image that needs converting.
    async fn needs_conversion(&self, repo: &str, tag: &str) -> Result<Option<String>> {
        let store = self.converter.store(repo, tag)?;
        let (top, bytes) = store.resolve_top().await?;
        if let Some(last) = self.queue.result(repo, tag)? {
            let settled = matches!(last.state, State::Failed | State::Skipped)
                && last.source.as_deref() == Some(top.digest.as_str());
            let bound = last.bound.as_deref() == Some(top.digest.as_str());
            if settled || bound {
                return Ok(None);
            }
        }
        if super::not_an_image(&top.media_type, &bytes).is_some() {
            return Ok(None);
        }
        if is_bound(&store, &top.media_type, &bytes).await? {
            return Ok(None);
        }
        Ok(Some(top.digest))
    }
}

/// Whether the manifest (or every platform manifest of the index) binds a Beam artifact.
async fn is_bound(store: &Store, media_type: &str, bytes: &[u8]) -> Result<bool> {
    let mt = crate::registry::media_type_of(bytes).unwrap_or_else(|_| media_type.into());
    if mt == oci::MEDIA_TYPE_OCI_INDEX || mt == oci::MEDIA_TYPE_DOCKER_LIST {
        return Ok(store
            .image_manifests()
            .await?
            .iter()
            .all(|m| oci::bound_artifact(&m.manifest).is_some()));
    }
    let m: ImageManifest = serde_json::from_slice(bytes)?;
    Ok(oci::bound_artifact(&m).is_some())
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Compare a presented token with ours in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    fn settings(dir: &std::path::Path, token: Option<&str>) -> Settings {
        Settings {
            registry: "127.0.0.1:1".into(),
            registry_options: crate::registry::RegistryOptions {
                plain_http: true,
                ..Default::default()
            },
            token: token.map(String::from),
            state_dir: dir.to_path_buf(),
            rules: Default::default(),
            repositories: vec!["none".into()],
            scan_interval: Duration::ZERO,
            workers: 1,
            max_attempts: 2,
            convert: Default::default(),
        }
    }

    /// The endpoint's refusals change nothing, and an accepted event is queued before the
    /// answer (no worker runs here, so the job stays queued).
    #[tokio::test]
    async fn events_endpoint_refuses_and_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let svc = Service::open(settings(dir.path(), Some("s3cret"))).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = svc.clone();
        let server = tokio::spawn(crate::metrics::serve_http(listener, "test", move |req| {
            let me = me.clone();
            async move { me.respond(req).await }
        }));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/events");
        let event = r#"{"events":[{"action":"push","target":{
            "mediaType":"application/vnd.oci.image.manifest.v1+json",
            "digest":"sha256:bb","repository":"apps/web","tag":"v1"}}]}"#;
        let post = |auth: Option<&str>, body: &str| {
            let mut r = client.post(&url).body(body.to_string());
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.send()
        };
        assert_eq!(post(None, event).await.unwrap().status().as_u16(), 401);
        assert_eq!(
            post(Some("Bearer wrong"), event)
                .await
                .unwrap()
                .status()
                .as_u16(),
            401
        );
        assert_eq!(
            post(Some("Bearer s3cret"), "{\"events\": 7}")
                .await
                .unwrap()
                .status()
                .as_u16(),
            400
        );
        let big = "x".repeat(MAX_BODY + 10);
        assert_eq!(
            post(Some("Bearer s3cret"), &big)
                .await
                .unwrap()
                .status()
                .as_u16(),
            413
        );
        assert_eq!(svc.queue.depth().unwrap(), 0, "refusals changed the queue");
        assert_eq!(
            post(Some("Bearer s3cret"), event)
                .await
                .unwrap()
                .status()
                .as_u16(),
            200
        );
        let queued = svc.queue.pending().unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].key(), "apps/web:v1");
        // Status needs the token too.
        let st = client
            .get(format!("http://{addr}/status"))
            .send()
            .await
            .unwrap();
        assert_eq!(st.status().as_u16(), 401);
        let st = client
            .get(format!("http://{addr}/status"))
            .header("Authorization", "Bearer s3cret")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let st: Status = serde_json::from_str(&st).unwrap();
        assert_eq!(st.queue_depth, 1);
        assert_eq!(st.counters["refused_requests"], 4);
        let m = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(m.contains("beam_autoconvert_queue_depth 1"), "{m}");
        server.abort();
    }
}
