//! Fetching chunks on demand: Range requests to the registry, verification, the cache, and
//! the rules that keep it fast and safe.
//!
//! - **One fetch per chunk**, however many readers wait on it: the first asker fetches, the
//!   others wait for its result (single flight, keyed by chunk digest, across all layers).
//! - **Adjacent missing chunks are merged** into one Range request (up to
//!   [`FetchOptions::max_request_bytes`]).
//! - **Bounded concurrency**, with separate budgets for reads a process is blocked on
//!   (foreground) and for background fetch, so background work never takes the slots
//!   foreground reads need.
//! - **The container's reads always win the link** ([`Priority`], issue 13): a read a process
//!   waits on, then readahead of a sequential reader, then the recorded prefetch list, then
//!   background fill. Background fill only uses bandwidth the foreground leaves idle: it waits
//!   while any foreground fetch is queued or in flight and for an idle gap after the last one
//!   (four times the measured foreground latency, 100 ms-1 s), and its requests are bounded to
//!   about 50 ms of the link's measured throughput, so a read that arrives meanwhile waits behind
//!   at most that much. No fixed bytes-per-second: both adapt to the link they measure.
//! - **A container's start is left alone.** When a layer mounts or a container's root is
//!   prepared ([`Fetcher::note_start`]), background fill holds back for [`START_QUIET`] while
//!   nothing is read, then until the programs' reads and opens ([`Fetcher::note_open`]: other
//!   containers of the image open files the first one fetched) have been quiet for
//!   [`START_SETTLE`]
//!   (for [`START_PHASE`] after the signal; then the idle gap above), and while any recorded
//!   prefetch list is still being fetched. A starting program
//!   reads in bursts with pauses of its own work between them; a fill request sent into such a
//!   pause delayed the next burst (python at 200 Mbit/s: first output 1.25 s with fill, 0.97 s
//!   without).
//! - **Background fill takes only idle CPU too**: its chunks are decompressed, verified and
//!   stored on a thread of its own under `SCHED_IDLE`, so on a small node the container's
//!   processes keep the cores (a fill on an unlimited local link is CPU-bound).
//! - **Never serve a byte that does not match its digest**: each chunk is decompressed and
//!   checked when it arrives; a mismatch is refetched; a chunk that keeps failing gives an
//!   error after [`FetchOptions::deadline`], never a hang.
//! - Retries with exponential backoff and jitter on 5xx, truncated bodies, connection errors
//!   and timeouts; every attempt has a timeout.
//! - **One deadline per reader**: a chunk given up at its deadline is remembered for
//!   [`GAVE_UP_MEMORY`], and asks for it meanwhile fail at once. The kernel follows a failed
//!   readahead with a read of the page the process waits on; without the memory that second
//!   request waited a whole deadline again (issue 15).

use crate::blob::BlobError;
pub use crate::blob::RangeSource;
use crate::cache::ChunkCache;
use crate::format::chunk::{self, ChunkDigest};
use crate::format::index::ChunkRecord;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Semaphore};

/// Why a range or chunk could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// Reading the range failed (see [`BlobError`]: a refusal is given up at once, the rest
    /// is retried until the deadline).
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("chunk {0} failed verification")]
    Corrupt(String),
    #[error("gave up on chunk {chunk} after {secs:.1}s: {last}")]
    Deadline {
        chunk: String,
        secs: f64,
        last: String,
    },
    #[error("local cache: {0}")]
    Cache(String),
}

/// Who a fetch is for, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A read a process is blocked on.
    Demand,
    /// The next chunks of a sequential reader.
    Readahead,
    /// The layer's recorded prefetch list (what the workload read first when it was recorded).
    Prefetch,
    /// The rest of the layer, so that the node ends up with the whole image.
    Background,
}

impl Priority {
    /// Foreground work: counted as busy, never gated, on the foreground budget.
    fn is_foreground(self) -> bool {
        matches!(self, Priority::Demand | Priority::Readahead)
    }
}

/// What the fetcher measured of the link (exponentially weighted).
#[derive(Debug)]
struct LinkEstimate {
    /// Bytes per second of large completed requests, their round trip taken out.
    throughput: f64,
    /// Seconds per foreground request.
    latency: f64,
    /// The shortest small request seen alone on the wire: about one round trip (0 until one
    /// is seen).
    round_trip: f64,
    /// How many such requests were seen (the first few of a start may have waited on the
    /// node's CPU rather than the link).
    round_trips_seen: u32,
}

/// One request on the wire, counted until it is answered or dropped.
struct OnWire<'a> {
    count: &'a std::sync::atomic::AtomicUsize,
    at_start: usize,
    left: bool,
}

impl<'a> OnWire<'a> {
    fn enter(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        let at_start = count.fetch_add(1, Ordering::SeqCst) + 1;
        OnWire {
            count,
            at_start,
            left: false,
        }
    }

    /// Done: the most requests that were on the wire with this one, at its start or end.
    fn leave(mut self) -> usize {
        self.left = true;
        self.at_start.max(self.count.fetch_sub(1, Ordering::SeqCst))
    }
}

impl Drop for OnWire<'_> {
    fn drop(&mut self) {
        if !self.left {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Tuning of the fetcher.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Give up on a chunk after this long (then reads get EIO).
    pub deadline: Duration,
    /// Timeout of one Range request.
    pub attempt_timeout: Duration,
    /// Largest merged Range request.
    pub max_request_bytes: u64,
    /// Concurrent requests for reads a process waits on.
    pub foreground_concurrency: usize,
    /// Concurrent requests of background fetch.
    pub background_concurrency: usize,
    /// Cap on background fetch bandwidth, bytes per second (`None`: no cap). Reads a process
    /// waits on are never capped.
    pub background_bytes_per_sec: Option<u64>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            deadline: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(20),
            max_request_bytes: 8 << 20,
            foreground_concurrency: 8,
            background_concurrency: 2,
            background_bytes_per_sec: None,
        }
    }
}

/// Counters, for metrics, `beam cache stats` and tests.
#[derive(Debug, Default)]
pub struct FetchCounters {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub chunks: AtomicU64,
    pub retries: AtomicU64,
    pub corrupt: AtomicU64,
    pub failures: AtomicU64,
}

/// A chunk to make present: its record and where its layer's blob is.
#[derive(Clone)]
pub struct ChunkRef {
    pub rec: ChunkRecord,
    pub source: Arc<dyn RangeSource>,
}

impl ChunkRef {
    /// Every chunk of a layer's index, read from `source` (a whole-layer fetch).
    pub fn all_of<B: AsRef<[u8]>>(
        index: &crate::format::index::IndexReader<B>,
        source: &Arc<dyn RangeSource>,
    ) -> Vec<ChunkRef> {
        (0..index.chunk_count())
            .filter_map(|i| index.chunk(i).ok())
            .map(|rec| ChunkRef {
                rec,
                source: source.clone(),
            })
            .collect()
    }
}

/// Who waits on a chunk in flight: the asker that sent it on its way, and any others.
#[derive(Default)]
struct Flight {
    owner: Option<oneshot::Sender<Result<(), FetchError>>>,
    waiters: Vec<oneshot::Sender<Result<(), FetchError>>>,
}

/// What one fetch is: where the bytes are read (source, offset, length) and what they must
/// hash to. Single flight joins only fetches of the same thing, so a layer that declares
/// another layer's chunk digest at a wrong place fails alone, and others never wait on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlightKey {
    source: String,
    offset: u64,
    stored_len: u32,
    digest: ChunkDigest,
}

impl ChunkRef {
    fn flight_key(&self) -> FlightKey {
        FlightKey {
            source: self.source.describe(),
            offset: self.rec.offset,
            stored_len: self.rec.stored_len,
            digest: self.rec.digest,
        }
    }
}

/// How long background fill waits after a start signal ([`Fetcher::note_start`]) while the
/// foreground has read nothing since: containerd's and runc's own work between a pull or a
/// Prepare and the program's first read.
pub const START_QUIET: Duration = Duration::from_secs(1);

/// Once the starting program has read, how long the foreground must then have been quiet
/// before background fill starts: longer than the pauses of a starting program's own work
/// between its bursts of reads, short enough that the link does not idle long once it is done
/// (the whole image is in the cache that much sooner).
pub const START_SETTLE: Duration = Duration::from_millis(300);

/// How long after a start signal [`START_QUIET`] applies instead of the idle gap.
pub const START_PHASE: Duration = Duration::from_secs(10);

/// The round trip from which guesses at what a program reads next may pay (a registry in
/// another region; one nearby answers in a few milliseconds).
pub const SPECULATE_MIN_ROUND_TRIP: Duration = Duration::from_millis(10);

/// How many small requests alone on the wire must have shown the round trip before guesses
/// rely on it. One: a start's first reads are the ones worth guessing from (a python start
/// read json, re, enum and types one round trip apart while three were awaited), and the
/// estimate is the smallest sample, so a later quick answer from a near registry turns
/// guesses off again; a wrong first sample costs one guess's bytes.
const SPECULATE_MIN_SAMPLES: u32 = 1;

