//! The fields `/v1/chat/completions` and `/v1/completions` read from the rest
//! of their body (OpenAI's newer fields and llama-server's): the handlers
//! take them by name from a map ([`super::super::openai`]), so that a field
//! no documentation lists is ignored; these types describe them. Each is
//! honoured, refused unless it carries its neutral value, or ignored because
//! it cannot change the answer (README, "Request fields"); the fuzzer checks
//! that the server answers as written here. (`Deserialize` only lets the
//! schema derive read `flatten`; nothing is read into them.)
#![allow(dead_code)]

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// OpenAI's fields of `/v1/chat/completions` beyond the sampling ones.
#[derive(Deserialize, ToSchema)]
pub struct ChatExtras {
    /// Structured output: `{"type": "text" | "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    response_format: Option<Map<String, Value>>,
    /// Whether to return each token's log-probability.
    logprobs: Option<bool>,
    /// How many of the most likely alternatives to return with each token (0–20; needs `logprobs`).
    #[schema(minimum = 0, maximum = 20)]
    top_logprobs: Option<i64>,
    /// Functions the model may call: `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
    tools: Option<Vec<Map<String, Value>>>,
    /// `none`, `auto`, `required`, or `{"type": "function", "function": {"name"}}`.
    tool_choice: Option<Value>,
    /// Whether the model may call several tools in one reply.
    parallel_tool_calls: Option<bool>,
    /// Refused: OpenAI's deprecated form of `tools` (unless absent or empty).
    functions: Option<Value>,
    /// Refused: OpenAI's deprecated form of `tool_choice` (unless `none` or `auto`).
    function_call: Option<Value>,
    /// Ignored: stored nowhere.
    metadata: Option<Value>,
    /// Ignored: nothing is stored for OpenAI's dashboard.
    store: Option<Value>,
    /// Ignored: one tier.
    service_tier: Option<Value>,
    /// Ignored.
    safety_identifier: Option<Value>,
    /// Ignored: a predicted output only saves time where it is used.
    prediction: Option<Value>,
    /// Ignored: the served model does not reason before it answers.
    reasoning_effort: Option<Value>,
    /// Refused: text only.
    audio: Option<Value>,
    /// Refused unless `["text"]`.
    modalities: Option<Vec<String>>,
    /// Refused unless `"medium"`.
    verbosity: Option<String>,
    /// Refused: no web search.
    web_search_options: Option<Value>,
    #[serde(flatten)]
    shared: SharedExtras,
}

/// OpenAI's fields of `/v1/completions` beyond the sampling ones.
#[derive(Deserialize, ToSchema)]
pub struct TextExtras {
    /// How many of the most likely alternatives to return with each token (0–20), in the completions shape.
    #[schema(minimum = 0, maximum = 20)]
    logprobs: Option<i64>,
    /// Refused unless 1.
    best_of: Option<i64>,
    /// Refused unless false.
    echo: Option<bool>,
    /// Refused unless empty: the served model has no infill.
    suffix: Option<String>,
    /// Refused unless absent or empty: a text completion calls no tools.
    tools: Option<Value>,
    #[serde(flatten)]
    shared: SharedExtras,
}

