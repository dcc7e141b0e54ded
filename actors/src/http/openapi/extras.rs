//! The fields `/v1/chat/completions` and `/v1/completions` read from the rest
//! of their body (OpenAI's newer fields and llama-server's): the handlers
//! take them by name from a map ([`super::super::openai`]), so that a field
//! no documentation lists is ignored; these types describe them. Each is
//! honoured, refused unless it carries its neutral value, or ignored because
//! it cannot change the answer (docs/http-api.md, "Request fields"); the fuzzer checks
//! that the server answers as written here. (`Deserialize` only lets the
//! schema derive read `flatten`; nothing is read into them.)
#![allow(dead_code)]

use serde::Deserialize;
use serde_json::{json, Map, Value};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// A field refused unless it carries one of `neutral` (values that change
/// nothing) or is null: exactly what the server accepts of it.
fn only(neutral: &[Value]) -> RefOr<Schema> {
    let shown: Vec<String> = neutral.iter().map(Value::to_string).collect();
    let mut values = vec![Value::Null];
    values.extend_from_slice(neutral);
    // Any type: the values say which.
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::AnyValue)
        .enum_values(Some(values))
        .description(Some(format!("Refused unless {} (or null): not supported by this server", shown.join(" or "))))
        .into()
}

/// A JSON schema: an object or a boolean.
pub(crate) fn json_schema_value() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([Type::Object, Type::Boolean, Type::Null]))
        .description(Some("A JSON schema the reply follows (an object, or a boolean)"))
        .into()
}

/// llama-server's `max_tokens`: −1 (to the end of the context) or at least 1.
fn n_predict() -> RefOr<Schema> {
    use utoipa::openapi::schema::SchemaType;
    let int = |b: ObjectBuilder| b.schema_type(SchemaType::from_iter([Type::Integer]));
    utoipa::openapi::OneOfBuilder::new()
        .item(int(ObjectBuilder::new()).minimum(Some(-1)).maximum(Some(-1)))
        .item(int(ObjectBuilder::new()).minimum(Some(1)))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some("llama-server's `max_tokens`: -1 (to the end of the context) or at least 1"))
        .into()
}

/// A page size, `1 ..= max`; an empty value (`?limit=`) is the default.
fn limit(max: f64) -> RefOr<Schema> {
    use utoipa::openapi::schema::SchemaType;
    utoipa::openapi::OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::Integer]))
                .minimum(Some(1))
                .maximum(Some(max)),
        )
        .item(ObjectBuilder::new().schema_type(Type::String).max_length(Some(0)))
        .into()
}
/// A message id, or empty (absent).
pub(crate) fn message_id_or_empty() -> RefOr<Schema> {
    use utoipa::openapi::schema::SchemaType;
    utoipa::openapi::OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(SchemaType::from_iter([Type::Integer])).minimum(Some(0)))
        .item(ObjectBuilder::new().schema_type(Type::String).max_length(Some(0)))
        .into()
}
pub(crate) fn limit_100() -> RefOr<Schema> {
    limit(100.0)
}
pub(crate) fn limit_1000() -> RefOr<Schema> {
    limit(1000.0)
}

pub(crate) fn null_only() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Null).description(Some("Refused: not supported by this server")).into()
}
pub(crate) fn zero() -> RefOr<Schema> {
    only(&[json!(0)])
}
pub(crate) fn one() -> RefOr<Schema> {
    only(&[json!(1)])
}
pub(crate) fn no() -> RefOr<Schema> {
    only(&[json!(false)])
}
pub(crate) fn sigma_off() -> RefOr<Schema> {
    only(&[json!(-1), json!(0)])
}
pub(crate) fn empty_string() -> RefOr<Schema> {
    only(&[json!("")])
}
pub(crate) fn empty_list() -> RefOr<Schema> {
    only(&[json!([])])
}
pub(crate) fn empty_object() -> RefOr<Schema> {
    only(&[json!({})])
}
/// llama-server's fields that ask for something when set: empty or false passes.
pub(crate) fn unset() -> RefOr<Schema> {
    only(&[json!(false), json!(""), json!([]), json!({})])
}
/// Ollama's `think`: refused unless false, empty or null.
pub(crate) fn no_thinking() -> RefOr<Schema> {
    only(&[json!(false), json!(""), json!([])])
}
pub(crate) fn only_text() -> RefOr<Schema> {
    only(&[json!(["text"])])
}
pub(crate) fn only_medium() -> RefOr<Schema> {
    only(&[json!("medium")])
}
pub(crate) fn only_none() -> RefOr<Schema> {
    only(&[json!("none")])
}

