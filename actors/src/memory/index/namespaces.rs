//! The per-namespace part of the vector index (cross-conversation recall):
//! a flat matrix scored exactly while small, an HNSW graph built in the
//! background past `graph_from`, tombstones for deletions and a background
//! rebuild (compaction) when they are a fifth of the graph.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use hnsw_rs::prelude::Hnsw;

use super::{dot, top_k, Hit, UnitCosine, VectorIndex};
use crate::engine::embed::normalize;
use crate::memory::store::ConversationId;

const MAX_NB_CONNECTION: usize = 16;
const MAX_LAYER: usize = 16;
const EF_CONSTRUCTION: usize = 100;
/// Most slots a search may leave out and still run unfiltered.
const UNFILTERED_SLACK: usize = 64;

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
}

impl NsIndex {
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
}

impl VectorIndex {
    /// Whether message `id` is in the namespace index of `namespace`.
    pub fn contains(&self, namespace: &str, id: u64) -> bool {
        self.spaces.read().unwrap_or_else(|e| e.into_inner()).get(namespace).is_some_and(|s| s.by_id.contains_key(&id))
    }

    /// Adds vectors of one namespace to its index (not to the conversation cache).
    pub fn insert_namespace(self: &Arc<Self>, items: Vec<(u64, ConversationId, Vec<f32>)>, namespace: &str) {
        if !self.opts.namespaces {
            return;
        }
        let mut to_graph = Vec::new();
        let graph = {
            let mut spaces = self.spaces.write().unwrap_or_else(|e| e.into_inner());
            let space = spaces.entry(namespace.to_string()).or_default();
            for (id, conv, vector) in items {
                if vector.len() != self.dim || space.by_id.contains_key(&id) {
                    continue;
                }
                let vector = normalize(&vector);
                let slot = space.slots.len() as u32;
                space.slots.push(Slot { id, conv, alive: true });
                space.by_id.insert(id, slot);
                space.by_conv.entry(conv).or_default().push(slot);
                space.live += 1;
                if let Some(pending) = space.building.as_mut() {
                    pending.push((slot, vector.clone()));
                }
                if space.graph.is_some() {
                    to_graph.push((slot, vector));
                } else {
                    space.flat.extend_from_slice(&vector);
                }
            }
            space.graph.clone()
        };
        // Graph inserts take hnsw_rs's own locks, not this index's.
        if let Some(graph) = graph {
            for (slot, vector) in &to_graph {
                graph.insert((vector, *slot as usize));
            }
        }
        self.maybe_build(namespace);
    }

