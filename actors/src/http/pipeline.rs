//! The one pipeline every dialect translates into. A route reads its body
//! into [`Sampling`] (the one set of sampling fields: `/chat` and OpenAI's
//! bodies flatten it, Ollama's `options` are read into it by
//! [`Sampling::from_ollama_options`]), turns it into the engine's
//! `SamplingParams` with [`sampling`] (bounds checked here, once, with errors
//! naming the field), and runs through [`metered`] (one meter per request,
//! a client that leaves cancels it). Stateless routes then [`prepare`] the
//! request (the engine checks it, compiles its grammar and tokenizes the
//! prompt once, on a blocking thread) and [`run`] it; `/chat` hands its
//! sampling to the chat layer, which builds and tokenizes the prompt from
//! memory once and prepares it the same way. A new dialect is a file of
//! translation in and rendering out.

use std::collections::HashMap;
use std::future::Future;
use std::time::Instant;

use actix_web::{HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::Value;

use super::disconnect::unless_client_gone;
use super::error::ApiError;
use super::kit::{de_whole, short_json, whole, ApiState};
use super::metrics::Meter;
use crate::params::{GenerateRequest, PreparedRequest, SamplingParams};

/// `stop`: one string or several.
#[derive(Deserialize, Clone, Debug, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// The sampling fields a request of any dialect may set; what it leaves out
/// is the configured default. Whole numbers arrive as i64 (written `8` or
/// `8.0`) so that any value a client sends is checked against its bounds by
/// [`sampling`], with an error naming the field.
#[derive(Deserialize, Default, Debug, utoipa::ToSchema)]
pub struct Sampling {
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "de_whole")]
    pub max_tokens: Option<i64>,
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    /// -1: a fresh seed for this request.
    #[schema(minimum = -1, maximum = 4294967295_i64)]
    #[serde(default, deserialize_with = "de_whole")]
    pub seed: Option<i64>,
    /// 0 is off (llama.cpp's extension, as llama-server takes it).
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "de_whole")]
    pub top_k: Option<i64>,
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f32>,
    #[schema(exclusive_minimum = 0)]
    pub repeat_penalty: Option<f32>,
    /// -1: the whole context.
    #[schema(minimum = -1)]
    #[serde(default, deserialize_with = "de_whole")]
    pub repeat_last_n: Option<i64>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f32>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f32>,
    /// The reply ends before any of these strings.
    pub stop: Option<Stop>,
}

impl Sampling {
    /// Ollama's `options` map read into the one set of fields (Ollama calls
    /// `max_tokens` `num_predict`; a negative one, to the end of the context,
    /// is returned apart). A value of the wrong type is refused naming
    /// `options.<key>`.
    pub(crate) fn from_ollama_options(o: &HashMap<String, Value>) -> Result<(Sampling, bool), ApiError> {
        let refuse = |key: &str, rule: &str, v: &Value| {
            ApiError::bad(&format!("options.{key}"), format!("invalid options.{key}: {rule}, got {}", short_json(v)))
        };
        let number = |key: &str| -> Result<Option<f32>, ApiError> {
            match o.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| refuse(key, "must be a number", v)),
            }
        };
        let integer = |key: &str| -> Result<Option<i64>, ApiError> {
            match o.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => whole(v).map(Some).ok_or_else(|| refuse(key, "must be a whole number", v)),
            }
        };
        let num_predict = integer("num_predict")?;
        let stop = match o.get("stop") {
            None | Some(Value::Null) => None,
            Some(Value::String(one)) => Some(Stop::One(one.clone())),
            Some(v) => Some(Stop::Many(
                serde_json::from_value(v.clone())
                    .map_err(|_| refuse("stop", "must be a string or an array of strings", v))?,
            )),
        };
        let sampling = Sampling {
            max_tokens: num_predict.filter(|n| *n >= 0),
            temperature: number("temperature")?,
            top_p: number("top_p")?,
            seed: integer("seed")?,
            top_k: integer("top_k")?,
            min_p: number("min_p")?,
            repeat_penalty: number("repeat_penalty")?,
            repeat_last_n: integer("repeat_last_n")?,
            frequency_penalty: number("frequency_penalty")?,
            presence_penalty: number("presence_penalty")?,
            stop,
        };
        Ok((sampling, num_predict.is_some_and(|n| n < 0)))
    }
}

/// A whole number a client sent for `field`, within `lo..=hi`: checked
/// before anything is sized by it; the error names the field, the rule and the value.
pub(crate) fn bounded(field: &str, n: i64, lo: i64, hi: i64, rule: &str) -> Result<i64, ApiError> {
    if (lo..=hi).contains(&n) {
        return Ok(n);
    }
    Err(ApiError::bad(field, format!("invalid {field}: must be {rule}, got {n}")))
}

