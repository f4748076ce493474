//! Every read from a registry (manifests, referrers, blobs whole or by Range, tag and catalog
//! lists, tokens) goes through Beam's own HTTP client, so that no body is read without a bound.
//!
//! Why not oci-client, which still pushes and answers HEAD: it reads manifest, referrers,
//! token and error bodies whole into memory before its caller sees them, so a hostile
//! registry could grow the daemon without limit with one endless body (issue 16), and it
//! hides the headers a caller needs to back off (`Retry-After`, issue 15). Here each body has
//! a byte limit, checked against `Content-Length` and again as the body arrives; a failed
//! request is a typed [`StatusError`] (status, the registry's error codes, `Retry-After`), so
//! callers decide from types whether to retry, never from text.
//!
//! Auth is the distribution token protocol. A request goes out with the authorization cached
//! for its registry and scope (or none). A 401 with a `Bearer` challenge fetches a token from
//! the challenge's realm, with the node's credentials for that registry if it has any; a
//! `Basic` challenge is answered with those credentials. The request is then sent once more.
//! A second 401 reads the credentials again (they may have been rotated) and tries a last
//! time. Credentials go to the registry and its token realm only: reqwest drops the
//! `Authorization` header on a redirect to another host (a blob store).

use super::{Failure, Registry};
use anyhow::{Context, Result};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest error body read (for its error codes); the rest is not read.
pub const MAX_ERROR_BODY: usize = 64 << 10;
/// Largest token answer read.
pub const MAX_TOKEN_BODY: usize = 1 << 20;
/// Largest page of a tag or repository list read.
pub const MAX_LIST_BODY: usize = 16 << 20;
/// How many times a read of a manifest, list or whole blob is tried, while its answers are
/// worth another try (5xx, 429, a dropped connection), before its error stands. Range reads
/// are retried by the fetcher instead, up to its deadline.
const READ_TRIES: u32 = 3;
/// The longest `Retry-After` a read waits for; a registry asking for longer gets its error
/// returned at once.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How long a token whose answer names no lifetime is used (the token spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A registry answered a read with a status other than the one asked for.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{url}: HTTP {status}{}", detail(.codes, .message))]
pub struct StatusError {
    /// The URL asked (never with credentials: they go in headers).
    pub url: String,
    pub status: u16,
    /// The registry's error codes from the spec's error envelope (`MANIFEST_UNKNOWN`, ...).
    pub codes: Vec<String>,
    /// The first error's message, or the start of a body that is not an envelope.
    pub message: String,
    /// The registry's `Retry-After`, in seconds form (an HTTP date is not honoured).
    pub retry_after: Option<Duration>,
}

fn detail(codes: &[String], message: &str) -> String {
    match (codes.is_empty(), message.is_empty()) {
        (true, true) => String::new(),
        (true, false) => format!(": {message}"),
        (false, _) => format!(" {}: {message}", codes.join(",")),
    }
}