/// The fields both routes share: the conversation's cache key, and
/// llama-server's own fields.
#[derive(Deserialize, ToSchema)]
pub struct SharedExtras {
    /// Keys the conversation's KV cache (after `X-Conversation-Id`), so its next request finds its prefix warm.
    prompt_cache_key: Option<String>,
    /// Keys the conversation's KV cache after `prompt_cache_key`; the answer does not depend on it.
    user: Option<String>,
    /// Refused unless empty.
    logit_bias: Option<Map<String, Value>>,
    /// llama-server's `max_tokens` (−1: to the end of the context).
    #[schema(minimum = -1)]
    n_predict: Option<i64>,
    /// A GBNF grammar the reply follows (README, "Bounds").
    grammar: Option<String>,
    /// A JSON schema the reply follows.
    json_schema: Option<Map<String, Value>>,
    /// Refused unless 1.
    typical_p: Option<f64>,
    /// Refused unless 0.
    mirostat: Option<f64>,
    /// Ignored: used only with `mirostat`.
    mirostat_tau: Option<Value>,
    /// Ignored: used only with `mirostat`.
    mirostat_eta: Option<Value>,
    /// Refused unless 0.
    dynatemp_range: Option<f64>,
    /// Ignored: used only with `dynatemp_range`.
    dynatemp_exponent: Option<Value>,
    /// Refused unless 0.
    dry_multiplier: Option<f64>,
    /// Ignored: used only with `dry_multiplier`.
    dry_base: Option<Value>,
    /// Ignored: used only with `dry_multiplier`.
    dry_allowed_length: Option<Value>,
    /// Ignored: used only with `dry_multiplier`.
    dry_penalty_last_n: Option<Value>,
    /// Ignored: used only with `dry_multiplier`.
    dry_sequence_breakers: Option<Value>,
    /// Refused unless 0.
    xtc_probability: Option<f64>,
    /// Ignored: used only with `xtc_probability`.
    xtc_threshold: Option<Value>,
    /// Refused unless −1 or 0.
    top_n_sigma: Option<f64>,
    /// Refused unless empty.
    samplers: Option<Vec<String>>,
    /// Refused unless false.
    ignore_eos: Option<bool>,
    /// Refused unless 0 (`logprobs` gives the same).
    n_probs: Option<i64>,
    /// Refused unless 0.
    min_keep: Option<i64>,
    /// Refused unless 0.
    n_indent: Option<i64>,
    /// Refused unless 0 (`max_generation_ms` bounds every generation).
    t_max_predict_ms: Option<i64>,
    /// Ignored: a full context never shifts here.
    n_keep: Option<Value>,
    /// Ignored: the pool picks the slot that holds the conversation's cache.
    id_slot: Option<Value>,
    /// Ignored: prompts are always cached.
    cache_prompt: Option<Value>,
    /// Refused unless false.
    return_tokens: Option<bool>,
    /// Refused unless false.
    timings_per_token: Option<bool>,
    /// Refused unless false.
    return_progress: Option<bool>,
    /// Refused unless false.
    post_sampling_probs: Option<bool>,
    /// Refused unless empty.
    response_fields: Option<Vec<String>>,
    /// Refused unless empty: no adapters are loaded.
    lora: Option<Vec<Value>>,
    /// Refused unless empty: the model's template is used as it is.
    chat_template_kwargs: Option<Map<String, Value>>,
    /// Refused unless `"none"`.
    reasoning_format: Option<String>,
}

/// Ollama's `options` on `/api/chat` and `/api/generate`.
#[derive(Deserialize, ToSchema)]
pub struct OllamaOptions {
    seed: Option<i64>,
    /// Tokens to generate; < 0: to the end of the context.
    num_predict: Option<i64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    temperature: Option<f64>,
    repeat_penalty: Option<f64>,
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    /// A string or an array of strings.
    stop: Option<Value>,
    /// Honoured up to the instance's `n_ctx`; above it refused.
    num_ctx: Option<i64>,
    /// Refused unless 1.
    typical_p: Option<f64>,
    /// Refused unless 0.
    mirostat: Option<f64>,
    /// Refused unless 1.
    tfs_z: Option<f64>,
    /// Ignored: used only with `mirostat`.
    mirostat_tau: Option<Value>,
    /// Ignored: used only with `mirostat`.
    mirostat_eta: Option<Value>,
    /// Ignored: a full context never shifts here.
    num_keep: Option<Value>,
    /// Ignored, as current Ollama ignores it.
    penalize_newline: Option<Value>,
    /// Ignored: how the server runs is set at start-up.
    numa: Option<Value>,
    /// Ignored: how the server runs is set at start-up.
    num_batch: Option<Value>,
    /// Ignored: how the server runs is set at start-up.
    num_gpu: Option<Value>,
    /// Ignored: how the server runs is set at start-up.
    main_gpu: Option<Value>,
    /// Ignored: how the server runs is set at start-up.
    use_mmap: Option<Value>,
    /// Ignored: how the server runs is set at start-up.
    num_thread: Option<Value>,
}