    /// Starts a background graph build for `namespace` when it has grown
    /// past `graph_from` without one, or its graph holds too many tombstones.
    pub(super) fn maybe_build(self: &Arc<Self>, namespace: &str) {
        let snapshot = {
            let mut spaces = self.spaces.write().unwrap_or_else(|e| e.into_inner());
            let Some(space) = spaces.get_mut(namespace) else { return };
            if !space.wants_build(self.opts.graph_from) {
                return;
            }
            let mut live: Vec<(u32, Vec<f32>)> = Vec::with_capacity(space.live);
            match &space.graph {
                None => {
                    for (i, slot) in space.slots.iter().enumerate() {
                        if slot.alive {
                            live.push((i as u32, space.flat[i * self.dim..(i + 1) * self.dim].to_vec()));
                        }
                    }
                }
                Some(graph) if graph.get_nb_point() > 0 => {
                    for point in graph.get_point_indexation() {
                        let slot = point.get_origin_id() as u32;
                        if space.slots[slot as usize].alive {
                            live.push((slot, point.get_v().to_vec()));
                        }
                    }
                }
                Some(_) => {}
            }
            space.building = Some(Vec::new());
            live
        };
        let index = self.clone();
        let name = namespace.to_string();
        let spawned = std::thread::Builder::new().name("index-build".into()).spawn(move || {
            index.build(&name, snapshot);
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start an index build; the namespace stays exact");
            if let Some(space) = self.spaces.write().unwrap_or_else(|e| e.into_inner()).get_mut(namespace) {
                space.building = None;
            }
        }
    }

    /// Builds a graph from `snapshot` (old slot, vector), then swaps it in
    /// with the slots renumbered, adding what was inserted meanwhile.
    fn build(self: &Arc<Self>, namespace: &str, mut snapshot: Vec<(u32, Vec<f32>)>) {
        let started = std::time::Instant::now();
        snapshot.sort_by_key(|(slot, _)| *slot);
        let graph = Graph::new(MAX_NB_CONNECTION, snapshot.len().max(1024), MAX_LAYER, EF_CONSTRUCTION, UnitCosine);
        let refs: Vec<(&Vec<f32>, usize)> = snapshot.iter().enumerate().map(|(new, (_, v))| (v, new)).collect();
        graph.parallel_insert(&refs);
        let mut spaces = self.spaces.write().unwrap_or_else(|e| e.into_inner());
        let Some(space) = spaces.get_mut(namespace) else { return };
        let pending = space.building.take().unwrap_or_default();
        let mut renumber: HashMap<u32, u32> = HashMap::with_capacity(snapshot.len() + pending.len());
        let mut slots = Vec::with_capacity(snapshot.len() + pending.len());
        for (old, _) in &snapshot {
            renumber.insert(*old, slots.len() as u32);
            slots.push(space.slots[*old as usize]);
        }
        for (old, vector) in &pending {
            if renumber.contains_key(old) {
                continue;
            }
            let new = slots.len() as u32;
            renumber.insert(*old, new);
            slots.push(space.slots[*old as usize]);
            graph.insert((vector, new as usize));
        }
        // Deletions during the build: tombstones in the new graph; everything
        // else not carried over was dead before.
        let dead = slots.iter().filter(|s| !s.alive).count();
        space.by_id = slots.iter().enumerate().filter(|(_, s)| s.alive).map(|(i, s)| (s.id, i as u32)).collect();
        space.by_conv.clear();
        for (i, s) in slots.iter().enumerate().filter(|(_, s)| s.alive) {
            space.by_conv.entry(s.conv).or_default().push(i as u32);
        }
        space.live = slots.len() - dead;
        space.dead = dead;
        space.slots = slots;
        space.flat = Vec::new();
        space.graph = Some(Arc::new(graph));
        tracing::info!(
            namespace,
            vectors = space.live,
            tombstones = space.dead,
            millis = started.elapsed().as_millis() as u64,
            "namespace graph built"
        );
        let again = space.wants_build(self.opts.graph_from);
        drop(spaces);
        if again {
            self.maybe_build(namespace);
        }
    }

    /// A namespace search with `ef` candidates (what [`Self::search`] does
    /// with the configured `ef_search`; benchmarks compare values). `query`
    /// must have unit length.
    pub fn search_namespace_ef(
        &self,
        query: &[f32],
        k: usize,
        ns: &str,
        exclude: &HashSet<u64>,
        ef: usize,
    ) -> Vec<Hit> {
        let spaces = self.spaces.read().unwrap_or_else(|e| e.into_inner());
        let Some(space) = spaces.get(ns) else { return Vec::new() };
        let wanted = |slot: usize| -> Option<&Slot> {
            let s = space.slots.get(slot)?;
            (s.alive && !exclude.contains(&s.id)).then_some(s)
        };
        match &space.graph {
            Some(graph) => {
                let hits = |found: Vec<hnsw_rs::prelude::Neighbour>| -> Vec<Hit> {
                    found
                        .into_iter()
                        .filter_map(|n| {
                            let s = wanted(n.d_id)?;
                            Some(Hit { id: s.id, conversation_id: s.conv, score: 1.0 - n.distance })
                        })
                        .collect()
                };
                let ef = ef.max(k);
                // hnsw_rs never ends a filtered search early (it walks every
                // candidate left), so while few slots are left out (the
                // recent window, tombstones) the search runs unfiltered for
                // that many more hits, which are left out afterwards.
                let slack = exclude.len() + space.dead;
                if slack <= UNFILTERED_SLACK {
                    let want = k + slack;
                    let mut found = hits(graph.search(query, want, ef.max(want)));
                    if found.len() >= k.min(space.live) {
                        found.truncate(k);
                        return found;
                    }
                }
                let filter = |slot: &usize| wanted(*slot).is_some();
                hits(graph.search_filter(query, k, ef, Some(&filter)))
            }
            None => {
                let mut hits: Vec<Hit> = space
                    .flat
                    .chunks_exact(self.dim)
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

    /// Exact top-k over a namespace, whatever its index (for benchmarks and tests).
    pub fn search_namespace_exact(&self, query: &[f32], k: usize, ns: &str) -> Vec<Hit> {
        let spaces = self.spaces.read().unwrap_or_else(|e| e.into_inner());
        let Some(space) = spaces.get(ns) else { return Vec::new() };
        let query = normalize(query);
        let mut hits: Vec<Hit> = match &space.graph {
            Some(graph) if graph.get_nb_point() > 0 => graph
                .get_point_indexation()
                .into_iter()
                .filter_map(|p| {
                    let s = space.slots.get(p.get_origin_id()).filter(|s| s.alive)?;
                    Some(Hit { id: s.id, conversation_id: s.conv, score: dot(&query, p.get_v()) })
                })
                .collect(),
            Some(_) => Vec::new(),
            None => space
                .flat
                .chunks_exact(self.dim)
                .zip(&space.slots)
                .filter(|(_, s)| s.alive)
                .map(|(v, s)| Hit { id: s.id, conversation_id: s.conv, score: dot(&query, v) })
                .collect(),
        };
        top_k(&mut hits, k);
        hits
    }

    /// Waits until no graph build is running (tests and benchmarks).
    pub fn wait_built(&self, timeout: std::time::Duration) -> bool {
        let started = std::time::Instant::now();
        while self.stats().building > 0 {
            if started.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    }
}

/// Drops dead rows of a namespace without a graph.
pub(super) fn compact_flat(space: &mut NsIndex, dim: usize) {
    if space.dead == 0 {
        return;
    }
    let mut slots = Vec::with_capacity(space.live);
    let mut flat = Vec::with_capacity(space.live * dim);
    for (s, v) in space.slots.iter().zip(space.flat.chunks_exact(dim)) {
        if s.alive {
            slots.push(*s);
            flat.extend_from_slice(v);
        }
    }
    space.by_id = slots.iter().enumerate().map(|(i, s)| (s.id, i as u32)).collect();
    space.by_conv.clear();
    for (i, s) in slots.iter().enumerate() {
        space.by_conv.entry(s.conv).or_default().push(i as u32);
    }
    space.slots = slots;
    space.flat = flat;
    space.dead = 0;
}
