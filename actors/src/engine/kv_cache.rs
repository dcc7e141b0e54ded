//! The conversations one instance keeps in its KV cache: a few sequences share
//! the context's one unified KV buffer, and each remembers the tokens it
//! holds. A request takes the sequence whose tokens share the longest prefix
//! with its prompt (as llama-server's slots do), or else the least recently
//! used one; when the buffer is full, other sequences are evicted, oldest first.

use llama_cpp_2::token::LlamaToken;

/// Sequences that keep conversations' caches (ids 0..CACHED_SEQUENCES).
pub const CACHED_SEQUENCES: usize = 4;
/// The health probe's own sequence: it never touches a cached one.
pub const SCRATCH_SEQ: i32 = CACHED_SEQUENCES as i32;
/// Sequences the context is created with.
pub const N_SEQ_MAX: u32 = CACHED_SEQUENCES as u32 + 1;

#[derive(Debug, Default)]
struct Cached {
    tokens: Vec<LlamaToken>,
    last_used: u64,
}

/// What each cached sequence of a context holds.
#[derive(Debug)]
pub struct SeqCaches {
    seqs: Vec<Cached>,
    clock: u64,
}

impl Default for SeqCaches {
    fn default() -> Self {
        Self { seqs: (0..CACHED_SEQUENCES).map(|_| Cached::default()).collect(), clock: 0 }
    }
}

/// Length of the common prefix of two token lists.
pub fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl SeqCaches {
    /// The sequence for `prompt` and how many of its cached tokens stay: the
    /// one sharing the longest prefix when the prompt continues it (keeps at
    /// least half of what it holds), else an empty or the least recently used
    /// one, so that a new conversation does not wipe another's cache for the
    /// sake of a shared system prompt.
    pub fn choose(&self, prompt: &[LlamaToken]) -> (usize, usize) {
        let shared = |i: usize| common_prefix(&self.seqs[i].tokens, prompt);
        let best = (0..self.seqs.len()).max_by_key(|&i| (shared(i), self.seqs[i].last_used)).expect("sequences");
        let kept = shared(best);
        if kept > 0 && kept * 2 >= self.seqs[best].tokens.len() {
            return (best, kept);
        }
        let coldest = (0..self.seqs.len())
            .min_by_key(|&i| (!self.seqs[i].tokens.is_empty(), self.seqs[i].last_used))
            .expect("sequences");
        (coldest, shared(coldest))
    }

    /// The tokens sequence `seq` holds; marks it the most recently used.
    pub fn take(&mut self, seq: usize) -> &mut Vec<LlamaToken> {
        self.clock += 1;
        self.seqs[seq].last_used = self.clock;
        &mut self.seqs[seq].tokens
    }

    pub fn tokens(&mut self, seq: usize) -> &mut Vec<LlamaToken> {
        &mut self.seqs[seq].tokens
    }

    /// Forgets the least recently used non-empty sequence other than `keep`
    /// (the caller clears its KV entries); none when there is nothing to evict.
    pub fn evict_other(&mut self, keep: usize) -> Option<usize> {
        let victim = (0..self.seqs.len())
            .filter(|&i| i != keep && !self.seqs[i].tokens.is_empty())
            .min_by_key(|&i| self.seqs[i].last_used)?;
        self.seqs[victim].tokens.clear();
        Some(victim)
    }

    /// Forgets everything (after a failure the whole KV buffer is cleared).
    pub fn clear(&mut self) {
        for s in &mut self.seqs {
            s.tokens.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: &[i32]) -> Vec<LlamaToken> {
        v.iter().map(|&t| LlamaToken(t)).collect()
    }

    #[test]
    fn a_continuation_takes_its_own_sequence_and_a_new_conversation_an_empty_one() {
        let mut c = SeqCaches::default();
        let (s, kept) = c.choose(&toks(&[1, 2, 3]));
        assert_eq!(kept, 0);
        c.take(s).extend(toks(&[1, 2, 3, 4, 5]));
        // The same conversation, one turn later.
        assert_eq!(c.choose(&toks(&[1, 2, 3, 4, 5, 6, 7])), (s, 5));
        // Another conversation sharing only the system prompt [1, 2]: an empty sequence.
        let (other, kept) = c.choose(&toks(&[1, 2, 9, 9, 9, 9, 9]));
        assert_ne!(other, s);
        assert_eq!(kept, 0);
    }

    #[test]
    fn when_all_are_taken_the_least_recently_used_goes() {
        let mut c = SeqCaches::default();
        for i in 0..CACHED_SEQUENCES {
            let (s, _) = c.choose(&toks(&[100 + i as i32]));
            c.take(s).extend(toks(&[100 + i as i32, 1, 1, 1]));
        }
        c.take(2); // sequence 2 used again: sequence 0 is now the oldest
        let (s, kept) = c.choose(&toks(&[7, 7]));
        assert_eq!((s, kept), (0, 0));
        assert_eq!(c.evict_other(1), Some(0));
        assert_eq!(c.evict_other(1), Some(3));
    }
}
