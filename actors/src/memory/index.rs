//! Semantic search over stored messages: an HNSW graph (hnsw_rs, cosine) with
//! the message id as payload. hnsw_rs cannot delete, so deleted messages are
//! tombstoned (left out of the filter) and never returned. The vectors in
//! sled are the source of truth; the graph is rebuilt from them at start-up.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use hnsw_rs::prelude::{DistCosine, Hnsw};

use super::store::{ConversationId, ConversationStore, StoreError};
use crate::engine::embed::cosine;

const MAX_NB_CONNECTION: usize = 16;
const MAX_LAYER: usize = 16;
const EF_CONSTRUCTION: usize = 200;

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
}

pub struct VectorIndex {
    dim: usize,
    graph: Hnsw<'static, f32, DistCosine>,
    live: RwLock<Live>,
}

impl VectorIndex {
    pub fn new(dim: usize, expected: usize) -> Self {
        Self {
            dim,
            graph: Hnsw::new(MAX_NB_CONNECTION, expected.max(1024), MAX_LAYER, EF_CONSTRUCTION, DistCosine {}),
            live: RwLock::new(Live::default()),
        }
    }

    /// Rebuilds the index from every vector in the store.
    pub fn rebuild(store: &ConversationStore, dim: usize) -> Result<Self, StoreError> {
        let namespaces: HashMap<ConversationId, String> =
            store.list_conversations()?.into_iter().map(|c| (c.id, c.namespace)).collect();
        let index = Self::new(dim, 1024);
        for record in store.vectors() {
            let (id, conv, vector) = record?;
            let ns = namespaces.get(&conv).cloned().unwrap_or_default();
            if vector.len() == dim {
                index.insert(id, conv, &ns, vector);
            }
        }
        Ok(index)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.live.read().expect("index lock").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds one vector. Vectors of the wrong dimension are refused (hnsw_rs would panic).
    pub fn insert(&self, id: u64, conversation_id: ConversationId, namespace: &str, vector: Vec<f32>) -> bool {
        if vector.len() != self.dim {
            return false;
        }
        self.graph.insert((&vector, id as usize));
        let mut live = self.live.write().expect("index lock");
        live.namespaces.entry(conversation_id).or_insert_with(|| namespace.to_string());
        live.entries.insert(id, Entry { conversation_id, vector });
        true
    }

    /// Tombstones a conversation's messages.
    pub fn remove_conversation(&self, conversation_id: &ConversationId, ids: &[u64]) {
        let mut live = self.live.write().expect("index lock");
        for id in ids {
            live.entries.remove(id);
        }
        live.namespaces.remove(conversation_id);
    }

    /// The `k` most similar live messages in `scope`, leaving out `exclude`.
    /// HNSW answers first; if the filter leaves it short of `k` hits, an exact
    /// scan of the scope fills in (small scopes, heavy filtering).
    pub fn search(&self, query: &[f32], k: usize, scope: &Scope, exclude: &HashSet<u64>) -> Vec<Hit> {
        if query.len() != self.dim || k == 0 {
            return Vec::new();
        }
        let live = self.live.read().expect("index lock");
        let in_scope = |id: u64| -> Option<&Entry> {
            let e = live.entries.get(&id)?;
            if exclude.contains(&id) {
                return None;
            }
            let ok = match scope {
                Scope::Conversation(c) => e.conversation_id == *c,
                Scope::Namespace(ns) => live.namespaces.get(&e.conversation_id) == Some(ns),
            };
            ok.then_some(e)
        };
        let filter = |id: &usize| in_scope(*id as u64).is_some();
        let ef = (k * 8).max(64);
        let mut hits: Vec<Hit> = self
            .graph
            .search_filter(query, k, ef, Some(&filter))
            .into_iter()
            .filter_map(|n| {
                let e = in_scope(n.d_id as u64)?;
                Some(Hit { id: n.d_id as u64, conversation_id: e.conversation_id, score: 1.0 - n.distance })
            })
            .collect();
        if hits.len() < k {
            hits = live
                .entries
                .keys()
                .filter_map(|id| {
                    let e = in_scope(*id)?;
                    Some(Hit { id: *id, conversation_id: e.conversation_id, score: cosine(query, &e.vector) })
                })
                .collect();
            hits.sort_by(|a, b| b.score.total_cmp(&a.score));
            hits.truncate(k);
        }
        hits
    }

    /// Exact top-k over everything live (the reference for recall measurements).
    pub fn exact(&self, query: &[f32], k: usize) -> Vec<Hit> {
        let live = self.live.read().expect("index lock");
        let mut hits: Vec<Hit> = live
            .entries
            .iter()
            .map(|(id, e)| Hit { id: *id, conversation_id: e.conversation_id, score: cosine(query, &e.vector) })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(k);
        hits
    }

    /// Plain HNSW top-k without a filter (for benchmarks).
    pub fn approximate(&self, query: &[f32], k: usize, ef: usize) -> Vec<u64> {
        self.graph.search(query, k, ef).into_iter().map(|n| n.d_id as u64).collect()
    }
}
