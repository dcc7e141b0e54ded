//! The key a cache is kept by in every tier (its namespace and its
//! conversation, hashed), and how many deleted keys the tiers remember.

use crate::params::{ChatMessage, Role};

/// Whose cache an entry is: a namespace and a conversation, both hashed.
/// Requests of one namespace never see another namespace's caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CacheKey {
    pub namespace: u64,
    pub conversation: u64,
}

/// A stable 64-bit hash for keys and routing: FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

impl CacheKey {
    /// The key of `conversation` (an id, a header value, a user name) in `namespace` ("" for none).
    pub fn new(namespace: &str, conversation: &[u8]) -> Self {
        Self {
            namespace: if namespace.is_empty() { 0 } else { fnv1a(namespace.as_bytes()) },
            conversation: fnv1a(conversation),
        }
    }

    /// A request that names no conversation: its opening (the messages up
    /// to and including the first user message: the system prompt and the
    /// first question stay the same for a whole conversation) stands for it.
    pub fn of_messages(namespace: &str, messages: &[ChatMessage]) -> Self {
        let opening = messages.iter().position(|m| m.role == Role::User).map_or(messages.len(), |i| i + 1);
        let mut bytes = Vec::new();
        for m in &messages[..opening] {
            bytes.extend_from_slice(m.role.as_str().as_bytes());
            bytes.push(0);
            bytes.extend_from_slice(m.content.as_bytes());
            bytes.push(0);
        }
        Self::new(namespace, &bytes)
    }

    /// The pool's routing key: prefer the slot that served this key last.
    pub fn affinity(&self) -> u64 {
        self.conversation ^ self.namespace.rotate_left(32)
    }
}

/// Deleted conversations remembered (ids are never reused; the set is only
/// a guard against a slot parking a conversation deleted moments before).
pub(super) const MAX_DELETED: usize = 65_536;