/// A body that could not be read whole within its limit.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{url}: the body is over the {max}-byte limit")]
    TooLong { url: String, max: usize },
    #[error("{url}: reading the body")]
    Read {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// The HTTP clients and token cache of one [`Registry`].
pub(super) struct HttpReads {
    /// The client of every host without CAs of its own, over TLS: made on first use, because
    /// making one loads the system's CA roots, about 30 ms from a cold disk, on the path of
    /// every `beam pull` (a plain-HTTP registry never needs them).
    client: std::sync::OnceLock<Result<reqwest::Client, String>>,
    /// The global CAs (PEM) that client trusts beside the system's.
    roots: Vec<Vec<u8>>,
    /// The client of plain-HTTP URLs: no CA roots, and it stops at a redirect to HTTPS (a
    /// blob store), which the request then takes through the TLS client.
    plain: reqwest::Client,
    /// The clients of hosts with CAs of their own.
    host_clients: std::collections::BTreeMap<String, reqwest::Client>,
    plain_http: bool,
    plain_http_hosts: Vec<String>,
    /// `Authorization` values per (registry, scope), until they expire.
    authorizations: Mutex<HashMap<(String, String), (HeaderValue, Instant)>>,
}

impl HttpReads {
    /// Clients with the same TLS and timeout settings as the registry's oci-client ones.
    /// `roots` are the PEM contents of the CAs every host trusts; `host_roots` those of one
    /// host each (added to the global ones).
    pub(super) fn new(
        plain_http: bool,
        plain_http_hosts: Vec<String>,
        roots: &[Vec<u8>],
        host_roots: &[(String, Vec<Vec<u8>>)],
    ) -> Result<HttpReads> {
        let mut host_clients = std::collections::BTreeMap::new();
        for (host, pems) in host_roots {
            host_clients.insert(host.clone(), tls_client(&mut roots.iter().chain(pems))?);
        }
        // Checked now, so that a bad CA file is an error here, not at the first HTTPS read.
        certificates(&mut roots.iter())?;
        let plain = client_builder()
            .tls_certs_only([])
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.url().scheme() != "http" {
                    attempt.stop()
                } else if attempt.previous().len() >= 10 {
                    attempt.error("too many redirects")
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .context("building the registry HTTP client")?;
        Ok(HttpReads {
            client: std::sync::OnceLock::new(),
            roots: roots.to_vec(),
            plain,
            host_clients,
            plain_http,
            plain_http_hosts,
            authorizations: Mutex::new(HashMap::new()),
        })
    }

    /// The client of `r`'s registry over TLS (or of any URL, when its host has no CAs of its
    /// own).
    fn client(&self, r: &Reference) -> Result<&reqwest::Client> {
        match self
            .host_clients
            .get(r.registry())
            .or_else(|| self.host_clients.get(r.resolve_registry()))
        {
            Some(c) => Ok(c),
            None => self.tls(),
        }
    }

    /// The TLS client of hosts without CAs of their own, made on first use.
    fn tls(&self) -> Result<&reqwest::Client> {
        self.client
            .get_or_init(|| tls_client(&mut self.roots.iter()).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The client of a request to `url` of `r`'s registry.
    fn client_for_url(&self, r: &Reference, url: &str) -> Result<&reqwest::Client> {
        if url.starts_with("http://") {
            Ok(&self.plain)
        } else {
            self.client(r)
        }
    }

    /// `scheme://registry/v2/` for `r`'s registry.
    fn base(&self, r: &Reference) -> String {
        let registry = r.resolve_registry();
        let plain = self.plain_http || self.plain_http_hosts.iter().any(|h| h == registry);
        format!("{}://{registry}/v2/", if plain { "http" } else { "https" })
    }

    fn cached(&self, key: &(String, String)) -> Option<HeaderValue> {
        let map = self
            .authorizations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(v, _)| v.clone())
    }

    fn remember(&self, key: (String, String), value: HeaderValue, lifetime: Duration) {
        // Renew a little before the registry would refuse it.
        let until = Instant::now() + lifetime.saturating_sub(lifetime / 10);
        self.authorizations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (value, until));
    }
}

/// The settings every registry client shares.
fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("beam/", env!("CARGO_PKG_VERSION")))
}

/// The certificates of PEM bundles.
fn certificates(pems: &mut dyn Iterator<Item = &Vec<u8>>) -> Result<Vec<reqwest::Certificate>> {
    let mut certs = Vec::new();
    for pem in pems {
        certs.extend(
            reqwest::Certificate::from_pem_bundle(pem).context("reading a CA certificate (PEM)")?,
        );
    }
    Ok(certs)
}

/// A client over TLS trusting the system's CAs and those of `pems`.
fn tls_client(pems: &mut dyn Iterator<Item = &Vec<u8>>) -> Result<reqwest::Client> {
    client_builder()
        .tls_certs_merge(certificates(pems)?)
        .build()
        .context("building the registry HTTP client")
}

/// The URL of `r`'s manifest (by digest when it has one, else by tag).
pub(super) fn manifest_path(r: &Reference) -> String {
    let reference = r.digest().or(r.tag()).unwrap_or("latest");
    format!("{}/manifests/{reference}", r.repository())
}

