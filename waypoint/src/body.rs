//! Watching an HTTP body go by: the one wrapper behind the waypoint's
//! body bookkeeping (the copy kept for retries, the end of a request sent
//! upstream, the end of a response that frees its connection).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// What went by.
#[derive(Debug)]
pub enum Seen<'a> {
    Data(&'a Bytes),
    Trailers,
    Error,
    /// The body ended (told once).
    End,
}

/// A body passed through unchanged while `watch` is told what goes by.
#[derive(Debug)]
pub struct Watched<B, F> {
    inner: B,
    watch: F,
    ended: bool,
}

impl<B: Body, F: FnMut(Seen<'_>)> Watched<B, F> {
    pub fn new(inner: B, watch: F) -> Self {
        let mut watched = Self {
            inner,
            watch,
            ended: false,
        };
        watched.end_if_done();
        watched
    }

    /// hyper stops polling a body that says it has ended, so the end is
    /// also taken from `is_end_stream`, not only from a final `None`.
    fn end_if_done(&mut self) {
        if !self.ended && self.inner.is_end_stream() {
            self.ended = true;
            (self.watch)(Seen::End);
        }
    }
}

impl<B, F> Body for Watched<B, F>
where
    B: Body<Data = Bytes> + Unpin,
    F: FnMut(Seen<'_>) + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => (this.watch)(Seen::Data(data)),
                None => (this.watch)(Seen::Trailers),
            },
            Poll::Ready(Some(Err(_))) => (this.watch)(Seen::Error),
            Poll::Ready(None) if !this.ended => {
                this.ended = true;
                (this.watch)(Seen::End);
            }
            Poll::Ready(None) | Poll::Pending => {}
        }
        this.end_if_done();
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
