//! Semantic search over stored messages, in two parts that fit the two ways
//! a chat turn recalls:
//!
//! - **One conversation** (the default): each conversation's vectors sit
//!   together in one contiguous matrix, loaded from the store on first use
//!   and kept in a cache bounded by vector count (least recently used
//!   conversation evicted first). Recall scores the matrix exactly: time
//!   proportional to the conversation, whatever the store holds.
//! - **A namespace** (`cross_conversation` recall): one index per namespace.
//!   Up to `graph_from` live vectors it is a flat matrix scored exactly;
//!   past that an HNSW graph (hnsw_rs, cosine) is built on a background
//!   thread, and the graph then holds the vectors (the flat copy is dropped).
//!   A vector near-identical to a graph point (a repeated message) is its
//!   twin rather than a point: found with it and scored exactly, so that
//!   clusters of repeats never become islands the graph cannot reach.
//!   hnsw_rs cannot delete: deleted messages are tombstoned (left out by the
//!   search filter, which passes nearly everything, so hnsw_rs keeps its early
//!   exit), and when tombstones reach a fifth of a graph it is rebuilt from
//!   the live vectors in the background and swapped in. Each graph is saved
//!   to `graph_dir` after it is built and at shutdown (`persist.rs`). At
//!   start-up the vectors are read from the store; each namespace's saved
//!   graph is loaded, checked against them and caught up with what was
//!   stored after the save, or (missing, damaged, foreign) built again, in
//!   the background. Until a namespace's graph is ready its recall is exact
//!   (slower, never worse), and [`IndexStats::building`] says so.
//!
//! The store stays the source of truth: everything here can be rebuilt from it.

mod conversations;
mod namespaces;
mod persist;

pub use persist::graph_files;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};

use hnsw_rs::prelude::Distance;
use lru::LruCache;
use serde::Serialize;

use super::store::{ConversationId, ConversationStore, StoreError};
use crate::engine::embed::normalize;
use conversations::ConvCache;
use namespaces::{compact_flat, NsIndex, Slot};

/// Cosine distance for unit vectors, `1 - a·b`, clamped at 0 (rounding can
/// push a dot product of unit vectors past 1). Every vector is normalised
/// before it reaches the graph. Computed in f32 with eight lanes so that the
/// compiler vectorises it; hnsw_rs's `DistCosine` recomputes both norms in f64
/// on every call and was the bulk of index build time.
#[derive(Clone, Copy, Default)]
pub struct UnitCosine;

impl Distance<f32> for UnitCosine {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// Dot product with eight independent accumulators.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Where recall may look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Conversation(ConversationId),
    /// Every conversation of one namespace (cross-conversation recall).
    Namespace(String),
}

/// A search hit: message id, its conversation, cosine similarity.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub conversation_id: ConversationId,
    pub score: f32,
}

/// Settings of the index.
#[derive(Clone, Debug)]
pub struct IndexOptions {
    /// Keep an index per namespace (cross-conversation recall). Off, only
    /// the conversation cache exists and nothing is loaded at start-up.
    pub namespaces: bool,
    /// Most vectors in the conversation cache.
    pub cache_vectors: usize,
    /// Most conversations in the conversation cache.
    pub cache_conversations: usize,
    /// A namespace gets an HNSW graph from this many live vectors; below it
    /// is scored exactly.
    pub graph_from: usize,
    /// Candidates examined by a graph search (`ef`); more is slower and closer to exact.
    pub ef_search: usize,
    /// Where namespace graphs are saved, to be loaded at the next start
    /// instead of built again (none: built at every start).
    pub graph_dir: Option<PathBuf>,
    /// The embedding model's name: a graph saved for another model is not loaded.
    pub model: String,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            namespaces: false,
            cache_vectors: 262_144,
            cache_conversations: 65_536,
            graph_from: 4096,
            ef_search: 48,
            graph_dir: None,
            model: String::new(),
        }
    }
}

