//! One sequence on a remote: a streaming `/completion` pinned to the leased
//! slot, its events turned into the pool's text pieces and usage, ended by
//! its last event, a cancellation, the client leaving or the remote failing.

use std::time::Instant;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::oneshot;

use super::client::{clip, error_chain, Remote};
use crate::engine::sampling::check_fits;
use crate::engine::{SeqEvent, SeqSink, Undelivered};
use crate::error::EngineError;
use crate::params::{Completion, FinishReason, PreparedRequest, Usage};

/// One event of a streaming `/completion`.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    content: String,
    #[serde(default)]
    stop: bool,
    #[serde(default)]
    tokens_predicted: u32,
    #[serde(default)]
    tokens_evaluated: u32,
    #[serde(default)]
    stop_type: String,
    timings: Option<Timings>,
    error: Option<serde_json::Value>,
    /// With `n_probs`: each token of this chunk and its alternatives.
    #[serde(default)]
    completion_probabilities: Vec<Prob>,
}

/// llama-server's account of one token: `logprob` (or `prob` on builds
/// that report probabilities after sampling) and the alternatives.
#[derive(Deserialize)]
struct Prob {
    #[serde(default)]
    token: String,
    bytes: Option<Vec<u8>>,
    logprob: Option<f32>,
    prob: Option<f32>,
    #[serde(default, alias = "top_probs")]
    top_logprobs: Vec<Prob>,
}

impl Prob {
    fn text(&self) -> crate::params::TokenText {
        crate::params::TokenText::new(self.bytes.clone().unwrap_or_else(|| self.token.as_bytes().to_vec()))
    }

    fn logprob(&self) -> f32 {
        self.logprob.or(self.prob.map(f32::ln)).unwrap_or(f32::NEG_INFINITY)
    }

    fn into_token(self, top: usize) -> crate::params::TokenLogprob {
        crate::params::TokenLogprob {
            token: self.text(),
            logprob: self.logprob(),
            top: self.top_logprobs.iter().take(top).map(|p| (p.text(), p.logprob())).collect(),
        }
    }
}

#[derive(Deserialize)]
struct Timings {
    #[serde(default)]
    cache_n: u32,
}

/// One sequence on the remote.
pub(super) struct Job {
    pub remote: Remote,
    pub slot: usize,
    pub n_ctx: u32,
    /// Whether the remote may reuse its slot's tokens (`cache_prompt`):
    /// only its own namespace's (`remote/instance.rs`).
    pub reuse: bool,
    /// Tokens generated, told to the slot's record when the job ends.
    pub generated: std::rc::Rc<std::cell::Cell<u32>>,
}

/// How a stream ended before its last event.
enum Interrupted {
    Cancelled,
    /// Its reader took nothing for the pause limit.
    Stalled,
    Failed(EngineError),
}

impl From<Undelivered> for Interrupted {
    fn from(u: Undelivered) -> Self {
        match u {
            Undelivered::ReaderGone => Interrupted::Cancelled,
            Undelivered::Stalled => Interrupted::Stalled,
        }
    }
}

impl Job {
    pub async fn run(
        self,
        request: PreparedRequest,
        started: Instant,
        sink: SeqSink,
        cancelled: oneshot::Receiver<()>,
    ) {
        let mut usage = Usage::default();
        let result = tokio::select! {
            r = self.stream(&request, started, &sink, &mut usage) => r,
            _ = cancelled => Err(Interrupted::Cancelled),
            _ = sink.closed() => Err(Interrupted::Cancelled),
        };
        let done = match result {
            Ok(done) => Ok(done),
            Err(Interrupted::Cancelled) => {
                usage.total_ms = started.elapsed().as_secs_f64() * 1e3;
                Ok(Completion { usage, finish_reason: FinishReason::Cancelled })
            }
            // The reader took nothing for the pause limit: the reply is cut, and says so.
            Err(Interrupted::Stalled) => {
                usage.total_ms = started.elapsed().as_secs_f64() * 1e3;
                Ok(Completion { usage, finish_reason: FinishReason::Stalled })
            }
            Err(Interrupted::Failed(e)) => Err(e),
        };
        self.generated.set(match &done {
            Ok(c) => c.usage.completion_tokens,
            // Unknown: as much as the context holds, so that nothing is reused.
            Err(_) => u32::MAX / 4,
        });
        sink.done(done);
    }

