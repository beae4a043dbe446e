//! Connections as the server hands them to HTTP/2.
//!
//! h2 writes a DATA frame's payload straight from the caller's buffer when
//! it is bigger than a threshold (256 bytes when the connection takes
//! vectored writes, 1,024 when it does not), and cannot encode the next
//! frame until that payload is written. A unary answer is HEADERS, one DATA
//! frame, then the trailers: with a payload between 256 and 1,024 bytes (a
//! push echoing a small document, a get of one) that made two socket writes
//! per call, the second one a 10-byte trailers frame. [`Coalescing`] tells
//! h2 the connection does not take vectored writes, so such an answer is
//! copied into h2's buffer and leaves in one write. Bigger payloads are
//! still written from their own buffer (a pull page: the frame header and
//! its payload as two writes instead of one `writev`, per frame of up to
//! 16 KiB). Over TLS the same holds for records: one per write.
//!
//! Measured (docs/benchmarks.md, "Third pass"): push1 2.0 `writev` per
//! call → 1 `sendto`, server CPU per push −15%; no change in pull or
//! catch-up throughput.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

pin_project! {
    /// A connection that declines vectored writes (see the module docs).
    pub struct Coalescing<T> {
        #[pin]
        inner: T,
    }
}

impl<T> Coalescing<T> {
    /// Wraps a connection.
    pub fn new(inner: T) -> Self {
        Self { inner }
    }
}

impl<T: AsyncRead> AsyncRead for Coalescing<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Coalescing<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl<T: Connected> Connected for Coalescing<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