/// What the index holds, for `/pool` and `/health`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct IndexStats {
    /// Conversations and vectors in the conversation cache.
    pub cached_conversations: usize,
    pub cached_vectors: usize,
    pub cache_limit: usize,
    /// Namespace indexes (cross-conversation recall only).
    pub namespaces: usize,
    /// Live vectors in the namespace indexes.
    pub namespace_vectors: usize,
    /// Vectors held by the namespace indexes, tombstones included.
    pub namespace_slots: usize,
    /// Deleted vectors still in a graph, waiting for compaction.
    pub tombstones: usize,
    /// Vectors kept as twins of a near-identical graph point rather than
    /// as points of their own (repeated messages).
    pub twins: usize,
    /// Namespaces with a graph.
    pub graphs: usize,
    /// Graph builds in progress (start-up, growth past `graph_from`,
    /// compaction); those namespaces are searched exactly meanwhile.
    pub building: usize,
    /// Graphs built from the vectors since start-up.
    pub graphs_built: usize,
    /// Graphs loaded from `graph_dir` since start-up.
    pub graphs_loaded: usize,
    /// Saved graph files found damaged, foreign or stale, and rebuilt instead.
    pub graph_files_rejected: usize,
    /// Namespace recalls scanned exactly because the graph's best hit scored
    /// far below the asking conversation's own.
    pub exact_fallbacks: usize,
}

pub struct VectorIndex {
    dim: usize,
    opts: IndexOptions,
    convs: Mutex<ConvCache>,
    spaces: RwLock<HashMap<String, NsIndex>>,
    /// Held by every insert into a graph and by a save: hnsw_rs's dump must
    /// not see an insert half done.
    graph_writer: Mutex<()>,
    /// Background threads building, loading or saving graphs.
    workers: AtomicUsize,
    built: AtomicUsize,
    loaded: AtomicUsize,
    rejected: AtomicUsize,
    fallbacks: AtomicUsize,
}

impl VectorIndex {
    pub fn new(dim: usize, opts: IndexOptions) -> Self {
        let cap = NonZeroUsize::new(opts.cache_conversations.max(1)).expect("non-zero");
        Self {
            dim,
            opts,
            convs: Mutex::new(ConvCache { lru: LruCache::new(cap), vectors: 0 }),
            spaces: RwLock::default(),
            graph_writer: Mutex::default(),
            workers: AtomicUsize::new(0),
            built: AtomicUsize::new(0),
            loaded: AtomicUsize::new(0),
            rejected: AtomicUsize::new(0),
            fallbacks: AtomicUsize::new(0),
        }
    }

