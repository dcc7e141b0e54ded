//! The HTTP side of a remote `llama-server`: one client per remote, the
//! fields of `/props` and `/v1/models` modelpool reads, and the checks made
//! when connecting (up, serving the pool's model, how many slots).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{Expected, RemoteSpec};
use crate::error::EngineError;

/// Longest wait for `/health` and `/props` while connecting or probing.
pub(super) const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What a remote told us when we connected.
#[derive(Clone, Debug)]
pub(super) struct RemoteProps {
    pub slots: usize,
    /// Tokens one slot may hold.
    pub n_ctx: u32,
}

/// The fields of `/props` modelpool reads.
#[derive(Deserialize)]
pub(super) struct Props {
    pub total_slots: Option<usize>,
    pub model_path: Option<String>,
    pub model_alias: Option<String>,
    pub default_generation_settings: Option<GenerationSettings>,
    /// The model's Jinja chat template, and the texts of its BOS and EOS.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct GenerationSettings {
    pub n_ctx: Option<u32>,
}

/// `/v1/models`.
#[derive(Deserialize)]
pub(super) struct Models {
    pub data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
pub(super) struct ModelEntry {
    pub id: String,
    pub meta: Option<ModelMeta>,
}

#[derive(Deserialize)]
pub(super) struct ModelMeta {
    pub n_vocab: Option<u32>,
    pub n_ctx_train: Option<u32>,
}

/// The file name part of a model path or name, without `.gguf`.
pub(super) fn model_stem(name: &str) -> &str {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    base.strip_suffix(".gguf").unwrap_or(base)
}

/// A connection to one remote (a `reqwest` client keeps its connections).
#[derive(Clone)]
pub(super) struct Remote {
    pub client: reqwest::Client,
    pub spec: Arc<RemoteSpec>,
    /// The URL without a trailing slash.
    pub base: String,
    /// The URL as shown in status and logs (no credentials).
    pub shown: String,
}

impl Remote {
    pub(super) fn new(spec: RemoteSpec) -> Result<Self, EngineError> {
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

    pub(super) fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.auth(self.client.get(format!("{}{path}", self.base)))
    }

    pub(super) fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.spec.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    /// An error that makes the remote count as broken (replaced = reconnected).
    pub(super) fn broken(&self, what: impl std::fmt::Display) -> EngineError {
        EngineError::Remote(format!("remote {}: {what}", self.shown))
    }

    /// GET `path` as JSON within the check timeout.
    pub(super) async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, EngineError> {
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
    pub(super) async fn health(&self) -> Result<(), EngineError> {
        self.get_json::<serde_json::Value>("/health").await.map(|_| ())
    }

    /// Checks that the remote is up and serves the expected model; reads its slots.
    pub(super) async fn connect(&self, expect: &Expected) -> Result<RemoteProps, EngineError> {
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

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

pub(super) fn clip(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
