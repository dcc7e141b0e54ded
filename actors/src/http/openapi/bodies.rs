//! The shapes of the answers that their handlers write as JSON values (the
//! generation routes build theirs piece by piece, some straight into bytes):
//! described here for the document; the fuzzer checks every answer against
//! them.
#![allow(dead_code)]

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::http::openai_reply::UsageBody;

/// `/v1/chat/completions` with `stream: false`.
#[derive(Serialize, ToSchema)]
pub struct ChatCompletion {
    id: String,
    /// Always `chat.completion`.
    object: String,
    /// Seconds since the Unix epoch.
    created: u64,
    model: String,
    /// Exactly one.
    choices: Vec<ChatChoice>,
    usage: UsageBody,
}

#[derive(Serialize, ToSchema)]
pub struct ChatChoice {
    index: u32,
    message: AssistantMessage,
    /// `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}` with `logprobs: true`.
    logprobs: Option<Map<String, Value>>,
    finish_reason: FinishReason,
}

/// Why a reply ended: `stop`, `length` (`max_tokens`, or cut after the pause limit), `tool_calls`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
}

#[derive(Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    role: String,
    /// Null when the reply is tool calls.
    content: Option<String>,
    /// `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<Map<String, Value>>>,
}

/// `/v1/completions` with `stream: false`.
#[derive(Serialize, ToSchema)]
pub struct TextCompletion {
    id: String,
    /// Always `text_completion`.
    object: String,
    created: u64,
    model: String,
    choices: Vec<TextChoice>,
    usage: UsageBody,
}

#[derive(Serialize, ToSchema)]
pub struct TextChoice {
    index: u32,
    text: String,
    /// `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` with `logprobs: n`.
    logprobs: Option<Map<String, Value>>,
    /// `stop` or `length`.
    finish_reason: FinishReason,
}

/// One server-sent event of a streamed answer, as a client's SSE reader
/// gives it. `/v1`: unnamed events (`message`) whose `data` is a chunk's
/// JSON, then `[DONE]`. `/chat`: `start` (`{"conversation_id"}`), `token`
/// (`{"text"}`) each, then `done` (the whole answer's JSON) or `error`.
#[derive(Serialize, ToSchema)]
pub struct SseEvent {
    event: String,
    data: String,
    id: Option<String>,
    retry: Option<u64>,
}

/// `/v1/embeddings`.
#[derive(Serialize, ToSchema)]
pub struct EmbeddingList {
    /// Always `list`.
    object: String,
    data: Vec<EmbeddingItem>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(Serialize, ToSchema)]
pub struct EmbeddingItem {
    /// Always `embedding`.
    object: String,
    index: u32,
    embedding: Embedding,
}

/// The vector as numbers, or (`encoding_format: base64`) its little-endian f32 bytes in base64.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum Embedding {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize, ToSchema)]
pub struct EmbeddingUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

/// `GET /pool` (docs/http-api.md, "Routes": what each part holds).
#[derive(Serialize, ToSchema)]
pub struct PoolBody {
    available: u32,
    in_use: u32,
    loading: u32,
    unhealthy: u32,
    queued: u32,
    waiting_for_conversation: u32,
    replaced: u64,
    total: u32,
    /// `Available: 3/4 slots on 1 instance`.
    summary: String,
    accepting: bool,
    totals: Map<String, Value>,
    /// One entry per instance: state, slots, requests, tokens, failures, last error, age.
    instances: Vec<Map<String, Value>>,
    tokenizer: Map<String, Value>,
    embedder: Map<String, Value>,
    memory_index: Map<String, Value>,
    cpu: Map<String, Value>,
    /// The CPU features llama.cpp's build uses (`AVX2`, `AVX512`, …).
    llama_cpp_cpu_features: Vec<String>,
    /// The KV cache tiers (memory, disk); null without them.
    kv: Option<Map<String, Value>>,
    rss_bytes: u64,
    storage: Map<String, Value>,
    auth: Map<String, Value>,
}

