//! The answer of `/v1/chat/completions` and `/v1/completions`: one object,
//! or server-sent `chat.completion.chunk` / `text_completion` chunks.

use actix_web::{web, HttpResponse};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

use super::disconnect::after_admission;
use super::error::ApiError;
use super::kit::{unix_now, ApiState};
use super::metrics::Meter;
use super::sse::{self, json_str, Frame};
use crate::engine::CacheKey;
use crate::error::PoolError;
use crate::params::{FinishReason, GenerateRequest, Usage};
use crate::pool::lease::{GenEvent, GenerationStream};

/// Which OpenAI route a generation answers.
#[derive(Clone, Copy)]
pub(super) enum Route {
    /// `/v1/chat/completions`: `chat.completion` objects, `delta` chunks.
    Chat,
    /// `/v1/completions`: `text_completion` objects, `text` chunks.
    Text,
}

impl Route {
    pub(super) fn endpoint(self) -> &'static str {
        match self {
            Route::Chat => "chat_completions",
            Route::Text => "completions",
        }
    }
}

/// How an answer is delivered: streamed or not, with a last usage chunk or not.
#[derive(Clone, Copy)]
pub(super) struct Delivery {
    pub stream: bool,
    pub include_usage: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = CompletionUsage)]
pub(super) struct UsageBody {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: PromptDetails,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct PromptDetails {
    /// Prompt tokens served from the instance's KV cache.
    cached_tokens: u32,
}

fn usage_body(u: &Usage) -> UsageBody {
    UsageBody {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details: PromptDetails { cached_tokens: u.cached_tokens },
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        // A cut reply says so: it did not reach its end.
        FinishReason::Length | FinishReason::Stalled => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// The assistant message of a whole reply and its finish reason: under
/// tools, the parsed calls (`tool_calls`) or the answer.
fn reply_message(text: String, finish: FinishReason, with_tools: bool) -> (Value, &'static str) {
    use super::tools::{parse_reply, Reply};
    match with_tools.then(|| parse_reply(&text)) {
        Some(Reply::Calls(calls)) => {
            let calls: Vec<Value> = calls.iter().map(|c| c.openai(None)).collect();
            (json!({ "role": "assistant", "content": null, "tool_calls": calls }), "tool_calls")
        }
        Some(Reply::Text(answer)) => (json!({ "role": "assistant", "content": answer }), finish_str(finish)),
        None => (json!({ "role": "assistant", "content": text }), finish_str(finish)),
    }
}

#[tracing::instrument(name = "request", skip_all, fields(endpoint = route.endpoint()))]
pub(super) async fn generate(
    state: &web::Data<ApiState>,
    request: GenerateRequest,
    key: CacheKey,
    delivery: Delivery,
    route: Route,
    with_tools: bool,
    peer: Option<super::disconnect::PeerSocket>,
    client: Option<u64>,
    meter: Meter,
) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let model = chat.pool().engine_info().model_name;
    let Delivery { stream, include_usage } = delivery;
    let with_logprobs = request.sampling.logprobs.is_some();
    // A streaming request still waiting for a slot after a moment gets its
    // answer's headers, then SSE comments while it waits (clients and
    // proxies see it is alive); a refusal before that keeps its status.
    // Checked and tokenized once, before any answer: a bad field keeps its 400.
    let pool = chat.pool().clone();
    let request = super::pipeline::prepare(state, request).await?;
    let mut admission: std::pin::Pin<Box<dyn std::future::Future<Output = Result<GenerationStream, PoolError>>>> =
        Box::pin(async move { pool.run_as(request, Some(key), client).await });
    let admitted = if stream {
        tokio::select! {
            admitted = &mut admission => Some(admitted?),
            _ = tokio::time::sleep(super::kit::HEADERS_WHILE_QUEUED) => None,
        }
    } else {
        Some((&mut admission).await?)
    };
    let (prefix, object) = match route {
        Route::Chat => ("chatcmpl", "chat.completion"),
        Route::Text => ("cmpl", "text_completion"),
    };
    let id = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now();

    if !stream {
        let generation = admitted.expect("a request that does not stream waits for its admission");
        // An error returns to the handler, which counts it once.
        let (text, lps, done) = generation.collect().await?;
        meter.ok(&done.usage);
        let choice = match route {
            Route::Chat => {
                let (message, finish) = reply_message(text, done.finish_reason, with_tools);
                json!({
                    "index": 0,
                    "message": message,
                    "logprobs": if with_logprobs { chat_logprobs(&lps) } else { Value::Null },
                    "finish_reason": finish,
                })
            }
            Route::Text => json!({
                "index": 0,
                "text": text,
                "logprobs": if with_logprobs { text_logprobs(&lps, 0) } else { Value::Null },
                "finish_reason": finish_str(done.finish_reason),
            }),
        };
        return Ok(HttpResponse::Ok().json(json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage_body(&done.usage),
        })));
    }