/// The URL of blob `digest` of `r`'s repository.
pub(super) fn blob_path(r: &Reference, digest: &str) -> String {
    format!("{}/blobs/{digest}", r.repository())
}

/// The token scope a pull of `r`'s repository needs.
pub(super) fn pull_scope(r: &Reference) -> String {
    format!("repository:{}:pull", r.repository())
}

impl Registry {
    /// Send a read to `r`'s registry at `path` (below `/v2/`), with the authorization the
    /// module doc describes. Returns the answer whatever its status; only a request that got
    /// no answer, or an auth exchange that failed, is an error.
    pub(super) async fn send_read(
        &self,
        r: &Reference,
        method: Method,
        path: &str,
        scope: &str,
        add: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response> {
        let reads = &self.reads;
        let url = format!("{}{path}", reads.base(r));
        let registry = r.resolve_registry();
        let key = (registry.to_string(), scope.to_string());
        let client = reads.client_for_url(r, &url)?;
        let mut denials = 0;
        loop {
            let send = |client: &reqwest::Client| {
                let mut req = add(client.request(method.clone(), &url));
                if let Some(a) = reads.cached(&key) {
                    req = req.header(AUTHORIZATION, a);
                }
                req.send()
            };
            let mut resp = send(client)
                .await
                .with_context(|| format!("{method} {url}"))?;
            if resp.status().is_redirection() && std::ptr::eq(client, &reads.plain) {
                // A plain-HTTP registry sending the read to an HTTPS store: the TLS client
                // asks again and follows it.
                resp = send(reads.client(r)?)
                    .await
                    .with_context(|| format!("{method} {url}"))?;
            }
            if resp.status() != StatusCode::UNAUTHORIZED || denials == 2 {
                return Ok(resp);
            }
            denials += 1;
            let Some(challenge) = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
            else {
                return Ok(resp);
            };
            let credentials = if denials == 1 {
                self.auth(registry)
            } else {
                self.reread_auth(registry)
            };
            let realm_client = match Challenge::parse(&challenge) {
                Some(Challenge::Bearer { realm, .. }) => reads.client_for_url(r, &realm)?,
                _ => client,
            };
            match authorize(realm_client, &challenge, scope, &credentials).await? {
                Some((value, lifetime)) => reads.remember(key.clone(), value, lifetime),
                None => return Ok(resp),
            }
        }
    }

    /// GET `path` expecting 200, and its body, at most `max` bytes; tried again while the
    /// answer is worth it (see [`retry_wait`]).
    pub(super) async fn get_bounded(
        &self,
        r: &Reference,
        path: &str,
        scope: &str,
        accept: &[&str],
        max: usize,
    ) -> Result<Bytes> {
        let accept = accept.join(", ");
        let once = || async {
            let resp = self
                .send_read(r, Method::GET, path, scope, |b| {
                    if accept.is_empty() {
                        b
                    } else {
                        b.header(reqwest::header::ACCEPT, accept.as_str())
                    }
                })
                .await?;
            let resp = expect_status(resp, &[StatusCode::OK]).await?;
            anyhow::Ok(read_body(resp, max).await?)
        };
        let mut tried = 0;
        loop {
            tried += 1;
            match once().await {
                Ok(body) => return Ok(body),
                Err(e) => match retry_wait(&e, tried) {
                    Some(wait) => {
                        tracing::info!(path, "retrying in {wait:?}: {e:#}");
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(e),
                },
            }
        }
    }
}

/// The `Retry-After` of the registry answer in `e`'s chain, if any.
pub fn retry_after(e: &anyhow::Error) -> Option<Duration> {
    e.chain()
        .find_map(|c| c.downcast_ref::<StatusError>())
        .and_then(|s| s.retry_after)
}

/// How long to wait before the next try of a read that failed with `e` after `tried` tries:
/// exponential backoff from 200 ms, at least the registry's `Retry-After`; `None` when
/// another try cannot help (the error's [`Failure`] is final, the tries are used up, or the
/// registry asked for more than [`MAX_RETRY_AFTER`]).
pub fn retry_wait(e: &anyhow::Error, tried: u32) -> Option<Duration> {
    if !Failure::of(e).is_retryable() || tried >= READ_TRIES {
        return None;
    }
    let backoff = Duration::from_millis(200) * 2u32.pow(tried.saturating_sub(1));
    match retry_after(e) {
        Some(asked) if asked > MAX_RETRY_AFTER => None,
        Some(asked) => Some(asked.max(backoff)),
        None => Some(backoff),
    }
}

/// `resp` if its status is one of `ok`, else its [`StatusError`] (the body read up to
/// [`MAX_ERROR_BODY`] for the registry's error codes).
pub async fn expect_status(resp: Response, ok: &[StatusCode]) -> Result<Response, StatusError> {
    if ok.contains(&resp.status()) {
        return Ok(resp);
    }
    Err(status_error(resp).await)
}

/// The error a non-success answer stands for.
pub async fn status_error(resp: Response) -> StatusError {
    let status = resp.status().as_u16();
    let url = resp.url().to_string();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = read_prefix(resp, MAX_ERROR_BODY).await;
    let (codes, message) = error_codes(&body);
    StatusError {
        url,
        status,
        codes,
        message,
        retry_after,
    }
}

/// The codes and first message of the spec's error envelope in `body`; no codes and the
/// start of the body when it is not one.
fn error_codes(body: &[u8]) -> (Vec<String>, String) {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(env) => (
            env.errors.iter().map(|e| e.code.clone()).collect(),
            env.errors
                .first()
                .map(|e| e.message.clone())
                .unwrap_or_default(),
        ),
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            (Vec::new(), text.trim().to_string())
        }
    }
}

