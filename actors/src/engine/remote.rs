//! A remote instance: a llama.cpp `llama-server` reached over HTTP, driven by
//! the same command channel as a local step loop. Its thread runs a small
//! tokio runtime; each sequence is one streaming `/completion` request pinned
//! to the slot the pool leased (`id_slot`, `cache_prompt`), so the remote's
//! own prefix cache serves a conversation's next turn. The prompt goes as
//! token ids made by the local tokenizer: message text is never parsed for
//! special tokens, exactly as for a local instance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::sampling::check_fits;
use super::step_loop::{Command, ExitGuard, LoopSender};
use super::{Engine, InstanceInfo, SeqEvent, SeqSink};
use crate::error::EngineError;
use crate::params::{Completion, FinishReason, GenerateRequest, Usage};

/// How to reach one remote `llama-server`.
#[derive(Clone, Debug)]
pub struct RemoteSpec {
    /// Base URL, e.g. `http://10.0.0.5:8080` (no path).
    pub url: String,
    /// Sent as `Authorization: Bearer …` when set (llama-server's `--api-key`).
    pub api_key: Option<String>,
    /// Slots to lease on it; `None` reads `total_slots` from its `/props`.
    pub slots: Option<usize>,
    /// Longest wait for the remote's answer to start, and between two events
    /// of a stream; past it the remote counts as broken.
    pub timeout: Duration,
    /// The model file it must serve (file name, or its stem); `None` means
    /// the pool's own model.
    pub model: Option<String>,
}

impl RemoteSpec {
    /// The URL as shown in status and logs: without credentials or query.
    pub fn display_url(&self) -> String {
        display_url(&self.url)
    }
}

/// `url` without user information, query or fragment.
pub fn display_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.as_str().trim_end_matches('/').to_string()
        }
        Err(_) => "(invalid URL)".into(),
    }
}

/// True for an absolute http:// or https:// URL with a host.
pub fn is_http_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

/// Longest wait for `/health` and `/props` while connecting or probing.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What a remote told us when we connected.
#[derive(Clone, Debug)]
struct RemoteProps {
    slots: usize,
    /// Tokens one slot may hold.
    n_ctx: u32,
}

#[derive(Deserialize)]
struct Props {
    total_slots: Option<usize>,
    model_path: Option<String>,
    model_alias: Option<String>,
    default_generation_settings: Option<GenerationSettings>,
}

#[derive(Deserialize)]
struct GenerationSettings {
    n_ctx: Option<u32>,
}

#[derive(Deserialize)]
struct Models {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
    meta: Option<ModelMeta>,
}

#[derive(Deserialize)]
struct ModelMeta {
    n_vocab: Option<u32>,
}

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
}

#[derive(Deserialize)]
struct Timings {
    #[serde(default)]
    cache_n: u32,
}

/// The file name part of a model path or name, without `.gguf`.
fn model_stem(name: &str) -> &str {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    base.strip_suffix(".gguf").unwrap_or(base)
}

/// A connection to one remote (a `reqwest` client keeps its connections).
#[derive(Clone)]
struct Remote {
    client: reqwest::Client,
    spec: Arc<RemoteSpec>,
    base: String,
    shown: String,
}

impl Remote {
    fn new(spec: RemoteSpec) -> Result<Self, EngineError> {
        let base = spec.url.trim_end_matches('/').to_string();
        let shown = spec.display_url();
        reqwest::Url::parse(&base).map_err(|e| EngineError::RemoteSetup(format!("remote URL {shown}: {e}")))?;
        // No idle connections kept: llama-server closes kept-alive
        // connections on its own schedule, and a request sent on one it has
        // just closed fails as if the remote were broken. A new connection
        // per sequence costs a handshake, small beside a generation.
        let client = reqwest::Client::builder()
            .connect_timeout(spec.timeout.min(CHECK_TIMEOUT))
            .pool_max_idle_per_host(0)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| EngineError::RemoteSetup(format!("HTTP client for {shown}: {e}")))?;
        Ok(Self { client, spec: Arc::new(spec), base, shown })
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.auth(self.client.get(format!("{}{path}", self.base)))
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.spec.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    /// An error that makes the remote count as broken (replaced = reconnected).
    fn broken(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::Remote(format!("remote {}: {what}", self.shown))
    }

