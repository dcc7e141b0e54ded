//! Request and result types shared by the engine, the pool and the chat layer.

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// Who wrote a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation. `content` is always plain text: it is never
/// parsed for the model's special tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// Sampling settings for one generation. `temperature == 0` means greedy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 selects greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling cut-off, in (0, 1].
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: i32,
    /// Seed for the sampler; none picks a fresh one per request.
    pub seed: Option<u32>,
    /// Penalty for repeating recent tokens; 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat, frequency and presence penalties
    /// look at; -1: the whole context (as llama-server). At most n_ctx.
    pub repeat_last_n: i32,
    /// OpenAI's frequency penalty: subtracted per earlier occurrence; 0 disables.
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty: subtracted once a token occurred; 0 disables.
    pub presence_penalty: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// Most tokens to generate; none: to the end of the context, as
    /// llama-server and OpenAI do (`max_tokens_default` in the config).
    #[serde(default, alias = "max_tokens_default")]
    pub max_tokens: Option<u32>,
    /// Generation ends before any of these strings; they are not emitted.
    pub stop: Vec<String>,
    /// A GBNF grammar (root rule `root`) the reply must follow: structured
    /// output.
    pub grammar: Option<String>,
    /// A JSON schema the reply must follow (checked against the bounds of
    /// [`crate::engine::grammar`] at the API); it becomes `grammar` when the
    /// request is prepared, on a parser thread.
    #[serde(skip)]
    pub json_schema: Option<crate::engine::grammar::JsonSchema>,
    /// Log-probabilities of each generated token and of this many
    /// alternatives (0 to [`MAX_TOP_LOGPROBS`]), from the distribution
    /// before sampling; none: not computed.
    #[serde(default)]
    pub logprobs: Option<u32>,
}

/// Most alternatives a token's log-probabilities may list (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// One generated token's log-probability and the most likely alternatives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: TokenText,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(TokenText, f32)>,
}

/// A token as text (lossy where it is part of a character) and as bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenText {
    pub text: String,
    pub bytes: Vec<u8>,
}

impl TokenText {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self { text: String::from_utf8_lossy(&bytes).into_owned(), bytes }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 0.95,
            top_k: 40,
            seed: None,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            min_p: 0.0,
            max_tokens: None,
            stop: Vec::new(),
            grammar: None,
            json_schema: None,
            logprobs: None,
        }
    }
}

/// Longest grammar a request may carry (a JSON schema's is a few KiB).
pub use crate::engine::grammar::MAX_GRAMMAR_BYTES;

impl SamplingParams {
    /// Whether the reply is constrained (a grammar or a JSON schema).
    pub fn is_constrained(&self) -> bool {
        self.grammar.is_some() || self.json_schema.is_some()
    }

    /// Greedy decoding with the given token budget: deterministic output.
    pub fn greedy(max_tokens: u32) -> Self {
        Self { temperature: 0.0, max_tokens: Some(max_tokens), ..Self::default() }
    }

    /// Checks every field against its rule; the error names the field, the
    /// rule and the value given.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field: &'static str, rule: &'static str, value: String| {
            Err(EngineError::InvalidParam { field, rule, value })
        };
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return bad("temperature", "must be between 0 and 2", self.temperature.to_string());
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be greater than 0 and at most 1", self.top_p.to_string());
        }
        if !(0..=MAX_TOP_K).contains(&self.top_k) {
            return bad("top_k", "must be between 0 (off) and 1048576", self.top_k.to_string());
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad("repeat_penalty", "must be greater than 0", self.repeat_penalty.to_string());
        }
        if !(-1..=MAX_PENALTY_WINDOW).contains(&self.repeat_last_n) {
            return bad(
                "repeat_last_n",
                "must be -1 (the whole context) or between 0 and 1048576",
                self.repeat_last_n.to_string(),
            );
        }
        for (field, v) in [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return bad(field, "must be between -2 and 2", v.to_string());
            }
        }
        if !(self.min_p.is_finite() && (0.0..=1.0).contains(&self.min_p)) {
            return bad("min_p", "must be between 0 and 1", self.min_p.to_string());
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens", "must be at least 1", "0".into());
        }
        if let Some(g) = &self.grammar {
            crate::engine::grammar::check_gbnf(g, "grammar", MAX_GRAMMAR_BYTES)?;
        }
        if self.grammar.is_some() && self.json_schema.is_some() {
            return bad("grammar", "give a grammar or a JSON schema, not both", "both".into());
        }
        if let Some(n) = self.logprobs.filter(|n| *n > MAX_TOP_LOGPROBS) {
            return bad("top_logprobs", "must be between 0 and 20", n.to_string());
        }
        if self.stop.len() > 4 || self.stop.iter().any(|s| s.is_empty() || s.len() > 64) {
            return bad("stop", "at most 4 non-empty strings of at most 64 bytes", format!("{:?}", self.stop));
        }
        Ok(())
    }

    /// [`Self::validate`], then the rules that depend on the model and the
    /// context: the penalty window within the sequence's `n_ctx` tokens (the
    /// penalties sampler allocates a ring of that many tokens), `top_k`
    /// within the vocabulary. (`max_tokens` is checked with the prompt: [`crate::engine::sampling::check_fits`].)
    pub fn validate_for(&self, n_ctx: u32, n_vocab: Option<u32>) -> Result<(), EngineError> {
        self.validate()?;
        let bad = |field: &'static str, rule: &'static str, value: String| {
            Err(EngineError::InvalidParam { field, rule, value })
        };
        if self.repeat_last_n > n_ctx as i32 {
            return bad(
                "repeat_last_n",
                "must be at most the context size n_ctx (-1 means all of it)",
                format!("{} (n_ctx {n_ctx})", self.repeat_last_n),
            );
        }
        if let Some(v) = n_vocab.filter(|v| self.top_k as i64 > *v as i64) {
            return bad("top_k", "must be at most the vocabulary size", format!("{} (vocabulary {v})", self.top_k));
        }
        Ok(())
    }

    /// The penalty window in tokens for a sequence of `n_ctx` tokens.
    pub fn penalty_window(&self, n_ctx: u32) -> i32 {
        match self.repeat_last_n {
            -1 => n_ctx as i32,
            n => n.clamp(0, n_ctx as i32),
        }
    }
}