/// At most `max` bytes of the body; what is read before an error or the limit.
async fn read_prefix(mut resp: Response, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < max {
        match resp.chunk().await {
            Ok(Some(piece)) => out.extend_from_slice(&piece[..piece.len().min(max - out.len())]),
            _ => break,
        }
    }
    out
}

/// The whole body, refused as soon as it is known to pass `max` bytes (by `Content-Length`,
/// or as it arrives).
pub async fn read_body(mut resp: Response, max: usize) -> Result<Bytes, BodyError> {
    let url = resp.url().to_string();
    let declared = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLong { url, max });
    }
    let mut out = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    loop {
        match resp.chunk().await {
            Ok(Some(piece)) => {
                if out.len() + piece.len() > max {
                    return Err(BodyError::TooLong { url, max });
                }
                out.extend_from_slice(&piece);
            }
            Ok(None) => return Ok(out.freeze()),
            Err(source) => return Err(BodyError::Read { url, source }),
        }
    }
}

/// The `Authorization` value (and how long it lasts) that answers `challenge` for `scope`,
/// or `None` when the challenge is not one Beam can answer with what it has.
async fn authorize(
    client: &reqwest::Client,
    challenge: &str,
    scope: &str,
    credentials: &RegistryAuth,
) -> Result<Option<(HeaderValue, Duration)>> {
    let basic = |u: &str, p: &str| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        HeaderValue::from_str(&format!("Basic {b64}")).ok()
    };
    match Challenge::parse(challenge) {
        Some(Challenge::Bearer { realm, service }) => {
            if let RegistryAuth::Bearer(token) = credentials {
                return Ok(HeaderValue::from_str(&format!("Bearer {token}"))
                    .ok()
                    .map(|v| (v, DEFAULT_TOKEN_LIFETIME)));
            }
            let mut query = vec![("scope", scope.to_string())];
            if let Some(s) = service {
                query.push(("service", s));
            }
            let mut req = client.get(&realm).query(&query);
            if let RegistryAuth::Basic(u, p) = credentials {
                req = req.basic_auth(u, Some(p));
            }
            let resp = req
                .send()
                .await
                .with_context(|| format!("asking {realm} for a token"))?;
            let resp = expect_status(resp, &[StatusCode::OK])
                .await
                .with_context(|| format!("asking {realm} for a token"))?;
            let body = read_body(resp, MAX_TOKEN_BODY).await?;
            let token = Token::parse(&body).with_context(|| format!("the token from {realm}"))?;
            let value = HeaderValue::from_str(&format!("Bearer {}", token.value))
                .context("the token is not a valid header value")?;
            Ok(Some((value, token.lifetime)))
        }
        Some(Challenge::Basic) => Ok(match credentials {
            RegistryAuth::Basic(u, p) => basic(u, p).map(|v| (v, Duration::from_secs(3600))),
            _ => None,
        }),
        None => Ok(None),
    }
}

