//! Moving bytes between a byte stream (a TCP socket) and an HBONE tunnel.
//!
//! Backpressure is end to end: data is read from the socket only into a
//! bounded buffer and sent only as the peer's HTTP/2 window admits it, and
//! received data is acknowledged to the peer (window released) only after it
//! has been written to the socket. Buffers are reused: reads alternate
//! between two `BytesMut`s whose allocations are reclaimed once h2 has
//! written the chunks cut from them, and grow for bulk transfers.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::H2Stream;

/// First read buffer: small, so that idle or chatty tunnels stay cheap.
const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest read buffer, reached after consecutive full reads (bulk transfer).
pub const MAX_BUFFER: usize = 256 * 1024;
/// Read buffers per direction (see `socket_to_stream`).
const RING: usize = 3;

/// Bytes moved by a tunnel, in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the socket into the tunnel.
    pub sent: u64,
    /// From the tunnel to the socket.
    pub received: u64,
}

/// A tunnel that ended with an error, and what it had moved until then.
#[derive(Debug, thiserror::Error)]
#[error("tunnel failed after {} bytes sent, {} received: {source}", .transferred.sent, .transferred.received)]
pub struct CopyError {
    pub transferred: Transferred,
    #[source]
    pub source: io::Error,
}

/// An ordinary in-memory byte stream for a tunnel, for code that needs
/// `AsyncRead + AsyncWrite` (an HTTP server or client on top of the
/// tunnel): a task copies between the two until both directions end, or
/// until the returned stream is dropped and what was written to it is sent
/// (the tunnel is then reset, so a peer that never finishes does not keep
/// the task and the tunnel). The in-memory pipe is bounded, so
/// backpressure stays end to end.
pub fn attach(stream: H2Stream) -> Attached {
    let (app, proxy) = tokio::io::duplex(MAX_BUFFER);
    let dropped = tokio_util::sync::CancellationToken::new();
    let gone = dropped.clone();
    tokio::spawn(async move {
        let (r, w) = tokio::io::split(proxy);
        // As a closed TCP socket: what the application wrote before it
        // dropped the stream is still sent, with END_STREAM; what the peer
        // sends after that is read and discarded; once the write side is
        // done (or after a linger, if the peer does not take it), the
        // stream is dropped, which h2 resets after the frames it queued.
        let (r, sent_all) = EofSignal::new(r);
        let w = DiscardWhenClosed(w);
        let stop = async move {
            gone.cancelled().await;
            let mut sent_all = sent_all;
            let _ = tokio::time::timeout(LINGER, sent_all.wait_for(|eof| *eof)).await;
        };
        tokio::select! {
            result = copy_bidirectional(r, w, stream) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "attached tunnel ended");
                }
            }
            () = stop => {}
        }
    });
    Attached {
        io: app,
        _dropped: dropped.drop_guard(),
    }
}

/// How long a dropped [`Attached`] stream may still take to send what was
/// written to it.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// A writer whose reader has gone: what is written after that is dropped,
/// so the other direction of the copy can still finish.
struct DiscardWhenClosed<W>(W);

impl<W: AsyncWrite + Unpin> AsyncWrite for DiscardWhenClosed<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.get_mut().0).poll_write(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                Poll::Ready(Ok(buf.len()))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.get_mut().0).poll_flush(cx) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => Poll::Ready(Ok(())),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.get_mut().0).poll_shutdown(cx) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

/// A reader that says when it has reached its end.
struct EofSignal<R> {
    inner: R,
    eof: tokio::sync::watch::Sender<bool>,
}

impl<R> EofSignal<R> {
    fn new(inner: R) -> (Self, tokio::sync::watch::Receiver<bool>) {
        let (eof, rx) = tokio::sync::watch::channel(false);
        (Self { inner, eof }, rx)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for EofSignal<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A read into a full buffer returns nothing without being the end.
        let before = if buf.remaining() == 0 {
            usize::MAX
        } else {
            buf.filled().len()
        };
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Err(_)))
            || matches!(polled, Poll::Ready(Ok(())) if buf.filled().len() == before)
        {
            this.eof.send_replace(true);
        }
        polled
    }
}

/// The byte stream of an [`attach`]ed tunnel.
#[derive(Debug)]
pub struct Attached {
    io: tokio::io::DuplexStream,
    /// Ends the copy when the stream is dropped.
    _dropped: tokio_util::sync::DropGuard,
}

