//! Recall: the earlier messages a turn's message brings back by meaning,
//! within its conversation or its namespace, with the index kept up to date
//! from the store (another replica's writes, vectors that never came).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::chat::turn::{ChatCore, StoreClock};
use crate::chat::types::ChatError;
use crate::memory::index::{Hit, Scope};
use crate::memory::prompt_builder::Recalled;
use crate::memory::store::{Conversation, ConversationId, StoredMessage};
use crate::memory::Priority;

/// Candidates searched per recalled message wanted.
const RECALL_CANDIDATES: usize = 3;

/// Cosine similarity from which a stored message counts as the query
/// itself (the same question asked again, up to case and punctuation).
const ECHO_SCORE: f32 = 0.97;

/// A message's text for spotting repeats: lower case, words only.
fn normalized(text: &str) -> String {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `wanted` best of `candidates` (best first; `true`: a message of the
/// asking conversation), where the conversation's own best always keeps a
/// place: with namespace recall, "what did I say about my garden?" is about
/// this conversation, and a namespace of thousands of conversations always
/// holds other messages about gardens that score a little higher. The other
/// places go to the best, whoever's.
fn pick(candidates: Vec<(bool, Recalled)>, wanted: usize) -> Vec<Recalled> {
    let mut keep = vec![false; candidates.len()];
    let mut kept = 0;
    if let Some(i) = candidates.iter().position(|(own, _)| *own).filter(|_| wanted > 0) {
        keep[i] = true;
        kept += 1;
    }
    for k in keep.iter_mut() {
        if kept == wanted {
            break;
        }
        if !*k {
            *k = true;
            kept += 1;
        }
    }
    candidates.into_iter().zip(keep).filter(|(_, k)| *k).map(|((_, r), _)| r).collect()
}

/// Vectors are read again from this long before the last read: a write
/// that was stamped before it but committed after is still found.
const SYNC_OVERLAP_MS: u64 = 2_000;

/// The text a stored message is embedded as: an empty reply (the model
/// stopped at once) still gets a vector, so it is never embedded again.
fn embedded_text(content: &str) -> &str {
    if content.trim().is_empty() {
        "(empty reply)"
    } else {
        content
    }
}

impl ChatCore {
    fn scope(&self, conv: &Conversation) -> Scope {
        if self.opts.cross_conversation {
            Scope::Namespace(conv.namespace.clone())
        } else {
            Scope::Conversation(conv.id)
        }
    }

    /// What memory recalls for `vector` in `conv` now, as a turn would: the
    /// store's count, the recent window left out, the search. Runs in the
    /// conversation's actor, after its earlier turns (their replies'
    /// embeddings included).
    pub(crate) async fn recall_now(
        self: &Arc<Self>,
        conv: &Conversation,
        vector: &[f32],
    ) -> Result<Vec<Recalled>, ChatError> {
        let clock = StoreClock::default();
        let stored = self.store.count(&conv.id).await?;
        let recent = self.recent_window(&conv.id, stored, &clock).await?;
        let exclude: HashSet<u64> = recent.iter().map(|m| m.id).collect();
        self.recall(conv, vector, exclude, stored, &clock).await
    }

    /// Messages related to `vector`, best first, leaving out `exclude`. The
    /// conversation has `stored` messages in the store.
    pub(crate) async fn recall(
        self: &Arc<Self>,
        conv: &Conversation,
        vector: &[f32],
        exclude: HashSet<u64>,
        stored: usize,
        clock: &StoreClock,
    ) -> Result<Vec<Recalled>, ChatError> {
        let scope = self.scope(conv);
        // The conversation's own vectors are checked in both scopes: a
        // message stored without one (its embedding failed) is embedded now.
        if stored > 0 {
            self.ensure_loaded(conv, stored, clock).await?;
        }
        if let Scope::Namespace(ns) = &scope {
            self.sync_namespace(ns, clock).await?;
        }
        // Scoring is CPU work: a blocking thread does it, never an arbiter.
        // More candidates than are kept: echoes and repeats are left out below.
        let (core, query, asking) = (self.clone(), vector.to_vec(), conv.id);
        let wanted = self.opts.recall_k;
        let candidates = wanted.saturating_mul(RECALL_CANDIDATES).saturating_add(2);
        let hits: Vec<Hit> = actix_web::rt::task::spawn_blocking(move || {
            // A conversation evicted since it was loaded has nothing to
            // recall from this turn on, which is rare enough (a cache of
            // 256k vectors) not to load it twice.
            core.index.recall(&query, candidates, &scope, &asking, &exclude)
        })
        .await
        .map_err(|_| ChatError::Internal("searching the memory index panicked".into()))?;
        // An earlier copy of the question itself (users repeat themselves)
        // tells the model nothing: a hit that close to the query is left out.
        let hits: Vec<Hit> =
            hits.into_iter().filter(|h| h.score >= self.opts.recall_min_score && h.score < ECHO_SCORE).collect();
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<(ConversationId, u64)> = hits.iter().map(|h| (h.conversation_id, h.id)).collect();
        let mut found: HashMap<u64, StoredMessage> =
            clock.time(self.store.messages_by_id(&ids)).await?.into_iter().map(|m| (m.id, m)).collect();
        // Best first; a message deleted meanwhile (by another replica) is
        // left out, and so is a repeat of a message already kept.
        let mut seen = HashSet::new();
        let candidates: Vec<(bool, Recalled)> = hits
            .into_iter()
            .filter_map(|h| {
                let m = found.remove(&h.id)?;
                seen.insert(normalized(&m.content)).then(|| {
                    let own = h.conversation_id == conv.id;
                    (own, Recalled { id: m.id, role: m.role, content: m.content, score: h.score })
                })
            })
            .collect();
        Ok(pick(candidates, wanted))
    }

    /// Loads a conversation's vectors from the store into the index's cache
    /// when it is not cached, or holds fewer of its messages than the store's
    /// `stored` (another replica wrote to it). With namespace recall on a
    /// shared store, vectors other replicas wrote join the namespace index too.
    async fn ensure_loaded(
        self: &Arc<Self>,
        conv: &Conversation,
        stored: usize,
        clock: &StoreClock,
    ) -> Result<(), ChatError> {
        if self.index.conversation_seen(&conv.id).is_some_and(|seen| seen >= stored) {
            return Ok(());
        }
        let mut vectors = clock.time(self.store.vectors(Some(&conv.id))).await?;
        if vectors.len() < stored {
            vectors.extend(self.embed_missing(conv, &vectors, stored, clock).await?);
        }
        let (index, conv, shared) = (self.index.clone(), conv.clone(), self.store.shared());
        actix_web::rt::task::spawn_blocking(move || {
            if shared && index.options().namespaces {
                let missing: Vec<_> = vectors
                    .iter()
                    .filter(|(id, _, _)| !index.contains(&conv.namespace, *id))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    tracing::debug!(conversation = %conv.id, loaded = missing.len(), "namespace vectors loaded from the store");
                    index.insert_namespace(missing, &conv.namespace);
                }
            }
            index.load_conversation(conv.id, stored, vectors.into_iter().map(|(id, _, v)| (id, v)).collect());
        })
        .await
        .map_err(|_| ChatError::Internal("loading a conversation's vectors panicked".into()))
    }

    /// With namespace recall on a shared store, adds to the namespace's
    /// index the vectors other replicas stored since this process last looked.
    async fn sync_namespace(self: &Arc<Self>, ns: &str, clock: &StoreClock) -> Result<(), ChatError> {
        if !self.store.shared() {
            return Ok(());
        }
        let last = self.synced.lock().unwrap_or_else(|e| e.into_inner()).get(ns).copied();
        let since = last.unwrap_or(self.opened_at_ms).saturating_sub(SYNC_OVERLAP_MS);
        let (vectors, now) = clock.time(self.store.namespace_vectors_since(ns, since)).await?;
        self.synced.lock().unwrap_or_else(|e| e.into_inner()).insert(ns.to_string(), now);
        let index = self.index.clone();
        let ns = ns.to_string();
        actix_web::rt::task::spawn_blocking(move || {
            let missing: Vec<_> = vectors.into_iter().filter(|(id, _, _)| !index.contains(&ns, *id)).collect();
            if !missing.is_empty() {
                tracing::debug!(namespace = %ns, loaded = missing.len(), "vectors other replicas stored joined the namespace index");
                index.insert_namespace(missing, &ns);
            }
        })
        .await
        .map_err(|_| ChatError::Internal("adding other replicas' vectors panicked".into()))
    }

    /// Embeds and stores the vectors of a conversation's messages that have
    /// none (a reply whose embedding was interrupted by a restart).
    async fn embed_missing(
        &self,
        conv: &Conversation,
        have: &[(u64, ConversationId, Vec<f32>)],
        stored: usize,
        clock: &StoreClock,
    ) -> Result<Vec<(u64, ConversationId, Vec<f32>)>, ChatError> {
        let have: HashSet<u64> = have.iter().map(|(id, _, _)| *id).collect();
        let messages = clock.time(self.store.messages(&conv.id, None, stored)).await?;
        let missing: Vec<StoredMessage> = messages.into_iter().filter(|m| !have.contains(&m.id)).collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        tracing::info!(conversation = %conv.id, messages = missing.len(), "embedding messages stored without a vector");
        let texts = missing.iter().map(|m| embedded_text(&m.content).to_string()).collect();
        let vectors = self.embedder.embed_as(texts, Priority::Interactive).await.map_err(ChatError::Embedding)?;
        let mut out = Vec::with_capacity(missing.len());
        for (m, v) in missing.into_iter().zip(vectors) {
            if clock.time(self.store.set_vector(&conv.id, m.id, &v)).await? {
                out.push((m.id, conv.id, v));
            }
        }
        Ok(out)
    }

    /// Adds a stored message's vector to the index, off the arbiter (a graph
    /// insert is CPU work).
    pub(crate) async fn index_message(self: &Arc<Self>, id: u64, conv: &Conversation, vector: Vec<f32>) {
        let (index, conv_id, ns) = (self.index.clone(), conv.id, conv.namespace.clone());
        let _ = actix_web::rt::task::spawn_blocking(move || index.insert(id, conv_id, &ns, vector)).await;
    }

    /// Embeds a stored message that has no vector yet (a reply, just
    /// answered), stores the vector and indexes it. A failure is logged: the
    /// message then has no vector until its conversation is next loaded
    /// ([`Self::ensure_loaded`] embeds what lacks one).
    pub(crate) async fn embed_stored(self: &Arc<Self>, conv: &Conversation, id: u64, text: &str) {
        let text = embedded_text(text);
        let result = async {
            let vector = self.embedder.embed_one(text).await.map_err(ChatError::Embedding)?;
            if self.store.set_vector(&conv.id, id, &vector).await? {
                self.index_message(id, conv, vector).await;
            }
            Ok::<_, ChatError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(conversation = %conv.id, message = id, error = %e, "a reply's embedding is missing; it is made when the conversation is next loaded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Role;

    fn r(id: u64, score: f32) -> Recalled {
        Recalled { id, role: Role::User, content: id.to_string(), score }
    }

    #[test]
    fn the_asking_conversations_own_best_always_keeps_a_place() {
        // Five better messages of other conversations, then two of its own.
        let candidates: Vec<(bool, Recalled)> = (0..5)
            .map(|i| (false, r(i, 0.9 - i as f32 * 0.01)))
            .chain([(true, r(10, 0.5)), (true, r(11, 0.4))])
            .collect();
        let ids = |v: Vec<Recalled>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(pick(candidates.clone(), 3)), [0, 1, 10], "best first, its own best kept");
        assert_eq!(ids(pick(candidates.clone(), 1)), [10]);
        // Its own already among the best: nothing moves.
        let mixed: Vec<(bool, Recalled)> =
            vec![(false, r(0, 0.9)), (true, r(1, 0.8)), (false, r(2, 0.7)), (true, r(3, 0.6))];
        assert_eq!(ids(pick(mixed, 3)), [0, 1, 2]);
        // None of its own: the best of the rest.
        assert_eq!(ids(pick(candidates[..5].to_vec(), 3)), [0, 1, 2]);
        assert!(pick(candidates, 0).is_empty());
    }
}