/// Structured output: the reply is JSON (`json_object`; llama-server's
/// `schema` beside it is honoured), JSON that follows `json_schema.schema`,
/// or free `text`.
#[derive(Deserialize, ToSchema)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    kind: ResponseFormatType,
    /// With `json_object`: a JSON schema the object follows (llama-server's).
    #[schema(schema_with = json_schema_value)]
    schema: Option<Value>,
    /// Required with `json_schema`.
    json_schema: Option<JsonSchemaFormat>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormatType {
    Text,
    JsonObject,
    JsonSchema,
}

#[derive(Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    name: Option<String>,
    description: Option<String>,
    /// The JSON schema (docs/http-api.md, "Bounds": its size, nesting and names are bounded).
    #[schema(schema_with = json_schema_value)]
    schema: Value,
    strict: Option<bool>,
}

/// OpenAI's fields of `/v1/chat/completions` beyond the sampling ones.
#[derive(Deserialize, ToSchema)]
pub struct ChatExtras {
    /// Structured output: `{"type": "text" | "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    response_format: Option<ResponseFormat>,
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
    #[schema(schema_with = null_only)]
    functions: Option<Value>,
    /// Refused: OpenAI's deprecated form of `tool_choice` (unless `none` or `auto`).
    #[schema(schema_with = null_only)]
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
    #[schema(schema_with = null_only)]
    audio: Option<Value>,
    /// Refused unless `["text"]`.
    #[schema(schema_with = only_text)]
    modalities: Option<Value>,
    /// Refused unless `"medium"`.
    #[schema(schema_with = only_medium)]
    verbosity: Option<Value>,
    /// Refused: no web search.
    #[schema(schema_with = null_only)]
    web_search_options: Option<Value>,
    #[serde(flatten)]
    shared: SharedExtras,
}

/// A `/v1/completions` prompt: text written whole (its special tokens
/// parsed), or token ids of the served model's vocabulary, or an array
/// holding one of those (several prompts are refused: send several requests).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    OneText(Vec<String>),
    OneTokens(Vec<Vec<u32>>),
}

/// OpenAI's fields of `/v1/completions` beyond the sampling ones.
#[derive(Deserialize, ToSchema)]
pub struct TextExtras {
    /// How many of the most likely alternatives to return with each token (0–20), in the completions shape.
    #[schema(minimum = 0, maximum = 20)]
    logprobs: Option<i64>,
    /// Refused unless 1.
    #[schema(schema_with = one)]
    best_of: Option<Value>,
    /// Refused unless false.
    #[schema(schema_with = no)]
    echo: Option<Value>,
    /// Refused unless empty: the served model has no infill.
    #[schema(schema_with = empty_string)]
    suffix: Option<Value>,
    /// Refused unless absent or empty: a text completion calls no tools.
    #[schema(schema_with = empty_list)]
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
    #[schema(schema_with = empty_object)]
    logit_bias: Option<Value>,
    #[schema(schema_with = n_predict)]
    n_predict: Option<Value>,
    /// A GBNF grammar the reply follows (docs/http-api.md, "Bounds").
    grammar: Option<String>,
    /// A JSON schema the reply follows (an object, or a boolean).
    #[schema(schema_with = json_schema_value)]
    json_schema: Option<Value>,
    /// Refused unless 1.
    #[schema(schema_with = one)]
    typical_p: Option<Value>,
    /// Refused unless 0.
    #[schema(schema_with = zero)]
    mirostat: Option<Value>,
    /// Ignored: used only with `mirostat`.
    mirostat_tau: Option<Value>,
    /// Ignored: used only with `mirostat`.
    mirostat_eta: Option<Value>,
    /// Refused unless 0.
    #[schema(schema_with = zero)]
    dynatemp_range: Option<Value>,
    /// Ignored: used only with `dynatemp_range`.
    dynatemp_exponent: Option<Value>,
    /// Refused unless 0.
    #[schema(schema_with = zero)]
    dry_multiplier: Option<Value>,
    /// Ignored: used only with `dry_multiplier`.
    dry_base: Option<Value>,
    /// Ignored: used only with `dry_multiplier`.
    dry_allowed_length: Option<Value>,
    /// Ignored: used only with `dry_multiplier`.
    dry_penalty_last_n: Option<Value>,
    /// Ignored: used only with `dry_multiplier`.
    dry_sequence_breakers: Option<Value>,
    /// Refused unless 0.
    #[schema(schema_with = zero)]
    xtc_probability: Option<Value>,
    /// Ignored: used only with `xtc_probability`.
    xtc_threshold: Option<Value>,
    /// Refused unless −1 or 0.
    #[schema(schema_with = sigma_off)]
    top_n_sigma: Option<Value>,
    /// Refused unless empty.
    #[schema(schema_with = unset)]
    samplers: Option<Value>,
    /// Refused unless false.
    #[schema(schema_with = no)]
    ignore_eos: Option<Value>,
    /// Refused unless 0 (`logprobs` gives the same).
    #[schema(schema_with = zero)]
    n_probs: Option<Value>,
    /// Refused unless 0.
    #[schema(schema_with = zero)]
    min_keep: Option<Value>,
    /// Refused unless 0.
    #[schema(schema_with = zero)]
    n_indent: Option<Value>,
    /// Refused unless 0 (`max_generation_ms` bounds every generation).
    #[schema(schema_with = zero)]
    t_max_predict_ms: Option<Value>,
    /// Ignored: a full context never shifts here.
    n_keep: Option<Value>,
    /// Ignored: the pool picks the slot that holds the conversation's cache.
    id_slot: Option<Value>,
    /// Ignored: prompts are always cached.
    cache_prompt: Option<Value>,
    /// Refused unless false.
    #[schema(schema_with = unset)]
    return_tokens: Option<Value>,
    /// Refused unless false.
    #[schema(schema_with = unset)]
    timings_per_token: Option<Value>,
    /// Refused unless false.
    #[schema(schema_with = unset)]
    return_progress: Option<Value>,
    /// Refused unless false.
    #[schema(schema_with = unset)]
    post_sampling_probs: Option<Value>,
    /// Refused unless empty.
    #[schema(schema_with = unset)]
    response_fields: Option<Value>,
    /// Refused unless empty: no adapters are loaded.
    #[schema(schema_with = unset)]
    lora: Option<Value>,
    /// Refused unless empty: the model's template is used as it is.
    #[schema(schema_with = unset)]
    chat_template_kwargs: Option<Value>,
    /// Refused unless `"none"`.
    #[schema(schema_with = only_none)]
    reasoning_format: Option<Value>,
}