impl AsyncRead for Attached {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Attached {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Copies in both directions until both are finished. A half-close on one
/// side (socket EOF, or END_STREAM from the peer) is forwarded to the other
/// and the opposite direction keeps flowing.
pub async fn copy_bidirectional<R, W>(
    reader: R,
    writer: W,
    stream: H2Stream,
) -> Result<Transferred, CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    copy_bidirectional_until(reader, writer, stream, std::future::pending()).await
}

/// [`copy_bidirectional`], cut short when `stop` resolves: the stream is
/// reset (`CANCEL`) and the error says so, with the bytes moved until then.
pub async fn copy_bidirectional_until<R, W>(
    reader: R,
    writer: W,
    stream: H2Stream,
    stop: impl Future<Output = ()>,
) -> Result<Transferred, CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let H2Stream {
        mut send,
        mut recv,
        lease: _lease,
        sent_early,
    } = stream;
    // Counted as the bytes move so that a failed tunnel still reports them.
    let sent = AtomicU64::new(sent_early);
    let received = AtomicU64::new(0);
    let copied = async {
        tokio::try_join!(
            socket_to_stream(reader, &mut send, &sent),
            stream_to_socket(&mut recv, writer, &received),
        )
    };
    let result = tokio::select! {
        result = copied => result.map(|_| ()),
        () = stop => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed by the proxy")),
    };
    let transferred = Transferred {
        sent: sent.into_inner(),
        received: received.into_inner(),
    };
    match result {
        Ok(()) => Ok(transferred),
        Err(source) => {
            // Tell the peer the tunnel is broken rather than let it wait.
            send.send_reset(Reason::CANCEL);
            Err(CopyError {
                transferred,
                source,
            })
        }
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::other(e)
}

async fn socket_to_stream<R: AsyncRead + Unpin>(
    mut reader: R,
    send: &mut SendStream<Bytes>,
    sent: &AtomicU64,
) -> io::Result<()> {
    // Buffers in turn: while h2 still holds chunks cut from one, reads go into
    // the next, whose allocation `reserve` reclaims once its chunks have been
    // written. h2 queues at most MAX_SEND_BUFFER (one full buffer) per stream
    // and its writer holds one frame more, so by the time a buffer comes round
    // again it is free: no allocation per read in steady state.
    let mut bufs: [BytesMut; RING] = Default::default();
    bufs[0].reserve(INITIAL_BUFFER);
    let mut current = 0;
    let mut target = INITIAL_BUFFER;
    loop {
        if spare(&bufs[current]) < target {
            current = (current + 1) % RING;
            bufs[current].reserve(target);
        }
        let buf = &mut bufs[current];
        let room = spare(buf);
        let n = reader.read_buf(buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
            return Ok(());
        }
        if n == room && target < MAX_BUFFER {
            // A full read: bulk transfer, read more per call.
            target *= 2;
        }
        send_chunk(send, buf.split().freeze(), sent).await?;
    }
}

fn spare(buf: &BytesMut) -> usize {
    buf.capacity() - buf.len()
}

/// Sends `chunk` as the peer's window admits it, counting in `sent` what
/// h2 took: bytes read but never admitted (the peer stopped reading, the
/// tunnel was closed) were not sent.
async fn send_chunk(
    send: &mut SendStream<Bytes>,
    mut chunk: Bytes,
    sent: &AtomicU64,
) -> io::Result<()> {
    while !chunk.is_empty() {
        send.reserve_capacity(chunk.len());
        let available = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(h2_to_io(e)),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "peer closed the stream",
                ));
            }
        };
        if available == 0 {
            continue;
        }
        let part = chunk.split_to(available.min(chunk.len()));
        let len = part.len() as u64;
        send.send_data(part, false).map_err(h2_to_io)?;
        sent.fetch_add(len, Relaxed);
    }
    Ok(())
}

async fn stream_to_socket<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    mut writer: W,
    received: &AtomicU64,
) -> io::Result<()> {
    loop {
        match poll_fn(|cx| recv.poll_data(cx)).await {
            Some(Ok(data)) => {
                writer.write_all(&data).await?;
                received.fetch_add(data.len() as u64, Relaxed);
                // Only now may the peer send more: backpressure follows the socket.
                recv.flow_control()
                    .release_capacity(data.len())
                    .map_err(h2_to_io)?;
            }
            // RST_STREAM NO_ERROR / CANCEL is how some peers end a stream: EOF.
            Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => {
                break;
            }
            Some(Err(e)) => return Err(h2_to_io(e)),
            None => break,
        }
    }
    writer.flush().await?;
    writer.shutdown().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

    use std::time::Duration;

    use super::*;

    /// A client stream whose peer answers and then never reads: h2's
    /// default stream window (65,535 bytes) is all it may send.
    async fn stalled_stream() -> (H2Stream, tokio::sync::oneshot::Sender<()>) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (hold, held) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (_request, mut respond) = conn.accept().await.unwrap().unwrap();
            let response = http::Response::new(());
            let _send = respond.send_response(response, false).unwrap();
            // Keeps the connection going (PINGs, SETTINGS) without taking
            // any of the stream's data.
            tokio::select! {
                _ = poll_fn(|cx| conn.poll_closed(cx)) => {}
                _ = held => {}
            }
        });
        let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let request = http::Request::connect("127.0.0.1:7").body(()).unwrap();
        client = client.ready().await.unwrap();
        let (response, send) = client.send_request(request, false).unwrap();
        let recv = response.await.unwrap().into_body();
        (H2Stream::new(send, recv, None), hold)
    }

    #[tokio::test]
    async fn bytes_the_peer_never_admitted_are_not_counted_as_sent() {
        let (stream, _hold) = stalled_stream().await;
        let (mut app, proxy) = tokio::io::duplex(4 << 20);
        app.write_all(&vec![7u8; 1 << 20]).await.unwrap();
        let stop = tokio::time::sleep(Duration::from_millis(300));
        let err = copy_bidirectional_until(proxy, tokio::io::sink(), stream, stop)
            .await
            .unwrap_err();
        // More than the window was read from the client; only the window
        // went into the tunnel.
        assert_eq!(err.transferred.sent, 65_535);
    }
}
