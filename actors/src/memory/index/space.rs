//! One namespace's index and its search: slots (the graph's data ids, one
//! per message), their vectors in a flat matrix while the namespace is small
//! or in an HNSW graph past `graph_from`, twins (a vector near-identical to
//! a graph point hangs on that point instead of joining the graph),
//! tombstones for deletions. Building, loading and saving graphs is
//! `namespaces.rs`'s; the files are `persist.rs`'s.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use hnsw_rs::prelude::Hnsw;

use super::score::{dot, top_k, Hit, UnitCosine};
use crate::engine::embed::normalize;
use crate::memory::store::ConversationId;

/// Most slots a search may leave out and still run unfiltered.
const UNFILTERED_SLACK: usize = 64;
/// Cosine similarity from which a vector is a twin of the graph point it
/// is nearest to (the same message repeated, up to a word): it hangs on
/// that point instead of joining the graph. HNSW links near-identical points
/// only to each other, so a cluster of repeats became an island that
/// searches from elsewhere never reached; as one point with twins it is
/// reached like any other.
const TWIN_SCORE: f32 = 0.98;
/// Candidates of the search that looks for a vector's twin.
const TWIN_EF: usize = 16;
/// Most twins of one found point scored by a search (a message repeated
/// thousands of times is found through any of its copies).
const TWIN_SCAN: usize = 512;

#[derive(Clone, Copy)]
pub(super) struct Slot {
    pub(super) id: u64,
    pub(super) conv: ConversationId,
    pub(super) alive: bool,
}

pub(super) type Graph = Hnsw<'static, f32, UnitCosine>;

/// One namespace's index: slots (graph data ids) and where their vectors are.
#[derive(Default)]
pub(super) struct NsIndex {
    pub(super) slots: Vec<Slot>,
    pub(super) by_id: HashMap<u64, u32>,
    pub(super) by_conv: HashMap<ConversationId, Vec<u32>>,
    pub(super) live: usize,
    pub(super) dead: usize,
    /// The vectors of every slot, row by row, while there is no graph.
    pub(super) flat: Vec<f32>,
    pub(super) graph: Option<Arc<Graph>>,
    /// A build in progress: vectors added meanwhile, to add to the new graph.
    pub(super) building: Option<Vec<(u32, Vec<f32>)>>,
    /// Vectors added to the graph since it was last saved.
    pub(super) unsaved: usize,
    /// Graph point → the slots that are its twins (near-identical vectors,
    /// not graph points themselves; [`TWIN_SCORE`]).
    pub(super) twins: HashMap<u32, Vec<u32>>,
    /// Each twin's own vector, to score it exactly.
    pub(super) twin_vecs: HashMap<u32, Vec<f32>>,
}

/// Adds `vector` as slot `slot` to `graph`, or finds the graph point it is a
/// twin of and returns it (the caller records the twin).
pub(super) fn place(graph: &Graph, slot: u32, vector: &[f32]) -> Option<u32> {
    if graph.get_nb_point() > 0 {
        let nearest = graph.search(vector, 1, TWIN_EF);
        if let Some(n) = nearest.first().filter(|n| 1.0 - n.distance >= TWIN_SCORE) {
            return Some(n.d_id as u32);
        }
    }
    graph.insert((vector, slot as usize));
    None
}

impl NsIndex {
    pub(super) fn add_twin(&mut self, rep: u32, slot: u32, vector: Vec<f32>) {
        self.twins.entry(rep).or_default().push(slot);
        self.twin_vecs.insert(slot, vector);
    }

    /// For each slot, the graph point it is a twin of (`u32::MAX`: none), for saving.
    pub(super) fn reps(&self) -> Vec<u32> {
        let mut reps = vec![u32::MAX; self.slots.len()];
        for (rep, twins) in &self.twins {
            for t in twins {
                reps[*t as usize] = *rep;
            }
        }
        reps
    }

    pub(super) fn wants_build(&self, graph_from: usize) -> bool {
        if self.building.is_some() {
            return false;
        }
        match &self.graph {
            None => self.live >= graph_from,
            // Compaction: tombstones are a fifth of the graph.
            Some(_) => self.dead * 5 >= self.slots.len() && self.dead > 0,
        }
    }

    /// Drops dead rows of a namespace without a graph.
    pub(super) fn compact_flat(&mut self, dim: usize) {
        if self.dead == 0 {
            return;
        }
        let mut slots = Vec::with_capacity(self.live);
        let mut flat = Vec::with_capacity(self.live * dim);
        for (s, v) in self.slots.iter().zip(self.flat.chunks_exact(dim)) {
            if s.alive {
                slots.push(*s);
                flat.extend_from_slice(v);
            }
        }
        self.by_id = slots.iter().enumerate().map(|(i, s)| (s.id, i as u32)).collect();
        self.by_conv.clear();
        for (i, s) in slots.iter().enumerate() {
            self.by_conv.entry(s.conv).or_default().push(i as u32);
        }
        self.slots = slots;
        self.flat = flat;
        self.dead = 0;
    }