/// The configured sampling with a request's fields; `max_tokens_field` is
/// what the dialect calls `max_tokens` (for its errors). A field out of its
/// range is an error naming the field, the rule and the value. The rest of
/// the rules are checked once, with the prompt, when the request is
/// prepared (`Engine::prepare`; a chat turn checks before it embeds anything).
pub(crate) fn sampling(state: &ApiState, o: Sampling, max_tokens_field: &str) -> Result<SamplingParams, ApiError> {
    let chat = state.chat()?;
    let mut s = chat.options().sampling.clone();
    let n_ctx = chat.pool().options().instance.n_ctx;
    if let Some(n) = o.max_tokens {
        let rule = format!("at least 1 and less than the context size n_ctx={n_ctx}");
        s.max_tokens = Some(bounded(max_tokens_field, n, 1, n_ctx as i64 - 1, &rule)? as u32);
    }
    s.temperature = o.temperature.unwrap_or(s.temperature);
    s.top_p = o.top_p.unwrap_or(s.top_p);
    // -1, as in llama-server: a fresh seed for this request.
    match o.seed {
        Some(-1) => s.seed = None,
        Some(n) => {
            s.seed = Some(bounded("seed", n, 0, u32::MAX as i64, "-1 (random) or between 0 and 4294967295")? as u32)
        }
        None => {}
    }
    let vocab = chat.pool().engine().n_vocab().map_or(crate::params::MAX_TOP_K as i64, i64::from);
    if let Some(n) = o.top_k {
        s.top_k = bounded("top_k", n, 0, vocab, &format!("between 0 (off) and the vocabulary size {vocab}"))? as i32;
    }
    if let Some(n) = o.repeat_last_n {
        let rule = format!("-1 (the whole context) or between 0 and the context size n_ctx={n_ctx}");
        s.repeat_last_n = bounded("repeat_last_n", n, -1, n_ctx as i64, &rule)? as i32;
    }
    s.min_p = o.min_p.unwrap_or(s.min_p);
    s.repeat_penalty = o.repeat_penalty.unwrap_or(s.repeat_penalty);
    s.frequency_penalty = o.frequency_penalty.unwrap_or(s.frequency_penalty);
    s.presence_penalty = o.presence_penalty.unwrap_or(s.presence_penalty);
    if let Some(stop) = o.stop {
        s.stop = stop.into_vec();
    }
    Ok(s)
}

/// Runs a route's work under the one meter every generation route passes
/// through: the request is counted once, by outcome (a generation that
/// streams counts itself when it ends), and a client that leaves before the
/// answer starts cancels the work. `prompt_field` names where the dialect
/// keeps the prompt, for a prompt too long for the context.
pub(crate) async fn metered<F, Fut>(
    state: &ApiState,
    http: &HttpRequest,
    endpoint: &'static str,
    prompt_field: Option<&'static str>,
    work: F,
) -> Result<HttpResponse, ApiError>
where
    F: FnOnce(Meter) -> Fut,
    Fut: Future<Output = Result<HttpResponse, ApiError>>,
{
    let meter = Meter::new(state.metrics.clone(), endpoint, Instant::now());
    let result = unless_client_gone(http, work(meter.clone())).await;
    meter.answer(match prompt_field {
        Some(field) => result.map_err(|e| e.prompt_in(field)),
        None => result,
    })
}

/// A stateless request checked, its grammar compiled and its prompt
/// tokenized, once, on a blocking thread; refused here with a 400 before
/// any answer starts.
pub(crate) async fn prepare(state: &ApiState, request: GenerateRequest) -> Result<PreparedRequest, ApiError> {
    let chat = state.chat()?;
    state.admit()?;
    Ok(chat.pool().prepared(request).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dialect_reads_the_same_fields() {
        let s: Sampling = serde_json::from_str(r#"{"max_tokens": 8.0, "top_k": 3, "stop": "x"}"#).unwrap();
        assert_eq!((s.max_tokens, s.top_k), (Some(8), Some(3)));
        let options = serde_json::from_str(r#"{"num_predict": 8, "top_k": 3, "stop": ["x"]}"#).unwrap();
        let (o, to_the_end) = Sampling::from_ollama_options(&options).unwrap();
        assert_eq!((o.max_tokens, o.top_k, to_the_end), (Some(8), Some(3), false));
        let options = serde_json::from_str(r#"{"num_predict": -1, "top_k": "3"}"#).unwrap();
        let e = Sampling::from_ollama_options(&options).unwrap_err();
        assert!(e.to_string().contains("options.top_k"), "{e}");
    }
}
