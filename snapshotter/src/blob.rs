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
        let mut out = bytes::BytesMut::with_capacity(len as usize);
        let mut pieces = std::pin::pin!(body_pieces(resp, skip, len));
        while let Some(piece) = pieces.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out.freeze())
    }
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
