//! HTTP/2 settings shared by both ends, matching those observed from Istio's
//! ztunnel so that flow control behaves the same across implementations.

/// The port HBONE servers listen on.
pub const HBONE_PORT: u16 = 15008;

/// Per-stream window: large enough that one stream can fill a fast link.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection window: several busy streams before they throttle each other.
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub(crate) const MAX_FRAME_SIZE: u32 = 1024 * 1024;
pub(crate) const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Streams a server accepts per connection.
pub(crate) const SERVER_MAX_STREAMS: u32 = 200;
/// Data h2 may queue per stream. The copy loop waits for this capacity, so it
/// bounds memory per stream; equal to one read buffer so that the copy loop's
/// buffers are free again when their turn comes (see `copy`).
pub(crate) const MAX_SEND_BUFFER: usize = crate::copy::MAX_BUFFER;

pub(crate) fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    b
}

pub(crate) fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    b
}
