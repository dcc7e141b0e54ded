//! What each sequence slot of a context holds in its KV cache, for which
//! conversation, and where a new prompt's prefix can be found: in its own
//! slot, in another slot of the same namespace, or in the conversation's own
//! parked cache (memory or disk tier, [`super::kv_tiers`]).

use llama_cpp_2::token::LlamaToken;

use super::kv_tiers::{CacheKey, Tier};

/// The tokens whose KV entries a slot's sequence holds, in order, and whose they are.
#[derive(Debug, Default)]
pub struct SlotCache {
    pub tokens: Vec<LlamaToken>,
    /// The conversation (and namespace) whose tokens these are.
    pub key: CacheKey,
}

impl SlotCache {
    pub fn common_prefix(&self, prompt: &[LlamaToken]) -> usize {
        common_prefix(&self.tokens, prompt)
    }
}

/// Length of the common prefix of two token lists.
pub fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Fewer extra tokens than this are decoded rather than restored.
const MIN_RESTORE_GAIN: usize = 16;

/// A place a prompt's prefix can be restored from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Another slot of the instance (same namespace).
    Slot(usize),
    /// The conversation's parked cache (memory, or read from disk).
    Parked,
}

impl Source {
    pub fn tier(self, parked: Tier) -> Tier {
        match self {
            Source::Slot(_) => Tier::Slot,
            Source::Parked => parked,
        }
    }
}

/// Where to restore `prompt`'s prefix from into slot `target`: the other
/// slot of the same namespace, or the conversation's parked cache
/// (`parked`: its tokens), that shares the longest prefix with `prompt`, and
/// that length (at most `prompt.len() - 1`: the last prompt token is always
/// decoded). None when the slot's own cache is as good or restoring gains little.
pub fn restore_source(
    slots: &[(&[LlamaToken], CacheKey)],
    target: usize,
    namespace: u64,
    parked: Option<&[LlamaToken]>,
    prompt: &[LlamaToken],
) -> Option<(Source, usize)> {
    let limit = prompt.len().saturating_sub(1);
    let own = match slots[target].1.namespace == namespace {
        true => common_prefix(slots[target].0, prompt).min(limit),
        false => 0,
    };
    let from_slots = slots
        .iter()
        .enumerate()
        .filter(|(i, (tokens, key))| *i != target && key.namespace == namespace && !tokens.is_empty())
        .map(|(i, (t, _))| (Source::Slot(i), common_prefix(t, prompt).min(limit)));
    let from_parked = parked.map(|t| (Source::Parked, common_prefix(t, prompt).min(limit)));
    let (src, len) = from_slots.chain(from_parked).max_by_key(|&(src, n)| {
        // Ties: the parked cache (no slot copy), then the lowest slot.
        let rank = match src {
            Source::Parked => usize::MAX,
            Source::Slot(i) => usize::MAX - 1 - i,
        };
        (n, rank)
    })?;
    (len >= own + MIN_RESTORE_GAIN).then_some((src, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: impl IntoIterator<Item = i32>) -> Vec<LlamaToken> {
        v.into_iter().map(LlamaToken).collect()
    }

    const NS: u64 = 5;

    fn key(c: u64) -> CacheKey {
        CacheKey { namespace: NS, conversation: c }
    }

    #[test]
    fn a_longer_prefix_in_another_cache_is_restored_a_short_one_is_not() {
        let system = toks(0..40);
        let conv_a: Vec<_> = system.iter().copied().chain(toks(100..130)).collect();
        let empty = Vec::new();
        // Slot 1 holds the shared system prompt and conversation A; slot 0 is empty.
        let slots = [(empty.as_slice(), key(0)), (conv_a.as_slice(), key(1))];
        let prompt_b: Vec<_> = system.iter().copied().chain(toks(200..210)).collect();
        assert_eq!(restore_source(&slots, 0, NS, None, &prompt_b), Some((Source::Slot(1), 40)));
        // A's next turn placed on slot 0 copies all of A.
        let next_a: Vec<_> = conv_a.iter().copied().chain(toks(300..305)).collect();
        assert_eq!(restore_source(&slots, 0, NS, None, &next_a), Some((Source::Slot(1), conv_a.len())));
        // A prompt equal to the cache keeps its last token to decode.
        assert_eq!(restore_source(&slots, 0, NS, None, &conv_a), Some((Source::Slot(1), conv_a.len() - 1)));
        // Too little to gain, or the slot already holds it: no copy.
        assert_eq!(restore_source(&slots, 0, NS, None, &toks(0..10)), None);
        assert_eq!(restore_source(&slots, 1, NS, None, &next_a), None);
        // The conversation's parked cache wins over a shorter slot prefix.
        assert_eq!(restore_source(&slots, 0, NS, Some(&conv_a), &next_a), Some((Source::Parked, conv_a.len())));
    }

    #[test]
    fn another_namespace_is_never_a_source_not_even_the_slots_own_cache() {
        let conv_a: Vec<_> = toks(0..80);
        let empty = Vec::new();
        let other = CacheKey { namespace: NS + 1, conversation: 1 };
        let slots = [(empty.as_slice(), key(0)), (conv_a.as_slice(), other)];
        let prompt: Vec<_> = conv_a.iter().copied().chain(toks(500..510)).collect();
        assert_eq!(restore_source(&slots, 0, NS, None, &prompt), None);
        // The slot itself held the other namespace's text: nothing is kept either.
        let slots = [(conv_a.as_slice(), other)];
        assert_eq!(restore_source(&slots, 0, NS, None, &prompt), None);
    }
}