/// The bandwidth-delay product from which guesses at what a program reads next pay
/// ([`Fetcher::speculation_bytes`]): a round trip costs as much as moving this many bytes.
/// 200 Mbit/s with 10 ms or more; never on a local registry.
pub const SPECULATE_MIN_BDP: u64 = 256 << 10;

/// The largest hole a readahead request spans (fetched and dropped) rather than being split in
/// two: a cached chunk, or a directory's subdirectory between two of its files.
const READAHEAD_MAX_GAP: u64 = 64 << 10;

/// Request slots kept for reads a process waits on, beyond the foreground concurrency
/// ([`Fetcher`]'s `demand_reserve`).
const DEMAND_RESERVE: usize = 2;

/// How long a chunk given up at its deadline fails new asks at once: long enough for the
/// kernel's follow-up request of the same read, short enough that the next read tries the
/// registry again.
pub const GAVE_UP_MEMORY: Duration = Duration::from_millis(500);

/// Fetches chunks into the cache. One per process.
pub struct Fetcher {
    pub cache: Arc<ChunkCache>,
    opts: FetchOptions,
    inflight: Mutex<HashMap<FlightKey, Flight>>,
    /// Chunks given up at their deadline, when, and why (see [`GAVE_UP_MEMORY`]).
    gave_up: Mutex<HashMap<FlightKey, (Instant, FetchError)>>,
    foreground: Semaphore,
    /// Slots only a run a reader waits on may take, beside `foreground`: readahead and
    /// guesses filling every foreground slot never queue a read a process is blocked on.
    demand_reserve: Semaphore,
    /// Requests of recorded prefetch lists (ahead of background fill, never behind it).
    prefetch: Semaphore,
    background: Semaphore,
    /// Foreground `ensure` calls with something to fetch or wait for.
    fg_busy: std::sync::atomic::AtomicUsize,
    /// Prefetch-list `ensure` calls in progress (background fill waits for them).
    prefetch_busy: std::sync::atomic::AtomicUsize,
    /// The last start signal (a layer mounted, a container's root prepared).
    started: Mutex<Option<Instant>>,
    /// When a program last opened a file of a layer (nanoseconds after `epoch`; 0: never).
    opened_at: AtomicU64,
    epoch: Instant,
    /// Decodes, verifies and stores background fill on a `SCHED_IDLE` thread.
    idle_worker: IdleWorker,
    /// Whether [`Fetcher::probe_round_trip`] sent its probe.
    probed: AtomicBool,
    /// Range requests on the wire now (they share the link).
    on_wire: std::sync::atomic::AtomicUsize,
    /// When `fg_busy` last dropped to zero.
    fg_idle_since: Mutex<Instant>,
    link: Mutex<LinkEstimate>,
    /// [`Fetcher::speculation_bytes`], from the link estimate.
    speculation: AtomicU64,
    pub counters: FetchCounters,
    /// Latency of successful Range requests, for metrics.
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

impl Fetcher {
    pub fn new(cache: Arc<ChunkCache>, opts: FetchOptions) -> Self {
        Fetcher {
            cache,
            foreground: Semaphore::new(opts.foreground_concurrency.max(1)),
            demand_reserve: Semaphore::new(DEMAND_RESERVE),
            prefetch: Semaphore::new(opts.background_concurrency.max(1) * 2),
            background: Semaphore::new(opts.background_concurrency.max(1)),
            fg_busy: std::sync::atomic::AtomicUsize::new(0),
            prefetch_busy: std::sync::atomic::AtomicUsize::new(0),
            started: Mutex::new(None),
            opened_at: AtomicU64::new(0),
            epoch: Instant::now(),
            idle_worker: IdleWorker::spawn(),
            on_wire: std::sync::atomic::AtomicUsize::new(0),
            probed: AtomicBool::new(false),
            fg_idle_since: Mutex::new(Instant::now()),
            link: Mutex::new(LinkEstimate {
                throughput: 0.0,
                latency: 0.0,
                round_trip: 0.0,
                round_trips_seen: 0,
            }),
            speculation: AtomicU64::new(0),
            opts,
            inflight: Mutex::new(HashMap::new()),
            gave_up: Mutex::new(HashMap::new()),
            counters: FetchCounters::default(),
            latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16),
            ),
        }
    }

    pub fn options(&self) -> &FetchOptions {
        &self.opts
    }

    /// Make every chunk of `chunks` present in the cache (fetching those that are missing) at
    /// priority `p`, or fail with the first error.
    pub async fn ensure(
        self: &Arc<Self>,
        chunks: &[ChunkRef],
        p: Priority,
    ) -> Result<(), FetchError> {
        self.ensure_along(chunks, &[], p).await
    }

    /// [`Fetcher::ensure`] of `chunks`, taking `along` (in order, up to the first that is
    /// cached, in flight or given up) into the same requests when a request is sent anyway.
    /// Nothing waits on `along`: a chunk of it that fails verification is dropped, and only
    /// the failures of `chunks` are errors. For a read's blob neighbours (`crate::fs`).
    pub async fn ensure_along(
        self: &Arc<Self>,
        chunks: &[ChunkRef],
        along: &[ChunkRef],
        p: Priority,
    ) -> Result<(), FetchError> {
        if p == Priority::Background {
            // Held back before claiming anything: a read that needs one of these chunks
            // meanwhile fetches it itself instead of waiting on a held-back run.
            self.yield_to_foreground().await;
        }
        if p == Priority::Prefetch {
            self.prefetch_busy.fetch_add(1, Ordering::SeqCst);
            let r = self.ensure_inner(chunks, along, p).await;
            self.prefetch_busy.fetch_sub(1, Ordering::SeqCst);
            return r;
        }
        if !p.is_foreground() {
            return self.ensure_inner(chunks, along, p).await;
        }
        self.fg_busy.fetch_add(1, Ordering::SeqCst);
        let r = self.ensure_inner(chunks, along, p).await;
        if self.fg_busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.fg_idle_since.lock().expect("idle lock") = Instant::now();
        }
        r
    }

    /// The idle gap background fill leaves after foreground work: four times the measured
    /// foreground latency, within 100 ms-1 s (a starting program reads in bursts separated by
    /// its own work; the gap keeps the fill out of those pauses).
    fn idle_gap(&self) -> Duration {
        let l = self.link.lock().expect("link lock").latency;
        Duration::from_secs_f64((4.0 * l).clamp(0.1, 1.0))
    }

    /// Largest request of background fill: about 50 ms of the measured throughput, within
    /// 256 KiB and the configured maximum (a read arriving meanwhile waits behind at most
    /// that). Background fill hands the fetcher batches of this size.
    pub fn background_request_bytes(&self) -> u64 {
        let t = self.link.lock().expect("link lock").throughput;
        let max = self.opts.max_request_bytes;
        if t <= 0.0 {
            return (1 << 20).min(max);
        }
        ((t * 0.05) as u64).clamp(256 << 10, max.max(256 << 10))
    }

    /// The largest readahead window of a sequential reader (`crate::fs`): what the measured
    /// link moves in a tenth of a second, within `floor` and 32 MiB.
    pub fn readahead_bytes(&self, floor: u64) -> u64 {
        let t = self.link.lock().expect("link lock").throughput;
        ((t * 0.1) as u64).clamp(floor, (32 << 20).max(floor))
    }

    /// How many bytes a guess at what a program reads next may cost (`crate::fs`: the rest of
    /// a directory whose files it reads one after another): four round trips' worth of the
    /// measured link, at most 8 MiB. 0 on a near registry (a round trip under
    /// [`SPECULATE_MIN_ROUND_TRIP`], or one that moves less than [`SPECULATE_MIN_BDP`]) and
    /// until [`SPECULATE_MIN_SAMPLES`] requests have shown the round trip:
    /// there a miss costs little more than its bytes, and a wrong guess would only take the
    /// link from the program's reads.
    pub fn speculation_bytes(&self) -> u64 {
        // Kept up to date by `observe`: asked at every cold FUSE read, which must not take
        // the link lock.
        self.speculation.load(Ordering::Relaxed)
    }

    /// Whether someone else waits on a chunk of `run` (a read that found it in flight): then
    /// the run is needed now, whatever its priority.
    fn has_waiters(&self, run: &[ChunkRef]) -> bool {
        let inflight = self.inflight.lock().expect("inflight lock");
        run.iter().any(|c| {
            inflight
                .get(&c.flight_key())
                .is_some_and(|f| !f.waiters.is_empty())
        })
    }

    /// A container is starting (a layer mounted, a container's root prepared): background
    /// fill holds back (see [`START_QUIET`] and [`START_SETTLE`]).
    pub fn note_start(&self) {
        *self.started.lock().expect("start lock") = Some(Instant::now());
    }

    /// A program opened a file of a layer (`crate::fs`; cheap: one atomic store). Within
    /// [`START_PHASE`] of a start signal this counts as the program's activity like a read
    /// does, though the file's chunks are cached: when containers of one image start
    /// together, the first fetches what they all read and the others only open it, and fill
    /// sent meanwhile took the link and the CPU from those starts (ten python containers at
    /// once: the last started 0.56 s later with fill than without).
    pub fn note_open(&self) {
        let ns = self.epoch.elapsed().as_nanos().max(1) as u64;
        self.opened_at.fetch_max(ns, Ordering::Relaxed);
    }

    /// When a program last opened a file of a layer (see [`Fetcher::note_open`]).
    fn last_open(&self) -> Option<Instant> {
        match self.opened_at.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns)),
        }
    }

    /// Wait until no foreground fetch or prefetch list is queued or in flight and the idle gap
    /// has passed (within [`START_PHASE`] of a start signal: [`START_QUIET`] from the signal
    /// while nothing was read or opened since, else [`START_SETTLE`] from the last read or
    /// open).
    async fn yield_to_foreground(&self) {
        loop {
            let busy =
                self.fg_busy.load(Ordering::SeqCst) + self.prefetch_busy.load(Ordering::SeqCst);
            let mut quiet_since = *self.fg_idle_since.lock().expect("idle lock");
            let mut gap = self.idle_gap();
            if let Some(s) = *self.started.lock().expect("start lock") {
                if s.elapsed() < START_PHASE {
                    if let Some(o) = self.last_open() {
                        quiet_since = quiet_since.max(o);
                    }
                    if quiet_since > s {
                        // The program has read since the signal.
                        gap = gap.max(START_SETTLE);
                    } else {
                        quiet_since = s;
                        gap = gap.max(START_QUIET);
                    }
                }
            }
            let idle = quiet_since.elapsed();
            if busy == 0 && idle >= gap {
                return;
            }
            let wait = if busy > 0 {
                Duration::from_millis(5)
            } else {
                gap - idle
            };
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }

    /// Fold one completed request into the link estimate. `sharing`: how many requests were
    /// on the wire with it (it had that share of the link).
    fn observe(&self, bytes: u64, took: Duration, foreground: bool, sharing: usize) {
        let secs = took.as_secs_f64().max(1e-6);
        let mut l = self.link.lock().expect("link lock");
        let ewma = |old: f64, new: f64| {
            if old == 0.0 {
                new
            } else {
                0.7 * old + 0.3 * new
            }
        };
        // Only a request alone on the wire shows the round trip: one that shared the link
        // also waited behind the others' bytes.
        if bytes < 64 << 10 && sharing <= 1 {
            l.round_trips_seen += 1;
            if l.round_trip == 0.0 || secs < l.round_trip {
                l.round_trip = secs;
            }
        }
        if bytes >= 256 << 10 {
            // The link's rate, not the request's: a request also waits one round trip, and
            // counting it would size requests ever smaller on a far registry.
            let transfer = (secs - l.round_trip).max(1e-3);
            l.throughput = ewma(
                l.throughput,
                bytes as f64 / transfer * sharing.max(1) as f64,
            );
        }
        if foreground {
            l.latency = ewma(l.latency, secs);
        }
        self.update_speculation(&l);
    }

    /// Ask the chunk blob behind `source` for one byte, once per process before any round
    /// trip was seen, and take its answer time as one: the first reads of a start then know
    /// whether guesses pay. Without it the first small request alone on the wire (a python
    /// start's first module) was what showed it, and the guesses it could have sent along
    /// went a round trip later. The byte is dropped; a failed probe shows nothing.
    pub fn probe_round_trip(self: &Arc<Self>, source: Arc<dyn RangeSource>) {
        if !self.wants_round_trip_probe() || self.probed.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            if source.read_range(0, 1).await.is_ok() {
                let secs = sent.elapsed().as_secs_f64().max(1e-6);
                let mut l = me.link.lock().expect("link lock");
                l.round_trips_seen += 1;
                if l.round_trip == 0.0 || secs < l.round_trip {
                    l.round_trip = secs;
                }
                me.update_speculation(&l);
                tracing::debug!(ms = (secs * 1000.0) as u64, "round trip probed");
            }
        });
    }

    /// Whether [`Fetcher::probe_round_trip`] would still send its probe (none sent yet, no
    /// round trip seen): callers build the probe's source only then.
    pub fn wants_round_trip_probe(&self) -> bool {
        !self.probed.load(Ordering::SeqCst)
            && self.link.lock().expect("link lock").round_trips_seen == 0
    }

    fn update_speculation(&self, l: &LinkEstimate) {
        let bdp = l.round_trip * l.throughput;
        let guess = if l.round_trips_seen < SPECULATE_MIN_SAMPLES
            || l.round_trip < SPECULATE_MIN_ROUND_TRIP.as_secs_f64()
            || bdp < SPECULATE_MIN_BDP as f64
        {
            0
        } else {
            ((4.0 * bdp) as u64).min(8 << 20)
        };
        self.speculation.store(guess, Ordering::Relaxed);
    }

    async fn ensure_inner(
        self: &Arc<Self>,
        chunks: &[ChunkRef],
        along: &[ChunkRef],
        p: Priority,
    ) -> Result<(), FetchError> {
        let mut mine: Vec<ChunkRef> = Vec::new();
        let mut optional = std::collections::HashSet::new();
        let mut waits = Vec::new();
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            for c in chunks {
                if self.cache.contains(&c.rec.digest) {
                    continue;
                }
                let key = c.flight_key();
                // Only a chunk to fetch looks at what was given up (a read of cached chunks
                // takes no second lock).
                if !inflight.contains_key(&key) {
                    let gave_up = self.gave_up.lock().expect("gave_up lock");
                    if let Some((when, e)) = gave_up.get(&key) {
                        if when.elapsed() < GAVE_UP_MEMORY {
                            return Err(e.clone());
                        }
                    }
                }
                match inflight.get_mut(&key) {
                    Some(f) => {
                        let (tx, rx) = oneshot::channel();
                        f.waiters.push(tx);
                        waits.push(rx);
                    }
                    None => {
                        // The asker waits as the chunk's owner: not counted as someone else
                        // waiting (which would make a fill run foreground work).
                        let (tx, rx) = oneshot::channel();
                        inflight.insert(
                            key,
                            Flight {
                                owner: Some(tx),
                                waiters: Vec::new(),
                            },
                        );
                        waits.push(rx);
                        mine.push(c.clone());
                    }
                }
            }
            if !mine.is_empty() {
                let gave_up = self.gave_up.lock().expect("gave_up lock");
                for c in along {
                    let key = c.flight_key();
                    if self.cache.contains(&c.rec.digest)
                        || inflight.contains_key(&key)
                        || gave_up.contains_key(&key)
                        || optional.contains(&key)
                    {
                        break;
                    }
                    inflight.insert(key.clone(), Flight::default());
                    optional.insert(key);
                    mine.push(c.clone());
                }
            }
        }
        if !mine.is_empty() {
            mine.sort_by_key(|c| (Arc::as_ptr(&c.source) as *const () as usize, c.rec.offset));
            let max = if p == Priority::Background {
                self.background_request_bytes()
            } else {
                self.opts.max_request_bytes
            };
            // Background fill bridges holes left by chunks already cached (up to a sixteenth
            // of a request), readahead small ones (between a directory's files); reads fetch
            // exactly what they need.
            let max_gap = match p {
                Priority::Background => max / 16,
                Priority::Readahead => READAHEAD_MAX_GAP,
                _ => 0,
            };
            // Each run goes on by itself: the asker waits only for its own chunks, each
            // handed over as soon as it is stored, not for the chunks taken along after them.
            let optional = Arc::new(optional);
            for run in self.runs(mine, max, max_gap) {
                let (me, optional) = (self.clone(), optional.clone());
                tokio::spawn(async move { me.fetch_run(run, &optional, p).await });
            }
        }
        let mut result = Ok(());
        for w in waits {
            match w.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(BlobError::Remote("fetch abandoned".into()).into()),
            }
        }
        result
    }

    /// Group chunks (sorted by source, then offset) into runs of one source, each at most
    /// `max` bytes (or one chunk). Chunks of a run are contiguous, or apart by at most
    /// `max_gap` bytes (fetched and dropped: on a far registry a round trip costs more).
    fn runs(&self, chunks: Vec<ChunkRef>, max: u64, max_gap: u64) -> Vec<Vec<ChunkRef>> {
        let mut runs: Vec<Vec<ChunkRef>> = Vec::new();
        for c in chunks {
            if let Some(run) = runs.last_mut() {
                let last = run.last().expect("runs are never empty");
                let start = run[0].rec.offset;
                let end = last.rec.offset + last.rec.stored_len as u64;
                if Arc::ptr_eq(&last.source, &c.source)
                    && c.rec.offset >= end
                    && c.rec.offset - end <= max_gap
                    && c.rec.offset + c.rec.stored_len as u64 - start <= max
                {
                    run.push(c);
                    continue;
                }
            }
            runs.push(vec![c]);
        }
        runs
    }

    /// A chunk's fetch is over: wake whoever waits on it with `result`.
    fn finish(&self, c: &ChunkRef, result: &Result<(), FetchError>) {
        let flight = self
            .inflight
            .lock()
            .expect("inflight lock")
            .remove(&c.flight_key());
        if let Some(f) = flight {
            for w in f.owner.into_iter().chain(f.waiters) {
                let _ = w.send(result.clone());
            }
        }
    }

    /// Fetch one run with retries until the deadline, store its chunks, wake their waiters.
    /// Chunks whose keys are in `optional` were taken along (see [`Fetcher::ensure_along`]).
    async fn fetch_run(
        &self,
        run: Vec<ChunkRef>,
        optional: &std::collections::HashSet<FlightKey>,
        p: Priority,
    ) -> Result<(), FetchError> {
        let optional: Vec<bool> = run
            .iter()
            .map(|c| optional.contains(&c.flight_key()))
            .collect();
        let result = self.fetch_run_inner(&run, &optional, p).await;
        // Chunks stored on the way were handed over then; the rest get the run's outcome.
        for c in &run {
            self.finish(c, &result);
        }
        if let Err(e @ FetchError::Deadline { .. }) = &result {
            let mut gave_up = self.gave_up.lock().expect("gave_up lock");
            gave_up.retain(|_, (when, _)| when.elapsed() < GAVE_UP_MEMORY);
            let now = Instant::now();
            for c in &run {
                if !self.cache.contains(&c.rec.digest) {
                    gave_up.insert(c.flight_key(), (now, e.clone()));
                }
            }
        }
        if result.is_err() {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn fetch_run_inner(
        &self,
        run: &[ChunkRef],
        optional: &[bool],
        p: Priority,
    ) -> Result<(), FetchError> {
        let background = !p.is_foreground();
        let last = &run[run.len() - 1].rec;
        let end = last.offset + last.stored_len as u64;
        let source = run[0].source.clone();
        let began = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 0u32;
        // The first chunk of the run not yet stored (or dropped): a later try asks only for
        // the rest.
        let mut next = 0usize;
        loop {
            attempt += 1;
            let start = run[next].rec.offset;
            let len = end - start;
            let left_run = &run[next..];
            let err = 'attempt: {
                // A background run a reader now waits on takes a foreground slot.
                let waited_on = background && self.has_waiters(left_run);
                let sem = if waited_on {
                    &self.foreground
                } else {
                    match p {
                        Priority::Demand | Priority::Readahead => &self.foreground,
                        Priority::Prefetch => &self.prefetch,
                        Priority::Background => &self.background,
                    }
                };
                // The deadline counts from the first ask, queueing for a slot included: behind
                // a black-holed registry, queued reads end at their deadline, not after every
                // request ahead of them timed out.
                let left = self.opts.deadline.saturating_sub(began.elapsed());
                let demand = waited_on || p == Priority::Demand;
                let acquire = async {
                    if demand {
                        tokio::select! {
                            biased;
                            permit = self.foreground.acquire() => permit,
                            permit = self.demand_reserve.acquire() => permit,
                        }
                    } else {
                        sem.acquire().await
                    }
                };
                let Ok(permit) = tokio::time::timeout(left, acquire).await else {
                    return Err(FetchError::Deadline {
                        chunk: run[next].rec.digest.to_string(),
                        secs: began.elapsed().as_secs_f64(),
                        last: "no request slot came free".into(),
                    });
                };
                let permit = permit.expect("semaphore never closed");
                self.counters.requests.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let on_wire = OnWire::enter(&self.on_wire);
                let attempt_timeout = self
                    .opts
                    .attempt_timeout
                    .min(self.opts.deadline.saturating_sub(began.elapsed()))
                    .max(Duration::from_millis(100));
                if p == Priority::Background && !waited_on {
                    // Fill nobody waits on: the whole body, then decoded, verified and stored
                    // on the idle thread.
                    let answer =
                        tokio::time::timeout(attempt_timeout, source.read_range(start, len)).await;
                    let sharing = on_wire.leave();
                    let bytes = match answer {
                        Ok(Ok(b)) => b,
                        Ok(Err(e)) => break 'attempt FetchError::from(e),
                        Err(_) => {
                            break 'attempt BlobError::Remote(format!(
                                "no answer within {attempt_timeout:?}"
                            ))
                            .into()
                        }
                    };
                    self.latency.observe(sent.elapsed().as_secs_f64());
                    self.observe(bytes.len() as u64, sent.elapsed(), false, sharing);
                    tracing::debug!(priority = ?p, offset = start, bytes = bytes.len(),
                        ms = sent.elapsed().as_millis() as u64, "range fetched");
                    self.counters
                        .bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    // The slot is for the wire: the next request goes out while this one is
                    // stored.
                    drop(permit);
                    if let Some(rate) = self.opts.background_bytes_per_sec.filter(|r| *r > 0) {
                        // Pace background fetch: this request's bytes at the capped rate.
                        tokio::time::sleep(Duration::from_secs_f64(
                            bytes.len() as f64 / rate as f64,
                        ))
                        .await;
                    }
                    let (cache, recs) = (self.cache.clone(), run_records(left_run));
                    let opt = optional[next..].to_vec();
                    let stored = self
                        .idle_worker
                        .run(move || store_chunks(&cache, &recs, &opt, start, &bytes))
                        .await;
                    match self.stored(stored) {
                        Ok(()) => return Ok(()),
                        Err(e) => break 'attempt e,
                    }
                }
                // Everything else is stored chunk by chunk as the body arrives, and each
                // chunk's waiters are woken then: a read need not wait for the chunks taken
                // along after its own, and decoding overlaps the network.
                let mut body = source.read_range_stream(start, len);
                let mut buf = bytes::BytesMut::new();
                let mut pos = start;
                let mut got = 0u64;
                let mut stored = 0u64;
                let until = tokio::time::Instant::now() + attempt_timeout;
                let outcome: Result<(), FetchError> = 'body: loop {
                    use futures_util::StreamExt;
                    let piece = match tokio::time::timeout_at(until, body.next()).await {
                        Err(_) => {
                            break 'body Err(BlobError::Remote(format!(
                                "no answer within {attempt_timeout:?}"
                            ))
                            .into())
                        }
                        Ok(None) => break 'body Ok(()),
                        Ok(Some(Err(e))) => break 'body Err(e.into()),
                        Ok(Some(Ok(b))) => b,
                    };
                    got += piece.len() as u64;
                    // Counted as they come, before anyone is woken: what a reader then
                    // sees of the counters includes its own chunks.
                    self.counters
                        .bytes
                        .fetch_add(piece.len() as u64, Ordering::Relaxed);
                    buf.extend_from_slice(&piece);
                    while next < run.len() {
                        let c = &run[next];
                        let from = (c.rec.offset - pos) as usize;
                        let to = from + c.rec.stored_len as usize;
                        if to > buf.len() {
                            break;
                        }
                        match store_chunk(&self.cache, &c.rec, &buf[from..to]) {
                            Ok(()) => {
                                stored += 1;
                                self.counters.chunks.fetch_add(1, Ordering::Relaxed);
                                self.finish(c, &Ok(()));
                            }
                            Err(FetchError::Corrupt(_)) if optional[next] => {
                                self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => break 'body Err(e),
                        }
                        next += 1;
                        let _ = buf.split_to(to);
                        pos = c.rec.offset + c.rec.stored_len as u64;
                    }
                };
                let sharing = on_wire.leave();
                if stored > 0 {
                    if let Err(e) = self.cache.enforce_budget() {
                        tracing::warn!("cache eviction failed: {e}");
                    }
                }
                if outcome.is_ok() || next == run.len() {
                    self.latency.observe(sent.elapsed().as_secs_f64());
                    self.observe(got, sent.elapsed(), !background, sharing);
                    tracing::debug!(priority = ?p, offset = start, bytes = got,
                        ms = sent.elapsed().as_millis() as u64, "range fetched");
                }
                if next == run.len() {
                    return Ok(());
                }
                match outcome {
                    Err(e) => {
                        if let FetchError::Corrupt(_) = &e {
                            self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                        }
                        e
                    }
                    Ok(()) => FetchError::Blob(BlobError::Truncated { got, want: len }),
                }
            };
            if matches!(
                err,
                FetchError::Cache(_) | FetchError::Blob(BlobError::Refused(_))
            ) {
                if let FetchError::Blob(BlobError::Refused(_)) = &err {
                    tracing::warn!(source = %source.describe(), offset = start, len, "{err}");
                }
                return Err(err);
            }
            // Jitter: 50% to 100% of the backoff; never sooner than a busy registry asked.
            let mut wait = backoff.mul_f64(fastrand::f64() * 0.5 + 0.5);
            if let FetchError::Blob(BlobError::Busy {
                retry_after: Some(asked),
                ..
            }) = &err
            {
                wait = wait.max(*asked);
            }
            let elapsed = began.elapsed();
            if elapsed + wait >= self.opts.deadline {
                tracing::warn!(
                    source = %source.describe(),
                    offset = start,
                    len,
                    attempt,
                    "giving up: {err}"
                );
                return Err(FetchError::Deadline {
                    chunk: run[next].rec.digest.to_string(),
                    secs: elapsed.as_secs_f64(),
                    last: err.to_string(),
                });
            }
            tracing::info!(
                source = %source.describe(),
                offset = start,
                len,
                attempt,
                "retrying in {wait:?}: {err}"
            );
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Count what [`store_chunks`] did, and keep the cache within its budget.
    fn stored(&self, r: Result<Stored, StoreError>) -> Result<(), FetchError> {
        match r {
            Ok(Stored { stored, dropped }) => {
                self.counters.chunks.fetch_add(stored, Ordering::Relaxed);
                self.counters.corrupt.fetch_add(dropped, Ordering::Relaxed);
                if let Err(e) = self.cache.enforce_budget() {
                    tracing::warn!("cache eviction failed: {e}");
                }
                Ok(())
            }
            Err(StoreError { stored, error }) => {
                self.counters.chunks.fetch_add(stored, Ordering::Relaxed);
                if let FetchError::Corrupt(_) = &error {
                    self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                }
                Err(error)
            }
        }
    }
}

