//! An HTTP/1.1 reverse proxy on 127.0.0.1, placed between Beam and a test registry, that
//! records every request (to count what Beam fetches) and injects faults into blob GETs.
//!
//! Each client connection is served on its own thread with keep-alive; each request is sent
//! upstream on a fresh connection (`Connection: close`) so a stale upstream connection can never
//! fail a request. Responses go back with a `Content-Length` (upstream chunked or EOF-delimited
//! bodies are buffered and re-framed), and `Location` headers naming the upstream are rewritten
//! to the proxy so uploads keep going through it. Dropping the [`Proxy`] closes the listener and
//! every open socket and joins every thread.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, BufWriter, Cursor, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Read and write timeout of every socket (client and upstream).
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request or status line, and longest header line.
const MAX_LINE: u64 = 16 * 1024;
/// Most header lines in one message.
const MAX_HEADERS: usize = 256;
/// Largest upstream body of unknown length (chunked or until EOF) the proxy buffers.
const MAX_BUFFERED_BODY: u64 = 512 << 20;
/// Copy buffer size.
const BUF_SIZE: usize = 64 * 1024;

/// A fault injected into GETs of blobs (`/v2/<name>/blobs/<digest>`). Other requests are
/// always forwarded untouched (except with [`Proxy::set_down`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward normally.
    None,
    /// Answer with this status and a small JSON error body, without contacting the upstream.
    Status(u16),
    /// Forward, but XOR 0xFF into every 97th byte of a 2xx body (offsets 0, 97, 194, ... of
    /// the body sent): same length, different bytes.
    CorruptBody,
    /// Forward the headers of a 2xx answer (with the full `Content-Length`) but only the first
    /// half of the body (rounded down), then close the connection.
    TruncateBody,
    /// Wait this long, then forward normally.
    Stall(Duration),
    /// Close the connection at once without an answer.
    Down,
    /// Forward the headers of a 2xx answer, then its body one byte per this interval
    /// (slowloris), until the client gives up.
    Dribble(Duration),
    /// Forward without the request's `Range` header: the upstream answers 200 with the whole
    /// blob, as a registry that does not support Range requests does.
    IgnoreRange,
    /// Answer with this status and a body that never ends (chunked, fast), without contacting
    /// the upstream, until the client hangs up (or 2 GiB, so a test cannot spin for ever).
    Endless(u16),
    /// Answer with this status, a small JSON error body and `Retry-After: SECS`.
    RetryAfter(u16, u32),
    /// Apply the inner fault to the next `n` matching requests, then forward normally. See
    /// [`Fault::times`].
    FailTimes(u32, Box<Fault>),
}

impl Fault {
    /// `Fault::FailTimes(n, Box::new(inner))`: e.g. `Fault::times(2, Fault::Status(500))`
    /// answers 500, 500, then forwards.
    pub fn times(n: u32, inner: Fault) -> Fault {
        Fault::FailTimes(n, Box::new(inner))
    }

    /// The concrete fault for the next matching request (never `FailTimes`), consuming one
    /// use of any `FailTimes` counter.
    fn take(&mut self) -> Fault {
        match self {
            Fault::FailTimes(n, inner) => {
                if *n == 0 {
                    Fault::None
                } else {
                    *n -= 1;
                    inner.take()
                }
            }
            other => other.clone(),
        }
    }
}

/// One request the proxy served, in the order the requests arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Request path with query, e.g. `/v2/repo/blobs/sha256:...`.
    pub path: String,
    /// The `Range` header `bytes=a-b` as `(a, b)` (inclusive); `bytes=a-` gives
    /// `(a, u64::MAX)`; absent or any other form gives `None`.
    pub range: Option<(u64, u64)>,
    /// Status sent to the client; 0 while the request is in flight, or when the connection
    /// was closed without an answer ([`Fault::Down`], [`Proxy::set_down`]).
    pub status: u16,
    /// Response body bytes sent to the client (updated as they are sent).
    pub body_bytes: u64,
    /// True when an injected fault (any kind but `None`) changed this request.
    pub faulted: bool,
}

impl Record {
    /// The digest of a blob request (`/v2/<name>/blobs/<digest>`), else `None`.
    pub fn digest(&self) -> Option<&str> {
        blob_digest(&self.path)
    }

