//! The client's bytes that travel while its tunnel is being opened (ADR
//! 0008, 0029): what it has sent goes in DATA frames right behind the
//! CONNECT's HEADERS, and so does what it sends until the server answers,
//! instead of waiting for the `200`. A client that speaks first reaches its
//! server one ztunnel-to-ztunnel round trip sooner whether or not its first
//! bytes were there when the tunnel was asked for.

use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Everything read from the client before its tunnel opened, kept in order:
/// each attempt (a retry, another endpoint) sends all of it again, and only
/// then what arrives during that attempt.
#[derive(Debug)]
pub struct EarlyData {
    kept: BytesMut,
    limit: usize,
    eof: bool,
    error: Option<io::Error>,
}

impl EarlyData {
    /// At most `limit` bytes are read ahead of the answer; beyond that the
    /// client waits, as it would for the tunnel's window.
    pub fn new(limit: usize) -> Self {
        Self {
            kept: BytesMut::new(),
            limit,
            eof: false,
            error: None,
        }
    }

    /// The bytes read so far.
    pub fn bytes(&self) -> &[u8] {
        &self.kept
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// The client's read error, if reading ahead met one. The client is then
    /// broken: the caller ends the tunnel instead of copying.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    /// Nothing more to read ahead: the client closed its side, failed, or
    /// sent the limit. Its next read (by the copy) sees the same end.
    pub(crate) fn done(&self) -> bool {
        self.eof || self.error.is_some() || self.kept.len() >= self.limit
    }

    /// Everything kept, for the start of an attempt.
    pub(crate) fn replay(&self) -> Option<Bytes> {
        (!self.kept.is_empty()).then(|| Bytes::copy_from_slice(&self.kept))
    }

    /// Waits for the client's next bytes and keeps them; `None` once
    /// [`EarlyData::done`]. Cancel-safe: a read either completes or takes
    /// nothing.
    pub(crate) async fn read_more<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        client: &mut R,
    ) -> Option<Bytes> {
        if self.done() {
            return None;
        }
        let before = self.kept.len();
        // Reserved once: the reads that follow within the limit do not
        // allocate.
        self.kept.reserve(self.limit - before);
        let mut room = (&mut self.kept).limit(self.limit - before);
        match client.read_buf(&mut room).await {
            Ok(0) => {
                self.eof = true;
                None
            }
            Ok(_) => Some(Bytes::copy_from_slice(&self.kept[before..])),
            Err(e) => {
                self.error = Some(e);
                None
            }
        }
    }
}
