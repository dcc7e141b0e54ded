//! Noticing a client that hung up while its request waits or generates.
//! actix-web keeps running a handler whose client is gone (a streaming
//! response notices at its next write; a JSON answer has nothing to write
//! until the end), so a generation nobody will read would run to the end. The
//! server records each connection's socket ([`record_peer`], from
//! `HttpServer::on_connect`); [`client_gone`] polls it without reading.
//!
//! An end of stream alone does not mean the client left: a client may
//! half-close (`shutdown(SHUT_WR)`) after sending its request and still read
//! the answer. Only a reset, or a socket error, means gone. A client that
//! closed its socket entirely also reads as an end of stream, so on the first
//! one an HTTP/1.1 connection is sent an interim `100 Continue` (which every
//! HTTP/1.1 client must accept and skip): a half-closed client's kernel takes
//! it, a closed one answers with a reset, seen at the next look.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use actix_web::HttpRequest;

use super::error::ApiError;

/// The socket of the connection a request came on.
#[derive(Clone, Copy)]
pub struct PeerSocket(RawFd);

/// How each connection's socket is set up ([`record_peer`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketOptions {
    /// `TCP_USER_TIMEOUT`: data the peer does not take for this long (a
    /// shut window included) closes the connection; zero: never.
    pub write_timeout: std::time::Duration,
    /// `SO_SNDBUF`; zero: the kernel's own sizing (up to several MiB).
    pub send_buffer_bytes: usize,
}

/// For `HttpServer::on_connect`: records the connection's socket so that
/// handlers can notice a client that went away, and applies `options`.
/// actix stops polling a body whose socket does not drain, so nothing above
/// the socket could end the response of a client that reads nothing: the
/// send timeout does, and a bounded send buffer makes its sequence pause
/// after little work instead of megabytes.
pub fn record_peer(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions, options: SocketOptions) {
    if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        let fd = tcp.as_raw_fd();
        if !options.write_timeout.is_zero() {
            let ms = libc::c_uint::try_from(options.write_timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
            set_option(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms as libc::c_int, "TCP_USER_TIMEOUT");
        }
        if options.send_buffer_bytes > 0 {
            let bytes = libc::c_int::try_from(options.send_buffer_bytes).unwrap_or(libc::c_int::MAX);
            set_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes, "SO_SNDBUF");
        }
        ext.insert(PeerSocket(fd));
    }
}

fn set_option(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int, what: &str) {
    // SAFETY: a valid socket of this connection, an option of its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), option = what, "could not set a socket option");
    }
}

/// What a look at the socket found.
#[derive(Debug, PartialEq)]
enum Peer {
    /// Nothing to say (no bytes waiting, or pipelined bytes for actix).
    Open,
    /// The peer sent its FIN: it half-closed, or closed entirely.
    EndOfStream,
    /// A reset or another socket error: the peer is gone.
    Gone,
}

fn look(fd: RawFd) -> Peer {
    let mut p = libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // SAFETY: the connection (and so its socket) outlives the handler that
    // asks: actix drops a handler together with its connection. A timeout of
    // 0 never blocks; poll reads nothing, so pipelined bytes stay for actix.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n <= 0 {
        return Peer::Open;
    }
    // A reset (or a write answered by one) shuts both directions: POLLHUP.
    if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        Peer::Gone
    } else if p.revents & libc::POLLRDHUP != 0 {
        Peer::EndOfStream
    } else {
        Peer::Open
    }
}

/// Writes an interim `100 Continue`; false when the socket refuses it (the
/// peer is gone). Only while no byte of the response was written: the
/// handler that asks has not answered yet.
fn probe(fd: RawFd) -> bool {
    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    // SAFETY: as in `look`; MSG_NOSIGNAL turns a broken pipe into an error.
    let n =
        unsafe { libc::send(fd, CONTINUE.as_ptr().cast(), CONTINUE.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    n == CONTINUE.len() as isize
}

/// Runs `work` (everything before the response starts: for a streaming
/// request that is until its first event can be sent; for a JSON answer,
/// the whole generation); it is abandoned, and so cancelled, when the
/// client hangs up meanwhile.
pub async fn unless_client_gone<T>(
    req: &HttpRequest,
    work: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::select! {
        r = work => r,
        _ = client_gone(req) => Err(ApiError::ClientGone),
    }
}

/// Resolves when the client of `req` has gone; never, when the server did
/// not record sockets (an embedding application without `record_peer`).
pub async fn client_gone(req: &HttpRequest) {
    let Some(PeerSocket(fd)) = req.conn_data::<PeerSocket>().copied() else {
        return std::future::pending().await;
    };
    // HTTP/1.0 has no interim responses: its clients do not half-close.
    let may_probe = req.version() == actix_web::http::Version::HTTP_11;
    let mut probed = false;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match look(fd) {
            Peer::Open => {}
            Peer::Gone => return,
            Peer::EndOfStream if !may_probe => return,
            Peer::EndOfStream if !probed => {
                probed = true;
                if !probe(fd) {
                    return;
                }
            }
            // Half-closed and still reading: its reset, if it closes, comes as an error.
            Peer::EndOfStream => {}
        }
    }
}

/// The socket of `req`'s connection, for a task that outlives the handler.
pub fn peer_of(req: &HttpRequest) -> Option<PeerSocket> {
    req.conn_data::<PeerSocket>().copied()
}

/// How often a stream waiting for a slot looks at its client's socket.
const WAITING_LOOK: Duration = Duration::from_millis(100);

/// The events of a streaming answer whose request may still wait for its
/// slot: `admitted` when it was admitted before the answer started, else
/// SSE comments while `admission` waits, then the events `answer` makes of
/// its result. The stream ends without an answer once the client is gone,
/// which drops `admission` and so gives its place in the queue up. actix
/// notices a closed client only when it writes, and an idle stream writes a
/// comment every few seconds; so once the client's socket shows its end of
/// stream, a comment is written at each look (a closed client answers it
/// with a reset, which ends the response; a half-closed one reads and skips
/// it). Dropping the stream (the response ended) gives the place up too.
pub(crate) fn after_admission<T, S>(
    admitted: Option<T>,
    admission: impl std::future::Future<Output = T>,
    peer: Option<PeerSocket>,
    answer: impl FnOnce(T) -> S,
) -> impl futures::Stream<Item = super::sse::Frame>
where
    S: futures::Stream<Item = super::sse::Frame>,
{
    use futures::StreamExt;
    async_stream::stream! {
        let result = match admitted {
            Some(result) => result,
            None => {
                tokio::pin!(admission);
                let mut looks = tokio::time::interval(WAITING_LOOK);
                loop {
                    let comment = tokio::select! {
                        result = &mut admission => break result,
                        _ = looks.tick() => match peer.map(|PeerSocket(fd)| look(fd)) {
                            Some(Peer::Gone) => return,
                            Some(Peer::EndOfStream) => true,
                            Some(Peer::Open) | None => false,
                        },
                    };
                    if comment {
                        yield super::sse::Frame::comment("waiting");
                    }
                }
            }
        };
        let mut events = std::pin::pin!(answer(result));
        while let Some(event) = events.next().await {
            yield event;
        }
    }
}
