//! Where a layer's chunk blob is read from, by byte range: a registry (HTTP Range, mirrors
//! first) or an OCI layout on disk (file offsets).
//!
//! This sits below both the fetcher (which merges, retries and verifies the ranges it reads
//! here) and the image store (which builds the right source for a layer), so neither has to
//! know about the other. A source only moves bytes: it never verifies them, and its errors say
//! whether the bytes could not be had at all or came short.

use crate::registry::{Failure, Registry};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use oci_client::Reference;
use std::path::PathBuf;
use std::sync::Arc;

/// Why a range could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlobError {
    /// Worth another try (a 5xx, 429, a connection error, a timeout).
    #[error("registry request failed: {0}")]
    Remote(String),
    /// Another try gets the same answer (404, 401 after a fresh token, 403, another 4xx).
    #[error("registry refused the request: {0}")]
    Refused(String),
    /// The registry is busy (429, 503): worth another try, no sooner than it asked.
    #[error("registry is busy: {message}")]
    Busy {
        message: String,
        /// The registry's `Retry-After`.
        retry_after: Option<std::time::Duration>,
    },
    #[error("registry sent {got} bytes for a {want}-byte range")]
    Truncated { got: u64, want: u64 },
}

impl BlobError {
    fn from_error(e: &anyhow::Error) -> BlobError {
        let f = Failure::of(e);
        let message = format!("{e:#}");
        if f == Failure::Busy {
            BlobError::Busy {
                message,
                retry_after: crate::registry::retry_after(e),
            }
        } else if f.is_retryable() {
            BlobError::Remote(message)
        } else {
            BlobError::Refused(message)
        }
    }
}

/// Where a layer's chunk blob can be read by byte range.
pub trait RangeSource: Send + Sync + 'static {
    /// `len` bytes at `offset` of the chunk blob.
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Bytes, BlobError>>;
    /// The same bytes as [`RangeSource::read_range`], handed on in order as they arrive: their
    /// total is `len`, or the stream ends with an error (the fetcher stores each chunk as soon
    /// as its bytes are in). By default one piece, when the whole range is read.
    fn read_range_stream(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxStream<'static, Result<Bytes, BlobError>> {
        Box::pin(futures_util::stream::once(self.read_range(offset, len)))
    }
    /// A name for logs (never includes credentials).
    fn describe(&self) -> String;
}

/// A chunk blob in a registry, with mirrors tried in order before the origin.
pub struct RegistryBlob {
    pub registry: Arc<Registry>,
    /// Mirrors first, origin last; same repository and digest on each.
    pub locations: Vec<Reference>,
    pub digest: String,
}

impl RangeSource for RegistryBlob {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Bytes, BlobError>> {
        let registry = self.registry.clone();
        let locations = self.locations.clone();
        let digest = self.digest.clone();
        Box::pin(async move {
            let mut last = BlobError::Remote("no registry location".into());
            for r in &locations {
                match registry.blob_range(r, &digest, offset, len).await {
                    Ok(b) => return Ok(b),
                    Err(e) => {
                        tracing::debug!(location = %r, "range fetch failed: {e}");
                        last = e;
                    }
                }
            }
            Err(last)
        })
    }

    fn read_range_stream(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxStream<'static, Result<Bytes, BlobError>> {
        let registry = self.registry.clone();
        let locations = self.locations.clone();
        let digest = self.digest.clone();
        // Mirrors in order until one answers; then its body, as it arrives.
        let answered = async move {
            let mut last = BlobError::Remote("no registry location".into());
            for r in &locations {
                match registry.range_response(r, &digest, offset, len).await {
                    Ok((resp, partial)) => return Ok((resp, if partial { 0 } else { offset })),
                    Err(e) => {
                        let e = BlobError::from_error(&e);
                        tracing::debug!(location = %r, "range fetch failed: {e}");
                        last = e;
                    }
                }
            }
            Err(last)
        };
        futures_util::stream::once(answered)
            .flat_map(move |answer| match answer {
                Ok((resp, skip)) => body_pieces(resp, skip, len).boxed(),
                Err(e) => futures_util::stream::once(async move { Err(e) }).boxed(),
            })
            .boxed()
    }