    /// True for a GET of a blob.
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.digest().is_some()
    }
}

/// The digest in `/v2/<name>/blobs/<digest>[?query]` (not `/blobs/uploads/...`).
fn blob_digest(path: &str) -> Option<&str> {
    let path = path.split('?').next().unwrap_or(path);
    let rest = path.strip_prefix("/v2/")?;
    let (name, digest) = rest.rsplit_once("/blobs/")?;
    if name.is_empty() || digest.is_empty() || digest.contains('/') || !digest.contains(':') {
        return None;
    }
    Some(digest)
}

/// Parses `bytes=a-b` (and `bytes=a-`).
fn parse_range(value: &str) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let a = a.trim().parse().ok()?;
    let b = match b.trim() {
        "" => u64::MAX,
        b => b.parse().ok()?,
    };
    Some((a, b))
}

struct Rule {
    digest: Option<String>,
    /// When set, the rule matches GETs whose path contains this (any kind of request, not
    /// only blobs), and `digest` is ignored.
    path: Option<String>,
    fault: Fault,
}

struct State {
    /// `(sequence number, record)`; the number lets a connection update its own record.
    records: VecDeque<(u64, Record)>,
    next_seq: u64,
    rule: Option<Rule>,
    down: bool,
    stopped: bool,
}

struct Sockets {
    stopped: bool,
    next_id: u64,
    open: Vec<(u64, TcpStream)>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    upstream: String,
    addr: String,
    state: Mutex<State>,
    /// Signalled when the proxy stops (wakes stalls).
    stop_cv: Condvar,
    sockets: Mutex<Sockets>,
    connections: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes a socket from the set Drop shuts down.
struct SocketGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for SocketGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.sockets)
            .open
            .retain(|(id, _)| *id != self.id);
    }
}

impl Shared {
    /// Registers a socket so Drop can shut it down; fails once the proxy is stopping.
    fn register(&self, stream: &TcpStream) -> io::Result<SocketGuard<'_>> {
        let clone = stream.try_clone()?;
        let mut s = lock(&self.sockets);
        if s.stopped {
            return Err(io::Error::other("proxy stopped"));
        }
        let id = s.next_id;
        s.next_id += 1;
        s.open.push((id, clone));
        Ok(SocketGuard { shared: self, id })
    }

    fn stopping(&self) -> bool {
        lock(&self.state).stopped
    }

    /// Sleeps for `d` or until the proxy stops; false if it stopped.
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut st = lock(&self.state);
        loop {
            if st.stopped {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            st = self
                .stop_cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Adds a record (status 0, no bytes yet) and returns the fault to apply.
    fn begin(&self, method: &str, path: &str, range: Option<(u64, u64)>) -> (u64, Fault) {
        let mut st = lock(&self.state);
        let fault = if st.down {
            Fault::Down
        } else if method == "GET" {
            match (blob_digest(path), st.rule.as_mut()) {
                (_, Some(rule)) if rule.path.as_deref().is_some_and(|p| path.contains(p)) => {
                    rule.fault.take()
                }
                (Some(d), Some(rule))
                    if rule.path.is_none() && rule.digest.as_deref().is_none_or(|w| w == d) =>
                {
                    rule.fault.take()
                }
                _ => Fault::None,
            }
        } else {
            Fault::None
        };
        let seq = st.next_seq;
        st.next_seq += 1;
        st.records.push_back((
            seq,
            Record {
                method: method.to_string(),
                path: path.to_string(),
                range,
                status: 0,
                body_bytes: 0,
                faulted: fault != Fault::None,
            },
        ));
        (seq, fault)
    }

    fn update(&self, seq: u64, f: impl FnOnce(&mut Record)) {
        let mut st = lock(&self.state);
        if let Some((_, r)) = st.records.iter_mut().rev().find(|(s, _)| *s == seq) {
            f(r);
        }
    }
}

/// A recording, fault-injecting HTTP/1.1 reverse proxy on 127.0.0.1. See the module docs.
///
/// Its threads are named `proxy-a-PORT` (accept) and `proxy-c-PORT` (one per connection).
pub struct Proxy {
    shared: Arc<Shared>,
    local: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.shared.addr)
            .field("upstream", &self.shared.upstream)
            .finish()
    }
}

