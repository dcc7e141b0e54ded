//! Server-sent events encoded once, as the bytes the socket gets: a
//! streamed token costs one buffer (its frame, sized for it) and one write;
//! no event object, no second encoding.

use std::convert::Infallible;

use actix_web::web::Bytes;
use actix_web::HttpResponse;
use futures::{Stream, StreamExt};

/// An idle event stream sends a comment this often: a request waiting for a
/// slot, or a long prompt being read, shows clients and proxies it is alive.
pub(crate) const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(3);

/// One encoded event (`data: …\n\n`, `event: …\ndata: …\n\n` or `: …\n\n`).
pub(crate) struct Frame(Bytes);

impl Frame {
    /// A `data` event whose JSON `build` writes in place; `size` is a hint
    /// for the buffer. The JSON must be one line (serde_json's output is).
    pub fn build(name: Option<&str>, size: usize, build: impl FnOnce(&mut Vec<u8>)) -> Self {
        let mut buf = Vec::with_capacity(size + 32);
        if let Some(name) = name {
            buf.extend_from_slice(b"event: ");
            buf.extend_from_slice(name.as_bytes());
            buf.push(b'\n');
        }
        buf.extend_from_slice(b"data: ");
        build(&mut buf);
        buf.extend_from_slice(b"\n\n");
        Self(Bytes::from(buf))
    }

    /// A `data` event carrying `data` (one line).
    pub fn data(data: &str) -> Self {
        Self::build(None, data.len(), |b| b.extend_from_slice(data.as_bytes()))
    }

    /// A named event carrying `data` (one line).
    pub fn named(name: &str, data: &str) -> Self {
        Self::build(Some(name), data.len(), |b| b.extend_from_slice(data.as_bytes()))
    }

    /// A comment, which clients skip.
    pub fn comment(text: &'static str) -> Self {
        Self(Bytes::from(format!(": {text}\n\n")))
    }
}

/// Writes `s` as a JSON string (quoted and escaped) into `buf`.
pub(crate) fn json_str(buf: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// A `text/event-stream` response written straight from `frames`, with a
/// comment every [`KEEP_ALIVE`]. Uncompressed and uncached, so every event
/// reaches the client as soon as it is sent.
pub(crate) fn response(frames: impl Stream<Item = Frame> + 'static) -> HttpResponse {
    use actix_web::http::header::{CacheControl, CacheDirective, ContentEncoding};
    let body = async_stream::stream! {
        let mut frames = std::pin::pin!(frames);
        let start = tokio::time::Instant::now() + KEEP_ALIVE;
        let mut keep_alive = tokio::time::interval_at(start, KEEP_ALIVE);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                frame = frames.next() => match frame {
                    Some(Frame(bytes)) => yield Ok::<_, Infallible>(bytes),
                    None => break,
                },
                _ = keep_alive.tick() => yield Ok(Bytes::from_static(b": keep-alive\n\n")),
            }
        }
    };
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(ContentEncoding::Identity)
        .insert_header(CacheControl(vec![CacheDirective::NoCache]))
        .streaming(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_encoded_once_as_the_wire_has_them() {
        assert_eq!(&Frame::data("[DONE]").0[..], b"data: [DONE]\n\n");
        assert_eq!(&Frame::named("token", "{\"a\":1}").0[..], b"event: token\ndata: {\"a\":1}\n\n");
        assert_eq!(&Frame::comment("waiting").0[..], b": waiting\n\n");
        let f = Frame::build(None, 8, |b| json_str(b, "a \"quote\"\nand a line"));
        assert_eq!(&f.0[..], b"data: \"a \\\"quote\\\"\\nand a line\"\n\n");
    }
}