    /// GET `path` as JSON within the check timeout.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, EngineError> {
        let limit = self.spec.timeout.min(CHECK_TIMEOUT);
        let answer = tokio::time::timeout(limit, async {
            let res =
                self.get(path).send().await.map_err(|e| self.broken(format!("GET {path}: {}", error_chain(&e))))?;
            let status = res.status();
            if !status.is_success() {
                let body = res.text().await.unwrap_or_default();
                return Err(self.broken(format!("GET {path} answered {status}: {}", clip(&body))));
            }
            res.json::<T>().await.map_err(|e| self.broken(format!("GET {path}: unexpected answer ({e})")))
        })
        .await;
        answer
            .unwrap_or_else(|_| Err(self.broken(format!("GET {path} did not answer within {} ms", limit.as_millis()))))
    }

    /// The remote's `/health` (200 once its model is loaded).
    async fn health(&self) -> Result<(), EngineError> {
        self.get_json::<serde_json::Value>("/health").await.map(|_| ())
    }

    /// Checks that the remote is up and serves the expected model; reads its slots.
    async fn connect(&self, expect: &Expected) -> Result<RemoteProps, EngineError> {
        self.health().await?;
        let props: Props = self.get_json("/props").await?;
        let models: Models = self.get_json("/v1/models").await?;
        let wanted = self.spec.model.as_deref().map(model_stem).unwrap_or(&expect.model_stem).to_string();
        let mut names: Vec<String> = Vec::new();
        names.extend(props.model_path.iter().map(|p| model_stem(p).to_string()));
        names.extend(props.model_alias.iter().map(|p| model_stem(p).to_string()));
        names.extend(models.data.iter().map(|m| model_stem(&m.id).to_string()));
        if !names.contains(&wanted) {
            return Err(EngineError::RemoteModel(format!(
                "remote {} serves {}, but this pool is configured for {wanted}; start it with that model, \
                 or set model = \"…\" in its [[remote]] entry",
                self.shown,
                names.first().map(String::as_str).unwrap_or("an unnamed model"),
            )));
        }
        let n_vocab = models.data.iter().find_map(|m| m.meta.as_ref()?.n_vocab);
        if let (Some(theirs), Some(ours)) = (n_vocab, expect.n_vocab) {
            if theirs != ours {
                return Err(EngineError::RemoteModel(format!(
                    "remote {} has a vocabulary of {theirs} tokens and the local tokenizer {ours}: \
                     prompts tokenized here would be wrong there",
                    self.shown
                )));
            }
        }
        let total = props.total_slots.unwrap_or(1).max(1);
        let slots = self.spec.slots.unwrap_or(total);
        if slots > total {
            return Err(EngineError::RemoteModel(format!(
                "remote {}: {slots} slots configured but it has {total} (its -np)",
                self.shown
            )));
        }
        let n_ctx = props.default_generation_settings.and_then(|g| g.n_ctx).unwrap_or(0);
        Ok(RemoteProps { slots, n_ctx })
    }
}

/// What every remote of a pool must serve.
#[derive(Clone, Debug)]
pub struct Expected {
    /// File stem of the pool's model.
    pub model_stem: String,
    /// Vocabulary size of the local tokenizer.
    pub n_vocab: Option<u32>,
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Starts a remote instance's thread: it connects (checks `/health`,
/// `/props`, `/v1/models`), reports with `on_ready`, then serves commands
/// until every sender is gone; `on_exit` runs when it ends after a good start.
pub fn spawn(
    id: usize,
    spec: RemoteSpec,
    tokenizer: Arc<dyn Engine>,
    expect: Expected,
    on_ready: impl FnOnce(Result<(LoopSender, InstanceInfo, usize), EngineError>) + Send + 'static,
    on_exit: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new().name(format!("remote-{id}")).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return on_ready(Err(EngineError::RemoteSetup(format!("runtime: {e}")))),
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let remote = match Remote::new(spec) {
                Ok(r) => r,
                Err(e) => return on_ready(Err(e)),
            };
            let props = match remote.connect(&expect).await {
                Ok(p) => p,
                Err(e) => return on_ready(Err(e)),
            };
            tracing::info!(instance = id, remote = %remote.shown, slots = props.slots, n_ctx = props.n_ctx, "remote instance connected");
            let _exit = ExitGuard::new(on_exit);
            let (tx, rx) = mpsc::unbounded_channel();
            let info = InstanceInfo { weights_addr: 0, kv_bytes_estimate: 0, endpoint: Some(remote.shown.clone()) };
            on_ready(Ok((LoopSender::task(tx), info, props.slots)));
            serve(remote, props, tokenizer, rx).await;
        });
    })?;
    Ok(())
}

