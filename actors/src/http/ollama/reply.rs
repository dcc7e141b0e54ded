//! What Ollama's generation routes answer: one NDJSON object per streamed
//! piece (encoded straight into the bytes the socket gets), and the last one
//! with the generation's figures, in Ollama's nanoseconds.

use std::time::Instant;

use actix_web::{web, HttpResponse, ResponseError};
use serde_json::{json, Value};

use crate::http::error::ApiError;
use crate::params::{Completion, FinishReason, Usage};

/// An Ollama error: its status, and `{"error": message}`.
pub(super) fn ollama_error(e: ApiError) -> HttpResponse {
    let message = match &e {
        ApiError::Internal(_) => "internal server error".to_string(),
        other => other.to_string(),
    };
    let mut res = e.error_response();
    let status = res.status();
    let headers = std::mem::take(res.headers_mut());
    let mut out = HttpResponse::build(status).json(json!({ "error": message }));
    for (name, value) in headers.iter().filter(|(n, _)| n.as_str() == "retry-after") {
        out.headers_mut().insert(name.clone(), value.clone());
    }
    out
}

/// Runs a handler and gives its error Ollama's shape.
pub(super) async fn reply(work: impl std::future::Future<Output = Result<HttpResponse, ApiError>>) -> HttpResponse {
    work.await.unwrap_or_else(ollama_error)
}

pub(super) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// What Ollama reports about a generation, in nanoseconds.
fn stats(usage: &Usage, started: Instant) -> Value {
    let eval_ns = if usage.tokens_per_second > 0.0 {
        (usage.completion_tokens as f64 / usage.tokens_per_second * 1e9) as u64
    } else {
        0
    };
    json!({
        "total_duration": started.elapsed().as_nanos() as u64,
        "load_duration": 0,
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": (usage.time_to_first_token_ms * 1e6) as u64,
        "eval_count": usage.completion_tokens,
        "eval_duration": eval_ns,
    })
}

fn done_reason(f: FinishReason) -> &'static str {
    match f {
        // A cut reply says so: it did not reach its end.
        FinishReason::Length | FinishReason::Stalled => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// Which shape a generation is answered in.
#[derive(Clone, Copy)]
pub(super) enum Shape {
    Chat,
    Generate,
}

impl Shape {
    /// One NDJSON object with `text` (a piece, or the whole reply).
    pub(super) fn piece(self, model: &str, text: &str) -> Value {
        match self {
            Shape::Chat => json!({
                "model": model, "created_at": now_rfc3339(),
                "message": { "role": "assistant", "content": text }, "done": false,
            }),
            Shape::Generate => json!({ "model": model, "created_at": now_rfc3339(), "response": text, "done": false }),
        }
    }

    /// [`Self::piece`] as its NDJSON line, written straight into one buffer
    /// (a streamed token's only allocation here).
    pub(super) fn piece_line(self, model: &str, text: &str) -> web::Bytes {
        use crate::http::sse::json_str;
        let mut b = Vec::with_capacity(model.len() + text.len() + 112);
        b.extend_from_slice(b"{\"model\":");
        json_str(&mut b, model);
        b.extend_from_slice(b",\"created_at\":\"");
        // Formatting a date into a Vec cannot fail.
        let _ = time::OffsetDateTime::now_utc().format_into(&mut b, &time::format_description::well_known::Rfc3339);
        b.extend_from_slice(match self {
            Shape::Chat => b"\",\"message\":{\"role\":\"assistant\",\"content\":" as &[u8],
            Shape::Generate => b"\",\"response\":",
        });
        json_str(&mut b, text);
        b.extend_from_slice(match self {
            Shape::Chat => b"},\"done\":false}\n" as &[u8],
            Shape::Generate => b",\"done\":false}\n",
        });
        web::Bytes::from(b)
    }

    pub(super) fn last(self, model: &str, text: &str, done: &Completion, started: Instant) -> Value {
        let mut v = self.piece(model, text);
        v["done"] = json!(true);
        v["done_reason"] = json!(done_reason(done.finish_reason));
        for (k, x) in stats(&done.usage, started).as_object().expect("object") {
            v[k] = x.clone();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_line_is_the_piece_it_stands_for() {
        for shape in [Shape::Chat, Shape::Generate] {
            let text = "a \"quoted\"\nline é";
            let line = shape.piece_line("m\"odel", text);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&c| c == b'\n').count(), 1, "one line");
            let mut got: Value = serde_json::from_slice(&line).unwrap();
            let mut want = shape.piece("m\"odel", text);
            let at = got["created_at"].as_str().unwrap().to_string();
            assert!(at.len() >= 20 && at.as_bytes()[10] == b'T' && at.ends_with('Z'), "{at}");
            got["created_at"] = Value::Null;
            want["created_at"] = Value::Null;
            assert_eq!(got, want);
        }
    }
}