/// `GET /pool/capacity`.
#[derive(Serialize, ToSchema)]
pub struct CapacityBody {
    ready: bool,
    free_slots: u32,
    total_slots: u32,
    running: u32,
    queue_depth: u32,
    queue_limit: u32,
    /// Each member: `id`, `kind`, `endpoint`, `state`, `slots`, `slots_busy`.
    instances: Vec<Map<String, Value>>,
}

/// `GET /health`, `/health/ready`, `/health/live`: `status` `ok`, or (503)
/// `loading`, `draining`, `unhealthy`, `storage_unavailable`,
/// `embedder_unavailable`, `stopped`, with the `cause` where known.
#[derive(Serialize, ToSchema)]
pub struct HealthBody {
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<String>,
    /// `ok`, or `exact while the index builds`.
    #[serde(skip_serializing_if = "Option::is_none")]
    recall: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_index: Option<Map<String, Value>>,
}

/// An error on Ollama's routes (also a line of a stream).
#[derive(Serialize, ToSchema)]
pub struct OllamaError {
    error: String,
}

/// `/api/chat`: the answer (`stream: false`), or each line of the NDJSON stream.
#[derive(Serialize, ToSchema)]
pub struct OllamaChatReply {
    model: String,
    /// RFC 3339.
    created_at: String,
    message: OllamaMessage,
    done: bool,
    #[serde(flatten)]
    last: OllamaStats,
}

#[derive(Serialize, ToSchema)]
pub struct OllamaMessage {
    role: String,
    content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<Map<String, Value>>>,
}

/// A line of `/api/chat`'s NDJSON stream: a piece of the reply (the last
/// with `done: true` and the counts), or an error that ends the stream.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum OllamaChatLine {
    Reply(OllamaChatReply),
    Error(OllamaError),
}

/// A line of `/api/generate`'s NDJSON stream.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum OllamaGenerateLine {
    Reply(OllamaGenerateReply),
    Error(OllamaError),
}

/// `/api/generate`: the answer (`stream: false`), or each line of the NDJSON stream.
#[derive(Serialize, ToSchema)]
pub struct OllamaGenerateReply {
    model: String,
    created_at: String,
    response: String,
    done: bool,
    #[serde(flatten)]
    last: OllamaStats,
}

/// Only on the last object (`done: true`); durations in nanoseconds.
#[derive(Serialize, ToSchema)]
pub struct OllamaStats {
    /// `stop`, `length`, or `load` (no messages: the model is loaded).
    done_reason: Option<String>,
    total_duration: Option<u64>,
    load_duration: Option<u64>,
    prompt_eval_count: Option<u32>,
    prompt_eval_duration: Option<u64>,
    eval_count: Option<u32>,
    eval_duration: Option<u64>,
}

/// `/api/embed`.
#[derive(Serialize, ToSchema)]
pub struct OllamaEmbed {
    model: String,
    embeddings: Vec<Vec<f32>>,
    total_duration: u64,
    load_duration: u64,
    prompt_eval_count: u32,
}

/// `/api/embeddings`.
#[derive(Serialize, ToSchema)]
pub struct OllamaEmbedding {
    embedding: Vec<f32>,
}

/// `/api/tags`, `/api/ps`.
#[derive(Serialize, ToSchema)]
pub struct OllamaModels {
    /// `name`, `model`, `size`, `digest`, `details`, `purpose` (`chat`,
    /// `embeddings`), `modified_at` (tags); `expires_at`, `size_vram`, `context_length` (ps).
    models: Vec<Map<String, Value>>,
}

/// `/api/show`.
#[derive(Serialize, ToSchema)]
pub struct OllamaShow {
    modelfile: String,
    parameters: String,
    template: String,
    details: Map<String, Value>,
    model_info: Map<String, Value>,
    capabilities: Vec<String>,
    modified_at: String,
}

/// `/api/version`.
#[derive(Serialize, ToSchema)]
pub struct OllamaVersion {
    version: String,
}