impl Proxy {
    /// Starts a proxy on a free port of 127.0.0.1 forwarding to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the proxy listener")?;
        let local = listener.local_addr().context("reading the proxy address")?;
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            addr: local.to_string(),
            state: Mutex::new(State {
                records: VecDeque::new(),
                next_seq: 0,
                rule: None,
                down: false,
                stopped: false,
            }),
            stop_cv: Condvar::new(),
            sockets: Mutex::new(Sockets {
                stopped: false,
                next_id: 0,
                open: Vec::new(),
                threads: Vec::new(),
            }),
            connections: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("proxy-a-{}", local.port()))
            .spawn(move || accept_loop(sh, listener))
            .context("spawning the proxy accept thread")?;
        Ok(Proxy {
            shared,
            local,
            accept: Some(accept),
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.shared.addr.clone()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The upstream `host:port`.
    pub fn upstream(&self) -> String {
        self.shared.upstream.clone()
    }

    /// Every request so far (since the last [`clear`](Self::clear)), in arrival order.
    pub fn records(&self) -> Vec<Record> {
        lock(&self.shared.state)
            .records
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Forgets the records (the fault stays).
    pub fn clear(&self) {
        lock(&self.shared.state).records.clear();
    }

    /// GETs of blobs so far.
    pub fn blob_requests(&self) -> Vec<Record> {
        self.records()
            .into_iter()
            .filter(|r| r.is_blob_get())
            .collect()
    }

    /// GETs of the blob `digest` so far.
    pub fn blob_requests_for(&self, digest: &str) -> Vec<Record> {
        self.records()
            .into_iter()
            .filter(|r| r.is_blob_get() && r.digest() == Some(digest))
            .collect()
    }

    /// Response body bytes sent for GETs of blobs so far.
    pub fn blob_bytes_sent(&self) -> u64 {
        self.blob_requests().iter().map(|r| r.body_bytes).sum()
    }

    /// The ranges of the Range GETs of the blob `digest` so far, in order.
    pub fn range_requests_for(&self, digest: &str) -> Vec<(u64, u64)> {
        self.blob_requests_for(digest)
            .iter()
            .filter_map(|r| r.range)
            .collect()
    }

    /// Client connections accepted so far (including ones closed by [`set_down`](Self::set_down)).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Applies `fault` to every blob GET from now on (replacing any fault set before).
    pub fn set_fault(&self, fault: Fault) {
        self.set_fault_for(None, fault);
    }

    /// Applies `fault` to GETs of the blob `digest` only (all blobs with `None`), replacing any
    /// fault set before. A `FailTimes` counter counts matching requests only.
    pub fn set_fault_for(&self, digest: Option<String>, fault: Fault) {
        lock(&self.shared.state).rule = Some(Rule {
            digest,
            path: None,
            fault,
        });
    }

    /// Applies `fault` to every GET whose path contains `part` (manifests, referrers, tag
    /// lists, blobs), replacing any fault set before.
    pub fn set_fault_on_path(&self, part: &str, fault: Fault) {
        lock(&self.shared.state).rule = Some(Rule {
            digest: None,
            path: Some(part.to_string()),
            fault,
        });
    }

    /// `set_fault(Fault::None)`.
    pub fn clear_fault(&self) {
        lock(&self.shared.state).rule = None;
    }

    /// While `down`, every new connection is accepted and closed at once, and every request on
    /// an open connection is answered by closing it, as if the registry were stopped.
    pub fn set_down(&self, down: bool) {
        lock(&self.shared.state).down = down;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        lock(&self.shared.state).stopped = true;
        self.shared.stop_cv.notify_all();
        {
            let mut s = lock(&self.shared.sockets);
            s.stopped = true;
            for (_, sock) in &s.open {
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
        // Wake the accept loop; it sees `stopped` and returns, closing the listener.
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_secs(5));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let threads = std::mem::take(&mut lock(&self.shared.sockets).threads);
        for h in threads {
            let _ = h.join();
        }
    }
}

fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let conn_name = format!(
        "proxy-c-{}",
        listener.local_addr().map(|a| a.port()).unwrap_or(0)
    );
    for conn in listener.incoming() {
        if shared.stopping() {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(_) => {
                // E.g. EMFILE: do not spin.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        if lock(&shared.state).down {
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(conn_name.clone())
            .spawn(move || {
                if let Ok(_guard) = sh.register(&stream) {
                    serve(&sh, stream);
                }
            });
        if let Ok(h) = spawned {
            let mut s = lock(&shared.sockets);
            s.threads.retain(|t| !t.is_finished());
            s.threads.push(h);
        }
    }
}

/// A parsed request or response head.
struct Head {
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// How the body is framed, for a request (or a response that has a body).
    fn framing(&self) -> io::Result<Framing> {
        if self.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked);
        }
        match self.header("content-length") {
            Some(v) => v
                .trim()
                .parse()
                .map(Framing::Length)
                .map_err(|_| bad("bad Content-Length")),
            None => Ok(Framing::None),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (requests), or until EOF (responses).
    None,
    Length(u64),
    Chunked,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one line (without CRLF), bounded by [`MAX_LINE`]; `None` at EOF before any byte.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    r.take(MAX_LINE).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(bad("line too long or truncated"));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| bad("non-UTF-8 line"))
}

/// Reads a head (start line and headers); `None` at EOF before it starts.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let start = loop {
        match read_line(r)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?.ok_or_else(|| bad("EOF in headers"))?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(bad("too many headers"));
        }
        let (k, v) = line.split_once(':').ok_or_else(|| bad("bad header line"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some(Head { start, headers }))
}

/// Copies a chunked body from `r` to `w`, re-chunked when `rechunk`, else decoded; at most
/// `limit` body bytes. Returns the body length.
fn copy_chunked(
    r: &mut impl BufRead,
    w: &mut impl Write,
    rechunk: bool,
    limit: u64,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let line = read_line(r)?.ok_or_else(|| bad("EOF in chunked body"))?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_hex, 16).map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            // Trailers (dropped) up to the empty line.
            while !read_line(r)?
                .ok_or_else(|| bad("EOF in chunk trailers"))?
                .is_empty()
            {}
            if rechunk {
                w.write_all(b"0\r\n\r\n")?;
            }
            return Ok(total);
        }
        total += size;
        if total > limit {
            return Err(bad("chunked body too large"));
        }
        if rechunk {
            write!(w, "{size:x}\r\n")?;
        }
        let n = io::copy(&mut r.take(size), w)?;
        if n != size {
            return Err(bad("EOF in chunk"));
        }
        if rechunk {
            w.write_all(b"\r\n")?;
        }
        if !read_line(r)?
            .ok_or_else(|| bad("EOF after chunk"))?
            .is_empty()
        {
            return Err(bad("missing CRLF after chunk"));
        }
    }
}

