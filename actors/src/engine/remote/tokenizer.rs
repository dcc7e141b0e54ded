//! The tokenizer of a pool whose model is not on this machine (every
//! instance remote, `model` naming a GGUF the remotes serve): the chat
//! template comes from a remote's `/props` and is rendered here; text is
//! tokenized by that remote's `/tokenize`, template text with special
//! tokens parsed and message content without, exactly as a local tokenizer
//! does. Results are cached per text (bounded in bytes; long texts are not
//! kept), so a conversation's earlier messages are not sent again. The HTTP calls run on a thread of their own; callers
//! wait for the answer (a round trip on a cache miss).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;

use super::client::{Models, Props, Remote};
use super::RemoteSpec;
use crate::engine::prompt::{split_rendered, ChatTemplate};
use crate::engine::{Engine, EngineInfo, InstanceBackend, InstanceOptions};
use crate::error::EngineError;
use crate::params::ChatMessage;

/// Bytes of text and tokens the cache may hold; the least recently used go first.
const CACHE_BYTES: usize = 32 << 20;
/// Longer texts are not cached: a message this long is rarely sent twice,
/// and one too long for the context would be refused after tokenizing.
const CACHE_MAX_TEXT: usize = 16 << 10;
/// Longest wait for one `/tokenize`.
const TOKENIZE_TIMEOUT: Duration = Duration::from_secs(10);

/// A text, whether its special tokens are parsed, whether a BOS may be added.
type CacheKey = (String, bool, bool);

struct Job {
    text: String,
    special: bool,
    /// Adds the model's BOS where its vocabulary says so (the prompt's start).
    add_special: bool,
    reply: std::sync::mpsc::Sender<Result<Vec<i32>, EngineError>>,
}

#[derive(Deserialize)]
struct Tokens {
    tokens: Vec<i32>,
}

/// An [`Engine`] that tokenizes through a remote llama-server and runs no
/// instance itself.
pub struct RemoteTokenizer {
    info: EngineInfo,
    template: ChatTemplate,
    n_vocab: Option<u32>,
    shown: String,
    jobs: mpsc::UnboundedSender<Job>,
    cache: Mutex<TokenCache>,
}

/// Tokens by text, bounded in bytes (text and tokens), least recently used out first.
struct TokenCache {
    entries: lru::LruCache<CacheKey, Arc<Vec<i32>>>,
    bytes: usize,
}

impl TokenCache {
    fn new() -> Self {
        Self { entries: lru::LruCache::unbounded(), bytes: 0 }
    }

    fn cost(key: &CacheKey, tokens: &[i32]) -> usize {
        key.0.len() + tokens.len() * 4 + 64
    }

    fn get(&mut self, key: &CacheKey) -> Option<Arc<Vec<i32>>> {
        self.entries.get(key).cloned()
    }

    fn insert(&mut self, key: CacheKey, tokens: Arc<Vec<i32>>) {
        if key.0.len() > CACHE_MAX_TEXT {
            return;
        }
        let cost = Self::cost(&key, &tokens);
        if let Some(old) = self.entries.put(key.clone(), tokens) {
            self.bytes -= Self::cost(&key, &old);
        }
        self.bytes += cost;
        while self.bytes > CACHE_BYTES {
            let Some((k, v)) = self.entries.pop_lru() else { break };
            self.bytes -= Self::cost(&k, &v);
        }
    }
}