    // The answer is a stream read straight from the sequence's channel: one
    // event per token, written to the socket when actix polls it; a client
    // that leaves drops it, and with it the generation.
    let events = after_admission(admitted.map(Ok), admission, peer, move |admitted| {
        async_stream::stream! {
            let chunk_object = match route {
                Route::Chat => "chat.completion.chunk",
                Route::Text => "text_completion",
            };
            // With `include_usage`, every chunk but the last carries `"usage": null`, as OpenAI's do.
            // The log-probabilities of the tokens since the last chunk go with the next one.
            let mut pending: Vec<crate::params::TokenLogprob> = Vec::new();
            let mut offset = 0usize;
            // Under tools the reply is read whole before it is sent: a call is
            // not known to be one until it parses.
            let mut held = with_tools.then(String::new);
            let mut chunk = |text: Option<&str>,
                             calls: Option<Value>,
                             finish: Option<&str>,
                             pending: &mut Vec<crate::params::TokenLogprob>| {
                let logprobs = match (with_logprobs, route) {
                    (false, _) => Value::Null,
                    (true, Route::Chat) => chat_logprobs(pending),
                    (true, Route::Text) => text_logprobs(pending, offset),
                };
                offset += pending.iter().map(|lp| lp.token.text.len()).sum::<usize>();
                pending.clear();
                let choice = match route {
                    Route::Chat => {
                        let delta = match (text, calls) {
                            (_, Some(calls)) => json!({ "tool_calls": calls }),
                            (Some(t), None) => json!({ "content": t }),
                            (None, None) if finish.is_none() => json!({ "role": "assistant", "content": "" }),
                            (None, None) => json!({}),
                        };
                        json!({ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
                    }
                    Route::Text => {
                        json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish })
                    }
                };
                let mut c = json!({
                    "id": id, "object": chunk_object, "created": created, "model": model, "choices": [choice],
                });
                if include_usage {
                    c["usage"] = Value::Null;
                }
                c
            };
            let data = |v: Value| Frame::data(&v.to_string());
            let tokens = TokenChunks::new(route, &id, chunk_object, created, &model, include_usage);
            let mut generation = match admitted {
                Ok(generation) => generation,
                Err(e) => {
                    let e = ApiError::from(e);
                    meter.fail(&e);
                    yield Frame::data(&e.body_json());
                    yield Frame::data("[DONE]");
                    return;
                }
            };
            if matches!(route, Route::Chat) {
                yield data(chunk(None, None, None, &mut pending));
            }
            while let Some(event) = generation.next().await {
                match event {
                    GenEvent::Logprob(lp) => pending.push(lp),
                    GenEvent::Token(t) => match held.as_mut() {
                        Some(held) => held.push_str(&t),
                        None if !with_logprobs => yield tokens.frame(&t),
                        None => yield data(chunk(Some(&t), None, None, &mut pending)),
                    },
                    GenEvent::Done(done) => {
                        meter.ok(&done.usage);
                        let mut finish = finish_str(done.finish_reason);
                        if let Some(text) = held.take() {
                            let piece = match super::tools::parse_reply(&text) {
                                super::tools::Reply::Calls(calls) => {
                                    finish = "tool_calls";
                                    let indexed: Vec<Value> =
                                        calls.iter().enumerate().map(|(i, c)| c.openai(Some(i))).collect();
                                    chunk(None, Some(Value::from(indexed)), None, &mut pending)
                                }
                                super::tools::Reply::Text(answer) => chunk(Some(&answer), None, None, &mut pending),
                            };
                            yield data(piece);
                        }
                        yield data(chunk(None, None, Some(finish), &mut pending));
                        if include_usage {
                            let last = json!({
                                "id": id, "object": chunk_object, "created": created, "model": model,
                                "choices": [], "usage": usage_body(&done.usage),
                            });
                            yield data(last);
                        }
                        break;
                    }
                    GenEvent::Error(e) => {
                        let e = ApiError::from(e);
                        meter.fail(&e);
                        yield Frame::data(&e.body_json());
                        break;
                    }
                }
            }
            yield Frame::data("[DONE]");
        }
    });
    Ok(sse::response(events))
}