    fn describe(&self) -> String {
        match self.locations.last() {
            Some(r) => format!("{}/{}@{}", r.registry(), r.repository(), self.digest),
            None => self.digest.clone(),
        }
    }
}

/// A chunk blob in an OCI image layout, read by file offset.
pub struct LayoutBlob {
    pub path: PathBuf,
}

impl RangeSource for LayoutBlob {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Bytes, BlobError>> {
        let path = self.path.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::open(&path).map_err(|e| BlobError::Remote(e.to_string()))?;
                let mut buf = vec![0u8; len as usize];
                let n = f
                    .read_at(&mut buf, offset)
                    .map_err(|e| BlobError::Remote(e.to_string()))?;
                if (n as u64) < len {
                    return Err(BlobError::Truncated {
                        got: n as u64,
                        want: len,
                    });
                }
                Ok(Bytes::from(buf))
            })
            .await
            .map_err(|e| BlobError::Remote(e.to_string()))?
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A registry-backed range read, used by [`RegistryBlob`].
impl Registry {
    /// `len` bytes at `offset` of blob `digest` in `r`'s repository, by HTTP Range.
    pub async fn blob_range(
        &self,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, BlobError> {
        let (resp, partial) = self
            .range_response(r, digest, offset, len)
            .await
            .map_err(|e| BlobError::from_error(&e))?;
        // A registry that ignores Range sends the whole blob: skip to the range.
        let skip = if partial { 0 } else { offset };
        joined(body_pieces(resp, skip, len), len).await
    }
}

/// The pieces of a range (`len` bytes) as one buffer, or the first error among them.
async fn joined(
    pieces: impl Stream<Item = Result<Bytes, BlobError>>,
    len: u64,
) -> Result<Bytes, BlobError> {
    let mut out = bytes::BytesMut::with_capacity(len as usize);
    let mut pieces = std::pin::pin!(pieces);
    while let Some(piece) = pieces.next().await {
        out.extend_from_slice(&piece?);
    }
    Ok(out.freeze())
}

/// The `len` bytes of a range answer's body after its first `skip` (a registry that ignores
/// Range sends the whole blob), piece by piece as they arrive; a body that ends short ends
/// with [`BlobError::Truncated`], and nothing past `len` is read.
fn body_pieces(
    resp: reqwest::Response,
    skip: u64,
    len: u64,
) -> impl Stream<Item = Result<Bytes, BlobError>> + Send + 'static {
    futures_util::stream::unfold(Some((resp, skip, 0u64)), move |state| async move {
        let (mut resp, mut to_skip, mut got) = state?;
        loop {
            match resp.chunk().await {
                Err(e) => {
                    return Some((Err(BlobError::Remote(format!("reading body: {e}"))), None))
                }
                Ok(None) if got < len => {
                    return Some((Err(BlobError::Truncated { got, want: len }), None))
                }
                Ok(None) => return None,
                Ok(Some(mut piece)) => {
                    if to_skip > 0 {
                        let k = to_skip.min(piece.len() as u64) as usize;
                        let _ = piece.split_to(k);
                        to_skip -= k as u64;
                    }
                    piece.truncate(piece.len().min((len - got) as usize));
                    if piece.is_empty() {
                        continue;
                    }
                    got += piece.len() as u64;
                    let more = (got < len).then_some((resp, to_skip, got));
                    return Some((Ok(piece), more));
                }
            }
        }
    })
}

/// How long a body asked for ahead ([`AheadBody`]) is kept for the reads it is meant for.
pub const AHEAD_BODY_KEPT: std::time::Duration = std::time::Duration::from_secs(30);

/// A small chunk blob whose whole body was asked for before anyone knew its chunks: a small
/// layer's, as soon as its artifact is known, beside its index, so that the index and the
/// chunks take one round trip, not two (issue 13). Ranges within it are served from that body
/// as it arrives, until it has been served whole or [`AHEAD_BODY_KEPT`] has passed; then, and
/// for whatever the body cannot serve (it failed or came short), from the blob itself. It only
/// moves bytes: the fetcher verifies them as it does any source's.
pub struct AheadBody {
    inner: Arc<dyn RangeSource>,
    size: u64,
    state: Arc<std::sync::Mutex<AheadState>>,
    /// Bytes of the body in so far, for readers waiting on more.
    arrived: tokio::sync::watch::Receiver<u64>,
}

