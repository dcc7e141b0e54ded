//! Chat memory benchmark, on the paths requests take. Prints figures; asserts nothing.
//!
//!   scripts/bench.sh --bench memory [-- SECTION…]
//!
//! Sections (all by default): `semantic`, `embed`, `ann`, `conversation`,
//! `startup`, `turn`, `quality`.
//!
//! The corpus is real text: Debian's `fortunes` package (scripts/setup.sh
//! --with-test-tools installs it). Each fortune, then its sentences, its
//! clauses and 8-word windows of the long ones, deduplicated (about 145,000
//! texts), shuffled, the first 100,500 kept. They are embedded once with the project's MiniLM model through the
//! embedder pool and cached under ~/.cache/modelpool/bench/.
//!
//! 1. `semantic`: facts and distractors of tests/fixtures in one
//!    conversation; each question (other words) must recall its fact.
//! 2. `embed`: embeddings/s through the embedder pool (the path of
//!    `/v1/embeddings` and of chat turns) for 1, 8 and 64 inputs per call, vs
//!    one text at a time on one context (how every text was embedded before
//!    batching); a chat turn's embedding latency alone and beside a running
//!    256-input request.
//! 3. `ann`: namespace (cross-conversation) recall: recall@10 against exact
//!    search and query p50/p99 at 10k and 100k vectors, per `ef`.
//! 4. `conversation`: per-conversation recall (`ChatHandle::recall_vector`,
//!    the turn's recall after embedding: store count, recent window, vectors
//!    loaded on first use, exact scoring, hits read back) with 1k to 500k
//!    messages in a sled store (`BENCH_CONVERSATIONS`, default 10,000
//!    conversations of 50 messages).
//! 5. `startup`: `modelpool serve` on a store of 100k vectors: time to
//!    /health 200, per-conversation and cross-conversation recall, and until
//!    the namespace graph is built; then a restart, until the saved graph is
//!    loaded.
//! 6. `turn`: the memory share of a `/chat` turn on the default model
//!    (`memory_ms` of each turn against its time at the client), with 2,000
//!    other conversations in the store.
//! 7. `quality`: the recall-quality set: each fact of tests/fixtures stated
//!    once in a conversation of greetings, fortunes and filler replies, then
//!    asked about in other words, up to five times (the earlier copies of the
//!    question stored): how often the fact is recalled, how often the
//!    question's own copies are, and the prompt tokens recall adds per turn,
//!    for the index's plain top-k (what recall returned before its echo
//!    filter and deduplication) and for the turn's recall
//!    (`ChatHandle::recall`).

#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelpool_actors::engine::embed::LlamaEmbedder;
use modelpool_actors::memory::store::{open_sled, ConversationStore, NewMessage};
use modelpool_actors::memory::{EmbedderOptions, IndexOptions, Priority, Scope, VectorIndex};
use modelpool_actors::{
    ChatHandle, ChatOptions, Conversation, Durability, EmbedderHandle, InstanceOptions, LlamaEngine, PoolHandle,
    PoolOptions, Role,
};

fn home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap())
}

fn embed_model() -> PathBuf {
    std::env::var_os("MODELPOOL_TEST_EMBED_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache/modelpool/models/all-MiniLM-L6-v2.Q8_0.gguf"))
}

