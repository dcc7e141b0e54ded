//! Configuration, layered: config/default.toml → profile → --config file →
//! MODELPOOL_<KEY> environment variables → command-line flags.

mod error;
mod layers;

use std::path::PathBuf;

use modelpool_actors::engine::kv_tiers::KvTierOptions;
use modelpool_actors::engine::remote::RemoteSpec;
use modelpool_actors::memory::{IndexOptions, StoreSpec};
use modelpool_actors::{ChatOptions, Durability, InstanceOptions, PoolOptions, SamplingParams};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use error::ConfigError;
use layers::{apply_env, expand, merge, parse_table};

const DEFAULT: &str = include_str!("../config/default.toml");
/// Deployment profiles shipped in config/.
pub const PROFILES: &[(&str, &str)] = &[
    ("development", include_str!("../config/development.toml")),
    ("small", include_str!("../config/small.toml")),
    ("medium", include_str!("../config/medium.toml")),
    ("large", include_str!("../config/large.toml")),
];

/// HTTP server settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: String,
    pub api_keys: Vec<String>,
    /// "key=namespace" pairs binding a key to one namespace.
    pub key_namespaces: Vec<String>,
    pub metrics_require_key: bool,
    pub max_body_bytes: usize,
    pub drain_timeout_ms: u64,
    /// A connection whose answer makes no progress this long is closed (0: never).
    pub write_timeout_ms: u64,
    /// Kernel send buffer of each connection, bytes (0: the kernel's sizing).
    pub send_buffer_bytes: usize,
    /// This replica's name (X-Modelpool-Node); empty: the host name.
    pub node: String,
    /// Host names requests may carry in `Host` (besides the loopback names
    /// when bound to loopback); ["*"]: any.
    pub allowed_hosts: Vec<String>,
    /// Origins (`https://app.example:8443`) whose browser pages may call the
    /// API (CORS); ["*"]: any; empty: none (same-origin pages need none).
    pub cors_origins: Vec<String>,
}

/// Chat memory settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    pub recent_messages: usize,
    pub recall_k: usize,
    pub recall_min_score: f32,
    pub cross_conversation_recall: bool,
    pub durability: Durability,
    pub max_message_chars: usize,
    pub embed_timeout_ms: u64,
    /// Most texts waiting for the embedder; past it, 503 + Retry-After.
    pub embed_queue: usize,
    /// Embedding contexts (threads of one thread each) sharing the weights.
    pub embed_contexts: usize,
    /// Most vectors in the conversation cache.
    pub vector_cache: usize,
    /// Candidates a namespace graph search examines (`ef`).
    pub recall_ef: usize,
}

/// One remote `llama-server` in the pool (`[[remote]]` in a config file).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// Base URL, e.g. "http://10.0.0.5:8080".
    pub url: String,
    /// Its `--api-key`, if it has one.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Slots to use; default: all of them (its `/props` `total_slots`).
    #[serde(default)]
    pub slots: Option<usize>,
    /// Longest wait for its answer to start and between two streamed tokens.
    #[serde(default = "default_remote_timeout_ms")]
    pub timeout_ms: u64,
    /// The model file it must serve; default: the pool's `model`.
    #[serde(default)]
    pub model: Option<String>,
}

fn default_remote_timeout_ms() -> u64 {
    30_000
}

impl RemoteConfig {
    /// A remote at `url` with the defaults.
    pub fn at(url: &str) -> Self {
        Self { url: url.to_string(), api_key: None, slots: None, timeout_ms: default_remote_timeout_ms(), model: None }
    }
}

// The key never reaches a log through Debug.
impl std::fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("url", &modelpool_actors::engine::remote::display_url(&self.url))
            .field("api_key", &self.api_key.as_ref().map(|_| "…"))
            .field("slots", &self.slots)
            .field("timeout_ms", &self.timeout_ms)
            .field("model", &self.model)
            .finish()
    }
}

/// The `store` setting: a URL that may hold a password, so its Debug form is redacted.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct StoreUrl(pub String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", modelpool_actors::memory::store::postgres::redact(&self.0))
    }
}

