//! Semantic search over stored messages: an HNSW graph (hnsw_rs, cosine) with
//! the message id as payload. hnsw_rs cannot delete, so deleted messages are
//! tombstoned (left out of the filter) and never returned. The vectors in
//! the store are the source of truth; the graph is rebuilt from them at
//! start-up. With a shared store, a conversation's vectors written by another
//! replica are added when the conversation's next turn comes here
//! ([`VectorIndex::conversation_len`] tells a turn whether it must).

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use hnsw_rs::prelude::{Distance, Hnsw};

use super::store::{ConversationId, ConversationStore, StoreError};
use crate::engine::embed::normalize;

const MAX_NB_CONNECTION: usize = 16;
const MAX_LAYER: usize = 16;
const EF_CONSTRUCTION: usize = 200;

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

struct Entry {
    conversation_id: ConversationId,
    vector: Vec<f32>,
}

#[derive(Default)]
struct Live {
    entries: HashMap<u64, Entry>,
    namespaces: HashMap<ConversationId, String>,
    /// Each conversation's live message ids: a conversation's recall scores
    /// exactly these, in time proportional to the conversation.
    by_conversation: HashMap<ConversationId, Vec<u64>>,
    /// Each namespace's conversations.
    by_namespace: HashMap<String, HashSet<ConversationId>>,
}

/// Namespaces with at most this many messages are scored exactly, like a
/// conversation; larger ones go through the HNSW graph.
const EXACT_NAMESPACE_LIMIT: usize = 4096;

impl Live {
    fn add(&mut self, id: u64, conversation_id: ConversationId, namespace: &str, vector: Vec<f32>) {
        if !self.namespaces.contains_key(&conversation_id) {
            self.namespaces.insert(conversation_id, namespace.to_string());
            self.by_namespace.entry(namespace.to_string()).or_default().insert(conversation_id);
        }
        self.by_conversation.entry(conversation_id).or_default().push(id);
        self.entries.insert(id, Entry { conversation_id, vector });
    }

    /// Exact top-k over `ids`, leaving out `exclude`.
    fn score<'a>(
        &self,
        ids: impl Iterator<Item = &'a u64>,
        query: &[f32],
        k: usize,
        exclude: &HashSet<u64>,
    ) -> Vec<Hit> {
        let mut hits: Vec<Hit> = ids
            .filter(|id| !exclude.contains(id))
            .filter_map(|id| {
                let e = self.entries.get(id)?;
                Some(Hit { id: *id, conversation_id: e.conversation_id, score: dot(query, &e.vector) })
            })
            .collect();
        top_k(&mut hits, k);
        hits
    }
}

pub struct VectorIndex {
    dim: usize,
    graph: Hnsw<'static, f32, UnitCosine>,
    live: RwLock<Live>,
}

impl VectorIndex {
    pub fn new(dim: usize, expected: usize) -> Self {
        Self {
            dim,
            graph: Hnsw::new(MAX_NB_CONNECTION, expected.max(1024), MAX_LAYER, EF_CONSTRUCTION, UnitCosine),
            live: RwLock::new(Live::default()),
        }
    }

    /// Rebuilds the index from every vector in the store.
    pub async fn rebuild(store: &ConversationStore, dim: usize) -> Result<Self, StoreError> {
        let namespaces: HashMap<ConversationId, String> =
            store.list_conversations().await?.into_iter().map(|c| (c.id, c.namespace)).collect();
        let mut items = Vec::new();
        for (id, conv, vector) in store.vectors(None).await? {
            let ns = namespaces.get(&conv).cloned().unwrap_or_default();
            items.push((id, conv, ns, vector));
        }
        let index = Self::new(dim, items.len());
        index.insert_many(items);
        Ok(index)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.live.read().expect("index lock").entries.len()
    }

    /// Number of live vectors of one conversation.
    pub fn conversation_len(&self, conversation_id: &ConversationId) -> usize {
        self.live.read().expect("index lock").by_conversation.get(conversation_id).map_or(0, Vec::len)
    }

