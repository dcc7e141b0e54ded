//! Recall benchmark. Prints figures; asserts nothing.
//!
//!   cargo bench --bench recall            (scripts/bench.sh does the set-up first)
//!
//! 1. Semantic recall on the real embedding model: the facts of
//!    tests/fixtures/recall_pairs.tsv and the distractors of
//!    recall_distractors.txt are stored in one conversation; each later
//!    question (other words) must find its fact. recall@1 and recall@5.
//! 2. HNSW vs exact search on 100,000 random unit vectors of dimension 384:
//!    recall@10 and query latency for several `ef`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use modelpool_actors::engine::embed::{normalize, LlamaEmbedder};
use modelpool_actors::memory::index::{Scope, VectorIndex};

fn embed_model() -> PathBuf {
    std::env::var_os("MODELPOOL_TEST_EMBED_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/modelpool/models/all-MiniLM-L6-v2.f16.gguf")
    })
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).unwrap()
}

fn semantic_recall() {
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
    let started = Instant::now();
    for (i, (fact, _)) in pairs.iter().enumerate() {
        index.insert(i as u64, conv, "bench", embedder.embed(fact).unwrap());
    }
    for (i, d) in distractors.iter().enumerate() {
        index.insert(10_000 + i as u64, conv, "bench", embedder.embed(d).unwrap());
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
}

/// xorshift64*: reproducible random vectors without a dependency.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn unit_vector(&mut self, dim: usize) -> Vec<f32> {
        normalize(&(0..dim).map(|_| self.next_f32()).collect::<Vec<_>>())
    }
}

fn hnsw_vs_exact() {
    let (n, dim, queries, k) = (100_000usize, 384usize, 200usize, 10usize);
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let conv = uuid::Uuid::new_v4();
    let items: Vec<_> = (0..n as u64).map(|id| (id, conv, "bench".to_string(), rng.unit_vector(dim))).collect();
    let index = VectorIndex::new(dim, n);
    let started = Instant::now();
    index.insert_many(items);
    let build_s = started.elapsed().as_secs_f64();
    let qs: Vec<Vec<f32>> = (0..queries).map(|_| rng.unit_vector(dim)).collect();

    let started = Instant::now();
    let truth: Vec<HashSet<u64>> = qs.iter().map(|q| index.exact(q, k).into_iter().map(|h| h.id).collect()).collect();
    let exact_us = started.elapsed().as_secs_f64() * 1e6 / queries as f64;

    println!("\n2. HNSW vs exact, {n} random unit vectors of dim {dim}, {queries} queries, k={k}");
    println!("   build: {build_s:.1} s (M=16, ef_construction=200, all cores)");
    println!("   {:<10} {:>12} {:>16}", "search", "recall@10", "latency µs/query");
    println!("   {:<10} {:>12.3} {:>16.0}", "exact", 1.0, exact_us);
    for ef in [32usize, 64, 128, 256] {
        let started = Instant::now();
        let found: Vec<Vec<u64>> = qs.iter().map(|q| index.approximate(q, k, ef)).collect();
        let us = started.elapsed().as_secs_f64() * 1e6 / queries as f64;
        let hit: usize = found.iter().zip(&truth).map(|(f, t)| f.iter().filter(|id| t.contains(id)).count()).sum();
        println!("   {:<10} {:>12.3} {:>16.0}", format!("ef={ef}"), hit as f64 / (queries * k) as f64, us);
    }
}

fn main() {
    semantic_recall();
    hnsw_vs_exact();
}
