//! The per-conversation part of the vector index: each conversation's
//! vectors as one contiguous matrix, in a cache bounded by vector count
//! (least recently used conversation out first), loaded from the store on
//! first use and scored exactly.

use lru::LruCache;

use super::VectorIndex;
use crate::engine::embed::normalize;
use crate::memory::store::ConversationId;

/// One conversation's vectors, contiguous.
pub(super) struct ConvVectors {
    pub(super) ids: Vec<u64>,
    pub(super) data: Vec<f32>,
    /// Messages of the conversation accounted for: the store's count at load,
    /// plus every message added since. A turn reloads the entry when the
    /// store holds more (another replica wrote to it).
    pub(super) seen: usize,
}

pub(super) struct ConvCache {
    pub(super) lru: LruCache<ConversationId, ConvVectors>,
    pub(super) vectors: usize,
}

impl VectorIndex {
    /// Messages of `conv` the cache accounts for, or none when it is not cached.
    pub fn conversation_seen(&self, conv: &ConversationId) -> Option<usize> {
        self.convs.lock().unwrap_or_else(|e| e.into_inner()).lru.get(conv).map(|c| c.seen)
    }

    /// Caches a conversation's vectors as read from the store, of its
    /// `seen` stored messages (replacing what was cached).
    pub fn load_conversation(&self, conv: ConversationId, seen: usize, vectors: Vec<(u64, Vec<f32>)>) {
        let mut entry = ConvVectors { ids: Vec::with_capacity(vectors.len()), data: Vec::new(), seen };
        entry.data.reserve(vectors.len() * self.dim);
        for (id, v) in vectors.into_iter().filter(|(_, v)| v.len() == self.dim) {
            entry.ids.push(id);
            entry.data.extend(normalize(&v));
        }
        let mut cache = self.convs.lock().unwrap_or_else(|e| e.into_inner());
        cache.vectors += entry.ids.len();
        if let Some(old) = cache.lru.put(conv, entry) {
            cache.vectors -= old.ids.len();
        }
        self.evict(&mut cache);
    }

    /// Caches a new conversation (nothing stored yet).
    pub fn start_conversation(&self, conv: ConversationId) {
        self.load_conversation(conv, 0, Vec::new());
    }

    /// Evicts least recently used conversations past the bound (the one just
    /// used is the most recent, so it goes last).
    pub(super) fn evict(&self, cache: &mut ConvCache) {
        while cache.vectors > self.opts.cache_vectors && cache.lru.len() > 1 {
            let Some((_, old)) = cache.lru.pop_lru() else { break };
            cache.vectors -= old.ids.len();
        }
    }
}
