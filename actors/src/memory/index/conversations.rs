//! The per-conversation part of the vector index: each conversation's
//! vectors as one contiguous matrix, in a cache bounded by vector count
//! (least recently used conversation out first), loaded from the store on
//! first use and scored exactly.

use std::collections::HashSet;
use std::num::NonZeroUsize;

use lru::LruCache;

use super::score::{dot, top_k, Hit};
use crate::engine::embed::normalize;
use crate::memory::store::ConversationId;

/// One conversation's vectors, contiguous.
pub(super) struct ConvVectors {
    ids: Vec<u64>,
    data: Vec<f32>,
    /// Messages of the conversation accounted for: the store's count at load,
    /// plus every message added since. A turn reloads the entry when the
    /// store holds more (another replica wrote to it).
    seen: usize,
}

impl ConvVectors {
    /// A conversation's vectors as read from the store, of its `seen` stored
    /// messages; vectors of another dimension are left out.
    pub(super) fn from_store(seen: usize, vectors: Vec<(u64, Vec<f32>)>, dim: usize) -> Self {
        let mut entry = ConvVectors { ids: Vec::with_capacity(vectors.len()), data: Vec::new(), seen };
        entry.data.reserve(vectors.len() * dim);
        for (id, v) in vectors.into_iter().filter(|(_, v)| v.len() == dim) {
            entry.ids.push(id);
            entry.data.extend(normalize(&v));
        }
        entry
    }
}

pub(super) struct ConvCache {
    lru: LruCache<ConversationId, ConvVectors>,
    vectors: usize,
    /// Most vectors held (the last conversation used is kept whatever its size).
    limit: usize,
}

impl ConvCache {
    /// At most `conversations` conversations and `vectors` vectors.
    pub(super) fn new(conversations: usize, vectors: usize) -> Self {
        let cap = NonZeroUsize::new(conversations.max(1)).expect("non-zero");
        ConvCache { lru: LruCache::new(cap), vectors: 0, limit: vectors }
    }

    /// Conversations cached.
    pub(super) fn conversations(&self) -> usize {
        self.lru.len()
    }

    /// Vectors cached.
    pub(super) fn vectors(&self) -> usize {
        self.vectors
    }

    /// Messages of `conv` the cache accounts for, or none when it is not cached.
    pub(super) fn seen(&mut self, conv: &ConversationId) -> Option<usize> {
        self.lru.get(conv).map(|c| c.seen)
    }

    /// Caches a conversation's vectors (replacing what was cached).
    pub(super) fn put(&mut self, conv: ConversationId, entry: ConvVectors) {
        self.vectors += entry.ids.len();
        if let Some(old) = self.lru.put(conv, entry) {
            self.vectors -= old.ids.len();
        }
        self.evict();
    }

    /// Adds one message's unit vector to its conversation, if cached.
    pub(super) fn add(&mut self, conv: &ConversationId, id: u64, vector: &[f32]) {
        if let Some(entry) = self.lru.get_mut(conv) {
            if !entry.ids.contains(&id) {
                entry.ids.push(id);
                entry.data.extend_from_slice(vector);
                entry.seen += 1;
                self.vectors += 1;
                self.evict();
            }
        }
    }

    /// Forgets a conversation.
    pub(super) fn remove(&mut self, conv: &ConversationId) {
        if let Some(old) = self.lru.pop(conv) {
            self.vectors -= old.ids.len();
        }
    }

    /// Exact top-k over a cached conversation, leaving out `exclude`;
    /// `query` must have unit length. None when it is not cached.
    pub(super) fn search(
        &mut self,
        query: &[f32],
        k: usize,
        c: &ConversationId,
        exclude: &HashSet<u64>,
        dim: usize,
    ) -> Option<Vec<Hit>> {
        let entry = self.lru.get(c)?;
        let mut hits: Vec<Hit> = entry
            .ids
            .iter()
            .zip(entry.data.chunks_exact(dim))
            .filter(|(id, _)| !exclude.contains(id))
            .map(|(id, v)| Hit { id: *id, conversation_id: *c, score: dot(query, v) })
            .collect();
        top_k(&mut hits, k);
        Some(hits)
    }

    /// Evicts least recently used conversations past the bound (the one just
    /// used is the most recent, so it goes last).
    fn evict(&mut self) {
        while self.vectors > self.limit && self.lru.len() > 1 {
            let Some((_, old)) = self.lru.pop_lru() else { break };
            self.vectors -= old.ids.len();
        }
    }
}