/// The records of a run's chunks.
fn run_records(run: &[ChunkRef]) -> Vec<ChunkRecord> {
    run.iter().map(|c| c.rec).collect()
}

/// What [`store_chunks`] did: chunks stored, and chunks taken along that failed verification
/// and were dropped.
struct Stored {
    stored: u64,
    dropped: u64,
}

/// A store that failed part way: how many chunks it stored first, and why it stopped.
struct StoreError {
    stored: u64,
    error: FetchError,
}

/// Verify and store each chunk of a fetched run (`bytes` from blob offset `start`). Nothing of
/// a chunk that fails verification is stored; one marked `optional` (taken along) is dropped,
/// any other fails the run.
fn store_chunks(
    cache: &ChunkCache,
    recs: &[ChunkRecord],
    optional: &[bool],
    start: u64,
    bytes: &[u8],
) -> Result<Stored, StoreError> {
    let (mut stored, mut dropped) = (0, 0);
    for (i, rec) in recs.iter().enumerate() {
        let from = (rec.offset - start) as usize;
        let to = from + rec.stored_len as usize;
        let taken_along = optional.get(i).copied().unwrap_or(false);
        let fail = |error| Err(StoreError { stored, error });
        let Some(raw) = bytes.get(from..to) else {
            if taken_along {
                continue;
            }
            return fail(FetchError::Blob(BlobError::Truncated {
                got: bytes.len() as u64,
                want: to as u64,
            }));
        };
        match store_chunk(cache, rec, raw) {
            Ok(()) => stored += 1,
            Err(FetchError::Corrupt(_)) if taken_along => dropped += 1,
            Err(e) => return fail(e),
        }
    }
    Ok(Stored { stored, dropped })
}