/// Copies a request body framed as `framing` from `r` to `w` (re-chunking chunked bodies).
fn copy_request_body(r: &mut impl BufRead, w: &mut impl Write, framing: Framing) -> io::Result<()> {
    match framing {
        Framing::None => Ok(()),
        Framing::Length(n) => {
            if io::copy(&mut r.take(n), w)? != n {
                return Err(bad("EOF in request body"));
            }
            Ok(())
        }
        Framing::Chunked => copy_chunked(r, w, true, u64::MAX).map(|_| ()),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Headers that describe one connection, not the message: never forwarded.
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Serves one client connection until it closes, errs, or asks to close.
fn serve(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(BUF_SIZE, read_half);
    let mut client = stream;
    loop {
        // A TLS ClientHello (or other non-HTTP bytes): close at once, like a plain HTTP server
        // that cannot parse it, so clients falling back from HTTPS to HTTP do so quickly.
        match reader.fill_buf() {
            Ok([first, ..])
                if first.is_ascii_alphabetic() || *first == b'\r' || *first == b'\n' => {}
            _ => break,
        }
        let head = match read_head(&mut reader) {
            Ok(Some(h)) => h,
            _ => break,
        };
        match handle(shared, &head, &mut reader, &mut client) {
            Ok(true) => continue,
            _ => break,
        }
    }
    let _ = client.shutdown(Shutdown::Both);
}

/// Writes a complete small response; the caller has recorded the request as `seq`.
fn send_simple(
    shared: &Shared,
    seq: u64,
    client: &mut TcpStream,
    status: u16,
    body: &[u8],
    keep: bool,
) -> io::Result<bool> {
    shared.update(seq, |r| {
        r.status = status;
        r.body_bytes = body.len() as u64;
    });
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    if !keep {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    client.write_all(&out)?;
    client.flush()?;
    Ok(keep)
}

/// Answers `status` with a chunked body that never ends, until the client hangs up or 2 GiB
/// went out; always closes the connection.
fn send_endless(
    shared: &Shared,
    seq: u64,
    client: &mut TcpStream,
    status: u16,
) -> io::Result<bool> {
    const LIMIT: u64 = 2 << 30;
    shared.update(seq, |r| r.status = status);
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        reason(status)
    );
    client.write_all(head.as_bytes())?;
    let piece = vec![b' '; 64 << 10];
    let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
    chunk.extend_from_slice(&piece);
    chunk.extend_from_slice(b"\r\n");
    let mut sent = 0u64;
    while sent < LIMIT {
        if client.write_all(&chunk).is_err() {
            break;
        }
        sent += piece.len() as u64;
        shared.update(seq, |r| r.body_bytes = sent);
    }
    let _ = client.shutdown(Shutdown::Both);
    Ok(false)
}

/// Handles one request; `Ok(true)` to keep the connection open.
fn handle(
    shared: &Shared,
    req: &Head,
    reader: &mut BufReader<TcpStream>,
    client: &mut TcpStream,
) -> io::Result<bool> {
    let mut parts = req.start.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("bad request line"));
    };
    // Absolute-form (a client using us as a forward proxy): keep the path only.
    let path = match target.strip_prefix("http://") {
        Some(rest) => match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        },
        None => target,
    };
    let framing = req.framing()?;
    let mut keep = version == "HTTP/1.1" && !req.has_token("connection", "close");
    let range = req.header("range").and_then(parse_range);
    let (seq, fault) = shared.begin(method, path, range);

    if fault == Fault::Down {
        let _ = client.shutdown(Shutdown::Both);
        return Ok(false);
    }
    if framing != Framing::None && req.has_token("expect", "100-continue") {
        client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    if let Fault::Stall(d) = fault {
        if !shared.sleep(d) {
            return Ok(false);
        }
    }
    if let Fault::Endless(code) = fault {
        copy_request_body(reader, &mut io::sink(), framing)?;
        return send_endless(shared, seq, client, code);
    }
    if let Fault::RetryAfter(code, secs) = fault {
        copy_request_body(reader, &mut io::sink(), framing)?;
        let body = format!(
            "{{\"errors\":[{{\"code\":\"TOOMANYREQUESTS\",\"message\":\"beam-tests proxy: injected status {code}\"}}]}}\n"
        );
        let head = format!(
            "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nRetry-After: {secs}\r\nContent-Length: {}\r\n\r\n",
            reason(code),
            body.len()
        );
        shared.update(seq, |r| {
            r.status = code;
            r.body_bytes = body.len() as u64;
        });
        client.write_all(head.as_bytes())?;
        client.write_all(body.as_bytes())?;
        client.flush()?;
        return Ok(keep);
    }
    if let Fault::Status(code) = fault {
        copy_request_body(reader, &mut io::sink(), framing)?;
        let body = format!(
            "{{\"errors\":[{{\"code\":\"UNKNOWN\",\"message\":\"beam-tests proxy: injected status {code}\"}}]}}\n"
        );
        return send_simple(shared, seq, client, code, body.as_bytes(), keep);
    }

    // Upstream request and response head.
    let drop_range = fault == Fault::IgnoreRange;
    let upstream = match forward_request(shared, method, path, req, framing, reader, drop_range) {
        Ok(u) => u,
        Err(e) => {
            eprintln!(
                "beam-tests proxy: {method} {path} to {}: {e}",
                shared.upstream
            );
            let body = format!(
                "{{\"errors\":[{{\"code\":\"UNKNOWN\",\"message\":\"beam-tests proxy: upstream: {}\"}}]}}\n",
                e.to_string().replace(['"', '\\'], "'")
            );
            // The request body may be partly unread: close.
            return send_simple(shared, seq, client, 502, body.as_bytes(), false);
        }
    };
    let Upstream {
        _guard,
        reader: mut up,
        head: resp,
        status,
    } = upstream;

    let no_body = method == "HEAD" || status / 100 == 1 || status == 204 || status == 304;
    let (mut body, len): (Box<dyn Read + '_>, u64) = if no_body {
        (Box::new(io::empty()), 0)
    } else {
        match resp.framing() {
            Ok(Framing::Length(n)) => (Box::new((&mut up).take(n)), n),
            Ok(Framing::Chunked) => {
                let mut v = Vec::new();
                copy_chunked(&mut up, &mut v, false, MAX_BUFFERED_BODY)?;
                let n = v.len() as u64;
                (Box::new(Cursor::new(v)), n)
            }
            Ok(Framing::None) => {
                let mut v = Vec::new();
                (&mut up).take(MAX_BUFFERED_BODY + 1).read_to_end(&mut v)?;
                if v.len() as u64 > MAX_BUFFERED_BODY {
                    return Err(bad("upstream body too large"));
                }
                let n = v.len() as u64;
                (Box::new(Cursor::new(v)), n)
            }
            Err(e) => return Err(e),
        }
    };

    let ok = status / 100 == 2;
    let corrupt = ok && fault == Fault::CorruptBody;
    let send_len = if ok && fault == Fault::TruncateBody {
        keep = false;
        len / 2
    } else {
        len
    };

    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason_of(&resp, status));
    for (k, v) in &resp.headers {
        if hop_by_hop(k) || (!no_body && k.eq_ignore_ascii_case("content-length")) {
            continue;
        }
        if k.eq_ignore_ascii_case("location") {
            let v = v.replace(
                &format!("//{}", shared.upstream),
                &format!("//{}", shared.addr),
            );
            head.push_str(&format!("{k}: {v}\r\n"));
        } else {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    if !no_body {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    if !keep {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");

    shared.update(seq, |r| r.status = status);
    let mut out = BufWriter::with_capacity(BUF_SIZE, &mut *client);
    out.write_all(head.as_bytes())?;
    let mut buf = vec![0u8; BUF_SIZE];
    let mut off = 0u64;
    while off < send_len {
        let want = (send_len - off).min(BUF_SIZE as u64) as usize;
        let n = body.read(&mut buf[..want])?;
        if n == 0 {
            // The upstream body ended early: the client cannot get the rest either.
            keep = false;
            break;
        }
        if corrupt {
            for (i, b) in buf[..n].iter_mut().enumerate() {
                if (off + i as u64) % 97 == 0 {
                    *b ^= 0xFF;
                }
            }
        }
        if let (true, Fault::Dribble(every)) = (ok, &fault) {
            for b in &buf[..n] {
                shared.update(seq, |r| r.body_bytes += 1);
                out.write_all(std::slice::from_ref(b))?;
                out.flush()?;
                if !shared.sleep(*every) {
                    return Ok(false);
                }
            }
            off += n as u64;
            continue;
        }
        // Count before sending so a client that got the bytes always sees them counted.
        shared.update(seq, |r| r.body_bytes += n as u64);
        if let Err(e) = out.write_all(&buf[..n]) {
            shared.update(seq, |r| r.body_bytes -= n as u64);
            return Err(e);
        }
        off += n as u64;
    }
    out.flush()?;
    drop(out);
    if !keep {
        let _ = client.shutdown(Shutdown::Both);
    }
    Ok(keep)
}

/// The reason phrase of a status line `HTTP/1.1 200 OK`, or a default.
fn reason_of(head: &Head, status: u16) -> String {
    let mut it = head.start.splitn(3, ' ');
    it.next();
    it.next();
    match it.next() {
        Some(r) if !r.trim().is_empty() => r.trim().to_string(),
        _ => reason(status).to_string(),
    }
}

struct Upstream<'a> {
    _guard: SocketGuard<'a>,
    reader: BufReader<TcpStream>,
    head: Head,
    status: u16,
}

/// Sends the request (with its body) upstream and reads the final response head.
fn forward_request<'a>(
    shared: &'a Shared,
    method: &str,
    path: &str,
    req: &Head,
    framing: Framing,
    client: &mut BufReader<TcpStream>,
    drop_range: bool,
) -> io::Result<Upstream<'a>> {
    let stream = TcpStream::connect(&shared.upstream)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let guard = shared.register(&stream)?;

    let mut w = BufWriter::with_capacity(BUF_SIZE, stream.try_clone()?);
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", shared.upstream);
    for (k, v) in &req.headers {
        if hop_by_hop(k)
            || k.eq_ignore_ascii_case("host")
            || k.eq_ignore_ascii_case("content-length")
            || (drop_range && k.eq_ignore_ascii_case("range"))
        {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => head.push_str(&format!("Content-Length: {n}\r\n")),
        Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("Connection: close\r\n\r\n");
    w.write_all(head.as_bytes())?;
    copy_request_body(client, &mut w, framing)?;
    w.flush()?;
    drop(w);

    let mut reader = BufReader::with_capacity(BUF_SIZE, stream);
    loop {
        let head = read_head(&mut reader)?.ok_or_else(|| bad("upstream closed without answer"))?;
        let status: u16 = head
            .start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad upstream status line"))?;
        // Interim answers (100 Continue): skip to the final one.
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        return Ok(Upstream {
            _guard: guard,
            reader,
            head,
            status,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_ranges() {
        assert_eq!(blob_digest("/v2/a/b/blobs/sha256:abc"), Some("sha256:abc"));
        assert_eq!(
            blob_digest("/v2/a/blobs/sha256:abc?x=1"),
            Some("sha256:abc")
        );
        assert_eq!(blob_digest("/v2/a/blobs/uploads/"), None);
        assert_eq!(blob_digest("/v2/a/blobs/uploads/123?digest=sha256:a"), None);
        assert_eq!(blob_digest("/v2/a/manifests/sha256:abc"), None);
        assert_eq!(blob_digest("/v2//blobs/sha256:abc"), None);
        assert_eq!(parse_range("bytes=0-99"), Some((0, 99)));
        assert_eq!(parse_range("bytes=5-"), Some((5, u64::MAX)));
        assert_eq!(parse_range("bytes=-5"), None);
        assert_eq!(parse_range("bytes=0-1,3-4"), None);
    }

    #[test]
    fn fail_times_counts_down() {
        let mut f = Fault::times(2, Fault::Status(500));
        assert_eq!(f.take(), Fault::Status(500));
        assert_eq!(f.take(), Fault::Status(500));
        assert_eq!(f.take(), Fault::None);
        assert_eq!(f.take(), Fault::None);
    }

    #[test]
    fn copies_chunked_bodies() {
        let raw = b"4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nX-Trailer: y\r\n\r\nNEXT";
        let mut r = BufReader::new(&raw[..]);
        let mut out = Vec::new();
        assert_eq!(copy_chunked(&mut r, &mut out, false, 100).unwrap(), 6);
        assert_eq!(out, b"abcdef");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"NEXT");

        let mut r = BufReader::new(&raw[..]);
        let mut out = Vec::new();
        copy_chunked(&mut r, &mut out, true, 100).unwrap();
        assert_eq!(out, b"4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n");
        let mut r = BufReader::new(&raw[..]);
        assert!(copy_chunked(&mut r, &mut io::sink(), false, 5).is_err());
    }

    /// A canned upstream answering each connection with one fixed response.
    fn canned_upstream(response: &'static [u8]) -> (String, JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let head = read_head(&mut r).unwrap().unwrap();
            let mut seen = format!("{}\n", head.start);
            for (k, v) in &head.headers {
                seen.push_str(&format!("{k}: {v}\n"));
            }
            let mut body = Vec::new();
            copy_request_body(&mut r, &mut body, head.framing().unwrap()).unwrap();
            let mut seen = seen.into_bytes();
            seen.extend_from_slice(b"\n");
            seen.extend_from_slice(&body);
            (&s).write_all(response).unwrap();
            drop(s);
            seen
        });
        (addr, h)
    }

    /// Sends raw bytes to the proxy and reads one response: `(head, body)`.
    fn raw_exchange(addr: &str, request: &[u8]) -> (Head, Vec<u8>) {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&s).write_all(request).unwrap();
        let mut r = BufReader::new(s);
        let head = read_head(&mut r).unwrap().unwrap();
        let n = match head.framing().unwrap() {
            Framing::Length(n) => n,
            f => panic!("proxy answered with framing {f:?}"),
        };
        let mut body = Vec::new();
        (&mut r).take(n).read_to_end(&mut body).unwrap();
        (head, body)
    }

    #[test]
    fn reframes_chunked_and_eof_bodies_and_rewrites_location() {
        // Upstream answers chunked, with a Location naming itself.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = l.local_addr().unwrap().to_string();
        let resp = format!(
            "HTTP/1.1 202 Accepted\r\nLocation: http://{up}/v2/x/blobs/uploads/1\r\n\
             Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n"
        );
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let head = read_head(&mut r).unwrap().unwrap();
            let mut body = Vec::new();
            copy_request_body(&mut r, &mut body, head.framing().unwrap()).unwrap();
            (&s).write_all(resp.as_bytes()).unwrap();
            (head.start, head.headers, body)
        });
        let proxy = Proxy::start(&up).unwrap();
        let (head, body) = raw_exchange(
            &proxy.addr(),
            b"PATCH /v2/x/blobs/uploads/1 HTTP/1.1\r\nHost: whatever\r\nTransfer-Encoding: chunked\r\n\
              Connection: keep-alive\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        );
        let (start, headers, up_body) = h.join().unwrap();
        assert_eq!(start, "PATCH /v2/x/blobs/uploads/1 HTTP/1.1");
        assert!(headers.contains(&("Host".to_string(), up.clone())));
        assert!(headers.contains(&("Transfer-Encoding".to_string(), "chunked".to_string())));
        // Re-chunked as received (the canned upstream copies the chunked framing through).
        assert_eq!(up_body, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
        assert!(head.start.starts_with("HTTP/1.1 202"), "{}", head.start);
        assert_eq!(
            head.header("location"),
            Some(format!("http://{}/v2/x/blobs/uploads/1", proxy.addr()).as_str())
        );
        assert_eq!(head.header("transfer-encoding"), None);
        assert_eq!(body, b"abcd");
        let recs = proxy.records();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].status, 202);
        assert_eq!(recs[0].body_bytes, 4);
        drop(proxy);

        // Upstream answers without length (until EOF), to a Content-Length request.
        let (up, h) =
            canned_upstream(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-eof body");
        let proxy = Proxy::start(&up).unwrap();
        let (head, body) = raw_exchange(
            &proxy.addr(),
            b"PUT /v2/x/manifests/v1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyz",
        );
        let seen = String::from_utf8(h.join().unwrap()).unwrap();
        assert!(
            seen.starts_with("PUT /v2/x/manifests/v1 HTTP/1.1\n"),
            "{seen}"
        );
        assert!(seen.contains("Content-Length: 3\n"), "{seen}");
        assert!(seen.ends_with("\n\nxyz"), "{seen}");
        assert!(head.start.starts_with("HTTP/1.1 200"));
        assert_eq!(body, b"until-eof body");
    }

    #[test]
    fn upstream_down_gives_502_and_drop_is_prompt() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = l.local_addr().unwrap().to_string();
        drop(l);
        let proxy = Proxy::start(&up).unwrap();
        let (head, _) = raw_exchange(&proxy.addr(), b"GET /v2/ HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(head.start.starts_with("HTTP/1.1 502"), "{}", head.start);
        assert_eq!(proxy.records()[0].status, 502);
        // An idle keep-alive client connection does not hold Drop up.
        let idle = TcpStream::connect(proxy.addr()).unwrap();
        let addr = proxy.addr();
        let t = Instant::now();
        drop(proxy);
        assert!(t.elapsed() < Duration::from_secs(5));
        // The accept thread is gone (probing the port instead would race
        // with parallel tests that get the freed port from the kernel).
        let port = addr.rsplit(':').next().unwrap().to_string();
        let accept_thread = format!("proxy-a-{port}");
        let alive: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .filter(|n| *n == accept_thread)
            .collect();
        assert!(alive.is_empty(), "{alive:?}");
        drop(idle);
    }
}