/// Largest `top_k` accepted before the model is known (no vocabulary is larger).
pub const MAX_TOP_K: i32 = 1 << 20;
/// Largest penalty window accepted before the context is known.
pub const MAX_PENALTY_WINDOW: i32 = 1 << 20;

/// One generation request: the conversation so far and how to sample.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingParams,
    /// A prompt written whole by the client (`/v1/completions`), without
    /// the chat template; then `messages` are not used. The client writes
    /// the whole context, so its markers speak for nobody else.
    #[serde(default)]
    pub raw_prompt: Option<RawPrompt>,
}

/// A request checked once and its prompt's token ids: what instances run.
/// Made by [`crate::engine::Engine::prepare`] (which validates the
/// sampling, checks the grammar, tokenizes the prompt and checks that it
/// fits); the pool, the step loop and remote instances take it as it is,
/// without validating or tokenizing again.
#[derive(Clone, Debug)]
pub struct PreparedRequest {
    request: GenerateRequest,
    prompt: Vec<i32>,
    max_tokens: u32,
    n_ctx: u32,
}

impl PreparedRequest {
    /// Only [`crate::engine::Engine::prepare_tokens`] makes one, after its checks.
    pub(crate) fn checked(request: GenerateRequest, prompt: Vec<i32>, max_tokens: u32, n_ctx: u32) -> Self {
        // What every route's request became, whatever its dialect: one line
        // per request (`MODELPOOL_LOG=modelpool::prepared=debug`).
        tracing::debug!(
            target: "modelpool::prepared",
            prompt_tokens = prompt.len(),
            max_tokens,
            n_ctx,
            raw = request.raw_prompt.is_some(),
            sampling = %serde_json::to_string(&request.sampling).unwrap_or_default(),
            "request prepared"
        );
        Self { request, prompt, max_tokens, n_ctx }
    }

    pub fn request(&self) -> &GenerateRequest {
        &self.request
    }

    pub fn sampling(&self) -> &SamplingParams {
        &self.request.sampling
    }

    /// The prompt's token ids (the chat template applied, or the raw prompt's).
    pub fn prompt(&self) -> &[i32] {
        &self.prompt
    }

    /// Tokens it may generate: `max_tokens`, or the rest of the context.
    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }

    /// The sequence length its prompt and reply were checked against: an
    /// instance with a shorter one refuses it.
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }
}

/// Says that a whole prompt was tokenized (`MODELPOOL_LOG=modelpool::tokenized=debug`):
/// once per request, where it is prepared or, for a chat turn, where its
/// prompt is built.
pub(crate) fn tokenized(tokens: usize) {
    tracing::debug!(target: "modelpool::tokenized", tokens, "prompt tokenized");
}

/// A prompt the client wrote whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RawPrompt {
    /// Text, tokenized as it is: the vocabulary's BOS where it wants one,
    /// special tokens parsed.
    Text(String),
    /// Token ids of the served model's own vocabulary, used as they are
    /// (as llama-server takes them).
    Tokens(Vec<i32>),
}

impl RawPrompt {
    /// Token ids checked against the vocabulary before llama.cpp sees them
    /// (an id outside it aborts the process there); the error names `prompt`.
    pub fn checked_ids(ids: &[i32], n_vocab: Option<u32>) -> Result<(), EngineError> {
        let bad = |rule: &'static str, value: String| Err(EngineError::InvalidParam { field: "prompt", rule, value });
        if ids.is_empty() {
            return bad("must not be empty", "[]".into());
        }
        let limit = n_vocab.map_or(i64::from(i32::MAX), i64::from);
        match ids.iter().position(|id| !(0..limit).contains(&i64::from(*id))) {
            Some(i) => bad("token ids must be within the model's vocabulary", format!("prompt[{i}] = {}", ids[i])),
            None => Ok(()),
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The receiver of the token stream went away.
    Cancelled,
    /// The reader took nothing for the pause limit: the reply was cut.
    Stalled,
}

/// Token counts and timings of one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// From the start of prompt processing to the first generated token.
    pub time_to_first_token_ms: f64,
    /// Whole generation, prompt included.
    pub total_ms: f64,
    /// Generated tokens per second after the first token.
    pub tokens_per_second: f64,
    /// Time the request waited in the pool's queue for an instance.
    #[serde(default)]
    pub queue_wait_ms: f64,
    /// When the first token was sampled, so that callers can measure time to
    /// first token from wherever their request began (not serialised).
    #[serde(skip)]
    pub first_token_at: Option<std::time::Instant>,
    /// Prompt tokens served from the instance's KV cache (a conversation's
    /// earlier turns) instead of being decoded; included in `prompt_tokens`.
    #[serde(default)]
    pub cached_tokens: u32,
}

/// The end of a successful generation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub usage: Usage,
    pub finish_reason: FinishReason,
}