fn chat_model() -> PathBuf {
    home().join(".cache/modelpool/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).unwrap()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// xorshift64*: reproducible choices without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// ---------------------------------------------------------------- corpus

const FORTUNES: &str = "/usr/share/games/fortunes";

/// The texts of the corpus, in a fixed shuffled order.
fn corpus_texts() -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(FORTUNES)
        .unwrap_or_else(|e| panic!("{FORTUNES}: {e} (scripts/setup.sh --with-test-tools installs Debian's fortunes)"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_none())
        .collect();
    files.sort();
    let mut fortunes = Vec::new();
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else { continue };
        let text = String::from_utf8_lossy(&bytes);
        for t in text.split("\n%\n") {
            let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
            if t.len() >= 20 {
                fortunes.push(t);
            }
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |t: String| {
        if t.len() >= 20 && seen.insert(t.clone()) {
            out.push(t);
        }
    };
    for t in &fortunes {
        add(t.clone());
    }
    for t in &fortunes {
        let mut start = 0;
        let b = t.as_bytes();
        for i in 0..b.len() {
            if matches!(b[i], b'.' | b'!' | b'?') && (i + 1 == b.len() || b[i + 1] == b' ') {
                add(t[start..=i].trim().to_string());
                start = i + 1;
            }
        }
        add(t[start..].trim().to_string());
    }
    for t in &fortunes {
        for c in t.split([',', ';', ':']) {
            if c.split_whitespace().count() >= 4 {
                add(c.trim().to_string());
            }
        }
    }
    for t in &fortunes {
        let w: Vec<&str> = t.split_whitespace().collect();
        if w.len() > 12 {
            for i in (0..w.len() - 8).step_by(4) {
                add(w[i..i + 8].join(" "));
            }
        }
    }
    let mut rng = Rng(0x5EED);
    for i in (1..out.len()).rev() {
        out.swap(i, rng.below(i + 1));
    }
    // 100,000 to store and 500 queries.
    out.truncate(CORPUS);
    out
}

const CORPUS: usize = 100_500;

/// The corpus and its vectors (embedded once, then read from the cache).
struct Corpus {
    texts: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

async fn corpus() -> Corpus {
    let texts = corpus_texts();
    let hash = texts
        .iter()
        .fold(0xcbf29ce484222325u64, |h, t| t.bytes().fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3)));
    let dir = home().join(".cache/modelpool/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let model = embed_model().file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let path = dir.join(format!("fortunes-{}-{hash:016x}-{model}.f32", texts.len()));
    let dim = 384;
    if let Ok(bytes) = std::fs::read(&path) {
        if bytes.len() == texts.len() * dim * 4 {
            let floats: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let vectors = floats.chunks_exact(dim).map(<[f32]>::to_vec).collect();
            println!("corpus: {} texts from {FORTUNES}, vectors read from {}", texts.len(), path.display());
            return Corpus { texts, vectors };
        }
    }
    println!("corpus: embedding {} texts from {FORTUNES} once (cached in {})…", texts.len(), path.display());
    let opts = EmbedderOptions { contexts: 2, threads: 1, timeout: Duration::from_secs(120), max_queued: 1 << 20 };
    let embedder = EmbedderHandle::start_with(&embed_model(), opts).await.expect("embedding model");
    let started = Instant::now();
    let mut vectors = Vec::with_capacity(texts.len());
    for (i, chunk) in texts.chunks(1024).enumerate() {
        // Two calls at a time keep both contexts busy.
        let (a, b) = chunk.split_at(chunk.len() / 2);
        let (va, vb) = tokio::join!(embedder.embed(a.to_vec()), embedder.embed(b.to_vec()));
        vectors.extend(va.unwrap());
        vectors.extend(vb.unwrap());
        if i % 10 == 9 {
            let rate = vectors.len() as f64 / started.elapsed().as_secs_f64();
            println!("   {} / {} ({rate:.0} texts/s)", vectors.len(), texts.len());
        }
    }
    let mut bytes = Vec::with_capacity(texts.len() * dim * 4);
    for v in &vectors {
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    Corpus { texts, vectors }
}

// ---------------------------------------------------------------- 1. semantic

/// tests/fixtures/recall_pairs.tsv: (a fact, a later question about it in other words).
fn recall_pairs() -> Vec<(String, String)> {
    fixture("recall_pairs.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (a, b) = l.split_once('\t').expect("fact<TAB>question");
            (a.to_string(), b.to_string())
        })
        .collect()
}

fn semantic() {
    let pairs = recall_pairs();
    let distractors: Vec<String> = fixture("recall_distractors.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(String::from)
        .collect();
    let mut embedder = LlamaEmbedder::load(&embed_model(), 1).expect("embedding model (run scripts/setup.sh)");
    let conv = uuid::Uuid::new_v4();
    let index = Arc::new(VectorIndex::new(embedder.dim(), IndexOptions::default()));
    let facts: Vec<&str> = pairs.iter().map(|(f, _)| f.as_str()).collect();
    let mut stored: Vec<(u64, Vec<f32>)> =
        embedder.embed_batch(&facts).unwrap().into_iter().enumerate().map(|(i, v)| (i as u64, v)).collect();
    let d: Vec<&str> = distractors.iter().map(String::as_str).collect();
    stored.extend(embedder.embed_batch(&d).unwrap().into_iter().enumerate().map(|(i, v)| (10_000 + i as u64, v)));
    let n_stored = stored.len();
    index.load_conversation(conv, n_stored, stored);
    let (mut at1, mut at5) = (0, 0);
    let mut misses = Vec::new();
    for (i, (fact, question)) in pairs.iter().enumerate() {
        let q = embedder.embed(question).unwrap();
        let hits = index.search(&q, 5, &Scope::Conversation(conv), &HashSet::new()).unwrap();
        let pos = hits.iter().position(|h| h.id == i as u64);
        at1 += (pos == Some(0)) as usize;
        at5 += pos.is_some() as usize;
        if pos.is_none() {
            misses.push(format!("{question:?} → not {fact:?}"));
        }
    }
    let n = pairs.len() as f64;
    println!(
        "\n1. Semantic recall (all-MiniLM-L6-v2, {n_stored} messages in one conversation, {} questions)",
        pairs.len()
    );
    println!("   recall@1 {:.3}   recall@5 {:.3}", at1 as f64 / n, at5 as f64 / n);
    for m in misses.iter().take(5) {
        println!("   miss: {m}");
    }
}

// ---------------------------------------------------------------- 2. embed

async fn embed(texts: &[String]) {
    println!("\n2. Embeddings/s (all-MiniLM-L6-v2; texts from the corpus, median 12 words)");
    let sample: Vec<String> = texts.iter().take(512).cloned().collect();
    // Before batching: one text per decode, one context of one thread.
    let mut alone = LlamaEmbedder::load(&embed_model(), 1).unwrap();
    let started = Instant::now();
    for t in &sample[..256] {
        alone.embed(t).unwrap();
    }
    let baseline = 256.0 / started.elapsed().as_secs_f64();
    drop(alone);
    println!("   {:<52} {:>9} {:>8}", "path", "texts/s", "vs one");
    println!("   {:<52} {baseline:>9.0} {:>8}", "one text per decode, 1 context × 1 thread (before)", "1.00×");
    for (contexts, threads) in [(1usize, 1u32), (1, 2), (2, 1)] {
        let opts = EmbedderOptions { contexts, threads, ..Default::default() };
        let embedder = EmbedderHandle::start_with(&embed_model(), opts).await.unwrap();
        for per_call in [1usize, 8, 64] {
            let calls = (512 / per_call).min(256);
            let started = Instant::now();
            // Two callers at a time, as two clients would.
            let half = calls / 2;
            let run = |from: usize| {
                let embedder = embedder.clone();
                let sample = sample.clone();
                async move {
                    for c in from..from + half {
                        let texts: Vec<String> =
                            (0..per_call).map(|i| sample[(c * per_call + i) % sample.len()].clone()).collect();
                        embedder.embed(texts).await.unwrap();
                    }
                }
            };
            tokio::join!(run(0), run(half));
            let rate = (2 * half * per_call) as f64 / started.elapsed().as_secs_f64();
            println!(
                "   {:<52} {rate:>9.0} {:>7.2}×",
                format!("pool {contexts} context(s) × {threads} thread(s), {per_call} input(s) per call"),
                rate / baseline
            );
        }
    }
    // A chat turn's embedding, alone and beside a 256-input request.
    let embedder = EmbedderHandle::start_with(&embed_model(), EmbedderOptions::default()).await.unwrap();
    let mut idle = Vec::new();
    for t in sample.iter().take(40) {
        let s = Instant::now();
        embedder.embed_one(t).await.unwrap();
        idle.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let bulk_texts: Vec<String> = sample[..256].to_vec();
    let bulk = {
        let embedder = embedder.clone();
        let texts = bulk_texts.clone();
        tokio::spawn(async move {
            let s = Instant::now();
            for _ in 0..3 {
                embedder.embed(texts.clone()).await.unwrap();
            }
            s.elapsed().as_secs_f64()
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut busy = Vec::new();
    for t in sample.iter().skip(40).take(20) {
        let s = Instant::now();
        embedder.embed_as(vec![t.clone()], Priority::Interactive).await.unwrap();
        busy.push(s.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bulk_s = bulk.await.unwrap();
    let (idle, busy) = (sorted(idle), sorted(busy));
    println!(
        "   a chat turn's embedding: idle p50 {:.1} ms p99 {:.1} ms; beside 256-input requests p50 {:.1} ms p99 {:.1} ms \
         (each 256-input request took {:.0} ms)",
        pct(&idle, 0.5),
        pct(&idle, 0.99),
        pct(&busy, 0.5),
        pct(&busy, 0.99),
        bulk_s * 1e3 / 3.0
    );
}

// ---------------------------------------------------------------- 3. ann

fn ann(c: &Corpus) {
    println!("\n3. Namespace recall (one namespace, cross-conversation): HNSW vs exact, k=10, real embeddings");
    let queries: Vec<&Vec<f32>> = c.vectors[c.vectors.len() - 500..].iter().collect();
    println!(
        "   {:>8} {:>9} {:>6} {:>10} {:>9} {:>9} {:>13}   (exact scan: p50 / p99 ms)",
        "vectors", "build s", "ef", "recall@10", "p50 ms", "p99 ms", "filtered p50"
    );
    // More left-out ids than an unfiltered search takes (none of them
    // stored): the filtered search, as a search with many tombstones runs.
    let many_out: HashSet<u64> = (0..65).map(|i| u64::MAX - i).collect();
    for n in [10_000usize, 100_000] {
        let opts = IndexOptions { namespaces: true, ..IndexOptions::default() };
        let index = Arc::new(VectorIndex::new(384, opts));
        let items: Vec<_> =
            (0..n).map(|i| (i as u64, uuid::Uuid::from_u128(i as u128 / 50), c.vectors[i].clone())).collect();
        let started = Instant::now();
        index.insert_namespace(items, "bench");
        assert!(index.wait_built(Duration::from_secs(3600)));
        let build_s = started.elapsed().as_secs_f64();
        let mut exact_ms = Vec::new();
        let truth: Vec<Vec<u64>> = queries
            .iter()
            .map(|q| {
                let s = Instant::now();
                let hits = index.search_namespace_exact(q, 10, "bench", &HashSet::new());
                exact_ms.push(s.elapsed().as_secs_f64() * 1e3);
                hits.into_iter().map(|h| h.id).collect()
            })
            .collect();
        let exact_ms = sorted(exact_ms);
        for (row, ef) in [16usize, 32, 48, 64, 128, 256].into_iter().enumerate() {
            let none = HashSet::new();
            let mut ms = Vec::new();
            let mut found = 0;
            for (q, t) in queries.iter().zip(&truth) {
                let s = Instant::now();
                let hits = index.search_namespace_ef(q, 10, "bench", &none, ef);
                ms.push(s.elapsed().as_secs_f64() * 1e3);
                found += hits.iter().filter(|h| t.contains(&h.id)).count();
            }
            let ms = sorted(ms);
            let mut filtered_ms = Vec::new();
            for q in &queries {
                let s = Instant::now();
                std::hint::black_box(index.search_namespace_ef(q, 10, "bench", &many_out, ef));
                filtered_ms.push(s.elapsed().as_secs_f64() * 1e3);
            }
            let filtered_ms = sorted(filtered_ms);
            let tail = if row == 0 {
                format!("   ({:.2} / {:.2})", pct(&exact_ms, 0.5), pct(&exact_ms, 0.99))
            } else {
                String::new()
            };
            println!(
                "   {n:>8} {:>9} {ef:>6} {:>10.3} {:>9.3} {:>9.3} {:>13.3}{tail}",
                if row == 0 { format!("{build_s:.1}") } else { String::new() },
                found as f64 / (10 * queries.len()) as f64,
                pct(&ms, 0.5),
                pct(&ms, 0.99),
                pct(&filtered_ms, 0.5),
            );
        }
    }
}

// ---------------------------------------------------------------- stores

const PER_CONVERSATION: usize = 50;

/// Adds conversations `from..to` of 50 corpus messages each to `store`.
async fn fill(store: &ConversationStore, c: &Corpus, from: usize, to: usize) -> Vec<uuid::Uuid> {
    let n = c.texts.len() - 500; // the last 500 are queries
    let mut ids = Vec::with_capacity(to - from);
    for conv_i in from..to {
        let conv = Conversation::new("default");
        let messages = (0..PER_CONVERSATION)
            .map(|j| {
                let i = (conv_i * PER_CONVERSATION + j) % n;
                NewMessage {
                    role: if j % 2 == 0 { Role::User } else { Role::Assistant },
                    content: c.texts[i].clone(),
                    created_at_ms: 0,
                    token_count: 16,
                    vector: c.vectors[i].clone(),
                }
            })
            .collect();
        store.import(&conv, messages).await.unwrap();
        ids.push(conv.id);
    }
    store.flush().await.unwrap();
    ids
}

async fn pool() -> PoolHandle {
    let engine = LlamaEngine::load(chat_model()).expect("chat model (run scripts/setup.sh)");
    let opts = PoolOptions {
        instances: 1,
        max_queue: 8,
        acquire_timeout: Duration::from_secs(60),
        max_generation: Duration::from_secs(60),
        health_interval: Duration::ZERO,
        instance: InstanceOptions::single(2048, 2),
        remotes: Vec::new(),
        max_per_client: 0,
    };
    PoolHandle::start(engine, opts, Arc::new(|_| {})).await.unwrap()
}

// ---------------------------------------------------------------- 4. conversation

async fn conversation(c: &Corpus) {
    let total: usize = std::env::var("BENCH_CONVERSATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    println!(
        "\n4. Per-conversation recall (ChatHandle::recall_vector: count, recent window, load on first use, exact \
         scoring, hits read back), k=3, sled, {PER_CONVERSATION} messages per conversation"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = open_sled(dir.path(), Durability::Async).unwrap();
    let embedder = EmbedderHandle::start(&embed_model(), 1).await.unwrap();
    let chat = ChatHandle::start_on(pool().await, embedder, store.clone(), ChatOptions::default()).await.unwrap();
    println!(
        "   {:>9} {:>13} {:>14} {:>14} {:>13} {:>13}  {:>9}",
        "messages", "conversations", "first p50 ms", "first p99 ms", "next p50 ms", "next p99 ms", "fill s"
    );
    let mut convs = Vec::new();
    let queries = &c.vectors[c.vectors.len() - 500..];
    let mut rng = Rng(7);
    for stage in [20usize, 1_000, total] {
        if stage < convs.len() || stage > total {
            continue;
        }
        let started = Instant::now();
        let from = convs.len();
        convs.extend(fill(&store, c, from, stage).await);
        let fill_s = started.elapsed().as_secs_f64();
        // 200 conversations never recalled before (first: loaded from the
        // store), then the same again (next: cached).
        let picks: Vec<uuid::Uuid> = (0..200).map(|_| convs[rng.below(convs.len())]).collect();
        let picks: Vec<uuid::Uuid> = picks.into_iter().collect::<HashSet<_>>().into_iter().collect();
        let (mut first, mut next) = (Vec::new(), Vec::new());
        for (i, id) in picks.iter().enumerate() {
            if chat.index_stats().cached_conversations > 0 && chat.index().conversation_seen(id).is_some() {
                continue;
            }
            let q = &queries[i % queries.len()];
            let s = Instant::now();
            let hits = chat.recall_vector(id, q).await.unwrap();
            first.push(s.elapsed().as_secs_f64() * 1e3);
            let s = Instant::now();
            let again = chat.recall_vector(id, q).await.unwrap();
            next.push(s.elapsed().as_secs_f64() * 1e3);
            assert_eq!(hits.len(), again.len());
        }
        let (first, next) = (sorted(first), sorted(next));
        println!(
            "   {:>9} {:>13} {:>14.3} {:>14.3} {:>13.3} {:>13.3}  {fill_s:>9.1}",
            convs.len() * PER_CONVERSATION,
            convs.len(),
            pct(&first, 0.5),
            pct(&first, 0.99),
            pct(&next, 0.5),
            pct(&next, 0.99),
        );
    }
    let s = chat.index_stats();
    println!(
        "   conversation cache: {} conversations, {} vectors (bound {})",
        s.cached_conversations, s.cached_vectors, s.cache_limit
    );
    chat.pool().shutdown().await;
    chat.shutdown().await.unwrap();
}

// ---------------------------------------------------------------- 5. startup

/// A data directory with `conversations` × 50 corpus messages.
async fn filled_dir(c: &Corpus, conversations: usize) -> (tempfile::TempDir, Vec<uuid::Uuid>) {
    let dir = tempfile::tempdir().unwrap();
    let ids = {
        let store = open_sled(dir.path(), Durability::Async).unwrap();
        fill(&store, c, 0, conversations).await
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    (dir, ids)
}

fn ready_after(data: &Path, env: &[(&str, &str)]) -> (f64, server::Server) {
    let started = Instant::now();
    let srv = server::start(1, 2048, data, env);
    (started.elapsed().as_secs_f64(), srv)
}

async fn pool_json(base: &str) -> serde_json::Value {
    reqwest::get(format!("{base}/pool")).await.unwrap().json().await.unwrap()
}

async fn startup(c: &Corpus) {
    println!(
        "\n5. Start-up of `modelpool serve` with 100,000 stored vectors (2,000 conversations × 50), sled; \
         then a restart that loads the saved namespace graph"
    );
    let (dir, _) = filled_dir(c, 2_000).await;
    let (empty_s, srv) = ready_after(tempfile::tempdir().unwrap().path(), &[]);
    drop(srv);
    println!("   empty store, for reference: /health 200 after {empty_s:.2} s (model loading included)");
    let (s, srv) = ready_after(dir.path(), &[]);
    println!("   per-conversation recall (the default): /health 200 after {s:.2} s");
    drop(srv);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The first start builds the namespace graph and saves it under
    // <data_dir>/graphs; the restart loads it.
    for restart in [false, true] {
        let started = Instant::now();
        let (s, srv) = ready_after(dir.path(), &[("MODELPOOL_CHAT_CROSS_CONVERSATION_RECALL", "true")]);
        let first = pool_json(&srv.1).await;
        loop {
            let v = pool_json(&srv.1).await;
            let index = &v["memory_index"];
            if index["building"].as_u64() == Some(0) {
                println!(
                    "   cross-conversation recall{}: /health 200 after {s:.2} s (recall exact while the graph is not \
                     ready: {} graph(s) pending at the first /pool); namespace graph of {} vectors ready {:.2} s after \
                     the start ({} built, {} loaded from disk, {} saved files rejected)",
                    if restart { ", restart" } else { "" },
                    first["memory_index"]["building"],
                    index["namespace_vectors"],
                    started.elapsed().as_secs_f64(),
                    index["graphs_built"],
                    index["graphs_loaded"],
                    index["graph_files_rejected"],
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The build's save runs right after the swap: wait for its files.
        let meta = modelpool_actors::memory::index::graph_files(&dir.path().join("graphs"), "default")[3].clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !meta.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(srv);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------- 6. turn

async fn turn(c: &Corpus) {
    println!("\n6. The memory share of a /chat turn (default model, 32 tokens, 2,000 other conversations stored)");
    let (dir, _) = filled_dir(c, 2_000).await;
    let (_, srv) = ready_after(dir.path(), &[]);
    let client = reqwest::Client::new();
    // Back to back (the next message sent the instant the answer arrives: it
    // waits for the previous reply's embedding), and with a second between
    // turns, as a person typing would leave.
    for (round, think) in [Duration::ZERO, Duration::from_secs(1)].into_iter().enumerate() {
        let (mut memory, mut store, mut total) = (Vec::new(), Vec::new(), Vec::new());
        for conv_i in 0..4 {
            let mut conv: Option<String> = None;
            for t in 0..8 {
                let text = &c.texts[c.texts.len() - 1 - round * 32 - conv_i * 8 - t];
                let mut body = serde_json::json!({ "message": text, "max_tokens": 32, "temperature": 0 });
                if let Some(id) = &conv {
                    body["conversation_id"] = serde_json::json!(id);
                }
                tokio::time::sleep(think).await;
                let s = Instant::now();
                let v: serde_json::Value =
                    client.post(format!("{}/chat", srv.1)).json(&body).send().await.unwrap().json().await.unwrap();
                let ms = s.elapsed().as_secs_f64() * 1e3;
                conv = Some(v["conversation_id"].as_str().expect("a reply").to_string());
                memory.push(v["memory_ms"].as_f64().unwrap());
                store.push(v["store_ms"].as_f64().unwrap());
                total.push(ms);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (m, st, t) = (sorted(memory), sorted(store), sorted(total));
        println!("   {} between turns:", if think.is_zero() { "nothing" } else { "1 s" });
        println!("   {:<28} {:>9} {:>9} {:>9}", "per turn (32 turns)", "mean ms", "p50 ms", "p90 ms");
        println!("   {:<28} {:>9.1} {:>9.1} {:>9.1}", "memory work (memory_ms)", mean(&m), pct(&m, 0.5), pct(&m, 0.9));
        println!(
            "   {:<28} {:>9.1} {:>9.1} {:>9.1}",
            "  of which store (store_ms)",
            mean(&st),
            pct(&st, 0.5),
            pct(&st, 0.9)
        );
        println!("   {:<28} {:>9.1} {:>9.1} {:>9.1}", "whole turn at the client", mean(&t), pct(&t, 0.5), pct(&t, 0.9));
        println!("   memory share of a turn: {:.2} % (target ≤ 10 %)", 100.0 * mean(&m) / mean(&t));
    }
}

// ---------------------------------------------------------------- 7. quality

async fn quality(texts: &[String]) {
    const RECENT: usize = 4;
    let pairs = recall_pairs();
    let k = ChatOptions::default().recall_k;
    println!(
        "\n7. Recall quality: {} facts, each stated once among greetings, fortunes and filler replies, then asked \
         about in other words; recent window {RECENT}, k={k}, per-conversation recall",
        pairs.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let pool = pool().await;
    let engine = pool.engine().clone();
    let embedder = EmbedderHandle::start(&embed_model(), 1).await.unwrap();
    let opts = ChatOptions { recent_messages: RECENT, ..ChatOptions::default() };
    let chat = ChatHandle::start(pool, embedder, dir.path(), Durability::Async, opts).await.unwrap();
    let min_score = chat.options().recall_min_score;
    let msg = |role: Role, content: &str| modelpool_actors::chat::import::ImportMessage {
        role,
        content: content.to_string(),
        created_at_ms: None,
    };
    println!(
        "   {:>4}  {:>35}  {:>35}",
        "ask", "index top-k: fact / echoes / tokens", "turn recall: fact / echoes / tokens"
    );
    let mut filler = texts.iter();
    for asks in 1..=5usize {
        let (mut before, mut after) = ([0usize; 3], [0usize; 3]);
        for (fact, question) in &pairs {
            let mut messages = vec![
                msg(Role::User, "Hi!"),
                msg(Role::Assistant, "Hello! How can I help you today?"),
                msg(Role::User, fact),
                msg(Role::Assistant, "Got it, I will remember that."),
            ];
            for _ in 0..6 {
                messages.push(msg(Role::User, filler.next().unwrap()));
                messages.push(msg(Role::Assistant, "Interesting, thanks for sharing."));
            }
            // The question's earlier copies, each with its answer.
            for _ in 1..asks {
                messages.push(msg(Role::User, question));
                messages.push(msg(Role::Assistant, "I am not sure, could you remind me?"));
            }
            let (conv, stored) = chat.import("default", None, messages).await.unwrap();
            let fact_id = stored[2].id;
            let is_question = |text: &str| text == question;
            let tokens = |texts: &[&str]| texts.iter().map(|t| engine.count_tokens(t) as usize).sum::<usize>();
            // The turn's recall (it also loads the conversation's vectors).
            let recalled = chat.recall(&conv.id, question).await.unwrap();
            after[0] += recalled.iter().any(|r| r.id == fact_id) as usize;
            after[1] += recalled.iter().filter(|r| is_question(&r.content)).count();
            after[2] += tokens(&recalled.iter().map(|r| r.content.as_str()).collect::<Vec<_>>());
            // The index's plain top-k over the same messages, recent window left out.
            let q = chat.embedder().embed_one(question).await.unwrap();
            let recent: HashSet<u64> = stored[stored.len() - RECENT..].iter().map(|m| m.id).collect();
            let hits = chat.index().search(&q, k, &Scope::Conversation(conv.id), &recent).unwrap_or_default();
            let hits: Vec<_> = hits.into_iter().filter(|h| h.score >= min_score).collect();
            let text = |id: u64| stored.iter().find(|m| m.id == id).map(|m| m.content.as_str()).unwrap_or("");
            before[0] += hits.iter().any(|h| h.id == fact_id) as usize;
            before[1] += hits.iter().filter(|h| is_question(text(h.id))).count();
            before[2] += tokens(&hits.iter().map(|h| text(h.id)).collect::<Vec<_>>());
        }
        let n = pairs.len() as f64;
        let row =
            |v: [usize; 3]| format!("{:.3} / {:>4.2} / {:>5.1}", v[0] as f64 / n, v[1] as f64 / n, v[2] as f64 / n);
        println!("   {asks:>4}  {:>35}  {:>35}", row(before), row(after));
    }
    println!("   (fact: share of questions whose fact was recalled; echoes and tokens: per question)");
    chat.pool().shutdown().await;
    chat.shutdown().await.unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let on = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    if on("semantic") {
        semantic();
    }
    let rt = actix::System::new();
    rt.block_on(async {
        if on("embed") {
            embed(&corpus_texts()).await;
        }
        if on("quality") {
            // Fortunes as filler: texts only, no corpus vectors needed.
            quality(&corpus_texts()).await;
        }
        if !["ann", "conversation", "startup", "turn"].iter().any(|s| on(s)) {
            return;
        }
        let c = corpus().await;
        if on("ann") {
            ann(&c);
        }
        if on("conversation") {
            conversation(&c).await;
        }
        if on("startup") {
            startup(&c).await;
        }
        if on("turn") {
            turn(&c).await;
        }
    });
}