/// Verify one fetched chunk (`raw`, as stored in the blob) and store it.
fn store_chunk(cache: &ChunkCache, rec: &ChunkRecord, raw: &[u8]) -> Result<(), FetchError> {
    let data = chunk::decode(raw, rec.uncompressed_len as usize, &rec.digest).map_err(|e| {
        tracing::warn!("discarding fetched chunk: {e}");
        FetchError::Corrupt(rec.digest.to_string())
    })?;
    cache
        .put(&rec.digest, &data)
        .map_err(|e| FetchError::Cache(e.to_string()))
}

/// Threads under `SCHED_IDLE` (they run only when no other thread wants the CPU) for the CPU
/// work of background fill, one per core (storing many small chunks is the fill's bottleneck
/// on a fast link). Where the policy cannot be set, ordinary threads at nice 19.
struct IdleWorker {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl IdleWorker {
    fn spawn() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("beam-fill-{i}"))
                .spawn(move || {
                    lower_own_cpu_priority();
                    loop {
                        let job = rx.lock().expect("fill jobs lock").recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                // With no thread at all the sender fails every job, and `run` does it on the
                // caller's thread.
                tracing::warn!("no idle thread for background fill: {e}");
            }
        }
        IdleWorker { jobs: tx }
    }

    /// Run `f` on an idle thread and wait for its result (on the caller's thread when there
    /// is no idle thread: the channel then hands the job back).
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = oneshot::channel();
        let job: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = tx.send(f());
        });
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            job();
        }
        rx.await.expect("a background fill job panicked")
    }
}

