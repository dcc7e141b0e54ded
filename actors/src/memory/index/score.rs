//! How the index scores: cosine similarity of unit vectors (the dot
//! product, and hnsw_rs's distance built on it), the hit it reports, and
//! keeping the best `k`.

use hnsw_rs::prelude::Distance;

use crate::memory::store::ConversationId;

/// Cosine distance for unit vectors, `1 - a·b`, clamped at 0 (rounding can
/// push a dot product of unit vectors past 1). Every vector is normalised
/// before it reaches the graph. Computed in f32 with eight lanes so that the
/// compiler vectorises it; hnsw_rs's `DistCosine` recomputes both norms in f64
/// on every call and was the bulk of index build time.
#[derive(Clone, Copy, Default)]
pub struct UnitCosine;

impl Distance<f32> for UnitCosine {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// Dot product with eight independent accumulators.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A search hit: message id, its conversation, cosine similarity.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub conversation_id: ConversationId,
    pub score: f32,
}

/// Keeps the `k` best hits, best first.
pub(super) fn top_k(hits: &mut Vec<Hit>, k: usize) {
    if hits.len() > k {
        hits.select_nth_unstable_by(k, |a, b| b.score.total_cmp(&a.score));
        hits.truncate(k);
    }
    hits.sort_by(|a, b| b.score.total_cmp(&a.score));
}