/// Every setting of modelpool; see config/default.toml for the documentation of each key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: PathBuf,
    pub embedding_model: PathBuf,
    pub data_dir: PathBuf,
    /// Empty: sled in `data_dir`; `postgres://…`: PostgreSQL.
    pub store: StoreUrl,
    pub instances: usize,
    pub slots: u32,
    pub prefill_chunk: u32,
    pub max_queue: usize,
    /// Most slots and queue places one API key (without keys: one peer
    /// address) holds at once; -1: every slot but one; 0: no limit.
    pub max_concurrent_per_key: i64,
    pub acquire_timeout_ms: u64,
    pub max_generation_ms: u64,
    /// Longest a sequence stays paused for a client that reads nothing.
    pub max_pause_ms: u64,
    pub health_interval_ms: u64,
    pub n_ctx: u32,
    /// Host memory for parked KV caches, MiB (-1: an eighth of the machine's, at most 8192; 0: off).
    pub kv_ram_mib: i64,
    /// Disk for KV cache files under `<data_dir>/kv`, MiB (0: off).
    pub kv_disk_mib: u64,
    /// Seconds a KV cache may go unused before it is deleted, on disk and in
    /// memory (0: no lifetime, only the budgets evict).
    pub kv_disk_ttl_s: u64,
    pub threads: u32,
    /// Lower each instance's threads while other processes keep cores busy.
    pub adapt_threads: bool,
    pub per_request: bool,
    pub system_prompt: String,
    pub sampling: SamplingParams,
    pub server: ServerConfig,
    pub chat: ChatConfig,
    /// Remote llama-server instances, pool members beside the local ones.
    #[serde(default)]
    pub remote: Vec<RemoteConfig>,
}

/// Values given on the command line; `None` leaves the layer below in force.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub profile: Option<String>,
    pub model: Option<PathBuf>,
    pub instances: Option<usize>,
    pub slots: Option<u32>,
    pub threads: Option<u32>,
    pub n_ctx: Option<u32>,
    pub data_dir: Option<PathBuf>,
    pub bind: Option<String>,
    pub per_request: bool,
    /// `--remote URL`, added to the config's `[[remote]]` entries.
    pub remotes: Vec<String>,
}

impl Config {
    /// Loads every layer, applies the flags and checks the result.
    pub fn load(o: &Overrides) -> Result<Self, ConfigError> {
        Self::load_with_env(o, std::env::vars())
    }

    pub fn load_with_env(o: &Overrides, env: impl Iterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = env.collect();
        let env_remotes: Vec<String> = env
            .iter()
            .find(|(k, _)| k == "MODELPOOL_REMOTES")
            .map(|(_, v)| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        let env = env.into_iter();
        let mut table = parse_table(DEFAULT, "config/default.toml")?;
        if let Some(name) = &o.profile {
            let (_, text) = PROFILES.iter().find(|(n, _)| n == name).ok_or_else(|| ConfigError::UnknownProfile {
                name: name.clone(),
                known: PROFILES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
            })?;
            merge(&mut table, parse_table(text, &format!("config/{name}.toml"))?);
        }
        if let Some(path) = &o.config {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            merge(&mut table, parse_table(&text, &path.display().to_string())?);
        }
        apply_env(&mut table, env)?;
        let origin = o.config.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "configuration".into());
        let mut cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse { path: origin, message: e.message().to_string() })?;

