//! The per-namespace part of the vector index (cross-conversation recall):
//! a flat matrix scored exactly while small, an HNSW graph built in the
//! background past `graph_from` (near-identical vectors kept as twins of
//! one point), tombstones for deletions and a background rebuild
//! (compaction) when they are a fifth of the graph; graphs saved and loaded
//! by `persist.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use hnsw_rs::prelude::Hnsw;
use rayon::prelude::*;

use std::sync::atomic::Ordering;

use super::persist::{self, LoadError, SavedGraph};
use super::{dot, top_k, Hit, UnitCosine, VectorIndex};
use crate::engine::embed::normalize;
use crate::memory::store::ConversationId;

const MAX_NB_CONNECTION: usize = 16;
const MAX_LAYER: usize = 16;
const EF_CONSTRUCTION: usize = 100;
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
    fn add_twin(&mut self, rep: u32, slot: u32, vector: Vec<f32>) {
        self.twins.entry(rep).or_default().push(slot);
        self.twin_vecs.insert(slot, vector);
    }

    /// For each slot, the graph point it is a twin of (`u32::MAX`: none), for saving.
    fn reps(&self) -> Vec<u32> {
        let mut reps = vec![u32::MAX; self.slots.len()];
        for (rep, twins) in &self.twins {
            for t in twins {
                reps[*t as usize] = *rep;
            }
        }
        reps
    }
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
            space.unsaved += to_graph.len();
            space.graph.clone()
        };
        // Graph inserts take hnsw_rs's own locks and the writer's, not the
        // namespaces': searches go on meanwhile.
        if let Some(graph) = graph.filter(|_| !to_graph.is_empty()) {
            let _writer = self.graph_writer.lock().unwrap_or_else(|e| e.into_inner());
            let mut twins = Vec::new();
            for (slot, vector) in to_graph {
                if let Some(rep) = place(&graph, slot, &vector) {
                    twins.push((rep, slot, vector));
                }
            }
            if !twins.is_empty() {
                let mut spaces = self.spaces.write().unwrap_or_else(|e| e.into_inner());
                if let Some(space) =
                    spaces.get_mut(namespace).filter(|s| s.graph.as_ref().is_some_and(|g| Arc::ptr_eq(g, &graph)))
                {
                    for (rep, slot, vector) in twins {
                        space.add_twin(rep, slot, vector);
                    }
                }
            }
        }
        self.maybe_build(namespace);
    }

    /// Starts a background graph build for `namespace` when it has grown
    /// past `graph_from` without one, or its graph holds too many
    /// tombstones. A namespace without a graph first tries the graph saved
    /// in `graph_dir`.
    pub(super) fn maybe_build(self: &Arc<Self>, namespace: &str) {
        let (snapshot, first) = {
            let mut spaces = self.spaces.write().unwrap_or_else(|e| e.into_inner());
            let Some(space) = spaces.get_mut(namespace) else { return };
            if !space.wants_build(self.opts.graph_from) {
                return;
            }
            let mut live: Vec<(u32, Slot, Vec<f32>)> = Vec::with_capacity(space.live);
            match &space.graph {
                None => {
                    for (i, slot) in space.slots.iter().enumerate() {
                        if slot.alive {
                            live.push((i as u32, *slot, space.flat[i * self.dim..(i + 1) * self.dim].to_vec()));
                        }
                    }
                }
                Some(graph) if graph.get_nb_point() > 0 => {
                    for point in graph.get_point_indexation() {
                        let slot = point.get_origin_id() as u32;
                        if space.slots[slot as usize].alive {
                            live.push((slot, space.slots[slot as usize], point.get_v().to_vec()));
                        }
                    }
                    for (slot, vector) in &space.twin_vecs {
                        if space.slots[*slot as usize].alive {
                            live.push((*slot, space.slots[*slot as usize], vector.clone()));
                        }
                    }
                }
                Some(_) => {}
            }
            space.building = Some(Vec::new());
            (live, space.graph.is_none())
        };
        let index = self.clone();
        let name = namespace.to_string();
        self.workers.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new().name("index-build".into()).spawn(move || {
            struct Done<'a>(&'a std::sync::atomic::AtomicUsize);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _done = Done(&index.workers);
            if first {
                if let Some(dir) = index.opts.graph_dir.clone() {
                    match index.load_saved(&name, &dir, &snapshot) {
                        Ok(()) => return,
                        Err(LoadError::Missing) => {}
                        Err(LoadError::Rejected(why)) => {
                            index.rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(namespace = %name, reason = %why, "saved namespace graph not used; building it again");
                        }
                    }
                }
            }
            index.build(&name, snapshot);
        });
        if let Err(e) = spawned {
            self.workers.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(error = %e, "could not start an index build; the namespace stays exact");
            if let Some(space) = self.spaces.write().unwrap_or_else(|e| e.into_inner()).get_mut(namespace) {
                space.building = None;
            }
        }
    }

    /// Builds a graph from `snapshot` (old slot, slot, vector), swaps it in
    /// and saves it.
    fn build(self: &Arc<Self>, namespace: &str, mut snapshot: Vec<(u32, Slot, Vec<f32>)>) {
        let started = std::time::Instant::now();
        snapshot.sort_by_key(|(slot, _, _)| *slot);
        let graph = Graph::new(MAX_NB_CONNECTION, snapshot.len().max(1024), MAX_LAYER, EF_CONSTRUCTION, UnitCosine);
        // Inserted on every core (hnsw_rs inserts take `&self`), each after
        // a look for the point it would be a twin of.
        let twins: std::sync::Mutex<Vec<(u32, u32)>> = Default::default();
        snapshot.par_iter().enumerate().for_each(|(new, (_, _, v))| {
            if let Some(rep) = place(&graph, new as u32, v) {
                twins.lock().unwrap_or_else(|e| e.into_inner()).push((rep, new as u32));
            }
        });
        let twins = twins.into_inner().unwrap_or_else(|e| e.into_inner());
        let twins = twins.into_iter().map(|(rep, new)| (rep, new, snapshot[new as usize].2.clone())).collect();
        let slots = snapshot.iter().map(|(_, s, _)| *s).collect();
        let carried = snapshot.iter().enumerate().map(|(new, (old, _, _))| (*old, new as u32)).collect();
        self.built.fetch_add(1, Ordering::Relaxed);
        self.swap_in(namespace, graph, slots, twins, carried, started, "namespace graph built", true);
    }

    /// Uses the graph saved for `namespace` if it holds the store's vectors:
    /// adds what was stored after it was saved, leaves out what was deleted,
    /// swaps it in. `snapshot` is every live vector of the namespace.
    fn load_saved(
        self: &Arc<Self>,
        namespace: &str,
        dir: &std::path::Path,
        snapshot: &[(u32, Slot, Vec<f32>)],
    ) -> Result<(), LoadError> {
        let started = std::time::Instant::now();
        let SavedGraph { graph, mut slots, reps } = persist::load(dir, namespace, &self.opts.model, self.dim)?;
        let by_id: HashMap<u64, usize> = snapshot.iter().enumerate().map(|(i, (_, s, _))| (s.id, i)).collect();
        // Every point of the graph is a slot, once, not a twin, and holds
        // the vector the store holds; every twin hangs on a graph point.
        let mut in_graph = vec![false; slots.len()];
        for point in graph.get_point_indexation() {
            let slot = point.get_origin_id();
            let Some(saved) = slots.get(slot) else {
                return Err(LoadError::Rejected(format!("graph point {slot} has no slot")));
            };
            if std::mem::replace(&mut in_graph[slot], true) || reps[slot] != u32::MAX {
                return Err(LoadError::Rejected(format!("slot {slot} is in the graph twice")));
            }
            if let Some(&i) = by_id.get(&saved.id) {
                let v = point.get_v();
                if v.len() != self.dim || dot(v, &snapshot[i].2) < 0.999 {
                    return Err(LoadError::Rejected(format!(
                        "message {}: the saved vector is not the store's",
                        saved.id
                    )));
                }
            }
        }
        if reps.iter().any(|r| *r != u32::MAX && !in_graph.get(*r as usize).copied().unwrap_or(false)) {
            return Err(LoadError::Rejected("a twin hangs on no graph point".into()));
        }
        // Slots whose message the store still has stay alive; the rest are
        // tombstones. Stored messages the graph lacks are added.
        let mut taken = vec![false; snapshot.len()];
        let mut carried = Vec::with_capacity(snapshot.len());
        let mut catch_up: Vec<(&Vec<f32>, usize)> = Vec::new();
        let mut twins = Vec::new();
        for (new, slot) in slots.iter_mut().enumerate() {
            slot.alive = match by_id.get(&slot.id) {
                Some(&i) if !taken[i] && snapshot[i].1.conv == slot.conv => {
                    taken[i] = true;
                    carried.push((snapshot[i].0, new as u32));
                    if reps[new] != u32::MAX {
                        twins.push((reps[new], new as u32, snapshot[i].2.clone()));
                    } else if !in_graph[new] {
                        catch_up.push((&snapshot[i].2, new));
                    }
                    true
                }
                // A twin whose message was deleted keeps no vector.
                _ => false,
            };
        }
        for (i, (old, slot, vector)) in snapshot.iter().enumerate() {
            if !taken[i] {
                carried.push((*old, slots.len() as u32));
                catch_up.push((vector, slots.len()));
                slots.push(*slot);
            }
        }
        // Past half the graph, building anew is faster than catching up.
        if catch_up.len() > graph.get_nb_point() / 2 {
            return Err(LoadError::Rejected(format!(
                "{} of {} vectors were stored after it was saved",
                catch_up.len(),
                snapshot.len()
            )));
        }
        let caught_up = catch_up.len();
        let more: std::sync::Mutex<Vec<(u32, u32, Vec<f32>)>> = Default::default();
        catch_up.par_iter().for_each(|(v, new)| {
            if let Some(rep) = place(&graph, *new as u32, v) {
                more.lock().unwrap_or_else(|e| e.into_inner()).push((rep, *new as u32, (*v).clone()));
            }
        });
        twins.extend(more.into_inner().unwrap_or_else(|e| e.into_inner()));
        self.loaded.fetch_add(1, Ordering::Relaxed);
        tracing::info!(namespace, caught_up, "namespace graph read from disk");
        self.swap_in(namespace, graph, slots, twins, carried, started, "namespace graph loaded", caught_up > 0);
        Ok(())
    }

    /// Swaps a new graph in: `slots` are its data ids, `carried` maps the
    /// namespace's current slots to them. Vectors inserted meanwhile are
    /// added, deletions meanwhile become tombstones. Then saves it (when
    /// `save` or anything was added meanwhile) and starts the next build if
    /// one is due.
    #[allow(clippy::too_many_arguments)]
    fn swap_in(
        self: &Arc<Self>,
        namespace: &str,
        graph: Graph,
        mut slots: Vec<Slot>,
        twins: Vec<(u32, u32, Vec<f32>)>,
        carried: Vec<(u32, u32)>,
        started: std::time::Instant,
        what: &'static str,
        save: bool,
    ) {
        let mut spaces = self.spaces.write().unwrap_or_else(|e| e.into_inner());
        let Some(space) = spaces.get_mut(namespace) else { return };
        let pending = space.building.take().unwrap_or_default();
        let mut renumber: HashMap<u32, u32> = carried.into_iter().collect();
        for (old, new) in &renumber {
            slots[*new as usize] = space.slots[*old as usize];
        }
        space.twins.clear();
        space.twin_vecs.clear();
        for (rep, twin, vector) in twins {
            space.add_twin(rep, twin, vector);
        }
        // In slot order, whatever order a parallel build found them in: a
        // built graph and the same graph loaded answer alike.
        for list in space.twins.values_mut() {
            list.sort_unstable();
        }
        for (old, vector) in &pending {
            if renumber.contains_key(old) {
                continue;
            }
            let new = slots.len() as u32;
            renumber.insert(*old, new);
            slots.push(space.slots[*old as usize]);
            if let Some(rep) = place(&graph, new, vector) {
                space.add_twin(rep, new, vector.clone());
            }
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
        space.unsaved = if save { pending.len().max(1) } else { pending.len() };
        tracing::info!(
            namespace,
            vectors = space.live,
            tombstones = space.dead,
            millis = started.elapsed().as_millis() as u64,
            "{what}"
        );
        let again = space.wants_build(self.opts.graph_from);
        drop(spaces);
        self.save_namespace(namespace);
        if again {
            self.maybe_build(namespace);
        }
    }

    /// Saves `namespace`'s graph to `graph_dir` if it changed since its
    /// last save. Inserts into it wait meanwhile; searches do not.
    pub(super) fn save_namespace(&self, namespace: &str) {
        let Some(dir) = &self.opts.graph_dir else { return };
        let _writer = self.graph_writer.lock().unwrap_or_else(|e| e.into_inner());
        let (graph, slots, reps) = {
            let mut spaces = self.spaces.write().unwrap_or_else(|e| e.into_inner());
            let Some(space) = spaces.get_mut(namespace) else { return };
            let Some(graph) = space.graph.clone() else { return };
            if space.unsaved == 0 {
                return;
            }
            space.unsaved = 0;
            (graph, space.slots.clone(), space.reps())
        };
        let started = std::time::Instant::now();
        match persist::save(dir, namespace, &self.opts.model, self.dim, &graph, &slots, &reps) {
            Ok(()) => tracing::info!(
                namespace,
                vectors = graph.get_nb_point(),
                millis = started.elapsed().as_millis() as u64,
                "namespace graph saved"
            ),
            Err(e) => {
                tracing::warn!(namespace, dir = %dir.display(), error = %e, "could not save the namespace graph; the next start builds it");
                if let Some(space) = self.spaces.write().unwrap_or_else(|e| e.into_inner()).get_mut(namespace) {
                    space.unsaved += 1;
                }
            }
        }
    }

    /// Saves every namespace graph that changed since its last save (at
    /// shutdown: the next start loads them and adds only what came later).
    pub fn save_graphs(&self) {
        let names: Vec<String> = self.spaces.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        for name in names {
            self.save_namespace(&name);
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
                // A graph point found, and its twins (scored exactly, up to
                // TWIN_SCAN of them), left out or not.
                let hits = |found: Vec<hnsw_rs::prelude::Neighbour>, want: usize| -> Vec<Hit> {
                    let mut out = Vec::with_capacity(found.len());
                    for n in found {
                        if let Some(s) = wanted(n.d_id) {
                            out.push(Hit { id: s.id, conversation_id: s.conv, score: 1.0 - n.distance });
                        }
                        let Some(twins) = space.twins.get(&(n.d_id as u32)) else { continue };
                        let live =
                            twins.iter().filter_map(|t| Some((wanted(*t as usize)?, *t))).take(TWIN_SCAN.max(want));
                        for (s, t) in live {
                            let score = space.twin_vecs.get(&t).map_or(0.0, |v| dot(query, v));
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
                let slack = exclude.len() + space.dead;
                if slack <= UNFILTERED_SLACK {
                    let want = k + slack;
                    let mut found = hits(graph.search(query, want, ef.max(want)), want);
                    if found.len() >= k.min(space.live) {
                        found.truncate(k);
                        return found;
                    }
                }
                // A point left out still leads to its twins that are not.
                let filter = |slot: &usize| {
                    wanted(*slot).is_some()
                        || space
                            .twins
                            .get(&(*slot as u32))
                            .is_some_and(|t| t.iter().any(|t| wanted(*t as usize).is_some()))
                };
                let mut found = hits(graph.search_filter(query, k, ef, Some(&filter)), k);
                found.truncate(k);
                found
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

    /// Whether `ns` is searched through a graph.
    pub(super) fn has_graph(&self, ns: &str) -> bool {
        self.spaces.read().unwrap_or_else(|e| e.into_inner()).get(ns).is_some_and(|s| s.graph.is_some())
    }

    /// Exact top-k over a namespace, whatever its index, leaving out `exclude`.
    pub fn search_namespace_exact(&self, query: &[f32], k: usize, ns: &str, exclude: &HashSet<u64>) -> Vec<Hit> {
        let spaces = self.spaces.read().unwrap_or_else(|e| e.into_inner());
        let Some(space) = spaces.get(ns) else { return Vec::new() };
        let query = normalize(query);
        let wanted = |s: &&Slot| s.alive && !exclude.contains(&s.id);
        let mut hits: Vec<Hit> = match &space.graph {
            Some(graph) if graph.get_nb_point() > 0 => graph
                .get_point_indexation()
                .into_iter()
                .filter_map(|p| {
                    let s = space.slots.get(p.get_origin_id()).filter(wanted)?;
                    Some(Hit { id: s.id, conversation_id: s.conv, score: dot(&query, p.get_v()) })
                })
                .chain(space.twin_vecs.iter().filter_map(|(t, v)| {
                    let s = space.slots.get(*t as usize).filter(wanted)?;
                    Some(Hit { id: s.id, conversation_id: s.conv, score: dot(&query, v) })
                }))
                .collect(),
            Some(_) => Vec::new(),
            None => space
                .flat
                .chunks_exact(self.dim)
                .zip(&space.slots)
                .filter(|(_, s)| wanted(s))
                .map(|(v, s)| Hit { id: s.id, conversation_id: s.conv, score: dot(&query, v) })
                .collect(),
        };
        top_k(&mut hits, k);
        hits
    }

    /// Waits until no graph build, load or save is running (tests and benchmarks).
    pub fn wait_built(&self, timeout: std::time::Duration) -> bool {
        let started = std::time::Instant::now();
        while self.workers.load(Ordering::SeqCst) > 0 || self.stats().building > 0 {
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