/// A `WWW-Authenticate` challenge Beam can answer.
#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Basic,
}

impl Challenge {
    /// The first Bearer (with a realm) or Basic challenge of a header.
    fn parse(header: &str) -> Option<Challenge> {
        for c in http_auth::ChallengeParser::new(header).flatten() {
            if c.scheme.eq_ignore_ascii_case("bearer") {
                let param = |name: &str| {
                    c.params
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.to_unescaped())
                };
                if let Some(realm) = param("realm") {
                    return Some(Challenge::Bearer {
                        realm,
                        service: param("service"),
                    });
                }
            } else if c.scheme.eq_ignore_ascii_case("basic") {
                return Some(Challenge::Basic);
            }
        }
        None
    }
}

/// A token endpoint's answer.
struct Token {
    value: String,
    lifetime: Duration,
}

impl Token {
    fn parse(body: &[u8]) -> Result<Token> {
        #[derive(serde::Deserialize)]
        struct Answer {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let a: Answer = serde_json::from_slice(body).context("not a token answer (JSON)")?;
        let value = a
            .token
            .or(a.access_token)
            .filter(|t| !t.is_empty())
            .context("the answer has no token")?;
        Ok(Token {
            value,
            lifetime: a
                .expires_in
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_TOKEN_LIFETIME)
                .max(Duration::from_secs(10)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_of_registries_are_understood() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="beam-test""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse(r#"Bearer service="x""#), None, "no realm");
        assert_eq!(Challenge::parse("Negotiate"), None);
    }

    #[test]
    fn token_answers_of_both_spellings_are_read() {
        let t = Token::parse(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!((t.value.as_str(), t.lifetime.as_secs()), ("abc", 300));
        let t = Token::parse(br#"{"access_token":"def"}"#).unwrap();
        assert_eq!(
            (t.value.as_str(), t.lifetime),
            ("def", DEFAULT_TOKEN_LIFETIME)
        );
        assert!(Token::parse(br#"{"token":""}"#).is_err());
        assert!(Token::parse(b"<html>").is_err());
    }

    #[test]
    fn reads_are_tried_again_only_when_it_can_help_and_not_before_retry_after() {
        let answer = |status: u16, secs: Option<u64>| {
            anyhow::Error::new(StatusError {
                url: "http://r/v2/x/manifests/1".into(),
                status,
                codes: Vec::new(),
                message: String::new(),
                retry_after: secs.map(Duration::from_secs),
            })
        };
        assert_eq!(
            retry_wait(&answer(429, Some(2)), 1),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_wait(&answer(503, None), 2),
            Some(Duration::from_millis(400))
        );
        assert_eq!(
            retry_wait(&answer(500, None), 1),
            Some(Duration::from_millis(200))
        );
        assert_eq!(retry_wait(&answer(429, Some(3600)), 1), None, "too long");
        assert_eq!(retry_wait(&answer(429, Some(1)), READ_TRIES), None);
        assert_eq!(retry_wait(&answer(404, None), 1), None);
        assert_eq!(retry_wait(&answer(401, None), 1), None);
        let too_long = anyhow::Error::new(BodyError::TooLong {
            url: "u".into(),
            max: 1,
        });
        assert_eq!(retry_wait(&too_long, 1), None);
    }

    #[test]
    fn error_envelopes_give_their_codes() {
        let (codes, message) = error_codes(
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        );
        assert_eq!(codes, ["MANIFEST_UNKNOWN"]);
        assert_eq!(message, "manifest unknown");
        let (codes, message) = error_codes(b"404 page not found\n");
        assert!(codes.is_empty());
        assert_eq!(message, "404 page not found");
    }
}