        if let Some(v) = &o.model {
            cfg.model = v.clone();
        }
        if let Some(v) = o.instances {
            cfg.instances = v;
        }
        if let Some(v) = o.slots {
            cfg.slots = v;
        }
        if let Some(v) = o.threads {
            cfg.threads = v;
        }
        if let Some(v) = o.n_ctx {
            cfg.n_ctx = v;
        }
        if let Some(v) = &o.data_dir {
            cfg.data_dir = v.clone();
        }
        if let Some(v) = &o.bind {
            cfg.server.bind = v.clone();
        }
        cfg.per_request |= o.per_request;
        cfg.remote.extend(env_remotes.iter().chain(&o.remotes).map(|u| RemoteConfig::at(u)));
        cfg.model = expand(&cfg.model);
        cfg.embedding_model = expand(&cfg.embedding_model);
        cfg.data_dir = expand(&cfg.data_dir);
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        for origin in &self.server.cors_origins {
            let rest = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
            let valid = origin == "*"
                || rest.is_some_and(|r| !r.is_empty() && !r.contains(['/', ' ', ',']) && !r.contains('*'));
            if !valid {
                return invalid(
                    "server.cors_origins",
                    format!("each origin must be \"*\" or scheme://host[:port] without a path, got {origin:?}"),
                );
            }
        }
        if self.instances == 0 && self.remote.is_empty() {
            return invalid("instances", "must be at least 1 when no [[remote]] is configured, got 0".into());
        }
        let store = self.store.0.trim();
        if !store.is_empty() && !store.starts_with("postgres://") && !store.starts_with("postgresql://") {
            return invalid(
                "store",
                format!(
                    "must be empty (sled in data_dir) or a postgres:// URL such as postgres://user:password@host:5432/db, got {:?}",
                    modelpool_actors::memory::store::postgres::redact(store)
                ),
            );
        }
        if self.instances == 0 && self.per_request {
            return invalid("per_request", "needs at least one local instance (instances = 0)".into());
        }
        for (i, r) in self.remote.iter().enumerate() {
            let shown = modelpool_actors::engine::remote::display_url(&r.url);
            match modelpool_actors::engine::remote::is_http_url(&r.url) {
                true => {}
                false => {
                    return invalid(
                        "remote.url",
                        format!(
                            "remote {} must be an http:// or https:// URL such as http://10.0.0.5:8080, got {shown}",
                            i + 1
                        ),
                    )
                }
            }
            if r.timeout_ms == 0 {
                return invalid("remote.timeout_ms", format!("must be at least 1 (remote {shown}), got 0"));
            }
            if r.slots == Some(0) {
                return invalid("remote.slots", format!("must be at least 1 (remote {shown}), got 0"));
            }
        }
        // One sequence per slot, each with a KV stream of n_ctx cells: 32 slots
        // of the default n_ctx already take 1.4 GiB of KV for SmolLM2-135M.
        if !(1..=32).contains(&self.slots) {
            return invalid("slots", format!("must be between 1 and 32, got {}", self.slots));
        }
        if !(16..=512).contains(&self.prefill_chunk) {
            return invalid("prefill_chunk", format!("must be between 16 and 512 tokens, got {}", self.prefill_chunk));
        }
        if self.n_ctx < 64 {
            return invalid("n_ctx", format!("must be at least 64 tokens, got {}", self.n_ctx));
        }
        if self.kv_ram_mib < -1 {
            return invalid(
                "kv_ram_mib",
                format!("must be -1 (auto), 0 (off) or a size in MiB, got {}", self.kv_ram_mib),
            );
        }
        if self.acquire_timeout_ms == 0 {
            return invalid("acquire_timeout_ms", "must be at least 1, got 0".into());
        }
        if self.max_concurrent_per_key < -1 {
            return invalid(
                "max_concurrent_per_key",
                format!(
                    "must be -1 (every slot but one), 0 (no limit) or a count, got {}",
                    self.max_concurrent_per_key
                ),
            );
        }
        if self.max_pause_ms < 100 {
            return invalid("max_pause_ms", format!("must be at least 100, got {}", self.max_pause_ms));
        }
        if self.server.write_timeout_ms != 0 && self.server.write_timeout_ms < self.max_pause_ms {
            return invalid(
                "server.write_timeout_ms",
                format!(
                    "must be 0 (never) or at least max_pause_ms ({}), so that a client that reads again sees how its \
                     reply ended, got {}",
                    self.max_pause_ms, self.server.write_timeout_ms
                ),
            );
        }
        if self.max_generation_ms == 0 {
            return invalid("max_generation_ms", "must be at least 1, got 0".into());
        }
        if let Some(n) = self.sampling.max_tokens.filter(|n| *n >= self.n_ctx) {
            return invalid("sampling.max_tokens_default", format!("{n} must be smaller than n_ctx ({})", self.n_ctx));
        }
        if let Err(e) = self.sampling.validate() {
            return invalid("sampling", e.to_string());
        }
        if !(0.0..=1.0).contains(&self.chat.recall_min_score) {
            return invalid(
                "chat.recall_min_score",
                format!("must be between 0 and 1, got {}", self.chat.recall_min_score),
            );
        }
        if self.chat.max_message_chars == 0 {
            return invalid("chat.max_message_chars", "must be at least 1, got 0".into());
        }
        if self.server.max_body_bytes < 1024 {
            return invalid(
                "server.max_body_bytes",
                format!("must be at least 1024, got {}", self.server.max_body_bytes),
            );
        }
        if self.server.api_keys.iter().any(|k| k.trim().is_empty()) {
            return invalid("server.api_keys", "must not contain empty keys".into());
        }
        for pair in &self.server.key_namespaces {
            let Some((key, ns)) = pair.split_once('=') else {
                return invalid("server.key_namespaces", format!("entries are \"key=namespace\", got {pair:?}"));
            };
            if !self.server.api_keys.iter().any(|k| k == key) {
                return invalid(
                    "server.key_namespaces",
                    format!("binds a key that is not in server.api_keys (entry for namespace {ns:?})"),
                );
            }
            if let Err(e) = modelpool_actors::http::validate_namespace(ns) {
                return invalid("server.key_namespaces", e.to_string());
            }
        }
        if self.chat.cross_conversation_recall && !self.server.api_keys.is_empty() {
            let bound = self.key_namespaces();
            if self.server.api_keys.iter().any(|k| !bound.contains_key(k)) {
                return invalid(
                    "server.key_namespaces",
                    "with chat.cross_conversation_recall on, every key in server.api_keys needs a namespace \
                     (\"key=namespace\"), or one tenant could recall another's messages"
                        .into(),
                );
            }
        }
        if self.chat.embed_timeout_ms == 0 {
            return invalid("chat.embed_timeout_ms", "must be at least 1, got 0".into());
        }
        if self.chat.embed_queue < 16 {
            return invalid(
                "chat.embed_queue",
                format!("must be at least 16 (one batch), got {}", self.chat.embed_queue),
            );
        }
        if self.chat.vector_cache < 1024 {
            return invalid(
                "chat.vector_cache",
                format!("must be at least 1024 vectors, got {}", self.chat.vector_cache),
            );
        }
        if !(8..=1024).contains(&self.chat.recall_ef) {
            return invalid("chat.recall_ef", format!("must be 8 to 1024, got {}", self.chat.recall_ef));
        }
        if !(1..=16).contains(&self.chat.embed_contexts) {
            return invalid("chat.embed_contexts", format!("must be 1 to 16, got {}", self.chat.embed_contexts));
        }
        if self.server.bind.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "server.bind",
                format!("must be ADDR:PORT such as 127.0.0.1:8080, got {:?}", self.server.bind),
            );
        }
        // A pool of remotes only may name a model that is not here: the
        // remotes then tokenize (their /tokenize), see startup.
        let model_elsewhere = self.instances == 0 && !self.model.exists();
        if let Err(e) = modelpool_actors::engine::llama::check_model_file(&self.model).or_else(|e| {
            if model_elsewhere {
                Ok(())
            } else {
                Err(e)
            }
        }) {
            return invalid(
                "model",
                format!("{e}. Run scripts/setup.sh to fetch the default model, or pass --model PATH"),
            );
        }
        if let Err(e) = modelpool_actors::engine::llama::check_model_file(&self.embedding_model) {
            return invalid(
                "embedding_model",
                format!("{e}. Run scripts/setup.sh to prepare the default embedding model"),
            );
        }
        Ok(())
    }

    /// This replica's name: `server.node`, else the host name.
    pub fn node_name(&self) -> String {
        if !self.server.node.trim().is_empty() {
            return self.server.node.trim().to_string();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "modelpool".into())
    }

    /// The keys bound to a namespace.
    pub fn key_namespaces(&self) -> std::collections::HashMap<String, String> {
        self.server
            .key_namespaces
            .iter()
            .filter_map(|p| p.split_once('='))
            .map(|(k, ns)| (k.to_string(), ns.to_string()))
            .collect()
    }

    /// Threads per instance: the setting, or an even split of the cores.
    pub fn threads_per_instance(&self) -> u32 {
        if self.threads > 0 {
            return self.threads;
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / self.instances.max(1)).max(1) as u32
    }

    /// The KV tiers' budgets, directory and lifetime.
    pub fn kv_tier_options(&self) -> KvTierOptions {
        let ram_bytes = match self.kv_ram_mib {
            -1 => modelpool_actors::engine::kv_tiers::default_ram_bytes(),
            mib => (mib.max(0) as u64) << 20,
        };
        KvTierOptions {
            ram_bytes,
            disk_bytes: self.kv_disk_mib << 20,
            dir: Some(self.data_dir.join("kv")),
            ttl: (self.kv_disk_ttl_s > 0).then(|| Duration::from_secs(self.kv_disk_ttl_s)),
        }
    }

    /// The `Host` names the API answers for: `server.allowed_hosts` ("*":
    /// any), plus the loopback names when the server listens on loopback;
    /// a server on another address with none configured answers for any.
    pub fn allowed_hosts(&self) -> Option<Vec<String>> {
        let configured = &self.server.allowed_hosts;
        if configured.iter().any(|h| h == "*") {
            return None;
        }
        let ip = self.server.bind.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or("");
        let loopback = ip == "localhost" || ip.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
        if !loopback && configured.is_empty() {
            return None;
        }
        let mut hosts: Vec<String> = configured.clone();
        if loopback {
            hosts.extend(modelpool_actors::http::LOOPBACK_HOSTS.iter().map(|h| h.to_string()));
        }
        Some(hosts)
    }

    /// Where conversations are kept.
    pub fn store_spec(&self) -> StoreSpec {
        match self.store.0.trim() {
            "" => StoreSpec::Sled { data_dir: self.data_dir.clone(), durability: self.chat.durability },
            url => StoreSpec::Postgres { url: url.to_string() },
        }
    }

    pub fn chat_options(&self) -> ChatOptions {
        ChatOptions {
            system_prompt: self.system_prompt.clone(),
            recent_messages: self.chat.recent_messages,
            recall_k: self.chat.recall_k,
            recall_min_score: self.chat.recall_min_score,
            cross_conversation: self.chat.cross_conversation_recall,
            max_message_chars: self.chat.max_message_chars,
            sampling: self.sampling.clone(),
            index: IndexOptions {
                namespaces: self.chat.cross_conversation_recall,
                cache_vectors: self.chat.vector_cache,
                ef_search: self.chat.recall_ef,
                graph_dir: Some(self.data_dir.join("graphs")),
                ..IndexOptions::default()
            },
        }
    }

    pub fn pool_options(&self) -> PoolOptions {
        PoolOptions {
            instances: self.instances,
            max_queue: self.max_queue,
            acquire_timeout: Duration::from_millis(self.acquire_timeout_ms),
            max_generation: Duration::from_millis(self.max_generation_ms),
            health_interval: Duration::from_millis(self.health_interval_ms),
            instance: InstanceOptions {
                n_ctx: self.n_ctx,
                n_threads: self.threads_per_instance(),
                // A per-request instance loads the model for one sequence at a time.
                slots: if self.per_request { 1 } else { self.slots },
                prefill_chunk: self.prefill_chunk,
                adapt_threads: self.adapt_threads,
                max_pause: Duration::from_millis(self.max_pause_ms),
                // The binary opens the shared tiers once the model is loaded.
                kv: None,
            },
            remotes: self
                .remote
                .iter()
                .map(|r| RemoteSpec {
                    url: r.url.clone(),
                    api_key: r.api_key.clone(),
                    slots: r.slots,
                    timeout: Duration::from_millis(r.timeout_ms),
                    model: r.model.clone(),
                })
                .collect(),
            max_per_client: self.max_per_client(),
        }
    }

    /// `max_concurrent_per_key` as a number (0: no limit); -1 is every slot
    /// but one (at least one), so that one client alone never holds them all.
    pub fn max_per_client(&self) -> usize {
        match self.max_concurrent_per_key {
            -1 => {
                let local = if self.per_request { self.instances } else { self.instances * self.slots as usize };
                let remote: usize = self.remote.iter().map(|r| r.slots.unwrap_or(1)).sum();
                (local + remote).saturating_sub(1).max(1)
            }
            n => n.max(0) as usize,
        }
    }
}

#[cfg(test)]
mod tests;
