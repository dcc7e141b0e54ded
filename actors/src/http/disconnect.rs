//! Noticing a client that hung up while its non-streaming request waits or
//! generates. actix-web keeps running a handler whose client is gone (a
//! streaming response notices at its next write; a JSON answer has nothing to
//! write until the end), so a generation nobody will read would run to the
//! end. The server records each connection's socket ([`record_peer`], from
//! `HttpServer::on_connect`); [`client_gone`] peeks at it without reading: an
//! orderly shutdown by the peer reads as 0 bytes.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use actix_web::HttpRequest;

use super::ApiError;

/// The socket of the connection a request came on.
#[derive(Clone, Copy)]
pub struct PeerSocket(RawFd);

/// For `HttpServer::on_connect`: records the connection's socket so that
/// handlers can notice a client that went away.
pub fn record_peer(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        ext.insert(PeerSocket(tcp.as_raw_fd()));
    }
}

/// True when the peer closed its side (peek reads end of stream).
fn closed(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: the connection (and so its socket) outlives the handler that
    // asks: actix drops a handler together with its connection. MSG_PEEK
    // leaves any pipelined bytes for actix to read; MSG_DONTWAIT never blocks.
    let n = unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n == 0
}

/// Runs `work`; for a non-streaming request (a JSON answer has nothing to
/// write until the end) it is abandoned, and so cancelled, when the client hangs up.
pub async fn unless_client_gone<T>(
    req: &HttpRequest,
    streaming: bool,
    work: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    if streaming {
        return work.await;
    }
    tokio::select! {
        r = work => r,
        _ = client_gone(req) => Err(ApiError::ClientGone),
    }
}

/// Resolves when the client of `req` has hung up; never, when the server did
/// not record sockets (an embedding application without `record_peer`).
pub async fn client_gone(req: &HttpRequest) {
    let Some(PeerSocket(fd)) = req.conn_data::<PeerSocket>().copied() else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if closed(fd) {
            return;
        }
    }
}