/// `/api/embeddings` (Ollama's older route): one `prompt`; `input` is
/// `/api/embed`'s and is not read here.
#[derive(Deserialize, ToSchema)]
pub struct OllamaEmbeddingsRequest {
    model: Option<String>,
    prompt: String,
    /// Cut a text past the model's 512 tokens (default), or refuse it.
    truncate: Option<bool>,
    /// Only the model's own.
    dimensions: Option<i64>,
    /// Ignored: nothing of them changes an embedding.
    options: Option<Map<String, Value>>,
    /// Ignored: the model stays loaded.
    keep_alive: Option<Value>,
}

/// `/api/embed`'s `input`.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OllamaEmbedInput {
    One(String),
    Many(Vec<String>),
}

/// Ollama's `options` on `/api/chat` and `/api/generate`.
#[derive(Deserialize, ToSchema)]
pub struct OllamaOptions {
    #[schema(minimum = -1, maximum = 4294967295_i64)]
    seed: Option<i64>,
    /// Tokens to generate; < 0: to the end of the context.
    num_predict: Option<i64>,
    #[schema(minimum = 0)]
    top_k: Option<i64>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    top_p: Option<f64>,
    #[schema(minimum = 0, maximum = 1)]
    min_p: Option<f64>,
    #[schema(minimum = 0, maximum = 2)]
    temperature: Option<f64>,
    #[schema(exclusive_minimum = 0)]
    repeat_penalty: Option<f64>,
    #[schema(minimum = -1)]
    repeat_last_n: Option<i64>,
    #[schema(minimum = -2, maximum = 2)]
    presence_penalty: Option<f64>,
    #[schema(minimum = -2, maximum = 2)]
    frequency_penalty: Option<f64>,
    /// A string or an array of strings.
    stop: Option<Value>,
    /// Honoured up to the instance's `n_ctx`; above it refused.
    num_ctx: Option<i64>,
    /// Refused unless 1.
    #[schema(schema_with = one)]
    typical_p: Option<Value>,
    /// Refused unless 0.
    #[schema(schema_with = zero)]
    mirostat: Option<Value>,
    /// Refused unless 1.
    #[schema(schema_with = one)]
    tfs_z: Option<Value>,
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
