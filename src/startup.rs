//! Loading the engine and starting the pool, with progress on the terminal.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use modelpool_actors::engine::remote::tokenizer::RemoteTokenizer;
use modelpool_actors::engine::KvTiers;
use modelpool_actors::{ChatHandle, EmbedderHandle, Engine, LlamaEngine, LoadEvent, PerRequestEngine, PoolHandle};

use crate::config::Config;
use modelpool_actors::memory::{EmbedderOptions, StoreSpec};

/// Prints a line above the spinner, or plainly when stderr is not a terminal.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Loads the weights once and starts `cfg.instances` instances on them.
pub async fn start_pool(cfg: &Config) -> anyhow::Result<PoolHandle> {
    let rss_before = modelpool_actors::rss_bytes().unwrap_or(0);
    let bar = ProgressBar::new_spinner();
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(100));
    bar.set_message(format!("Loading model weights from {}…", cfg.model.display()));
    let mut opts = cfg.pool_options();
    let engine: Arc<dyn Engine> = if cfg.per_request {
        PerRequestEngine::load(&cfg.model)?
    } else if cfg.instances == 0 && cfg.model.is_file() {
        // Every instance is remote: only the tokenizer and template are needed here.
        LlamaEngine::load_tokenizer(&cfg.model)?
    } else if cfg.instances == 0 {
        // The model is not on this machine: the remotes tokenize.
        let name = cfg.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        RemoteTokenizer::connect(&opts.remotes, &name).await?
    } else {
        let llama = LlamaEngine::load(&cfg.model)?;
        opts.instance.kv = Some(open_kv_tiers(cfg, &llama, &bar));
        llama
    };
    let info = engine.info();
    let rss_weights = modelpool_actors::rss_bytes().unwrap_or(0);
    if cfg.instances == 0 {
        let (source, by) = engine.tokenizer();
        say(
            &bar,
            format!("Tokenizer of {}: {source} ({by}); no local instance, every instance is remote", info.model_name),
        );
    } else {
        say(
            &bar,
            format!(
                "Model {} loaded: weights {:.1} MiB (shared by all instances), trained context {} tokens",
                info.model_name,
                mib(info.weights_bytes),
                info.n_ctx_train
            ),
        );
    }

    let threads = opts.instance.n_threads;
    let progress_bar = bar.clone();
    let progress = Arc::new(move |event: LoadEvent| match event {
        LoadEvent::Loading { index, total } => {
            let line = format!("Loading instance {index}/{total}…");
            if progress_bar.is_hidden() {
                eprintln!("{line}");
            }
            progress_bar.set_message(line);
        }
        LoadEvent::Loaded { index, total, info, millis } if info.endpoint.is_some() => say(
            &progress_bar,
            format!(
                "Instance {index}/{total} is remote {}: connected in {millis} ms",
                info.endpoint.as_deref().unwrap_or_default()
            ),
        ),
        LoadEvent::Unreachable { index, total, error } => say(
            &progress_bar,
            format!(
                "Instance {index}/{total} is not reachable ({error}); starting without it and retrying with back-off"
            ),
        ),
        LoadEvent::Loaded { index, total, info, millis } => {
            say(
                &progress_bar,
                format!(
                    "Instance {index}/{total} ready in {millis} ms (KV cache ~{:.1} MiB, estimated; {threads} thread(s))",
                    mib(info.kv_bytes_estimate)
                ),
            );
        }
    });
    let pool = PoolHandle::start(engine, opts, progress).await;
    bar.finish_and_clear();
    let pool = pool?;
    let rss_after = modelpool_actors::rss_bytes().unwrap_or(0);
    tracing::info!(
        weights_bytes = info.weights_bytes,
        rss_after_weights = rss_weights.saturating_sub(rss_before),
        rss_per_instance = rss_after.saturating_sub(rss_weights) / cfg.instances.max(1) as u64,
        "memory"
    );
    let remotes = if cfg.remote.is_empty() { String::new() } else { format!(" + {} remote", cfg.remote.len()) };
    let features = pool.engine().cpu_features();
    if !features.is_empty() {
        eprintln!("llama.cpp uses these CPU features: {}", features.join(" "));
    }
    eprintln!(
        "Pool ready: {} instance(s) × {} thread(s){remotes}, n_ctx {}; resident memory {:.0} MiB",
        cfg.instances,
        threads,
        cfg.n_ctx,
        mib(rss_after)
    );
    Ok(pool)
}

/// Opens the KV tiers the local instances share and says what they hold.
fn open_kv_tiers(cfg: &Config, engine: &LlamaEngine, bar: &ProgressBar) -> Arc<KvTiers> {
    let mut kv = cfg.kv_tier_options();
    let fingerprint = match engine.kv_fingerprint() {
        Ok(f) => f,
        Err(e) => {
            say(bar, format!("KV disk tier off: cannot read the model file to fingerprint its caches ({e})"));
            kv.disk_bytes = 0;
            Default::default()
        }
    };
    let tiers = KvTiers::open(&kv, fingerprint);
    let per_token = engine.kv_bytes_per_token().max(1);
    tiers.note_bytes_per_token(per_token);
    let s = tiers.status();
    let disk = if s.disk.enabled {
        format!(
            "disk {:.0} MiB in {} (~{} tokens; {} cache(s) kept from the last run)",
            mib(kv.disk_bytes),
            s.disk.dir.as_deref().unwrap_or_default(),
            kv.disk_bytes / per_token,
            s.disk.entries
        )
    } else if kv.disk_bytes == 0 {
        "disk off".into()
    } else {
        format!("disk off ({})", s.disk.disabled_cause.as_deref().unwrap_or("unavailable"))
    };
    say(
        bar,
        format!(
            "KV caches: {} KiB per token; memory {:.0} MiB (~{} tokens), {disk}",
            per_token as f64 / 1024.0,
            mib(kv.ram_bytes),
            kv.ram_bytes / per_token
        ),
    );
    tiers
}

/// Opens the conversation store, then starts the pool, the embedder and the
/// chat layer on it. The store comes first: a database that cannot be reached
/// stops start-up at once, before the model is loaded.
pub async fn start_chat(cfg: &Config) -> anyhow::Result<ChatHandle> {
    let spec = cfg.store_spec();
    if let StoreSpec::Postgres { .. } = spec {
        eprintln!("Connecting to the conversation store {spec:?}…");
    }
    let store = modelpool_actors::memory::store::open(&spec).await?;
    let pool = start_pool(cfg).await?;
    eprintln!("Loading embedding model {}…", cfg.embedding_model.display());
    let embedder = EmbedderHandle::start_with(
        &cfg.embedding_model,
        EmbedderOptions {
            contexts: cfg.chat.embed_contexts,
            threads: 1,
            timeout: std::time::Duration::from_millis(cfg.chat.embed_timeout_ms),
            max_queued: cfg.chat.embed_queue,
        },
    )
    .await?;
    let chat = ChatHandle::start_on(pool, embedder, store, cfg.chat_options()).await?;
    let index = chat.index_stats();
    let recall = if cfg.chat.cross_conversation_recall {
        format!(
            "namespace index: {} vector(s) in {} namespace(s){}",
            index.namespace_vectors,
            index.namespaces,
            if index.building > 0 { ", graphs building in the background (recall is exact meanwhile)" } else { "" }
        )
    } else {
        format!("vectors load per conversation on first use (cache of {} vectors)", index.cache_limit)
    };
    eprintln!(
        "Chat memory ready: {} conversation(s) in {}; {recall}",
        chat.conversations().await?.len(),
        chat.store().describe()
    );
    Ok(chat)
}
