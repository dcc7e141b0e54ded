//! Recall benchmark. Prints figures; asserts nothing.
//!
//!   cargo bench --bench recall            (scripts/bench.sh does the set-up first)
//!
//! 1. Semantic recall on the real embedding model: the facts of
//!    tests/fixtures/recall_pairs.tsv and the distractors of
//!    recall_distractors.txt are stored in one conversation; each later
//!    question (other words) must find its fact. recall@1 and recall@5.
//! 2. The path a chat turn takes (`VectorIndex::search` scoped to one
//!    conversation, and to one namespace of 100 conversations) on stores of
//!    100 to 2,500 conversations: latency per query and recall@3 against an
//!    exact search of the same scope.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use modelpool_actors::engine::embed::{normalize, LlamaEmbedder};
use modelpool_actors::memory::index::{dot, Scope, VectorIndex};

fn embed_model() -> PathBuf {
    std::env::var_os("MODELPOOL_TEST_EMBED_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/modelpool/models/all-MiniLM-L6-v2.f16.gguf")
    })
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).unwrap()
}

/// Section 1; returns the embeddings it made, for section 2.
fn semantic_recall() -> Vec<Vec<f32>> {
    let pairs: Vec<(String, String)> = fixture("recall_pairs.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (a, b) = l.split_once('\t').expect("fact<TAB>question");
            (a.to_string(), b.to_string())
        })
        .collect();
    let distractors: Vec<String> = fixture("recall_distractors.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(String::from)
        .collect();
    let mut embedder = LlamaEmbedder::load(&embed_model(), 2).expect("embedding model (run scripts/setup.sh)");
    let conv = uuid::Uuid::new_v4();
    let index = VectorIndex::new(embedder.dim(), 1024);
    let mut made = Vec::new();
    let started = Instant::now();
    for (i, (fact, _)) in pairs.iter().enumerate() {
        let v = embedder.embed(fact).unwrap();
        made.push(v.clone());
        index.insert(i as u64, conv, "bench", v);
    }
    for (i, d) in distractors.iter().enumerate() {
        let v = embedder.embed(d).unwrap();
        made.push(v.clone());
        index.insert(10_000 + i as u64, conv, "bench", v);
    }
    let stored = pairs.len() + distractors.len();
    let embed_ms = started.elapsed().as_secs_f64() * 1e3 / stored as f64;
    let (mut at1, mut at5) = (0, 0);
    let mut misses = Vec::new();
    for (i, (fact, question)) in pairs.iter().enumerate() {
        let q = embedder.embed(question).unwrap();
        let hits = index.search(&q, 5, &Scope::Conversation(conv), &HashSet::new());
        let pos = hits.iter().position(|h| h.id == i as u64);
        at1 += (pos == Some(0)) as usize;
        at5 += pos.is_some() as usize;
        if pos.is_none() {
            misses.push(format!("{question:?} → not {fact:?}"));
        }
    }
    let n = pairs.len() as f64;
    println!("1. Semantic recall (all-MiniLM-L6-v2, {} stored messages, {} questions)", stored, pairs.len());
    println!(
        "   recall@1 {:.3}   recall@5 {:.3}   ({:.1} ms per embedding, 2 threads)",
        at1 as f64 / n,
        at5 as f64 / n,
        embed_ms
    );
    for m in misses.iter().take(5) {
        println!("   miss: {m}");
    }
    made
}

/// xorshift64*: reproducible noise without a dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }

    fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// The exact top-k ids of `scope` (brute force over what the bench stored).
fn exact_in_scope(
    stored: &[(u64, usize, Vec<f32>)],
    query: &[f32],
    k: usize,
    scope: &dyn Fn(usize) -> bool,
) -> Vec<u64> {
    let mut scored: Vec<(f32, u64)> =
        stored.iter().filter(|(_, c, _)| scope(*c)).map(|(id, _, v)| (dot(query, v), *id)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(k).map(|(_, id)| id).collect()
}

/// What a chat turn calls, `VectorIndex::search` with a conversation or a
/// namespace scope, on a store of many conversations. Messages are real
/// MiniLM embeddings of the fixture texts with a little noise, so that every
/// vector is distinct and neighbourhoods look like real text, not like
/// uniform random vectors.
fn turn_path_at_scale(base: &[Vec<f32>]) {
    const PER_CONVERSATION: usize = 20;
    const NAMESPACE_SIZE: usize = 100;
    const QUERIES: usize = 200;
    let k = 3; // chat.recall_k's default
    println!(
        "\n2. The path a chat turn takes: VectorIndex::search, k={k}, {PER_CONVERSATION} messages per conversation"
    );
    println!(
        "   {:>13} {:>8} {:>9} {:>14} {:>11} {:>14} {:>11}",
        "conversations", "vectors", "build s", "conv µs/query", "conv r@3", "ns µs/query", "ns r@3"
    );
    for conversations in [100usize, 1_000, 2_500] {
        let mut rng = Rng(0x9E3779B97F4A7C15 ^ conversations as u64);
        let ids: Vec<uuid::Uuid> = (0..conversations).map(|_| uuid::Uuid::new_v4()).collect();
        let mut stored = Vec::with_capacity(conversations * PER_CONVERSATION);
        for c in 0..conversations {
            for _ in 0..PER_CONVERSATION {
                let b = &base[(rng.next_u64() % base.len() as u64) as usize];
                let v = normalize(&b.iter().map(|x| x + 0.02 * rng.next_f32()).collect::<Vec<_>>());
                stored.push((stored.len() as u64, c, v));
            }
        }
        let index = VectorIndex::new(base[0].len(), stored.len());
        let items =
            stored.iter().map(|(id, c, v)| (*id, ids[*c], format!("ns{}", c / NAMESPACE_SIZE), v.clone())).collect();
        let started = Instant::now();
        index.insert_many(items);
        let build_s = started.elapsed().as_secs_f64();
        let queries: Vec<(usize, Vec<f32>)> = (0..QUERIES)
            .map(|_| {
                let c = (rng.next_u64() % conversations as u64) as usize;
                let b = &base[(rng.next_u64() % base.len() as u64) as usize];
                (c, normalize(&b.iter().map(|x| x + 0.05 * rng.next_f32()).collect::<Vec<_>>()))
            })
            .collect();
        let none = HashSet::new();
        let measure = |namespace: bool| {
            let (mut hit, mut total, mut secs) = (0usize, 0usize, 0f64);
            for (c, q) in &queries {
                let scope = if namespace {
                    Scope::Namespace(format!("ns{}", c / NAMESPACE_SIZE))
                } else {
                    Scope::Conversation(ids[*c])
                };
                let t = Instant::now();
                let found = index.search(q, k, &scope, &none);
                secs += t.elapsed().as_secs_f64();
                let in_scope =
                    |other: usize| if namespace { other / NAMESPACE_SIZE == c / NAMESPACE_SIZE } else { other == *c };
                let truth = exact_in_scope(&stored, q, k, &in_scope);
                hit += found.iter().filter(|h| truth.contains(&h.id)).count();
                total += truth.len();
            }
            (secs * 1e6 / QUERIES as f64, hit as f64 / total as f64)
        };
        let (conv_us, conv_recall) = measure(false);
        let (ns_us, ns_recall) = measure(true);
        println!(
            "   {conversations:>13} {:>8} {build_s:>9.1} {conv_us:>14.0} {conv_recall:>11.3} {ns_us:>14.0} {ns_recall:>11.3}",
            stored.len()
        );
    }
}

fn main() {
    let base = semantic_recall();
    turn_path_at_scale(&base);
}