struct AheadState {
    /// The body so far; empty once let go.
    buf: Vec<u8>,
    /// The body ended: whole (`Some(true)`) or not (`Some(false)`: failed or came short).
    ended: Option<bool>,
    /// Whether ranges are still served from it.
    kept: bool,
    served: u64,
}

impl AheadBody {
    /// Ask `inner` for its first `size` bytes now (on the current tokio runtime).
    pub fn start(inner: Arc<dyn RangeSource>, size: u64) -> Arc<AheadBody> {
        let state = Arc::new(std::sync::Mutex::new(AheadState {
            buf: Vec::with_capacity(size as usize),
            ended: None,
            kept: true,
            served: 0,
        }));
        let (tx, arrived) = tokio::sync::watch::channel(0u64);
        let mut body = inner.read_range_stream(0, size);
        let weak = Arc::downgrade(&state);
        tokio::spawn(async move {
            let mut whole = false;
            while let Some(piece) = body.next().await {
                let Some(state) = weak.upgrade() else { return };
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                match piece {
                    Ok(b) if s.buf.len() + b.len() <= size as usize => {
                        s.buf.extend_from_slice(&b);
                        whole = s.buf.len() == size as usize;
                        tx.send_replace(s.buf.len() as u64);
                    }
                    _ => break,
                }
            }
            if let Some(state) = weak.upgrade() {
                state.lock().unwrap_or_else(|p| p.into_inner()).ended = Some(whole);
            }
            tx.send_modify(|_| {});
            // Not kept for ever for reads that never come (their chunks were cached).
            tokio::time::sleep(AHEAD_BODY_KEPT).await;
            if let Some(state) = weak.upgrade() {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                s.kept = false;
                s.buf = Vec::new();
            }
        });
        Arc::new(AheadBody {
            inner,
            size,
            state,
            arrived,
        })
    }
}

impl RangeSource for AheadBody {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Bytes, BlobError>> {
        Box::pin(joined(self.read_range_stream(offset, len), len))
    }

    fn read_range_stream(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxStream<'static, Result<Bytes, BlobError>> {
        let end = offset + len;
        let kept = self.state.lock().unwrap_or_else(|p| p.into_inner()).kept;
        if !kept || end > self.size {
            return self.inner.read_range_stream(offset, len);
        }
        let (inner, state, size) = (self.inner.clone(), self.state.clone(), self.size);
        let arrived = self.arrived.clone();
        // Each step hands on what arrived past `pos`, or waits for more; what the body cannot
        // give is read from the blob, as one piece.
        futures_util::stream::unfold(
            (offset, arrived, false),
            move |(pos, mut arrived, fell_back)| {
                let (inner, state) = (inner.clone(), state.clone());
                async move {
                    if pos >= end || fell_back {
                        return None;
                    }
                    loop {
                        let step = {
                            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                            let have = s.buf.len() as u64;
                            if s.kept && have > pos {
                                let to = have.min(end);
                                s.served += to - pos;
                                let piece =
                                    Bytes::copy_from_slice(&s.buf[pos as usize..to as usize]);
                                if s.served >= size {
                                    s.kept = false;
                                    s.buf = Vec::new();
                                }
                                Some(Ok((piece, to)))
                            } else if !s.kept || s.ended.is_some() {
                                Some(Err(()))
                            } else {
                                None
                            }
                        };
                        match step {
                            Some(Ok((piece, to))) => {
                                return Some((Ok(piece), (to, arrived, false)))
                            }
                            Some(Err(())) => {
                                let rest = inner.read_range(pos, end - pos).await;
                                return Some((rest, (end, arrived, true)));
                            }
                            None => {
                                if arrived.changed().await.is_err() {
                                    // The body's task is gone: see what it left.
                                    let nothing_more = {
                                        let s = state.lock().unwrap_or_else(|p| p.into_inner());
                                        s.ended.is_none() && s.buf.len() as u64 <= pos
                                    };
                                    if nothing_more {
                                        let rest = inner.read_range(pos, end - pos).await;
                                        return Some((rest, (end, arrived, true)));
                                    }
                                }
                            }
                        }
                    }
                }
            },
        )
        .boxed()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A blob in memory that counts the requests it answers.
    struct Counted {
        data: Bytes,
        requests: AtomicU64,
        fail_first: bool,
    }

    impl RangeSource for Counted {
        fn read_range(
            &self,
            offset: u64,
            len: u64,
        ) -> BoxFuture<'static, Result<Bytes, BlobError>> {
            let n = self.requests.fetch_add(1, Ordering::SeqCst);
            let r = if n == 0 && self.fail_first {
                Err(BlobError::Remote("dropped".into()))
            } else {
                Ok(self.data.slice(offset as usize..(offset + len) as usize))
            };
            Box::pin(async move { r })
        }

        fn describe(&self) -> String {
            "counted".into()
        }
    }