    async fn stream(
        &self,
        request: &PreparedRequest,
        started: Instant,
        sink: &SeqSink,
        usage: &mut Usage,
    ) -> Result<Completion, Interrupted> {
        let fail = Interrupted::Failed;
        // Tokenized and checked once, for the pool's sequences (Engine::prepare).
        let tokens = request.prompt();
        let s = request.sampling();
        // Without max_tokens: the rest of the context (-1 when the remote's
        // context is unknown, which llama-server reads the same way). A
        // remote whose context is shorter than the pool's holds less.
        let n_predict = match self.n_ctx {
            0 => s.max_tokens.map_or(-1, i64::from),
            n_ctx => i64::from(check_fits(tokens.len() as u32, s.max_tokens, n_ctx).map_err(fail)?),
        };
        usage.prompt_tokens = tokens.len() as u32;
        let mut body = serde_json::json!({
            "prompt": tokens,
            "n_predict": n_predict,
            "stream": true,
            "cache_prompt": self.reuse,
            "id_slot": self.slot,
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "min_p": s.min_p,
            "repeat_penalty": s.repeat_penalty,
            "repeat_last_n": s.repeat_last_n,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "stop": s.stop,
        });
        if let Some(seed) = s.seed {
            body["seed"] = seed.into();
        }
        // Log-probabilities: llama-server's n_probs (at least 1, for the chosen token's own).
        if let Some(n) = s.logprobs {
            body["n_probs"] = n.max(1).into();
        }
        // Structured output: the remote's sampler follows the same grammar.
        if let Some(grammar) = &s.grammar {
            body["grammar"] = grammar.clone().into();
        }
        let remote = &self.remote;
        let limit = remote.spec.timeout;
        let timed_out = |what: &str| fail(remote.broken(format!("{what} within {} ms", limit.as_millis())));
        let req = remote.auth(remote.client.post(format!("{}/completion", remote.base))).json(&body);
        let res = tokio::time::timeout(limit, req.send())
            .await
            .map_err(|_| timed_out("did not answer"))?
            .map_err(|e| fail(remote.broken(error_chain(&e))))?;
        let status = res.status();
        if !status.is_success() {
            let text = res.text().await.unwrap_or_default();
            let e = if status.is_server_error() {
                remote.broken(format!("answered {status}: {}", clip(&text)))
            } else {
                EngineError::RemoteRejected(format!("remote {} answered {status}: {}", remote.shown, clip(&text)))
            };
            return Err(fail(e));
        }
        let mut events = res.bytes_stream().eventsource();
        loop {
            let event = tokio::time::timeout(limit, events.next())
                .await
                .map_err(|_| timed_out("sent nothing"))?
                .ok_or_else(|| fail(remote.broken("closed the stream before its last event")))?
                .map_err(|e| fail(remote.broken(format!("stream: {e}"))))?;
            let chunk: Chunk = serde_json::from_str(&event.data)
                .map_err(|e| fail(remote.broken(format!("unexpected stream event ({e})"))))?;
            if let Some(err) = chunk.error {
                return Err(fail(remote.broken(format!("error in stream: {err}"))));
            }
            if usage.first_token_at.is_none() && (chunk.tokens_predicted > 0 || chunk.stop) {
                let now = Instant::now();
                usage.first_token_at = Some(now);
                usage.time_to_first_token_ms = (now - started).as_secs_f64() * 1e3;
            }
            usage.completion_tokens = chunk.tokens_predicted;
            if let Some(top) = s.logprobs {
                for p in chunk.completion_probabilities {
                    sink.send(SeqEvent::Logprob(p.into_token(top as usize))).await.map_err(Interrupted::from)?;
                }
            }
            if !chunk.content.is_empty() {
                sink.send(SeqEvent::Piece(chunk.content)).await.map_err(Interrupted::from)?;
            }
            if chunk.stop {
                if chunk.tokens_evaluated > 0 {
                    usage.prompt_tokens = chunk.tokens_evaluated;
                }
                usage.cached_tokens = chunk.timings.map(|t| t.cache_n).unwrap_or(0).min(usage.prompt_tokens);
                usage.total_ms = started.elapsed().as_secs_f64() * 1e3;
                let generating = usage.total_ms - usage.time_to_first_token_ms;
                if usage.completion_tokens > 1 && generating > 0.0 {
                    usage.tokens_per_second = (usage.completion_tokens - 1) as f64 / (generating / 1e3);
                }
                let finish_reason = if chunk.stop_type == "limit" { FinishReason::Length } else { FinishReason::Stop };
                return Ok(Completion { usage: *usage, finish_reason });
            }
        }
    }
}
