use bytes::Bytes;
use h2::{RecvStream, SendStream};

use crate::pool::Lease;

/// One open HBONE tunnel: the two halves of an HTTP/2 stream after a `200`.
/// Move bytes through it with [`crate::copy::copy_bidirectional`].
#[derive(Debug)]
pub struct H2Stream {
    pub(crate) send: SendStream<Bytes>,
    pub(crate) recv: RecvStream,
    /// Keeps the pooled connection's stream count until the tunnel closes.
    pub(crate) lease: Option<Lease>,
    /// Bytes sent with the request (its early data), counted as sent by
    /// the copy.
    pub(crate) sent_early: u64,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, lease: Option<Lease>) -> Self {
        Self {
            send,
            recv,
            lease,
            sent_early: 0,
        }
    }
}