    #[tokio::test]
    async fn a_body_asked_ahead_serves_its_ranges_in_one_request() {
        let data = Bytes::from((0..1000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let blob = Arc::new(Counted {
            data: data.clone(),
            requests: AtomicU64::new(0),
            fail_first: false,
        });
        let ahead = AheadBody::start(blob.clone(), 1000);
        assert_eq!(
            ahead.read_range(100, 200).await.unwrap(),
            data.slice(100..300)
        );
        assert_eq!(ahead.read_range(0, 100).await.unwrap(), data.slice(0..100));
        assert_eq!(
            ahead.read_range(300, 700).await.unwrap(),
            data.slice(300..1000)
        );
        assert_eq!(blob.requests.load(Ordering::SeqCst), 1, "one request");
        // Served whole: the body is let go, and a later read goes to the blob.
        assert_eq!(ahead.read_range(0, 10).await.unwrap(), data.slice(0..10));
        assert_eq!(blob.requests.load(Ordering::SeqCst), 2);
    }

    /// A blob whose body comes in two halves, the second after a pause.
    struct TwoHalves {
        data: Bytes,
    }

    impl RangeSource for TwoHalves {
        fn read_range(
            &self,
            offset: u64,
            len: u64,
        ) -> BoxFuture<'static, Result<Bytes, BlobError>> {
            let b = self.data.slice(offset as usize..(offset + len) as usize);
            Box::pin(async move { Ok(b) })
        }

        fn read_range_stream(
            &self,
            offset: u64,
            len: u64,
        ) -> BoxStream<'static, Result<Bytes, BlobError>> {
            let mut b = self.data.slice(offset as usize..(offset + len) as usize);
            let head = b.split_to(b.len() / 2);
            futures_util::stream::once(async move { Ok(head) })
                .chain(futures_util::stream::once(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    Ok(b)
                }))
                .boxed()
        }

        fn describe(&self) -> String {
            "two halves".into()
        }
    }

    #[tokio::test]
    async fn a_range_of_a_body_asked_ahead_is_served_as_soon_as_it_is_in() {
        let data = Bytes::from((0..1000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let ahead = AheadBody::start(Arc::new(TwoHalves { data: data.clone() }), 1000);
        let t = std::time::Instant::now();
        assert_eq!(
            ahead.read_range(10, 100).await.unwrap(),
            data.slice(10..110)
        );
        assert!(
            t.elapsed() < std::time::Duration::from_millis(300),
            "waited for the tail"
        );
        // A range across the halves: its first part at once, the rest when it comes.
        assert_eq!(
            ahead.read_range(400, 200).await.unwrap(),
            data.slice(400..600)
        );
        assert!(t.elapsed() >= std::time::Duration::from_millis(400));
    }

    #[tokio::test]
    async fn a_failed_body_asked_ahead_leaves_reads_to_the_blob() {
        let data = Bytes::from(vec![7u8; 100]);
        let blob = Arc::new(Counted {
            data: data.clone(),
            requests: AtomicU64::new(0),
            fail_first: true,
        });
        let ahead = AheadBody::start(blob.clone(), 100);
        assert_eq!(ahead.read_range(10, 20).await.unwrap(), data.slice(10..30));
        assert_eq!(ahead.read_range(0, 5).await.unwrap(), data.slice(0..5));
        assert_eq!(
            blob.requests.load(Ordering::SeqCst),
            3,
            "the failed ahead, then each read"
        );
    }
}