    /// The `k` best live hits with `ef` candidates, leaving out `exclude`;
    /// `query` must have unit length.
    pub(super) fn search(&self, query: &[f32], k: usize, exclude: &HashSet<u64>, ef: usize, dim: usize) -> Vec<Hit> {
        let wanted = |slot: usize| -> Option<&Slot> {
            let s = self.slots.get(slot)?;
            (s.alive && !exclude.contains(&s.id)).then_some(s)
        };
        match &self.graph {
            Some(graph) => {
                // A graph point found, and its twins (scored exactly, up to
                // TWIN_SCAN of them), left out or not.
                let hits = |found: Vec<hnsw_rs::prelude::Neighbour>, want: usize| -> Vec<Hit> {
                    let mut out = Vec::with_capacity(found.len());
                    for n in found {
                        if let Some(s) = wanted(n.d_id) {
                            out.push(Hit { id: s.id, conversation_id: s.conv, score: 1.0 - n.distance });
                        }
                        let Some(twins) = self.twins.get(&(n.d_id as u32)) else { continue };
                        let live =
                            twins.iter().filter_map(|t| Some((wanted(*t as usize)?, *t))).take(TWIN_SCAN.max(want));
                        for (s, t) in live {
                            let score = self.twin_vecs.get(&t).map_or(0.0, |v| dot(query, v));
                            out.push(Hit { id: s.id, conversation_id: s.conv, score });
                        }
                    }
                    top_k(&mut out, want);
                    out
                };
                let ef = ef.max(k);
                // hnsw_rs never ends a filtered search early (it walks every
                // candidate left), so while few slots are left out (the
                // recent window, tombstones) the search runs unfiltered for
                // that many more hits, which are left out afterwards.
                let slack = exclude.len() + self.dead;
                if slack <= UNFILTERED_SLACK {
                    let want = k + slack;
                    let mut found = hits(graph.search(query, want, ef.max(want)), want);
                    if found.len() >= k.min(self.live) {
                        found.truncate(k);
                        return found;
                    }
                }
                // A point left out still leads to its twins that are not.
                let filter = |slot: &usize| {
                    wanted(*slot).is_some()
                        || self
                            .twins
                            .get(&(*slot as u32))
                            .is_some_and(|t| t.iter().any(|t| wanted(*t as usize).is_some()))
                };
                let mut found = hits(graph.search_filter(query, k, ef, Some(&filter)), k);
                found.truncate(k);
                found
            }
            None => {
                let mut hits: Vec<Hit> = self
                    .flat
                    .chunks_exact(dim)
                    .enumerate()
                    .filter_map(|(i, v)| {
                        let s = wanted(i)?;
                        Some(Hit { id: s.id, conversation_id: s.conv, score: dot(query, v) })
                    })
                    .collect();
                top_k(&mut hits, k);
                hits
            }
        }
    }

    /// Exact top-k, whatever holds the vectors, leaving out `exclude`.
    pub(super) fn search_exact(&self, query: &[f32], k: usize, exclude: &HashSet<u64>, dim: usize) -> Vec<Hit> {
        let query = normalize(query);
        let wanted = |s: &&Slot| s.alive && !exclude.contains(&s.id);
        let mut hits: Vec<Hit> = match &self.graph {
            Some(graph) if graph.get_nb_point() > 0 => graph
                .get_point_indexation()
                .into_iter()
                .filter_map(|p| {
                    let s = self.slots.get(p.get_origin_id()).filter(wanted)?;
                    Some(Hit { id: s.id, conversation_id: s.conv, score: dot(&query, p.get_v()) })
                })
                .chain(self.twin_vecs.iter().filter_map(|(t, v)| {
                    let s = self.slots.get(*t as usize).filter(wanted)?;
                    Some(Hit { id: s.id, conversation_id: s.conv, score: dot(&query, v) })
                }))
                .collect(),
            Some(_) => Vec::new(),
            None => self
                .flat
                .chunks_exact(dim)
                .zip(&self.slots)
                .filter(|(_, s)| wanted(s))
                .map(|(v, s)| Hit { id: s.id, conversation_id: s.conv, score: dot(&query, v) })
                .collect(),
        };
        top_k(&mut hits, k);
        hits
    }
}