    /// An index over `store`. With namespace indexes, every stored vector is
    /// read now and graphs are loaded from `graph_dir` (and caught up with
    /// what was stored after they were saved) or built, in the background;
    /// without, nothing is read (conversations load on first use).
    pub async fn open(store: &ConversationStore, dim: usize, opts: IndexOptions) -> Result<Arc<Self>, StoreError> {
        let index = Arc::new(Self::new(dim, opts));
        if !index.opts.namespaces {
            return Ok(index);
        }
        if let Some(dir) = &index.opts.graph_dir {
            persist::clean(dir);
        }
        let namespaces: HashMap<ConversationId, String> =
            store.list_conversations().await?.into_iter().map(|c| (c.id, c.namespace)).collect();
        let vectors = store.vectors(None).await?;
        let loader = index.clone();
        actix_web::rt::task::spawn_blocking(move || {
            let mut spaces = loader.spaces.write().unwrap_or_else(|e| e.into_inner());
            for (id, conv, vector) in vectors {
                if vector.len() != loader.dim {
                    continue;
                }
                let ns = namespaces.get(&conv).cloned().unwrap_or_default();
                let space = spaces.entry(ns).or_default();
                if space.by_id.contains_key(&id) {
                    continue;
                }
                let slot = space.slots.len() as u32;
                space.slots.push(Slot { id, conv, alive: true });
                space.by_id.insert(id, slot);
                space.by_conv.entry(conv).or_default().push(slot);
                space.live += 1;
                space.flat.extend(normalize(&vector));
            }
        })
        .await
        .map_err(|_| StoreError::Corrupt("loading the vector index panicked".into()))?;
        let names: Vec<String> = index.spaces.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        for ns in names {
            index.maybe_build(&ns);
        }
        Ok(index)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn options(&self) -> &IndexOptions {
        &self.opts
    }

    pub fn stats(&self) -> IndexStats {
        let count = |c: &AtomicUsize| c.load(std::sync::atomic::Ordering::Relaxed);
        let mut s = IndexStats {
            cache_limit: self.opts.cache_vectors,
            graphs_built: count(&self.built),
            graphs_loaded: count(&self.loaded),
            graph_files_rejected: count(&self.rejected),
            exact_fallbacks: count(&self.fallbacks),
            ..Default::default()
        };
        {
            let convs = self.convs.lock().unwrap_or_else(|e| e.into_inner());
            s.cached_conversations = convs.lru.len();
            s.cached_vectors = convs.vectors;
        }
        let spaces = self.spaces.read().unwrap_or_else(|e| e.into_inner());
        s.namespaces = spaces.len();
        for space in spaces.values() {
            s.namespace_vectors += space.live;
            s.namespace_slots += space.slots.len();
            s.graphs += space.graph.is_some() as usize;
            s.building += space.building.is_some() as usize;
            if space.graph.is_some() {
                s.tombstones += space.dead;
            }
            s.twins += space.twin_vecs.len();
        }
        s
    }

    /// Live vectors: in the namespace indexes when they exist, else in the
    /// conversation cache.
    pub fn len(&self) -> usize {
        let s = self.stats();
        if self.opts.namespaces {
            s.namespace_vectors
        } else {
            s.cached_vectors
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds one message's vector: to its conversation's cache entry (if
    /// cached) and to its namespace's index. Vectors of the wrong dimension
    /// are refused (hnsw_rs would panic).
    pub fn insert(self: &Arc<Self>, id: u64, conv: ConversationId, namespace: &str, vector: Vec<f32>) -> bool {
        if vector.len() != self.dim {
            return false;
        }
        let vector = normalize(&vector);
        {
            let mut cache = self.convs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = cache.lru.get_mut(&conv) {
                if !entry.ids.contains(&id) {
                    entry.ids.push(id);
                    entry.data.extend_from_slice(&vector);
                    entry.seen += 1;
                    cache.vectors += 1;
                    self.evict(&mut cache);
                }
            }
        }
        if self.opts.namespaces {
            self.insert_namespace(vec![(id, conv, vector)], namespace);
        }
        true
    }

    /// Forgets a conversation: its cache entry at once, its namespace vectors
    /// tombstoned (a namespace without a graph drops them at once).
    pub fn remove_conversation(self: &Arc<Self>, conv: &ConversationId) {
        {
            let mut cache = self.convs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(old) = cache.lru.pop(conv) {
                cache.vectors -= old.ids.len();
            }
        }
        let mut touched = Vec::new();
        {
            let mut spaces = self.spaces.write().unwrap_or_else(|e| e.into_inner());
            for (name, space) in spaces.iter_mut() {
                let Some(slots) = space.by_conv.remove(conv) else { continue };
                for slot in &slots {
                    let s = &mut space.slots[*slot as usize];
                    if s.alive {
                        s.alive = false;
                        space.live -= 1;
                        space.dead += 1;
                        space.by_id.remove(&s.id);
                    }
                }
                if space.graph.is_none() && space.building.is_none() {
                    compact_flat(space, self.dim);
                }
                touched.push(name.clone());
            }
            spaces.retain(|_, s| !s.slots.is_empty() || s.building.is_some());
        }
        for ns in touched {
            self.maybe_build(&ns);
        }
    }

    /// The `k` most similar live messages in `scope`, leaving out `exclude`.
    /// For a conversation that is not cached, returns none: the caller loads
    /// it from the store first ([`Self::load_conversation`]).
    pub fn search(&self, query: &[f32], k: usize, scope: &Scope, exclude: &HashSet<u64>) -> Option<Vec<Hit>> {
        if query.len() != self.dim || k == 0 {
            return Some(Vec::new());
        }
        let query = &normalize(query)[..];
        match scope {
            Scope::Conversation(c) => self.search_conversation(query, k, c, exclude),
            Scope::Namespace(ns) => Some(self.search_namespace_ef(query, k, ns, exclude, self.opts.ef_search)),
        }
    }

    /// Exact top-k over a cached conversation; `query` must have unit length.
    fn search_conversation(
        &self,
        query: &[f32],
        k: usize,
        c: &ConversationId,
        exclude: &HashSet<u64>,
    ) -> Option<Vec<Hit>> {
        let mut cache = self.convs.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.lru.get(c)?;
        let mut hits: Vec<Hit> = entry
            .ids
            .iter()
            .zip(entry.data.chunks_exact(self.dim))
            .filter(|(id, _)| !exclude.contains(id))
            .map(|(id, v)| Hit { id: *id, conversation_id: *c, score: dot(query, v) })
            .collect();
        top_k(&mut hits, k);
        Some(hits)
    }

    /// Recall for a message of conversation `conv` in `scope`: the `k` best.
    /// In a namespace, the graph's `k` best are merged with the `k` best of an
    /// exact scan of the conversation's own vectors, best first (up to `2k`) (cached: the caller loaded them), and when
    /// the conversation's best hit scores more than [`EXACT_FALLBACK_GAP`]
    /// above the graph's best, the graph missed a region it holds (a cluster
    /// of near-identical messages can be an island in an HNSW graph): the
    /// namespace is then scanned exactly, and [`IndexStats::exact_fallbacks`]
    /// counts it.
    pub fn recall(
        &self,
        query: &[f32],
        k: usize,
        scope: &Scope,
        conv: &ConversationId,
        exclude: &HashSet<u64>,
    ) -> Vec<Hit> {
        let Scope::Namespace(ns) = scope else {
            return self.search(query, k, scope, exclude).unwrap_or_default();
        };
        if query.len() != self.dim || k == 0 {
            return Vec::new();
        }
        let query = &normalize(query)[..];
        let mut hits = self.search_namespace_ef(query, k, ns, exclude, self.opts.ef_search);
        let own = self.search_conversation(query, k, conv, exclude).unwrap_or_default();
        let graph_best = hits.first().map_or(f32::NEG_INFINITY, |h| h.score);
        if own.first().is_some_and(|o| o.score > graph_best + EXACT_FALLBACK_GAP) && self.has_graph(ns) {
            self.fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            hits = self.search_namespace_exact(query, k, ns, exclude);
        }
        // The conversation's own best stay among the candidates even when
        // the namespace holds many better-scoring ones: the caller keeps a
        // share of the recall for them.
        let seen: HashSet<u64> = hits.iter().map(|h| h.id).collect();
        hits.extend(own.into_iter().filter(|h| !seen.contains(&h.id)));
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits
    }
}

/// How far a conversation's own best hit may score above a namespace
/// graph's best before the namespace is scanned exactly instead.
pub const EXACT_FALLBACK_GAP: f32 = 0.05;

/// Keeps the `k` best hits, best first.
pub(super) fn top_k(hits: &mut Vec<Hit>, k: usize) {
    if hits.len() > k {
        hits.select_nth_unstable_by(k, |a, b| b.score.total_cmp(&a.score));
        hits.truncate(k);
    }
    hits.sort_by(|a, b| b.score.total_cmp(&a.score));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    fn with_namespaces(graph_from: usize) -> Arc<VectorIndex> {
        Arc::new(VectorIndex::new(8, IndexOptions { namespaces: true, graph_from, ..Default::default() }))
    }

    #[test]
    fn unit_cosine_matches_the_definition_and_never_goes_negative() {
        let a = normalize(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        let b = normalize(&[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]);
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-6);
        assert_eq!(UnitCosine.eval(&a, &a), 0.0);
    }

    #[test]
    fn a_panic_while_a_lock_is_held_does_not_break_the_index_for_later_requests() {
        let index = Arc::new(VectorIndex::new(3, IndexOptions { namespaces: true, ..Default::default() }));
        let c1 = uuid::Uuid::new_v4();
        index.start_conversation(c1);
        index.insert(1, c1, "ns", vec![1.0, 0.0, 0.0]);
        // One request panics while it holds the conversation cache's lock and a namespace's.
        let poisoner = index.clone();
        let _ = std::thread::spawn(move || {
            let _convs = poisoner.convs.lock().unwrap();
            let _spaces = poisoner.spaces.write().unwrap();
            panic!("a request panics while holding the index locks");
        })
        .join();
        assert!(index.convs.is_poisoned());
        // Every later call still works.
        index.insert(2, c1, "ns", vec![0.0, 1.0, 0.0]);
        assert_eq!(index.conversation_seen(&c1), Some(2));
        let hits = index.search(&[1.0, 0.0, 0.0], 2, &Scope::Conversation(c1), &HashSet::new()).unwrap_or_default();
        assert_eq!(hits.first().map(|h| h.id), Some(1), "{hits:?}");
    }

    #[test]
    fn a_graph_search_leaves_out_excluded_and_deleted_slots_unfiltered_or_filtered() {
        let index = with_namespaces(64);
        let mut next = rng(11);
        let convs: Vec<_> = (0..10).map(|_| uuid::Uuid::new_v4()).collect();
        let vectors: Vec<Vec<f32>> = (0..300).map(|_| (0..8).map(|_| next()).collect()).collect();
        let items = vectors.iter().enumerate().map(|(i, v)| (i as u64, convs[i % 10], v.clone())).collect();
        index.insert_namespace(items, "ns");
        assert!(index.wait_built(std::time::Duration::from_secs(30)));
        let query = normalize(&vectors[7]);
        let ids = |exclude: &HashSet<u64>| -> Vec<u64> {
            index.search_namespace_ef(&query, 5, "ns", exclude, 48).into_iter().map(|h| h.id).collect()
        };
        assert_eq!(ids(&HashSet::new()).first(), Some(&7), "the query's own vector first");
        // A few left out: the unfiltered search, with that many more hits.
        let few = HashSet::from([7]);
        let found = ids(&few);
        assert_eq!(found.len(), 5);
        assert!(!found.contains(&7), "{found:?}");
        // More left out than that: the filtered search.
        let many: HashSet<u64> = (0..70).collect();
        let found = ids(&many);
        assert_eq!(found.len(), 5);
        assert!(found.iter().all(|id| *id >= 70), "{found:?}");
        // Tombstones count as left out.
        index.remove_conversation(&convs[7]);
        let found = ids(&HashSet::new());
        assert!(!found.contains(&7) && found.len() == 5, "{found:?}");
    }

    #[test]
    fn search_filters_by_scope_exclusion_and_deletion() {
        let index = Arc::new(VectorIndex::new(3, IndexOptions { namespaces: true, ..Default::default() }));
        let (c1, c2, c3) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        index.start_conversation(c1);
        index.insert(1, c1, "ns", vec![1.0, 0.0, 0.0]);
        index.insert(2, c1, "ns", vec![0.9, 0.1, 0.0]);
        index.insert(3, c2, "ns", vec![1.0, 0.01, 0.0]);
        index.insert(4, c3, "other", vec![1.0, 0.0, 0.01]);
        assert!(!index.insert(5, c1, "ns", vec![1.0, 0.0]), "wrong dimension refused");
        let q = [1.0, 0.0, 0.0];
        let ids = |hits: Option<Vec<Hit>>| hits.unwrap().into_iter().map(|h| h.id).collect::<Vec<_>>();
        assert_eq!(ids(index.search(&q, 5, &Scope::Conversation(c1), &HashSet::new())), vec![1, 2]);
        assert_eq!(ids(index.search(&q, 5, &Scope::Conversation(c1), &HashSet::from([1]))), vec![2]);
        assert!(index.search(&q, 5, &Scope::Conversation(c2), &HashSet::new()).is_none(), "c2 is not cached");
        let ns = ids(index.search(&q, 5, &Scope::Namespace("ns".into()), &HashSet::new()));
        assert_eq!(ns.len(), 3, "{ns:?}");
        assert!(!ns.contains(&4), "another namespace leaked in");
        index.remove_conversation(&c1);
        assert!(index.search(&q, 5, &Scope::Conversation(c1), &HashSet::new()).is_none());
        assert_eq!(ids(index.search(&q, 5, &Scope::Namespace("ns".into()), &HashSet::new())), vec![3]);
        assert_eq!(index.len(), 2);
        assert_eq!(index.stats().namespace_slots, 2, "a namespace without a graph drops deleted rows at once");
    }

    #[test]
    fn the_conversation_cache_is_bounded_and_evicts_the_least_recently_used() {
        let opts = IndexOptions { cache_vectors: 10, ..Default::default() };
        let index = Arc::new(VectorIndex::new(2, opts));
        let convs: Vec<_> = (0..4).map(|_| uuid::Uuid::new_v4()).collect();
        for (i, c) in convs.iter().enumerate() {
            let vectors = (0..4).map(|j| ((i * 10 + j) as u64, vec![1.0, j as f32])).collect();
            index.load_conversation(*c, 4, vectors);
            if i == 1 {
                // Conversation 0 is used again, so 1 is now the least recently used.
                assert_eq!(index.conversation_seen(&convs[0]), Some(4));
            }
            if i == 2 {
                assert!(index.conversation_seen(&convs[1]).is_none(), "the least recently used went first");
                assert!(index.conversation_seen(&convs[0]).is_some());
            }
        }
        let s = index.stats();
        assert!(s.cached_vectors <= 10, "{s:?}");
        assert_eq!(s.cached_conversations, 2);
        assert!(index.conversation_seen(&convs[3]).is_some(), "the newest stays");
    }

    #[test]
    fn a_large_namespace_gets_a_graph_that_finds_the_nearest_and_compacts_after_deletes() {
        let dim = 8;
        let index = with_namespaces(1000);
        let (keep, drop_) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let mut next = rng(0x9E3779B97F4A7C15);
        let items: Vec<(u64, uuid::Uuid, Vec<f32>)> = (0..3000u64)
            .map(|i| (i, if i < 2000 { keep } else { drop_ }, (0..dim).map(|_| next()).collect()))
            .collect();
        let target = items[1234].2.clone();
        index.insert_namespace(items, "big");
        assert!(index.wait_built(std::time::Duration::from_secs(60)));
        assert_eq!(index.stats().graphs, 1);
        let hits = index.search(&target, 3, &Scope::Namespace("big".into()), &HashSet::new()).unwrap();
        assert_eq!(hits.first().map(|h| h.id), Some(1234), "{hits:?}");
        assert!(hits[0].score > 0.999);
        let exact = index.search_namespace_exact(&target, 3, "big", &HashSet::new());
        assert_eq!(exact.first().map(|h| h.id), Some(1234));

        let dropped = items_of(&index, "big", &drop_);
        let probe = dropped.clone();
        index.remove_conversation(&drop_);
        // Gone from recall at once...
        let hits = index.search(&probe, 10, &Scope::Namespace("big".into()), &HashSet::new()).unwrap();
        assert!(hits.iter().all(|h| h.conversation_id == keep), "{hits:?}");
        // ...and from memory once compacted (a third of the graph was tombstones).
        assert!(index.wait_built(std::time::Duration::from_secs(60)));
        let s = index.stats();
        assert_eq!((s.namespace_vectors, s.namespace_slots, s.tombstones), (2000, 2000, 0), "{s:?}");
        let hits = index.search(&target, 1, &Scope::Namespace("big".into()), &HashSet::new()).unwrap();
        assert_eq!(hits[0].id, 1234, "the compacted graph still finds it");
    }

    #[test]
    fn a_saved_graph_is_loaded_caught_up_with_the_store_and_rebuilt_when_damaged_or_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let mut next = rng(5);
        let convs: Vec<_> = (0..20).map(|_| uuid::Uuid::new_v4()).collect();
        let mut vector = || -> Vec<f32> { (0..8).map(|_| next()).collect() };
        let items: Vec<(u64, ConversationId, Vec<f32>)> =
            (0..2000u64).map(|i| (i, convs[i as usize % 20], vector())).collect();
        // A start-up over a store holding `items`.
        let open = |model: &str, items: &[(u64, ConversationId, Vec<f32>)]| {
            let opts = IndexOptions {
                namespaces: true,
                graph_from: 500,
                graph_dir: Some(dir.path().to_path_buf()),
                model: model.into(),
                ..Default::default()
            };
            let index = Arc::new(VectorIndex::new(8, opts));
            index.insert_namespace(items.to_vec(), "ns");
            assert!(index.wait_built(std::time::Duration::from_secs(60)));
            let s = index.stats();
            assert_eq!((s.graphs, s.namespace_vectors), (1, items.len()), "{s:?}");
            index
        };
        let counts = |index: &VectorIndex| {
            let s = index.stats();
            (s.graphs_built, s.graphs_loaded, s.graph_files_rejected)
        };
        let answers = |index: &VectorIndex, items: &[(u64, ConversationId, Vec<f32>)]| -> Vec<Vec<u64>> {
            items[..50]
                .iter()
                .map(|(_, _, q)| {
                    let q = normalize(q);
                    index.search_namespace_ef(&q, 5, "ns", &HashSet::new(), 48).into_iter().map(|h| h.id).collect()
                })
                .collect()
        };

        let first = open("model-a", &items);
        assert_eq!(counts(&first), (1, 0, 0));
        assert!(graph_files(dir.path(), "ns").iter().all(|f| f.exists()), "saved after the build");
        let before = answers(&first, &items);
        drop(first);

        let second = open("model-a", &items);
        assert_eq!(counts(&second), (0, 1, 0), "loaded, not built");
        assert_eq!(answers(&second, &items), before, "the loaded graph answers as the saved one did");
        drop(second);

        // The store moved on: a conversation deleted, 100 messages added.
        let mut later: Vec<_> = items.iter().filter(|(_, c, _)| *c != convs[3]).cloned().collect();
        later.extend((2000..2100u64).map(|i| (i, convs[0], vector())));
        let third = open("model-a", &later);
        assert_eq!(counts(&third), (0, 1, 0));
        let s = third.stats();
        assert_eq!((s.namespace_vectors, s.tombstones), (2000, 100), "{s:?}");
        for (id, _, v) in &later[later.len() - 100..] {
            let hits = third.search_namespace_ef(&normalize(v), 1, "ns", &HashSet::new(), 48);
            assert_eq!(hits.first().map(|h| h.id), Some(*id), "added after the save, found");
        }
        let deleted = &items[3];
        let hits = third.search_namespace_ef(&normalize(&deleted.2), 10, "ns", &HashSet::new(), 48);
        assert!(hits.iter().all(|h| h.conversation_id != convs[3]), "deleted after the save, left out: {hits:?}");
        drop(third);

        // A damaged file is not used: the graph is built again, and counted.
        let [graph_file, ..] = graph_files(dir.path(), "ns");
        let mut bytes = std::fs::read(&graph_file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        std::fs::write(&graph_file, bytes).unwrap();
        let fourth = open("model-a", &later);
        assert_eq!(counts(&fourth), (1, 0, 1));
        assert_eq!(answers(&fourth, &later).len(), 50);
        drop(fourth);

        // So is a graph saved for another embedding model.
        let fifth = open("model-b", &later);
        assert_eq!(counts(&fifth), (1, 0, 1));
        drop(fifth);
        // A store whose vectors differ from the saved graph's (another data directory).
        let foreign: Vec<_> = later.iter().map(|(id, c, _)| (*id, *c, vector())).collect();
        let sixth = open("model-b", &foreign);
        assert_eq!(counts(&sixth), (1, 0, 1));
    }

    /// Clusters of near-identical messages (one message repeated many times
    /// in one conversation, larger than the graph's construction beam): each
    /// is found by namespace recall asked from its own conversation (the
    /// graph, or the exact fallback when the graph missed it) and, from any
    /// other conversation, by the graph itself.
    #[test]
    fn every_cluster_of_near_identical_messages_is_reachable_through_namespace_recall() {
        let dim = 32;
        let opts = IndexOptions { namespaces: true, graph_from: 1000, ..Default::default() };
        let index = Arc::new(VectorIndex::new(dim, opts));
        let mut next = rng(77);
        let (clusters, size) = (40usize, 150usize);
        let convs: Vec<_> = (0..clusters).map(|_| uuid::Uuid::new_v4()).collect();
        let centers: Vec<Vec<f32>> =
            (0..clusters).map(|_| normalize(&(0..dim).map(|_| next()).collect::<Vec<_>>())).collect();
        let mut near = |c: &[f32], by: f32| -> Vec<f32> { c.iter().map(|x| x + by * next()).collect() };
        let mut items = Vec::new();
        for (c, center) in centers.iter().enumerate() {
            let members: Vec<(u64, Vec<f32>)> =
                (0..size).map(|j| ((c * size + j) as u64, near(center, 0.002))).collect();
            index.load_conversation(convs[c], size, members.clone());
            items.extend(members.into_iter().map(|(id, v)| (id, convs[c], v)));
        }
        index.insert_namespace(items, "ns");
        assert!(index.wait_built(std::time::Duration::from_secs(120)));
        assert_eq!(index.stats().graphs, 1);
        let ns = Scope::Namespace("ns".into());
        let stranger = uuid::Uuid::new_v4();
        let mut graph_found = 0;
        for (c, center) in centers.iter().enumerate() {
            let query = near(center, 0.02);
            let own = index.recall(&query, 3, &ns, &convs[c], &HashSet::new());
            assert!(own.len() >= 3 && own.iter().all(|h| h.conversation_id == convs[c]), "cluster {c}: {own:?}");
            let other = index.recall(&query, 3, &ns, &stranger, &HashSet::new());
            graph_found += other.first().is_some_and(|h| h.conversation_id == convs[c]) as usize;
        }
        println!(
            "graph alone reached {graph_found} of {clusters} clusters; exact fallbacks {}",
            index.stats().exact_fallbacks
        );
        assert_eq!(graph_found, clusters, "every cluster is reachable from any conversation");
    }

    fn items_of(index: &VectorIndex, ns: &str, conv: &ConversationId) -> Vec<f32> {
        let spaces = index.spaces.read().unwrap();
        let space = &spaces[ns];
        let slot = space.by_conv[conv][0] as usize;
        if let Some(v) = space.twin_vecs.get(&(slot as u32)) {
            return v.clone();
        }
        let graph = space.graph.as_ref().unwrap();
        let point = graph.get_point_indexation().into_iter().find(|p| p.get_origin_id() == slot).unwrap();
        let v = point.get_v().to_vec();
        v
    }
}