    /// Whether message `id` is in the index.
    pub fn contains(&self, id: u64) -> bool {
        self.live.read().expect("index lock").entries.contains_key(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds one vector. Vectors of the wrong dimension are refused (hnsw_rs would panic).
    pub fn insert(&self, id: u64, conversation_id: ConversationId, namespace: &str, vector: Vec<f32>) -> bool {
        if vector.len() != self.dim {
            return false;
        }
        let vector = normalize(&vector);
        self.graph.insert((&vector, id as usize));
        self.live.write().expect("index lock").add(id, conversation_id, namespace, vector);
        true
    }

    /// Adds many vectors at once, inserting into the graph on all cores.
    pub fn insert_many(&self, items: Vec<(u64, ConversationId, String, Vec<f32>)>) {
        let items: Vec<_> = items
            .into_iter()
            .filter(|(_, _, _, v)| v.len() == self.dim)
            .map(|(id, c, ns, v)| (id, c, ns, normalize(&v)))
            .collect();
        let refs: Vec<(&Vec<f32>, usize)> = items.iter().map(|(id, _, _, v)| (v, *id as usize)).collect();
        self.graph.parallel_insert(&refs);
        let mut live = self.live.write().expect("index lock");
        for (id, conversation_id, namespace, vector) in items {
            live.add(id, conversation_id, &namespace, vector);
        }
    }

    /// Tombstones a conversation's messages.
    pub fn remove_conversation(&self, conversation_id: &ConversationId, ids: &[u64]) {
        let mut live = self.live.write().expect("index lock");
        for id in ids {
            live.entries.remove(id);
        }
        live.by_conversation.remove(conversation_id);
        if let Some(ns) = live.namespaces.remove(conversation_id) {
            if let Some(set) = live.by_namespace.get_mut(&ns) {
                set.remove(conversation_id);
                if set.is_empty() {
                    live.by_namespace.remove(&ns);
                }
            }
        }
    }

    /// The `k` most similar live messages in `scope`, leaving out `exclude`.
    /// A conversation, and a namespace of up to 4,096 messages, are scored
    /// exactly over their own messages (time proportional to the scope, not
    /// to the store). A larger namespace goes through the HNSW graph with a
    /// filter; if that leaves it short of `k` hits, its messages are scored exactly.
    pub fn search(&self, query: &[f32], k: usize, scope: &Scope, exclude: &HashSet<u64>) -> Vec<Hit> {
        if query.len() != self.dim || k == 0 {
            return Vec::new();
        }
        let query = &normalize(query)[..];
        let live = self.live.read().expect("index lock");
        let ns = match scope {
            Scope::Conversation(c) => {
                return live.score(live.by_conversation.get(c).into_iter().flatten(), query, k, exclude);
            }
            Scope::Namespace(ns) => ns,
        };
        let namespace_ids = || {
            let convs = live.by_namespace.get(ns).into_iter().flatten();
            convs.filter_map(|c| live.by_conversation.get(c)).flatten()
        };
        if namespace_ids().take(EXACT_NAMESPACE_LIMIT + 1).count() <= EXACT_NAMESPACE_LIMIT {
            return live.score(namespace_ids(), query, k, exclude);
        }
        // A large namespace: the graph, filtered to it.
        let in_namespace = |id: u64| -> Option<&Entry> {
            let e = live.entries.get(&id)?;
            (!exclude.contains(&id) && live.namespaces.get(&e.conversation_id) == Some(ns)).then_some(e)
        };
        let filter = |id: &usize| in_namespace(*id as u64).is_some();
        let ef = (k * 8).max(64);
        let hits: Vec<Hit> = self
            .graph
            .search_filter(query, k, ef, Some(&filter))
            .into_iter()
            .filter_map(|n| {
                let e = in_namespace(n.d_id as u64)?;
                Some(Hit { id: n.d_id as u64, conversation_id: e.conversation_id, score: 1.0 - n.distance })
            })
            .collect();
        if hits.len() < k {
            return live.score(namespace_ids(), query, k, exclude);
        }
        hits
    }
}

/// Keeps the `k` best hits, best first.
fn top_k(hits: &mut Vec<Hit>, k: usize) {
    if hits.len() > k {
        hits.select_nth_unstable_by(k, |a, b| b.score.total_cmp(&a.score));
        hits.truncate(k);
    }
    hits.sort_by(|a, b| b.score.total_cmp(&a.score));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_cosine_matches_the_definition_and_never_goes_negative() {
        let a = normalize(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        let b = normalize(&[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]);
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-6);
        assert_eq!(UnitCosine.eval(&a, &a), 0.0);
    }

    #[test]
    fn search_filters_by_scope_exclusion_and_tombstones() {
        let index = VectorIndex::new(3, 16);
        let (c1, c2, c3) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        index.insert(1, c1, "ns", vec![1.0, 0.0, 0.0]);
        index.insert(2, c1, "ns", vec![0.9, 0.1, 0.0]);
        index.insert(3, c2, "ns", vec![1.0, 0.01, 0.0]);
        index.insert(4, c3, "other", vec![1.0, 0.0, 0.01]);
        assert!(!index.insert(5, c1, "ns", vec![1.0, 0.0]), "wrong dimension refused");
        let q = [1.0, 0.0, 0.0];
        let ids = |hits: Vec<Hit>| hits.into_iter().map(|h| h.id).collect::<Vec<_>>();
        assert_eq!(ids(index.search(&q, 5, &Scope::Conversation(c1), &HashSet::new())), vec![1, 2]);
        assert_eq!(ids(index.search(&q, 5, &Scope::Conversation(c1), &HashSet::from([1]))), vec![2]);
        let ns = ids(index.search(&q, 5, &Scope::Namespace("ns".into()), &HashSet::new()));
        assert_eq!(ns.len(), 3, "{ns:?}");
        assert!(!ns.contains(&4), "another namespace leaked in");
        index.remove_conversation(&c1, &[1, 2]);
        assert!(index.search(&q, 5, &Scope::Conversation(c1), &HashSet::new()).is_empty());
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn a_large_namespace_goes_through_the_graph_and_finds_the_nearest() {
        let dim = 8;
        let index = VectorIndex::new(dim, 6000);
        let conv = uuid::Uuid::new_v4();
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let items: Vec<_> = (0..5000u64)
            .map(|i| (i, conv, "big".to_string(), (0..dim).map(|_| next()).collect::<Vec<f32>>()))
            .collect();
        let target = items[1234].3.clone();
        index.insert_many(items);
        let hits = index.search(&target, 3, &Scope::Namespace("big".into()), &HashSet::new());
        assert_eq!(hits.first().map(|h| h.id), Some(1234), "{hits:?}");
        assert!(hits[0].score > 0.999);
        // The same conversation, scored exactly, agrees.
        let exact = index.search(&target, 3, &Scope::Conversation(conv), &HashSet::new());
        assert_eq!(exact.first().map(|h| h.id), Some(1234));
    }
}