impl RemoteTokenizer {
    /// Takes the first of `remotes` that answers: its chat template, and its
    /// `/tokenize` from then on. `model_name` is the pool's model (file stem).
    pub async fn connect(remotes: &[RemoteSpec], model_name: &str) -> Result<Arc<Self>, EngineError> {
        let mut errors = Vec::new();
        for spec in remotes {
            match Self::connect_one(spec, model_name).await {
                Ok(t) => return Ok(t),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(EngineError::RemoteSetup(format!(
            "no tokenizer: the model file is not here and no remote gave its chat template and /tokenize ({})",
            errors.join("; ")
        )))
    }

    async fn connect_one(spec: &RemoteSpec, model_name: &str) -> Result<Arc<Self>, EngineError> {
        let remote = Remote::new(spec.clone())?;
        let props: Props = remote.get_json("/props").await?;
        let models: Models = remote.get_json("/v1/models").await?;
        let source = props
            .chat_template
            .filter(|t| !t.is_empty())
            .ok_or_else(|| EngineError::RemoteSetup("no chat_template in /props".into()))?;
        let template =
            ChatTemplate::jinja(&source, props.bos_token.unwrap_or_default(), props.eos_token.unwrap_or_default())?;
        let meta = models.data.into_iter().find_map(|m| m.meta);
        let shown = remote.shown.clone();
        let (jobs, rx) = mpsc::unbounded_channel();
        spawn_worker(remote, rx)?;
        tracing::info!(remote = %shown, "prompts are tokenized by the remote's /tokenize (the model file is not here)");
        Ok(Arc::new(Self {
            info: EngineInfo {
                model_name: model_name.to_string(),
                weights_bytes: 0,
                n_ctx_train: meta.as_ref().and_then(|m| m.n_ctx_train).unwrap_or(0),
                per_request: false,
            },
            template,
            n_vocab: meta.and_then(|m| m.n_vocab),
            shown,
            jobs,
            cache: Mutex::new(TokenCache::new()),
        }))
    }

    /// Tokens of `text`; `special` parses the template's special tokens,
    /// `add_special` adds a BOS where the vocabulary wants one.
    fn tokenize(&self, text: &str, special: bool, add_special: bool) -> Result<Arc<Vec<i32>>, EngineError> {
        if text.is_empty() && !add_special {
            return Ok(Arc::new(Vec::new()));
        }
        let key = (text.to_string(), special, add_special);
        if let Some(hit) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(hit.clone());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.jobs
            .send(Job { text: text.to_string(), special, add_special, reply: tx })
            .map_err(|_| EngineError::Remote(format!("remote tokenizer {}: its thread has ended", self.shown)))?;
        let tokens = rx
            .recv_timeout(TOKENIZE_TIMEOUT + Duration::from_secs(1))
            .map_err(|_| EngineError::Remote(format!("remote tokenizer {}: no answer", self.shown)))??;
        let tokens = Arc::new(tokens);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, tokens.clone());
        Ok(tokens)
    }
}

/// The thread that makes the `/tokenize` calls.
fn spawn_worker(remote: Remote, mut rx: mpsc::UnboundedReceiver<Job>) -> Result<(), EngineError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EngineError::RemoteSetup(format!("runtime: {e}")))?;
    std::thread::Builder::new()
        .name("remote-tokenizer".into())
        .spawn(move || {
            runtime.block_on(async move {
                let url = format!("{}/tokenize", remote.base);
                while let Some(job) = rx.recv().await {
                    let body =
                        serde_json::json!({ "content": job.text, "add_special": job.add_special, "parse_special": job.special });
                    let req = remote.auth(remote.client.post(&url)).timeout(TOKENIZE_TIMEOUT).json(&body);
                    let result = async { req.send().await?.error_for_status()?.json::<Tokens>().await }
                        .await
                        .map(|t| t.tokens)
                        .map_err(|e| EngineError::Remote(format!("remote tokenizer {}: {e}", remote.shown)));
                    let _ = job.reply.send(result);
                }
            })
        })
        .map_err(|e| EngineError::RemoteSetup(format!("tokenizer thread: {e}")))?;
    Ok(())
}

impl Engine for RemoteTokenizer {
    fn info(&self) -> EngineInfo {
        self.info.clone()
    }

    fn create_instance(&self, _id: usize, _opts: &InstanceOptions) -> Result<Box<dyn InstanceBackend>, EngineError> {
        Err(EngineError::Context("the model file is not here: only remote instances can serve (instances = 0)".into()))
    }

    fn count_tokens(&self, text: &str) -> u32 {
        match self.tokenize(text, false, false) {
            Ok(t) => t.len() as u32,
            Err(e) => {
                // The budget must go on: a generous estimate (about 2 bytes a token).
                tracing::warn!(error = %e, "remote tokenizer failed; estimating the token count");
                (text.len() as u32).div_ceil(2)
            }
        }
    }

    fn prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<i32>, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::InvalidParam {
                field: "messages",
                rule: "must contain at least one message",
                value: "[]".into(),
            });
        }
        let rendered = self.template.render_jinja_only(messages)?;
        let mut tokens = Vec::with_capacity(rendered.len() / 3);
        for (i, (text, special)) in split_rendered(&rendered, messages)?.into_iter().enumerate() {
            tokens.extend_from_slice(&self.tokenize(text, special, i == 0)?);
        }
        Ok(tokens)
    }

    fn n_vocab(&self) -> Option<u32> {
        self.n_vocab
    }

    fn raw_prompt_tokens(&self, text: &str) -> Result<Vec<i32>, EngineError> {
        Ok(self.tokenize(text, true, true)?.to_vec())
    }

    fn tokenizer(&self) -> (&'static str, String) {
        ("remote", format!("{}/tokenize", self.shown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_cache_stays_within_its_bytes_and_never_keeps_long_texts() {
        let mut cache = TokenCache::new();
        let long = "x".repeat(CACHE_MAX_TEXT + 1);
        cache.insert((long.clone(), false, false), Arc::new(vec![1; 10]));
        assert!(cache.get(&(long, false, false)).is_none());
        // 4,000 distinct 16 KiB texts would pin 64 MiB: the cache keeps 32.
        for i in 0..4000 {
            let text = format!("{i:05}{}", "y".repeat(CACHE_MAX_TEXT - 5));
            cache.insert((text, false, false), Arc::new(vec![i; 100]));
            assert!(cache.bytes <= CACHE_BYTES, "{} bytes after {i}", cache.bytes);
        }
        let newest = format!("{:05}{}", 3999, "y".repeat(CACHE_MAX_TEXT - 5));
        assert!(cache.get(&(newest, false, false)).is_some(), "the most recent stays");
    }
}
