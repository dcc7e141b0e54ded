//! What each sequence slot of a context holds in the shared (unified) KV
//! buffer, and where a new prompt's prefix can be found: in its own slot, or
//! copied from another slot that holds a longer one (a shared system prompt,
//! a conversation moved between slots).

use llama_cpp_2::token::LlamaToken;

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

/// Length of the common prefix of two token lists.
pub fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Fewer extra tokens than this are decoded rather than copied.
const MIN_COPY_GAIN: usize = 16;

/// The other slot whose cache shares a longer prefix with `prompt` than
/// slot `target`'s own, and the length to copy (at most `prompt.len() - 1`:
/// the last prompt token is always decoded); none when copying gains little.
pub fn copy_source(slots: &[&[LlamaToken]], target: usize, prompt: &[LlamaToken]) -> Option<(usize, usize)> {
    let limit = prompt.len().saturating_sub(1);
    let own = common_prefix(slots[target], prompt).min(limit);
    let (src, len) = slots
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != target)
        .map(|(i, t)| (i, common_prefix(t, prompt).min(limit)))
        .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))?;
    (len >= own + MIN_COPY_GAIN).then_some((src, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: impl IntoIterator<Item = i32>) -> Vec<LlamaToken> {
        v.into_iter().map(LlamaToken).collect()
    }

    #[test]
    fn a_longer_prefix_in_another_slot_is_copied_a_short_one_is_not() {
        let system = toks(0..40);
        let conv_a: Vec<_> = system.iter().copied().chain(toks(100..130)).collect();
        let empty = Vec::new();
        // Slot 1 holds the shared system prompt and conversation A; slot 0 is empty.
        let slots = [empty.as_slice(), conv_a.as_slice()];
        let prompt_b: Vec<_> = system.iter().copied().chain(toks(200..210)).collect();
        assert_eq!(copy_source(&slots, 0, &prompt_b), Some((1, 40)));
        // A's next turn placed on slot 0 copies all of A.
        let next_a: Vec<_> = conv_a.iter().copied().chain(toks(300..305)).collect();
        assert_eq!(copy_source(&slots, 0, &next_a), Some((1, conv_a.len())));
        // A prompt equal to the cache keeps its last token to decode.
        assert_eq!(copy_source(&slots, 0, &conv_a), Some((1, conv_a.len() - 1)));
        // Too little to gain, or the slot already holds it: no copy.
        assert_eq!(copy_source(&slots, 0, &toks(0..10)), None);
        assert_eq!(copy_source(&slots, 1, &next_a), None);
    }
}
