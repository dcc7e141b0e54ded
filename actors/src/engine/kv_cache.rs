//! What each sequence slot of a context holds in its KV cache, the caches
//! parked in host memory when their slot went to another conversation, and
//! where a new prompt's prefix can be found: in its own slot, or restored from
//! another slot or a parked cache that holds a longer one.

use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::SeqState;

/// The tokens whose KV entries a slot's sequence holds, in order.
#[derive(Debug, Default)]
pub struct SlotCache {
    pub tokens: Vec<LlamaToken>,
    /// Step clock of the last request placed here (eviction goes oldest first).
    pub last_used: u64,
}

impl SlotCache {
    pub fn common_prefix(&self, prompt: &[LlamaToken]) -> usize {
        common_prefix(&self.tokens, prompt)
    }
}

/// A sequence's KV state saved to host memory, with the tokens it holds.
pub struct Parked {
    pub tokens: Vec<LlamaToken>,
    pub state: SeqState,
    pub last_used: u64,
}

/// Parked caches, bounded in count and bytes; the least recently used go first.
pub struct ParkedCaches {
    caches: Vec<Parked>,
    max_count: usize,
    max_bytes: usize,
}

impl ParkedCaches {
    pub fn new(max_count: usize, max_bytes: usize) -> Self {
        Self { caches: Vec::new(), max_count, max_bytes }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Parked> {
        self.caches.iter()
    }

    /// Keeps `p`, dropping the least recently used ones beyond the bounds
    /// (and any that holds the same tokens).
    pub fn push(&mut self, p: Parked) {
        if self.max_count == 0 || p.state.byte_len() > self.max_bytes {
            return;
        }
        self.caches.retain(|c| c.tokens != p.tokens);
        self.caches.push(p);
        while self.caches.len() > self.max_count || self.bytes() > self.max_bytes {
            let oldest = (0..self.caches.len()).min_by_key(|&i| self.caches[i].last_used).expect("non-empty");
            self.caches.swap_remove(oldest);
        }
    }

    /// Takes the `i`-th cache out (it goes back into a slot).
    pub fn take(&mut self, i: usize) -> Parked {
        self.caches.remove(i)
    }

    pub fn clear(&mut self) {
        self.caches.clear();
    }

    pub fn bytes(&self) -> usize {
        self.caches.iter().map(|c| c.state.byte_len()).sum()
    }
}

/// Length of the common prefix of two token lists.
pub fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Fewer extra tokens than this are decoded rather than restored.
const MIN_RESTORE_GAIN: usize = 16;

/// The other cache (slots first, then parked ones) that shares a longer
/// prefix with `prompt` than slot `target`'s own, and the length it shares
/// (at most `prompt.len() - 1`: the last prompt token is always decoded);
/// none when restoring it gains little.
pub fn restore_source(slots: &[&[LlamaToken]], target: usize, prompt: &[LlamaToken]) -> Option<(usize, usize)> {
    let limit = prompt.len().saturating_sub(1);
    let own = common_prefix(slots[target], prompt).min(limit);
    let (src, len) = slots
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != target)
        .map(|(i, t)| (i, common_prefix(t, prompt).min(limit)))
        .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))?;
    (len >= own + MIN_RESTORE_GAIN).then_some((src, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: impl IntoIterator<Item = i32>) -> Vec<LlamaToken> {
        v.into_iter().map(LlamaToken).collect()
    }

    #[test]
    fn a_longer_prefix_in_another_cache_is_restored_a_short_one_is_not() {
        let system = toks(0..40);
        let conv_a: Vec<_> = system.iter().copied().chain(toks(100..130)).collect();
        let empty = Vec::new();
        // Slot 1 holds the shared system prompt and conversation A; slot 0 is empty.
        let slots = [empty.as_slice(), conv_a.as_slice()];
        let prompt_b: Vec<_> = system.iter().copied().chain(toks(200..210)).collect();
        assert_eq!(restore_source(&slots, 0, &prompt_b), Some((1, 40)));
        // A's next turn placed on slot 0 copies all of A.
        let next_a: Vec<_> = conv_a.iter().copied().chain(toks(300..305)).collect();
        assert_eq!(restore_source(&slots, 0, &next_a), Some((1, conv_a.len())));
        // A prompt equal to the cache keeps its last token to decode.
        assert_eq!(restore_source(&slots, 0, &conv_a), Some((1, conv_a.len() - 1)));
        // Too little to gain, or the slot already holds it: no copy.
        assert_eq!(restore_source(&slots, 0, &toks(0..10)), None);
        assert_eq!(restore_source(&slots, 1, &next_a), None);
    }
}
