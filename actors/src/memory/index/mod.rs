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
mod score;
mod space;

pub use persist::graph_files;
pub use score::{dot, Hit, UnitCosine};

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::engine::embed::normalize;
use crate::memory::store::{ConversationId, ConversationStore, StoreError};
use conversations::{ConvCache, ConvVectors};
use namespaces::Namespaces;

/// Where recall may look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Conversation(ConversationId),
    /// Every conversation of one namespace (cross-conversation recall).
    Namespace(String),
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
    ns: Arc<Namespaces>,
    fallbacks: AtomicUsize,
}

impl VectorIndex {
    pub fn new(dim: usize, opts: IndexOptions) -> Self {
        Self {
            dim,
            convs: Mutex::new(ConvCache::new(opts.cache_conversations, opts.cache_vectors)),
            ns: Arc::new(Namespaces::new(dim, opts.graph_from, opts.graph_dir.clone(), opts.model.clone())),
            opts,
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
        let loader = index.ns.clone();
        actix_web::rt::task::spawn_blocking(move || loader.fill(vectors, &namespaces))
            .await
            .map_err(|_| StoreError::Corrupt("loading the vector index panicked".into()))?;
        for ns in index.ns.names() {
            index.ns.maybe_build(&ns);
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
            graphs_built: count(&self.ns.built),
            graphs_loaded: count(&self.ns.loaded),
            graph_files_rejected: count(&self.ns.rejected),
            exact_fallbacks: count(&self.fallbacks),
            ..Default::default()
        };
        {
            let convs = self.convs.lock().unwrap_or_else(|e| e.into_inner());
            s.cached_conversations = convs.conversations();
            s.cached_vectors = convs.vectors();
        }
        let spaces = self.ns.spaces.read().unwrap_or_else(|e| e.into_inner());
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
        self.convs.lock().unwrap_or_else(|e| e.into_inner()).add(&conv, id, &vector);
        if self.opts.namespaces {
            self.insert_namespace(vec![(id, conv, vector)], namespace);
        }
        true
    }

    /// Forgets a conversation: its cache entry at once, its namespace vectors
    /// tombstoned (a namespace without a graph drops them at once).
    pub fn remove_conversation(self: &Arc<Self>, conv: &ConversationId) {
        self.convs.lock().unwrap_or_else(|e| e.into_inner()).remove(conv);
        self.ns.remove_conversation(conv);
    }

    /// Messages of `conv` the cache accounts for, or none when it is not cached.
    pub fn conversation_seen(&self, conv: &ConversationId) -> Option<usize> {
        self.convs.lock().unwrap_or_else(|e| e.into_inner()).seen(conv)
    }

    /// Caches a conversation's vectors as read from the store, of its
    /// `seen` stored messages (replacing what was cached).
    pub fn load_conversation(&self, conv: ConversationId, seen: usize, vectors: Vec<(u64, Vec<f32>)>) {
        let entry = ConvVectors::from_store(seen, vectors, self.dim);
        self.convs.lock().unwrap_or_else(|e| e.into_inner()).put(conv, entry);
    }

    /// Caches a new conversation (nothing stored yet).
    pub fn start_conversation(&self, conv: ConversationId) {
        self.load_conversation(conv, 0, Vec::new());
    }

    /// Whether message `id` is in the namespace index of `namespace`.
    pub fn contains(&self, namespace: &str, id: u64) -> bool {
        self.ns.contains(namespace, id)
    }

    /// Adds vectors of one namespace to its index (not to the conversation cache).
    pub fn insert_namespace(self: &Arc<Self>, items: Vec<(u64, ConversationId, Vec<f32>)>, namespace: &str) {
        if !self.opts.namespaces {
            return;
        }
        self.ns.insert(items, namespace);
    }

    /// Saves every namespace graph that changed since its last save (at
    /// shutdown: the next start loads them and adds only what came later).
    pub fn save_graphs(&self) {
        self.ns.save_graphs();
    }

    /// Waits until no graph build, load or save is running (tests and benchmarks).
    pub fn wait_built(&self, timeout: std::time::Duration) -> bool {
        self.ns.wait_built(timeout)
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
        self.convs.lock().unwrap_or_else(|e| e.into_inner()).search(query, k, c, exclude, self.dim)
    }

    /// A namespace search with `ef` candidates (what [`Self::search`] does
    /// with the configured `ef_search`; benchmarks compare values). `query`
    /// must have unit length.
    pub fn search_namespace_ef(
        &self,
        query: &[f32],
        k: usize,
        ns: &str,
        exclude: &HashSet<u64>,
        ef: usize,
    ) -> Vec<Hit> {
        self.ns.search(query, k, ns, exclude, ef)
    }

    /// Exact top-k over a namespace, whatever its index, leaving out `exclude`.
    pub fn search_namespace_exact(&self, query: &[f32], k: usize, ns: &str, exclude: &HashSet<u64>) -> Vec<Hit> {
        self.ns.search_exact(query, k, ns, exclude)
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
        if own.first().is_some_and(|o| o.score > graph_best + EXACT_FALLBACK_GAP) && self.ns.has_graph(ns) {
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

#[cfg(test)]
mod tests;
