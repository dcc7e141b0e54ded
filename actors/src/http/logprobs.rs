//! Log-probabilities on the OpenAI routes: what a request asks for, and the
//! two shapes they are answered in (chat `content` entries, and the
//! completions route's parallel lists).

use std::collections::HashMap;

use serde_json::{json, Value};

use super::openai::{short_json, Route};
use super::ApiError;

/// The log-probabilities a request asks for: on chat completions
/// `logprobs: true` with `top_logprobs` alternatives (0 to 20); on
/// completions `logprobs: n` alternatives.
pub(super) fn logprobs_of(other: &HashMap<String, Value>, route: Route) -> Result<Option<u32>, ApiError> {
    let logprobs = other.get("logprobs").filter(|v| !v.is_null());
    let top = other.get("top_logprobs").filter(|v| !v.is_null());
    let count = |field: &str, v: &Value| match super::whole(v) {
        Some(n) if (0..=crate::params::MAX_TOP_LOGPROBS as i64).contains(&n) => Ok(n as u32),
        _ => Err(ApiError::bad(field, format!("invalid {field}: must be between 0 and 20, got {}", short_json(v)))),
    };
    match route {
        Route::Chat => {
            let on = match logprobs {
                None => false,
                Some(v) => v.as_bool().ok_or_else(|| {
                    ApiError::bad("logprobs", format!("invalid logprobs: must be true or false, got {}", short_json(v)))
                })?,
            };
            match (on, top) {
                (false, Some(v)) if super::whole(v) != Some(0) => Err(ApiError::bad(
                    "top_logprobs",
                    format!("invalid top_logprobs: needs logprobs: true, got {}", short_json(v)),
                )),
                (false, _) => Ok(None),
                (true, None) => Ok(Some(0)),
                (true, Some(v)) => count("top_logprobs", v).map(Some),
            }
        }
        Route::Text => match (logprobs, top) {
            (_, Some(v)) => Err(ApiError::bad(
                "top_logprobs",
                format!("invalid top_logprobs: /v1/completions takes logprobs: n, got {}", short_json(v)),
            )),
            (None, None) => Ok(None),
            (Some(v), None) => count("logprobs", v).map(Some),
        },
    }
}

/// Log-probabilities in OpenAI's chat shape (`content` entries).
pub(super) fn chat_logprobs(lps: &[crate::params::TokenLogprob]) -> Value {
    let entry = |t: &crate::params::TokenText, lp: f32| json!({ "token": t.text, "logprob": lp, "bytes": t.bytes });
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let mut e = entry(&lp.token, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|(t, p)| entry(t, *p)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// Log-probabilities in the completions shape: parallel lists, offsets in
/// the generated text from `offset` on.
pub(super) fn text_logprobs(lps: &[crate::params::TokenLogprob], mut offset: usize) -> Value {
    let mut offsets = Vec::with_capacity(lps.len());
    for lp in lps {
        offsets.push(offset);
        offset += lp.token.text.len();
    }
    let top: Vec<serde_json::Map<String, Value>> =
        lps.iter().map(|lp| lp.top.iter().map(|(t, p)| (t.text.clone(), json!(p))).collect()).collect();
    json!({
        "tokens": lps.iter().map(|lp| lp.token.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|lp| lp.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}