/// A token's chunk without log-probabilities, written straight into its
/// frame: what every such chunk of a stream shares is encoded once, then
/// each token's text goes between. The same JSON as the stream's other
/// chunks (`{"id", "object", "created", "model", "choices": [{"index": 0,
/// "delta": {"content"} | "text", "logprobs": null, "finish_reason": null}]}`).
struct TokenChunks {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl TokenChunks {
    fn new(route: Route, id: &str, object: &str, created: u64, model: &str, include_usage: bool) -> Self {
        let mut head = Vec::with_capacity(160);
        head.extend_from_slice(b"{\"id\":");
        json_str(&mut head, id);
        head.extend_from_slice(b",\"object\":");
        json_str(&mut head, object);
        head.extend_from_slice(format!(",\"created\":{created},\"model\":").as_bytes());
        json_str(&mut head, model);
        head.extend_from_slice(match route {
            Route::Chat => b",\"choices\":[{\"index\":0,\"delta\":{\"content\":" as &[u8],
            Route::Text => b",\"choices\":[{\"index\":0,\"text\":",
        });
        let mut tail = Vec::with_capacity(64);
        if matches!(route, Route::Chat) {
            tail.push(b'}');
        }
        tail.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":null}]");
        if include_usage {
            tail.extend_from_slice(b",\"usage\":null");
        }
        tail.push(b'}');
        Self { head, tail }
    }

    fn write(&self, buf: &mut Vec<u8>, text: &str) {
        buf.extend_from_slice(&self.head);
        json_str(buf, text);
        buf.extend_from_slice(&self.tail);
    }

    fn frame(&self, text: &str) -> Frame {
        Frame::build(None, self.head.len() + text.len() + self.tail.len() + 8, |b| self.write(b, text))
    }
}

/// Log-probabilities in OpenAI's chat shape (`content` entries).
fn chat_logprobs(lps: &[crate::params::TokenLogprob]) -> Value {
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
fn text_logprobs(lps: &[crate::params::TokenLogprob], mut offset: usize) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_chunk_is_the_json_of_the_streams_other_chunks() {
        let text = "a \"quoted\"\nline é";
        for (route, object, include_usage) in
            [(Route::Chat, "chat.completion.chunk", true), (Route::Text, "text_completion", false)]
        {
            let mut buf = Vec::new();
            TokenChunks::new(route, "id-1", object, 7, "m\"odel", include_usage).write(&mut buf, text);
            let got: Value = serde_json::from_slice(&buf).unwrap();
            let choice = match route {
                Route::Chat => {
                    json!({ "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null })
                }
                Route::Text => json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": null }),
            };
            let mut want =
                json!({ "id": "id-1", "object": object, "created": 7, "model": "m\"odel", "choices": [choice] });
            if include_usage {
                want["usage"] = Value::Null;
            }
            assert_eq!(got, want);
        }
    }
}
