//! The namespace indexes (cross-conversation recall): one index per
//! namespace (`space.rs`), a flat matrix scored exactly while small, an HNSW
//! graph built in the background past `graph_from`, and a background rebuild
//! (compaction) when tombstones are a fifth of the graph; graphs saved and
//! loaded by `persist.rs`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rayon::prelude::*;

use super::persist::{self, LoadError, SavedGraph};
use super::score::{dot, Hit, UnitCosine};
use super::space::{place, Graph, NsIndex, Slot};
use crate::engine::embed::normalize;
use crate::memory::store::ConversationId;

const MAX_NB_CONNECTION: usize = 16;
const MAX_LAYER: usize = 16;
const EF_CONSTRUCTION: usize = 100;

/// Every namespace's index, and the background threads that build, load
/// and save their graphs.
pub(super) struct Namespaces {
    dim: usize,
    /// A namespace gets a graph from this many live vectors.
    graph_from: usize,
    /// Where graphs are saved and loaded from.
    graph_dir: Option<PathBuf>,
    /// The embedding model's name, written with each saved graph.
    model: String,
    pub(super) spaces: RwLock<HashMap<String, NsIndex>>,
    /// Held by every insert into a graph and by a save: hnsw_rs's dump must
    /// not see an insert half done.
    graph_writer: Mutex<()>,
    /// Background threads building, loading or saving graphs.
    workers: AtomicUsize,
    pub(super) built: AtomicUsize,
    pub(super) loaded: AtomicUsize,
    pub(super) rejected: AtomicUsize,
}

impl Namespaces {
    pub(super) fn new(dim: usize, graph_from: usize, graph_dir: Option<PathBuf>, model: String) -> Self {
        Self {
            dim,
            graph_from,
            graph_dir,
            model,
            spaces: RwLock::default(),
            graph_writer: Mutex::default(),
            workers: AtomicUsize::new(0),
            built: AtomicUsize::new(0),
            loaded: AtomicUsize::new(0),
            rejected: AtomicUsize::new(0),
        }
    }

    /// The namespaces that have an index.
    pub(super) fn names(&self) -> Vec<String> {
        self.spaces.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// Fills the indexes with the store's vectors at start-up (no graph is
    /// built yet: [`Self::maybe_build`] each namespace next).
    pub(super) fn fill(
        &self,
        vectors: Vec<(u64, ConversationId, Vec<f32>)>,
        namespaces: &HashMap<ConversationId, String>,
    ) {
        let mut spaces = self.spaces.write().unwrap_or_else(|e| e.into_inner());
        for (id, conv, vector) in vectors {
            if vector.len() != self.dim {
                continue;
            }
            let ns = namespaces.get(&conv).cloned().unwrap_or_default();
            let space = spaces.entry(ns).or_default();
            if space.by_id.contains_key(&id) {
                continue;
            }
            let slot = space.slots.len() as u32;
            space.slots.push(Slot { id, conv, alive: true });
            space.by_id.insert(id, slot);
            space.by_conv.entry(conv).or_default().push(slot);
            space.live += 1;
            space.flat.extend(normalize(&vector));
        }
    }

    /// Tombstones a conversation's vectors (a namespace without a graph
    /// drops them at once).
    pub(super) fn remove_conversation(self: &Arc<Self>, conv: &ConversationId) {
        let mut touched = Vec::new();
        {
            let mut spaces = self.spaces.write().unwrap_or_else(|e| e.into_inner());
            for (name, space) in spaces.iter_mut() {
                let Some(slots) = space.by_conv.remove(conv) else { continue };
                for slot in &slots {
                    let s = &mut space.slots[*slot as usize];
                    if s.alive {
                        s.alive = false;
                        space.live -= 1;
                        space.dead += 1;
                        space.by_id.remove(&s.id);
                    }
                }
                if space.graph.is_none() && space.building.is_none() {
                    space.compact_flat(self.dim);
                }
                touched.push(name.clone());
            }
            spaces.retain(|_, s| !s.slots.is_empty() || s.building.is_some());
        }
        for ns in touched {
            self.maybe_build(&ns);
        }
    }
    /// Whether message `id` is in the namespace index of `namespace`.
    pub(super) fn contains(&self, namespace: &str, id: u64) -> bool {
        self.spaces.read().unwrap_or_else(|e| e.into_inner()).get(namespace).is_some_and(|s| s.by_id.contains_key(&id))
    }

    /// Adds vectors of one namespace to its index (not to the conversation cache).
    pub(super) fn insert(self: &Arc<Self>, items: Vec<(u64, ConversationId, Vec<f32>)>, namespace: &str) {
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
            if !space.wants_build(self.graph_from) {
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
                if let Some(dir) = index.graph_dir.clone() {
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
        let SavedGraph { graph, mut slots, reps } = persist::load(dir, namespace, &self.model, self.dim)?;
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
        let again = space.wants_build(self.graph_from);
        drop(spaces);
        self.save_namespace(namespace);
        if again {
            self.maybe_build(namespace);
        }
    }

    /// Saves `namespace`'s graph to `graph_dir` if it changed since its
    /// last save. Inserts into it wait meanwhile; searches do not.
    pub(super) fn save_namespace(&self, namespace: &str) {
        let Some(dir) = &self.graph_dir else { return };
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
        match persist::save(dir, namespace, &self.model, self.dim, &graph, &slots, &reps) {
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
    pub(super) fn save_graphs(&self) {
        for name in self.names() {
            self.save_namespace(&name);
        }
    }

    /// A namespace search with `ef` candidates; `query` must have unit length.
    pub(super) fn search(&self, query: &[f32], k: usize, ns: &str, exclude: &HashSet<u64>, ef: usize) -> Vec<Hit> {
        let spaces = self.spaces.read().unwrap_or_else(|e| e.into_inner());
        let Some(space) = spaces.get(ns) else { return Vec::new() };
        space.search(query, k, exclude, ef, self.dim)
    }

    /// Whether `ns` is searched through a graph.
    pub(super) fn has_graph(&self, ns: &str) -> bool {
        self.spaces.read().unwrap_or_else(|e| e.into_inner()).get(ns).is_some_and(|s| s.graph.is_some())
    }

    /// Exact top-k over a namespace, whatever its index, leaving out `exclude`.
    pub(super) fn search_exact(&self, query: &[f32], k: usize, ns: &str, exclude: &HashSet<u64>) -> Vec<Hit> {
        let spaces = self.spaces.read().unwrap_or_else(|e| e.into_inner());
        let Some(space) = spaces.get(ns) else { return Vec::new() };
        space.search_exact(query, k, exclude, self.dim)
    }

    /// Waits until no graph build, load or save is running (tests and benchmarks).
    pub(super) fn wait_built(&self, timeout: std::time::Duration) -> bool {
        let started = std::time::Instant::now();
        while self.workers.load(Ordering::SeqCst) > 0 || self.building() > 0 {
            if started.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    }

    /// Namespaces with a graph build in progress.
    pub(super) fn building(&self) -> usize {
        self.spaces.read().unwrap_or_else(|e| e.into_inner()).values().filter(|s| s.building.is_some()).count()
    }
}
