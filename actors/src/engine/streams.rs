//! Which KV stream holds each slot's sequence. A local instance keeps one KV
//! stream per slot, and llama.cpp decodes together only sequences whose ids
//! (streams) follow each other: each gap between the sequences of a step
//! costs one more pass over the weights. The pool places a new request next
//! to the busy streams; a sequence whose reader stopped is left out of the
//! batch, so when it sits between busy ones the batcher moves it to the edge
//! (its KV trades places with an edge sequence's), and the slot keeps its
//! number: the map below says where its stream went.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A sequence paused this long is moved out from between busy ones: a
/// reader that only hesitates is not worth copying KV caches for.
pub const MOVE_PAUSED_AFTER: Duration = Duration::from_millis(250);

/// Slot → KV stream (llama.cpp sequence id), shared by the instance's loop
/// (which moves sequences) and the pool (which places new ones).
#[derive(Debug)]
pub struct SlotStreams(Box<[AtomicUsize]>);

impl SlotStreams {
    /// Slot i in stream i.
    pub fn new(slots: usize) -> Self {
        Self((0..slots).map(AtomicUsize::new).collect())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The stream slot `slot`'s sequence lives in.
    pub fn of(&self, slot: usize) -> usize {
        self.0[slot].load(Ordering::Relaxed)
    }

    /// Slots `a` and `b` trade streams (their caches were traded).
    pub fn swap(&self, a: usize, b: usize) {
        let (sa, sb) = (self.of(a), self.of(b));
        self.0[a].store(sb, Ordering::Relaxed);
        self.0[b].store(sa, Ordering::Relaxed);
    }
}

/// What a slot does this step, as far as its stream's place matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Free, or paused for less than [`MOVE_PAUSED_AFTER`].
    Other,
    /// In this step's batch.
    Decoding,
    /// Left out of the batch for a while: its reader has no room.
    Paused,
}

/// How many passes over the weights a batch of sequences in these streams
/// costs: one per run of neighbouring streams.
pub fn passes(streams: impl IntoIterator<Item = usize>) -> usize {
    let mut ids: Vec<usize> = streams.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    ids.windows(2).filter(|w| w[1] != w[0] + 1).count() + usize::from(!ids.is_empty())
}

/// A paused slot whose stream lies between decoding ones, and the decoding
/// slot at the edge it should trade streams with (of the two edges, the one
/// with the smaller cache to copy); none when no paused sequence splits the
/// batch. `uses(i)` and `cost(i)` describe slot i of `streams`.
pub fn move_out(
    streams: &SlotStreams,
    uses: impl Fn(usize) -> Use,
    cost: impl Fn(usize) -> usize,
) -> Option<(usize, usize)> {
    let decoding = || (0..streams.len()).filter(|&i| uses(i) == Use::Decoding);
    let low = decoding().min_by_key(|&i| streams.of(i))?;
    let high = decoding().max_by_key(|&i| streams.of(i))?;
    let (lo, hi) = (streams.of(low), streams.of(high));
    let paused = (0..streams.len()).find(|&i| uses(i) == Use::Paused && lo < streams.of(i) && streams.of(i) < hi)?;
    Some((paused, if cost(low) < cost(high) { low } else { high }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies `move_out` until it has nothing to move, as the batcher does.
    fn settle(streams: &SlotStreams, uses: &[Use], cost: &[usize]) -> usize {
        let mut moves = 0;
        while let Some((p, e)) = move_out(streams, |i| uses[i], |i| cost[i]) {
            streams.swap(p, e);
            moves += 1;
            assert!(moves <= uses.len(), "moves end");
        }
        moves
    }

    fn batch_passes(streams: &SlotStreams, uses: &[Use]) -> usize {
        passes((0..uses.len()).filter(|&i| uses[i] == Use::Decoding).map(|i| streams.of(i)))
    }

    #[test]
    fn a_gap_between_streams_is_one_more_pass() {
        assert_eq!(passes([]), 0);
        assert_eq!(passes([2]), 1);
        assert_eq!(passes([0, 1, 2, 3]), 1);
        assert_eq!(passes([3, 0, 1]), 2);
        assert_eq!(passes([0, 2, 4, 6]), 4);
    }

    #[test]
    fn a_paused_sequence_between_busy_ones_moves_to_the_edge() {
        use Use::*;
        let streams = SlotStreams::new(4);
        let uses = [Decoding, Paused, Decoding, Decoding];
        let cost = [10, 4000, 10, 12];
        assert_eq!(batch_passes(&streams, &uses), 2);
        assert_eq!(settle(&streams, &uses, &cost), 1);
        assert_eq!(batch_passes(&streams, &uses), 1, "one pass once it moved");
        // It traded places with the cheaper edge (slot 0, 10 tokens), and
        // each slot still names its own stream.
        assert_eq!((streams.of(0), streams.of(1)), (1, 0));
        let mut seen: Vec<usize> = (0..4).map(|i| streams.of(i)).collect();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3]);
    }

    #[test]
    fn paused_ones_at_the_edges_or_free_slots_move_nothing() {
        use Use::*;
        let streams = SlotStreams::new(6);
        let cost = [1; 6];
        assert_eq!(move_out(&streams, |i| [Paused, Decoding, Decoding, Paused, Other, Other][i], |i| cost[i]), None);
        assert_eq!(move_out(&streams, |i| [Decoding, Other, Decoding, Other, Other, Other][i], |i| cost[i]), None);
        assert_eq!(move_out(&streams, |i| [Paused, Paused, Other, Other, Other, Other][i], |i| cost[i]), None);
    }

    #[test]
    fn several_paused_ones_all_leave_the_batch_in_one_run() {
        use Use::*;
        let streams = SlotStreams::new(8);
        let uses = [Decoding, Paused, Decoding, Paused, Decoding, Paused, Decoding, Other];
        let cost = [5, 900, 6, 800, 7, 700, 8, 0];
        assert_eq!(batch_passes(&streams, &uses), 4);
        assert!(settle(&streams, &uses, &cost) <= 3);
        assert_eq!(batch_passes(&streams, &uses), 1);
    }
}