/// A sequence running on the remote.
struct Running {
    cancel: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Applies commands until the handle is gone; each sequence is a local task.
async fn serve(
    remote: Remote,
    props: RemoteProps,
    tokenizer: Arc<dyn Engine>,
    mut rx: mpsc::UnboundedReceiver<Command>,
) {
    let mut running: Vec<Option<Running>> = (0..props.slots).map(|_| None).collect();
    while let Some(command) = rx.recv().await {
        match command {
            Command::Start { slot, request, started, sink } => {
                if slot >= running.len() {
                    let _ = sink.send(SeqEvent::Done(Err(EngineError::Remote(format!(
                        "slot {slot} is out of range ({} slots)",
                        running.len()
                    )))));
                    continue;
                }
                if let Some(mut old) = running[slot].take() {
                    if let Some(c) = old.cancel.take() {
                        let _ = c.send(());
                    }
                }
                let (cancel, cancelled) = oneshot::channel();
                let job = Job { remote: remote.clone(), slot, n_ctx: props.n_ctx, tokenizer: tokenizer.clone() };
                let task = tokio::task::spawn_local(job.run(request, started, sink, cancelled));
                running[slot] = Some(Running { cancel: Some(cancel), task });
            }
            Command::Cancel(slot) => {
                if let Some(Some(r)) = running.get_mut(slot) {
                    if let Some(c) = r.cancel.take() {
                        let _ = c.send(());
                    }
                }
            }
            Command::Probe(reply) => {
                let remote = remote.clone();
                tokio::task::spawn_local(async move {
                    let _ = reply.send(remote.health().await);
                });
            }
            #[cfg(feature = "fault-injection")]
            Command::Fault(f) => tracing::warn!(?f, "fault injection applies to local instances only; ignored"),
        }
        running.iter_mut().for_each(|r| {
            if r.as_ref().is_some_and(|r| r.task.is_finished()) {
                *r = None;
            }
        });
    }
    // The handle is gone: dropping the tasks closes their connections, and
    // llama-server stops those slots.
    for r in running.into_iter().flatten() {
        r.task.abort();
    }
}

/// One sequence on the remote.
struct Job {
    remote: Remote,
    slot: usize,
    n_ctx: u32,
    tokenizer: Arc<dyn Engine>,
}

/// How a stream ended before its last event.
enum Interrupted {
    Cancelled,
    Failed(EngineError),
}

impl Job {
    async fn run(self, request: GenerateRequest, started: Instant, sink: SeqSink, cancelled: oneshot::Receiver<()>) {
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
            Err(Interrupted::Failed(e)) => Err(e),
        };
        let _ = sink.send(SeqEvent::Done(done));
    }

    async fn stream(
        &self,
        request: &GenerateRequest,
        started: Instant,
        sink: &SeqSink,
        usage: &mut Usage,
    ) -> Result<Completion, Interrupted> {
        let fail = Interrupted::Failed;
        let tokens = self.tokenizer.prompt_tokens(&request.messages).map_err(fail)?;
        let s = &request.sampling;
        if self.n_ctx > 0 {
            check_fits(tokens.len() as u32, s.max_tokens, self.n_ctx).map_err(fail)?;
        }
        usage.prompt_tokens = tokens.len() as u32;
        let mut body = serde_json::json!({
            "prompt": tokens,
            "n_predict": s.max_tokens,
            "stream": true,
            "cache_prompt": true,
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
            if !chunk.content.is_empty() && sink.send(SeqEvent::Piece(chunk.content)).is_err() {
                return Err(Interrupted::Cancelled);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(display_url("http://user:secret@10.0.0.5:8080/?key=x"), "http://10.0.0.5:8080");
        assert_eq!(display_url("not a url"), "(invalid URL)");
    }

    #[test]
    fn model_names_compare_by_file_stem() {
        assert_eq!(model_stem("/models/SmolLM2-135M-Instruct.Q4_1.gguf"), "SmolLM2-135M-Instruct.Q4_1");
        assert_eq!(model_stem("SmolLM2-135M-Instruct.Q4_1"), "SmolLM2-135M-Instruct.Q4_1");
    }
}