/// Put the calling thread under `SCHED_IDLE`, or else at nice 19 (a syscall nix does not wrap).
#[allow(unsafe_code)]
fn lower_own_cpu_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler with pid 0 changes only the calling thread's policy; `param`
    // is a valid sched_param that outlives the call.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if r != 0 {
        // SAFETY: setpriority on PRIO_PROCESS with who = 0 changes only the calling thread's
        // nice value (threads have their own on Linux); no memory is passed.
        let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::future::BoxFuture;

    /// An in-memory blob that counts requests and can fail or corrupt the first answers.
    struct MemBlob {
        data: Vec<u8>,
        requests: Mutex<Vec<(u64, u64)>>,
        /// When each request was sent.
        sent: Mutex<Vec<Instant>>,
        fail_first: AtomicU64,
        corrupt_first: AtomicU64,
        /// Answer every request as a registry that refuses it (a 404 or 403).
        refuse: std::sync::atomic::AtomicBool,
        /// Answer the next request as a busy registry (429) asking for this `Retry-After`.
        busy_once: Mutex<Option<Duration>>,
        delay: Duration,
    }

    impl RangeSource for MemBlob {
        fn read_range(
            &self,
            offset: u64,
            len: u64,
        ) -> BoxFuture<'static, Result<Bytes, BlobError>> {
            self.requests.lock().unwrap().push((offset, len));
            self.sent.lock().unwrap().push(Instant::now());
            let fail = self
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let corrupt = self
                .corrupt_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let mut b = self.data[offset as usize..(offset + len) as usize].to_vec();
            if corrupt {
                b[0] ^= 0xff;
            }
            let delay = self.delay;
            let refuse = self.refuse.load(Ordering::SeqCst);
            let busy = self.busy_once.lock().unwrap().take();
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if let Some(asked) = busy {
                    return Err(BlobError::Busy {
                        message: "HTTP 429".into(),
                        retry_after: Some(asked),
                    });
                }
                if refuse {
                    return Err(BlobError::Refused("HTTP 404".into()));
                }
                if fail {
                    return Err(BlobError::Remote("HTTP 500".into()));
                }
                Ok(Bytes::from(b))
            })
        }
        fn describe(&self) -> String {
            format!("mem@{:p}", self)
        }
    }

    fn setup(
        n: usize,
        delay: Duration,
    ) -> (tempfile::TempDir, Arc<MemBlob>, Vec<ChunkRef>, Vec<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let mut data = Vec::new();
        let mut recs = Vec::new();
        let mut plain = Vec::new();
        for i in 0..n {
            let chunk: Vec<u8> = (0..4096u32)
                .map(|j| ((j * (i as u32 + 3)) % 251) as u8)
                .collect();
            let c = chunk::compress(&chunk);
            recs.push(ChunkRecord {
                digest: c.digest,
                offset: data.len() as u64,
                stored_len: c.stored.len() as u32,
                uncompressed_len: c.uncompressed_len,
            });
            data.extend_from_slice(&c.stored);
            plain.push(chunk);
        }
        let blob = Arc::new(MemBlob {
            data,
            requests: Mutex::new(Vec::new()),
            sent: Mutex::new(Vec::new()),
            fail_first: AtomicU64::new(0),
            corrupt_first: AtomicU64::new(0),
            refuse: Default::default(),
            busy_once: Mutex::new(None),
            delay,
        });
        let src: Arc<dyn RangeSource> = blob.clone();
        let refs = recs
            .into_iter()
            .map(|rec| ChunkRef {
                rec,
                source: src.clone(),
            })
            .collect();
        (dir, blob, refs, plain)
    }

    fn fetcher(dir: &std::path::Path, deadline: Duration) -> Arc<Fetcher> {
        let cache = Arc::new(ChunkCache::open(dir, 0).unwrap());
        Arc::new(Fetcher::new(
            cache,
            FetchOptions {
                deadline,
                attempt_timeout: Duration::from_secs(2),
                ..FetchOptions::default()
            },
        ))
    }

    /// `f.ensure(chunks, p)` on a task of its own.
    fn spawn_ensure(
        f: &Arc<Fetcher>,
        chunks: &[ChunkRef],
        p: Priority,
    ) -> tokio::task::JoinHandle<Result<(), FetchError>> {
        let (f, r) = (f.clone(), chunks.to_vec());
        tokio::spawn(async move { f.ensure(&r, p).await })
    }

    /// Background fill sends nothing while a read is in flight, and waits an idle gap after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_fill_waits_for_the_foreground() {
        let (dir, blob, refs, _) = setup(6, Duration::from_millis(200));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        let t0 = Instant::now();
        let fg = spawn_ensure(&f, &refs[..1], Priority::Demand);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let bg = spawn_ensure(&f, &refs[2..], Priority::Background);
        fg.await.unwrap().unwrap();
        let fg_done = t0.elapsed();
        bg.await.unwrap().unwrap();
        let sent = blob.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2, "{:?}", blob.requests.lock().unwrap());
        let bg_sent = sent[1] - t0;
        assert!(
            bg_sent >= fg_done + Duration::from_millis(90),
            "background request sent at {bg_sent:?}, the read finished at {fg_done:?}"
        );
    }

    /// After a start signal, background fill waits START_QUIET while nothing is read, then
    /// START_SETTLE after the program's last read (not the short idle gap).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_fill_leaves_a_start_alone() {
        // No read after the signal: the fill waits START_QUIET from it.
        let (dir, blob, refs, _) = setup(6, Duration::from_millis(10));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        f.ensure(&refs[..1], Priority::Demand).await.unwrap();
        f.note_start();
        let t0 = Instant::now();
        f.ensure(&refs[2..], Priority::Background).await.unwrap();
        let sent = blob.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2, "{:?}", blob.requests.lock().unwrap());
        assert!(
            sent[1] - t0 >= START_QUIET,
            "fill sent after {:?}",
            sent[1] - t0
        );
        // A read 100 ms after the signal: the fill waits START_SETTLE from its end.
        let (dir, blob, refs, _) = setup(6, Duration::from_millis(10));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        f.note_start();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        f.ensure(&refs[..1], Priority::Demand).await.unwrap();
        let read_done = t0.elapsed();
        f.ensure(&refs[2..], Priority::Background).await.unwrap();
        let sent = blob.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2, "{:?}", blob.requests.lock().unwrap());
        let bg_sent = sent[1] - t0;
        assert!(
            bg_sent >= read_done + START_SETTLE && bg_sent < read_done + START_QUIET,
            "fill sent at {bg_sent:?}, {START_SETTLE:?} after a read that ended at {read_done:?}"
        );
        // Without a start signal the idle gap (at most 1 s, here 100 ms) applies.
        let (dir, blob, refs, _) = setup(6, Duration::from_millis(10));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        f.ensure(&refs[..1], Priority::Demand).await.unwrap();
        let t = Instant::now();
        f.ensure(&refs[2..], Priority::Background).await.unwrap();
        // When the fill's request was sent (storing it on the idle threads may take longer on
        // a busy machine: they get only idle CPU).
        let sent = blob.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2);
        assert!(
            sent[1] - t < START_QUIET,
            "fill sent after {:?}",
            sent[1] - t
        );
    }

    /// After a start, opens of cached files count as the program's activity: the fill waits
    /// START_SETTLE after the last of them (other containers of the image starting), not
    /// after the last read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_fill_waits_while_starting_programs_open_files() {
        let (dir, blob, refs, _) = setup(6, Duration::from_millis(10));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        f.note_start();
        let t0 = Instant::now();
        f.ensure(&refs[..1], Priority::Demand).await.unwrap();
        let opener = {
            let f = f.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    f.note_open();
                }
                t0.elapsed()
            })
        };
        let fill = spawn_ensure(&f, &refs[2..], Priority::Background);
        let last_open = opener.await.unwrap();
        fill.await.unwrap().unwrap();
        let sent = blob.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2, "{:?}", blob.requests.lock().unwrap());
        let bg_sent = sent[1] - t0;
        assert!(
            bg_sent >= last_open + START_SETTLE,
            "fill sent at {bg_sent:?}, the last open was at {last_open:?}"
        );
    }

    /// Background fill sends nothing while a recorded prefetch list is being fetched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_fill_waits_for_the_prefetch_list() {
        let (dir, blob, refs, _) = setup(6, Duration::from_millis(300));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        let pre = spawn_ensure(&f, &refs[..1], Priority::Prefetch);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let bg = spawn_ensure(&f, &refs[2..], Priority::Background);
        pre.await.unwrap().unwrap();
        bg.await.unwrap().unwrap();
        let sent = blob.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2, "{:?}", blob.requests.lock().unwrap());
        // The prefetch request takes 300 ms to answer; the fill is sent after that.
        assert!(
            sent[1] - sent[0] >= Duration::from_millis(300),
            "fill sent {:?} after the prefetch request, during it",
            sent[1] - sent[0]
        );
    }

    /// Fill decoded on the idle thread is verified there like any other fetch: a corrupt answer
    /// is counted, never stored, and fetched again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_fill_is_verified_on_the_idle_thread() {
        let (dir, blob, refs, plain) = setup(3, Duration::from_millis(1));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        blob.corrupt_first.store(1, Ordering::SeqCst);
        f.ensure(&refs, Priority::Background).await.unwrap();
        assert_eq!(f.counters.corrupt.load(Ordering::SeqCst), 1);
        assert_eq!(f.counters.chunks.load(Ordering::SeqCst), 3);
        for (r, want) in refs.iter().zip(&plain) {
            let file = f
                .cache
                .open_chunk(&r.rec.digest, want.len())
                .unwrap()
                .unwrap();
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut &*file, &mut got).unwrap();
            assert_eq!(&got, want);
        }
    }

    /// Chunks taken along ride in the read's request; one that fails verification is dropped
    /// (the read still succeeds and the chunk is not cached), and one already in flight
    /// elsewhere ends what is taken along instead of being waited for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_taken_along_share_the_request_and_never_fail_the_read() {
        let (dir, blob, mut refs, _) = setup(4, Duration::from_millis(1));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        // A hostile neighbour: its record claims a digest its bytes do not have.
        refs[1].rec.digest = refs[3].rec.digest;
        f.ensure_along(&refs[..1], &refs[1..3], Priority::Demand)
            .await
            .unwrap();
        let reqs = blob.requests.lock().unwrap().clone();
        assert_eq!(reqs.len(), 1, "{reqs:?}");
        let end = refs[2].rec.offset + refs[2].rec.stored_len as u64;
        assert_eq!(reqs[0], (refs[0].rec.offset, end - refs[0].rec.offset));
        // The read returns once its own chunk is stored; the run goes on by itself.
        assert!(f.cache.contains(&refs[0].rec.digest));
        eventually(|| f.cache.contains(&refs[2].rec.digest)).await;
        assert!(
            !f.cache.contains(&refs[1].rec.digest),
            "the bad neighbour was stored"
        );
        eventually(|| f.counters.corrupt.load(Ordering::SeqCst) == 1).await;

        // In flight elsewhere: not taken along, not waited for.
        let (dir, blob, refs, _) = setup(4, Duration::from_millis(400));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        // The other fetch fails once and is retried: it ends well after this read's request.
        blob.fail_first.store(1, Ordering::SeqCst);
        let other = spawn_ensure(&f, &refs[1..2], Priority::Prefetch);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        f.ensure_along(&refs[..1], &refs[1..], Priority::Demand)
            .await
            .unwrap();
        let took = t.elapsed();
        other.await.unwrap().unwrap();
        let reqs = blob.requests.lock().unwrap().clone();
        assert_eq!(reqs.len(), 3, "{reqs:?}");
        assert_eq!(
            reqs[1],
            (refs[0].rec.offset, refs[0].rec.stored_len as u64),
            "{reqs:?}"
        );
        assert!(took < Duration::from_millis(700), "{took:?}");
    }

    /// Wait (up to 5 s) until `cond` holds: for what a run does after its asker has returned.
    async fn eventually(cond: impl Fn() -> bool) {
        let t = Instant::now();
        while !cond() {
            assert!(t.elapsed() < Duration::from_secs(5), "never came true");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A source whose answers stream: the first `first` bytes of a range at once, the rest
    /// after `pause`.
    struct SlowTail {
        data: Vec<u8>,
        first: usize,
        pause: Duration,
    }

    impl RangeSource for SlowTail {
        fn read_range(
            &self,
            offset: u64,
            len: u64,
        ) -> BoxFuture<'static, Result<Bytes, BlobError>> {
            let b = Bytes::copy_from_slice(&self.data[offset as usize..(offset + len) as usize]);
            let pause = self.pause;
            Box::pin(async move {
                tokio::time::sleep(pause).await;
                Ok(b)
            })
        }

        fn read_range_stream(
            &self,
            offset: u64,
            len: u64,
        ) -> futures_util::stream::BoxStream<'static, Result<Bytes, BlobError>> {
            use futures_util::StreamExt;
            let mut b =
                Bytes::copy_from_slice(&self.data[offset as usize..(offset + len) as usize]);
            let head = b.split_to(self.first.min(b.len()));
            let pause = self.pause;
            futures_util::stream::once(async move { Ok(head) })
                .chain(futures_util::stream::once(async move {
                    tokio::time::sleep(pause).await;
                    Ok(b)
                }))
                .boxed()
        }

        fn describe(&self) -> String {
            "slow tail".into()
        }
    }

    /// A source whose first answer is cut short after `first` bytes; later ones are whole.
    struct CutOnce {
        data: Vec<u8>,
        first: usize,
        cut: std::sync::atomic::AtomicBool,
        asked: Mutex<Vec<(u64, u64)>>,
    }

    impl RangeSource for CutOnce {
        fn read_range(
            &self,
            offset: u64,
            len: u64,
        ) -> BoxFuture<'static, Result<Bytes, BlobError>> {
            use futures_util::StreamExt;
            let mut s = self.read_range_stream(offset, len);
            Box::pin(async move {
                let mut out = Vec::new();
                while let Some(p) = s.next().await {
                    out.extend_from_slice(&p?);
                }
                Ok(Bytes::from(out))
            })
        }

        fn read_range_stream(
            &self,
            offset: u64,
            len: u64,
        ) -> futures_util::stream::BoxStream<'static, Result<Bytes, BlobError>> {
            use futures_util::StreamExt;
            self.asked.lock().unwrap().push((offset, len));
            let b = Bytes::copy_from_slice(&self.data[offset as usize..(offset + len) as usize]);
            if self.cut.swap(false, Ordering::SeqCst) {
                let head = b.slice(..self.first);
                return futures_util::stream::iter([
                    Ok(head),
                    Err(BlobError::Truncated {
                        got: self.first as u64,
                        want: len,
                    }),
                ])
                .boxed();
            }
            futures_util::stream::once(async move { Ok(b) }).boxed()
        }

        fn describe(&self) -> String {
            "cut once".into()
        }
    }

    /// A body cut short keeps the chunks that came whole; the next try asks only for the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_body_keeps_its_whole_chunks_and_asks_for_the_rest() {
        let (dir, blob, refs, _) = setup(4, Duration::from_millis(1));
        // Cut in the middle of the third chunk: the first two came whole.
        let cut_at = (refs[2].rec.offset - refs[0].rec.offset) as usize + 3;
        let src = Arc::new(CutOnce {
            data: blob.data.clone(),
            first: cut_at,
            cut: std::sync::atomic::AtomicBool::new(true),
            asked: Mutex::new(Vec::new()),
        });
        let source: Arc<dyn RangeSource> = src.clone();
        let refs: Vec<ChunkRef> = refs
            .into_iter()
            .map(|c| ChunkRef {
                rec: c.rec,
                source: source.clone(),
            })
            .collect();
        let f = fetcher(dir.path(), Duration::from_secs(5));
        f.ensure(&refs, Priority::Demand).await.unwrap();
        assert!(refs.iter().all(|c| f.cache.contains(&c.rec.digest)));
        let asked = src.asked.lock().unwrap().clone();
        let end = refs[3].rec.offset + refs[3].rec.stored_len as u64;
        assert_eq!(
            asked,
            vec![
                (refs[0].rec.offset, end - refs[0].rec.offset),
                (refs[2].rec.offset, end - refs[2].rec.offset)
            ]
        );
        assert_eq!(f.counters.chunks.load(Ordering::SeqCst), 4);
    }

    /// A read's chunk is handed over as soon as its bytes are in and verified: the read does
    /// not wait for the chunks taken along after it in the same request, which are stored
    /// when they arrive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_returns_when_its_chunk_arrives_not_when_the_request_ends() {
        let (dir, blob, refs, _) = setup(4, Duration::from_millis(1));
        let first = refs[0].rec.stored_len as usize;
        let src: Arc<dyn RangeSource> = Arc::new(SlowTail {
            data: blob.data.clone(),
            first,
            pause: Duration::from_millis(800),
        });
        let refs: Vec<ChunkRef> = refs
            .into_iter()
            .map(|c| ChunkRef {
                rec: c.rec,
                source: src.clone(),
            })
            .collect();
        let f = fetcher(dir.path(), Duration::from_secs(5));
        let t = Instant::now();
        f.ensure_along(&refs[..1], &refs[1..], Priority::Demand)
            .await
            .unwrap();
        let took = t.elapsed();
        assert!(took < Duration::from_millis(500), "the read took {took:?}");
        assert!(f.cache.contains(&refs[0].rec.digest));
        assert!(
            !f.cache.contains(&refs[3].rec.digest),
            "the tail came early"
        );
        eventually(|| refs.iter().all(|c| f.cache.contains(&c.rec.digest))).await;
        assert_eq!(f.counters.requests.load(Ordering::SeqCst), 1);
    }

    /// Readahead holding every foreground slot does not queue a read a process waits on: it
    /// takes a slot kept for such reads and is answered in one request's time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_is_never_queued_behind_readahead() {
        let (dir, _blob, refs, _) = setup(6, Duration::from_millis(400));
        let cache = Arc::new(ChunkCache::open(dir.path(), 0).unwrap());
        let f = Arc::new(Fetcher::new(
            cache,
            FetchOptions {
                deadline: Duration::from_secs(10),
                attempt_timeout: Duration::from_secs(5),
                foreground_concurrency: 2,
                ..FetchOptions::default()
            },
        ));
        let ahead: Vec<_> = [0, 2, 4]
            .iter()
            .map(|&i| spawn_ensure(&f, &refs[i..i + 1], Priority::Readahead))
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        f.ensure(&refs[3..4], Priority::Demand).await.unwrap();
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(700),
            "the read waited for a slot: {took:?}"
        );
        for a in ahead {
            a.await.unwrap().unwrap();
        }
    }

    /// A read of a chunk that held-back background fill also wants gets it now, not after the
    /// foreground goes idle (which it never would while that read waits): the fill claims no
    /// chunk while it is held back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_never_waits_on_held_back_fill() {
        let (dir, _blob, refs, _) = setup(4, Duration::from_millis(300));
        let f = fetcher(dir.path(), Duration::from_secs(10));
        // A long read keeps the foreground busy.
        let long = spawn_ensure(&f, &refs[..1], Priority::Demand);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Background fill wants chunks 2 and 3 and is held back.
        let bg = spawn_ensure(&f, &refs[2..], Priority::Background);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(3),
            f.ensure(&refs[3..], Priority::Demand),
        )
        .await
        .expect("the read waited on a held-back background run")
        .unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        long.await.unwrap().unwrap();
        bg.await.unwrap().unwrap();
    }

    /// Background fill fetches the chunks around cached ones in one request (the cached bytes
    /// between them are dropped); reads fetch each hole on its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_fill_bridges_small_holes() {
        let (dir, blob, refs, plain) = setup(5, Duration::from_millis(1));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        f.ensure(&[refs[1].clone()], Priority::Demand)
            .await
            .unwrap();
        f.ensure(&[refs[3].clone()], Priority::Demand)
            .await
            .unwrap();
        assert_eq!(blob.requests.lock().unwrap().len(), 2);
        f.ensure(&refs, Priority::Background).await.unwrap();
        let requests = blob.requests.lock().unwrap().clone();
        assert_eq!(
            requests.len(),
            3,
            "one request for chunks 0, 2 and 4: {requests:?}"
        );
        let last = refs[4].rec.offset + refs[4].rec.stored_len as u64;
        assert_eq!(requests[2], (0, last));
        for (r, p) in refs.iter().zip(&plain) {
            assert_eq!(
                &f.cache.read_chunk(&r.rec.digest, p.len()).unwrap().unwrap(),
                p
            );
        }
    }

    /// Guesses across files are paid for only on a far link, once its round trip has been
    /// seen: four round trips of the link's bytes there, nothing near by.
    #[test]
    fn guesses_follow_the_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let link = |rt_ms: u64, samples: usize| {
            let f = fetcher(dir.path(), Duration::from_secs(5));
            for _ in 0..samples {
                f.observe(4096, Duration::from_millis(rt_ms), true, 1);
            }
            f.observe(
                5 << 20,
                Duration::from_secs_f64(rt_ms as f64 / 1000.0 + 5.0 * 1048576.0 / 25e6),
                true,
                1,
            );
            f.speculation_bytes()
        };
        // 25 MB/s and 20 ms: 4 x 500 kB.
        let far = link(20, 1);
        assert!((1_950_000..2_050_000).contains(&far), "{far}");
        assert_eq!(link(20, 0), 0, "before a round trip was seen");
        assert_eq!(link(4, 10), 0, "a near registry");
    }

    /// One probe per process, before any round trip was seen: its answer time is the round
    /// trip, so guesses may go with the first reads of a start on a far registry.
    #[tokio::test]
    async fn a_probe_shows_the_round_trip_before_the_first_read() {
        let (_dir, blob, _refs, _) = setup(2, Duration::from_millis(25));
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), Duration::from_secs(5));
        // The link's rate is known (a large request), its round trip is not: no guesses.
        f.observe(
            5 << 20,
            Duration::from_secs_f64(5.0 * 1048576.0 / 25e6),
            false,
            3,
        );
        assert_eq!(f.speculation_bytes(), 0);
        assert!(f.wants_round_trip_probe());
        f.probe_round_trip(blob.clone());
        assert!(!f.wants_round_trip_probe());
        f.probe_round_trip(blob.clone());
        let t0 = Instant::now();
        while f.speculation_bytes() == 0 && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(f.speculation_bytes() > 0, "a far registry, once probed");
        assert_eq!(
            *blob.requests.lock().unwrap(),
            vec![(0, 1)],
            "one probe of one byte"
        );
        // Not again in this process.
        f.probe_round_trip(blob.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(blob.requests.lock().unwrap().len(), 1);
    }

    #[test]
    fn background_requests_follow_the_measured_link() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), Duration::from_secs(5));
        assert_eq!(
            f.background_request_bytes(),
            1 << 20,
            "before any measurement"
        );
        // 25 MB/s (200 Mbit/s) 20 ms away: about 1.25 MB per request (the round trip, learnt
        // from a small request, is not counted as transfer time).
        f.observe(4096, Duration::from_millis(20), true, 1);
        f.observe(
            5 << 20,
            Duration::from_secs_f64(0.02 + 5.0 * 1048576.0 / 25e6),
            true,
            1,
        );
        // Two requests sharing the link each see half of it.
        let f2 = fetcher(dir.path(), Duration::from_secs(5));
        f2.observe(4096, Duration::from_millis(20), true, 1);
        f2.observe(
            5 << 20,
            Duration::from_secs_f64(0.02 + 2.0 * 5.0 * 1048576.0 / 25e6),
            false,
            2,
        );
        let b2 = f2.background_request_bytes();
        assert!((1_200_000..1_300_000).contains(&b2), "{b2}");
        let b = f.background_request_bytes();
        assert!((1_200_000..1_300_000).contains(&b), "{b}");
        // A sequential reader's window: a tenth of a second of the link, at least the floor.
        assert_eq!(f.readahead_bytes(4 << 20), 4 << 20);
        let ra = f.readahead_bytes(1 << 20);
        assert!((2_490_000..2_510_000).contains(&ra), "{ra}");
        // A small request that shared the link waited behind other bytes: not a round trip,
        // and the link's rate is not taken for slower by it.
        let f3 = fetcher(dir.path(), Duration::from_secs(5));
        f3.observe(4096, Duration::from_millis(140), true, 3);
        assert_eq!(f3.link.lock().unwrap().round_trip, 0.0);
        f3.observe(4096, Duration::from_millis(20), true, 1);
        assert!((f3.link.lock().unwrap().round_trip - 0.02).abs() < 1e-9);
        // Loopback speeds are capped by the configured maximum.
        let f = fetcher(dir.path(), Duration::from_secs(5));
        f.observe(64 << 20, Duration::from_millis(20), true, 1);
        assert_eq!(f.background_request_bytes(), 8 << 20);
        assert_eq!(f.readahead_bytes(4 << 20), 32 << 20, "capped");
        assert_eq!(f.idle_gap(), Duration::from_millis(100));
        f.observe(4096, Duration::from_millis(100), true, 1);
        assert!(
            f.idle_gap() > Duration::from_millis(100),
            "grows with latency"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn adjacent_chunks_are_one_request_and_concurrent_readers_share_it() {
        let (dir, blob, refs, plain) = setup(5, Duration::from_millis(100));
        let f = fetcher(dir.path(), Duration::from_secs(5));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let f = f.clone();
            let refs = refs.clone();
            tasks.push(tokio::spawn(async move {
                f.ensure(&refs, Priority::Demand).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(blob.requests.lock().unwrap().len(), 1, "one merged request");
        for (r, p) in refs.iter().zip(&plain) {
            assert_eq!(
                &f.cache.read_chunk(&r.rec.digest, p.len()).unwrap().unwrap(),
                p
            );
        }
        // Present chunks are not fetched again.
        f.ensure(&refs, Priority::Demand).await.unwrap();
        assert_eq!(blob.requests.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn corrupt_answers_are_refetched_and_never_stored() {
        let (dir, blob, refs, plain) = setup(2, Duration::ZERO);
        blob.corrupt_first.store(2, Ordering::SeqCst);
        let f = fetcher(dir.path(), Duration::from_secs(10));
        f.ensure(&refs, Priority::Demand).await.unwrap();
        assert_eq!(blob.requests.lock().unwrap().len(), 3);
        assert_eq!(f.counters.corrupt.load(Ordering::Relaxed), 2);
        assert_eq!(
            &f.cache
                .read_chunk(&refs[0].rec.digest, 4096)
                .unwrap()
                .unwrap(),
            &plain[0]
        );
    }

    #[tokio::test]
    async fn persistent_failure_ends_at_the_deadline() {
        let (dir, blob, refs, _) = setup(1, Duration::ZERO);
        blob.fail_first.store(u64::MAX, Ordering::SeqCst);
        let f = fetcher(dir.path(), Duration::from_millis(600));
        let t = Instant::now();
        let e = f.ensure(&refs, Priority::Demand).await.unwrap_err();
        assert!(matches!(e, FetchError::Deadline { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(!f.cache.contains(&refs[0].rec.digest));
        // Asked again at once (the kernel's follow-up to a failed readahead), it fails at once
        // without a request: one deadline per reader, not two.
        blob.fail_first.store(0, Ordering::SeqCst);
        let asked = blob.requests.lock().unwrap().len();
        let t = Instant::now();
        let e = f.ensure(&refs, Priority::Demand).await.unwrap_err();
        assert!(matches!(e, FetchError::Deadline { .. }), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(blob.requests.lock().unwrap().len(), asked, "no new request");
        // And it works once the memory has passed and the source is healthy again.
        tokio::time::sleep(GAVE_UP_MEMORY).await;
        f.ensure(&refs, Priority::Demand).await.unwrap();
    }

    /// A refusal (404, 401 after a fresh token, 403) is final: no retries to the deadline.
    #[tokio::test]
    async fn a_refused_range_fails_at_once() {
        let (dir, blob, refs, _) = setup(1, Duration::ZERO);
        blob.refuse.store(true, Ordering::SeqCst);
        let f = fetcher(dir.path(), Duration::from_secs(60));
        let t = Instant::now();
        let e = f.ensure(&refs, Priority::Demand).await.unwrap_err();
        assert!(matches!(e, FetchError::Blob(BlobError::Refused(_))), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(blob.requests.lock().unwrap().len(), 1);
    }

    /// A busy registry (429, 503) is asked again no sooner than its `Retry-After`, within the
    /// deadline.
    #[tokio::test]
    async fn a_busy_registry_is_asked_again_after_its_retry_after() {
        let (dir, blob, refs, plain) = setup(1, Duration::ZERO);
        *blob.busy_once.lock().unwrap() = Some(Duration::from_millis(700));
        let f = fetcher(dir.path(), Duration::from_secs(10));
        f.ensure(&refs, Priority::Demand).await.unwrap();
        let sent = blob.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2, "one busy answer, one retry");
        let gap = sent[1] - sent[0];
        assert!(
            gap >= Duration::from_millis(700),
            "asked again after {gap:?}"
        );
        let got = f.cache.read_chunk(&refs[0].rec.digest, plain[0].len());
        assert_eq!(got.unwrap().unwrap(), plain[0]);
    }

    /// A hostile layer that declares a victim's chunk digest at a wrong place fails alone: the
    /// victim's read does not wait on that fetch or inherit its failure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shadowing_chunk_digest_does_not_capture_other_layers_reads() {
        let (dir, _victim_blob, victim, plain) = setup(2, Duration::ZERO);
        // The hostile blob holds other bytes where it claims chunk 0 of the victim is.
        let (_d2, hostile_blob, other, _) = setup(2, Duration::from_millis(300));
        let hostile_src: Arc<dyn RangeSource> = hostile_blob.clone();
        let shadow = ChunkRef {
            rec: ChunkRecord {
                offset: other[1].rec.offset,
                ..victim[0].rec
            },
            source: hostile_src,
        };
        let f = fetcher(dir.path(), Duration::from_millis(1500));
        let hostile = spawn_ensure(&f, &[shadow], Priority::Demand);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        f.ensure(&victim[..1], Priority::Demand).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            f.cache
                .read_chunk(&victim[0].rec.digest, 4096)
                .unwrap()
                .unwrap(),
            plain[0]
        );
        // The hostile fetch got bytes that do not hash to the claim.
        let _ = hostile.await.unwrap();
        assert!(f.counters.corrupt.load(Ordering::Relaxed) >= 1);
    }

    /// Behind a registry that never answers, reads queued for a request slot end at their
    /// deadline too (the wait for a slot counts), not after every request ahead of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_reads_end_at_their_deadline_behind_a_black_hole() {
        let (dir, _blob, refs, _) = setup(40, Duration::from_secs(3600));
        let cache = Arc::new(ChunkCache::open(dir.path(), 0).unwrap());
        let f = Arc::new(Fetcher::new(
            cache,
            FetchOptions {
                deadline: Duration::from_millis(800),
                attempt_timeout: Duration::from_secs(20),
                foreground_concurrency: 2,
                max_request_bytes: 1,
                ..FetchOptions::default()
            },
        ));
        let t = Instant::now();
        // One read per chunk, far more than there are slots.
        let reads: Vec<_> = refs
            .iter()
            .map(|c| spawn_ensure(&f, std::slice::from_ref(c), Priority::Demand))
            .collect();
        for r in reads {
            let e = r.await.unwrap().unwrap_err();
            assert!(matches!(e, FetchError::Deadline { .. }), "{e}");
        }
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
}
