//! Unit tests of the vector index: both parts, locks, graphs saved and loaded.

use hnsw_rs::prelude::Distance;

use super::*;

fn rng(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

fn with_namespaces(graph_from: usize) -> Arc<VectorIndex> {
    Arc::new(VectorIndex::new(8, IndexOptions { namespaces: true, graph_from, ..Default::default() }))
}

#[test]
fn unit_cosine_matches_the_definition_and_never_goes_negative() {
    let a = normalize(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    let b = normalize(&[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]);
    let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!((dot(&a, &b) - naive).abs() < 1e-6);
    assert_eq!(UnitCosine.eval(&a, &a), 0.0);
}

#[test]
fn a_panic_while_a_lock_is_held_does_not_break_the_index_for_later_requests() {
    let index = Arc::new(VectorIndex::new(3, IndexOptions { namespaces: true, ..Default::default() }));
    let c1 = uuid::Uuid::new_v4();
    index.start_conversation(c1);
    index.insert(1, c1, "ns", vec![1.0, 0.0, 0.0]);
    // One request panics while it holds the conversation cache's lock and a namespace's.
    let poisoner = index.clone();
    let _ = std::thread::spawn(move || {
        let _convs = poisoner.convs.lock().unwrap();
        let _spaces = poisoner.ns.spaces.write().unwrap();
        panic!("a request panics while holding the index locks");
    })
    .join();
    assert!(index.convs.is_poisoned());
    // Every later call still works.
    index.insert(2, c1, "ns", vec![0.0, 1.0, 0.0]);
    assert_eq!(index.conversation_seen(&c1), Some(2));
    let hits = index.search(&[1.0, 0.0, 0.0], 2, &Scope::Conversation(c1), &HashSet::new()).unwrap_or_default();
    assert_eq!(hits.first().map(|h| h.id), Some(1), "{hits:?}");
}

#[test]
fn a_graph_search_leaves_out_excluded_and_deleted_slots_unfiltered_or_filtered() {
    let index = with_namespaces(64);
    let mut next = rng(11);
    let convs: Vec<_> = (0..10).map(|_| uuid::Uuid::new_v4()).collect();
    let vectors: Vec<Vec<f32>> = (0..300).map(|_| (0..8).map(|_| next()).collect()).collect();
    let items = vectors.iter().enumerate().map(|(i, v)| (i as u64, convs[i % 10], v.clone())).collect();
    index.insert_namespace(items, "ns");
    assert!(index.wait_built(std::time::Duration::from_secs(30)));
    let query = normalize(&vectors[7]);
    let ids = |exclude: &HashSet<u64>| -> Vec<u64> {
        index.search_namespace_ef(&query, 5, "ns", exclude, 48).into_iter().map(|h| h.id).collect()
    };
    assert_eq!(ids(&HashSet::new()).first(), Some(&7), "the query's own vector first");
    // A few left out: the unfiltered search, with that many more hits.
    let few = HashSet::from([7]);
    let found = ids(&few);
    assert_eq!(found.len(), 5);
    assert!(!found.contains(&7), "{found:?}");
    // More left out than that: the filtered search.
    let many: HashSet<u64> = (0..70).collect();
    let found = ids(&many);
    assert_eq!(found.len(), 5);
    assert!(found.iter().all(|id| *id >= 70), "{found:?}");
    // Tombstones count as left out.
    index.remove_conversation(&convs[7]);
    let found = ids(&HashSet::new());
    assert!(!found.contains(&7) && found.len() == 5, "{found:?}");
}

#[test]
fn search_filters_by_scope_exclusion_and_deletion() {
    let index = Arc::new(VectorIndex::new(3, IndexOptions { namespaces: true, ..Default::default() }));
    let (c1, c2, c3) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    index.start_conversation(c1);
    index.insert(1, c1, "ns", vec![1.0, 0.0, 0.0]);
    index.insert(2, c1, "ns", vec![0.9, 0.1, 0.0]);
    index.insert(3, c2, "ns", vec![1.0, 0.01, 0.0]);
    index.insert(4, c3, "other", vec![1.0, 0.0, 0.01]);
    assert!(!index.insert(5, c1, "ns", vec![1.0, 0.0]), "wrong dimension refused");
    let q = [1.0, 0.0, 0.0];
    let ids = |hits: Option<Vec<Hit>>| hits.unwrap().into_iter().map(|h| h.id).collect::<Vec<_>>();
    assert_eq!(ids(index.search(&q, 5, &Scope::Conversation(c1), &HashSet::new())), vec![1, 2]);
    assert_eq!(ids(index.search(&q, 5, &Scope::Conversation(c1), &HashSet::from([1]))), vec![2]);
    assert!(index.search(&q, 5, &Scope::Conversation(c2), &HashSet::new()).is_none(), "c2 is not cached");
    let ns = ids(index.search(&q, 5, &Scope::Namespace("ns".into()), &HashSet::new()));
    assert_eq!(ns.len(), 3, "{ns:?}");
    assert!(!ns.contains(&4), "another namespace leaked in");
    index.remove_conversation(&c1);
    assert!(index.search(&q, 5, &Scope::Conversation(c1), &HashSet::new()).is_none());
    assert_eq!(ids(index.search(&q, 5, &Scope::Namespace("ns".into()), &HashSet::new())), vec![3]);
    assert_eq!(index.len(), 2);
    assert_eq!(index.stats().namespace_slots, 2, "a namespace without a graph drops deleted rows at once");
}

#[test]
fn the_conversation_cache_is_bounded_and_evicts_the_least_recently_used() {
    let opts = IndexOptions { cache_vectors: 10, ..Default::default() };
    let index = Arc::new(VectorIndex::new(2, opts));
    let convs: Vec<_> = (0..4).map(|_| uuid::Uuid::new_v4()).collect();
    for (i, c) in convs.iter().enumerate() {
        let vectors = (0..4).map(|j| ((i * 10 + j) as u64, vec![1.0, j as f32])).collect();
        index.load_conversation(*c, 4, vectors);
        if i == 1 {
            // Conversation 0 is used again, so 1 is now the least recently used.
            assert_eq!(index.conversation_seen(&convs[0]), Some(4));
        }
        if i == 2 {
            assert!(index.conversation_seen(&convs[1]).is_none(), "the least recently used went first");
            assert!(index.conversation_seen(&convs[0]).is_some());
        }
    }
    let s = index.stats();
    assert!(s.cached_vectors <= 10, "{s:?}");
    assert_eq!(s.cached_conversations, 2);
    assert!(index.conversation_seen(&convs[3]).is_some(), "the newest stays");
}

#[test]
fn a_large_namespace_gets_a_graph_that_finds_the_nearest_and_compacts_after_deletes() {
    let dim = 8;
    let index = with_namespaces(1000);
    let (keep, drop_) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let mut next = rng(0x9E3779B97F4A7C15);
    let items: Vec<(u64, uuid::Uuid, Vec<f32>)> =
        (0..3000u64).map(|i| (i, if i < 2000 { keep } else { drop_ }, (0..dim).map(|_| next()).collect())).collect();
    let target = items[1234].2.clone();
    index.insert_namespace(items, "big");
    assert!(index.wait_built(std::time::Duration::from_secs(60)));
    assert_eq!(index.stats().graphs, 1);
    let hits = index.search(&target, 3, &Scope::Namespace("big".into()), &HashSet::new()).unwrap();
    assert_eq!(hits.first().map(|h| h.id), Some(1234), "{hits:?}");
    assert!(hits[0].score > 0.999);
    let exact = index.search_namespace_exact(&target, 3, "big", &HashSet::new());
    assert_eq!(exact.first().map(|h| h.id), Some(1234));

    let dropped = items_of(&index, "big", &drop_);
    let probe = dropped.clone();
    index.remove_conversation(&drop_);
    // Gone from recall at once...
    let hits = index.search(&probe, 10, &Scope::Namespace("big".into()), &HashSet::new()).unwrap();
    assert!(hits.iter().all(|h| h.conversation_id == keep), "{hits:?}");
    // ...and from memory once compacted (a third of the graph was tombstones).
    assert!(index.wait_built(std::time::Duration::from_secs(60)));
    let s = index.stats();
    assert_eq!((s.namespace_vectors, s.namespace_slots, s.tombstones), (2000, 2000, 0), "{s:?}");
    let hits = index.search(&target, 1, &Scope::Namespace("big".into()), &HashSet::new()).unwrap();
    assert_eq!(hits[0].id, 1234, "the compacted graph still finds it");
}

#[test]
fn a_saved_graph_is_loaded_caught_up_with_the_store_and_rebuilt_when_damaged_or_foreign() {
    let dir = tempfile::tempdir().unwrap();
    let mut next = rng(5);
    let convs: Vec<_> = (0..20).map(|_| uuid::Uuid::new_v4()).collect();
    let mut vector = || -> Vec<f32> { (0..8).map(|_| next()).collect() };
    let items: Vec<(u64, ConversationId, Vec<f32>)> =
        (0..2000u64).map(|i| (i, convs[i as usize % 20], vector())).collect();
    // A start-up over a store holding `items`.
    let open = |model: &str, items: &[(u64, ConversationId, Vec<f32>)]| {
        let opts = IndexOptions {
            namespaces: true,
            graph_from: 500,
            graph_dir: Some(dir.path().to_path_buf()),
            model: model.into(),
            ..Default::default()
        };
        let index = Arc::new(VectorIndex::new(8, opts));
        index.insert_namespace(items.to_vec(), "ns");
        assert!(index.wait_built(std::time::Duration::from_secs(60)));
        let s = index.stats();
        assert_eq!((s.graphs, s.namespace_vectors), (1, items.len()), "{s:?}");
        index
    };
    let counts = |index: &VectorIndex| {
        let s = index.stats();
        (s.graphs_built, s.graphs_loaded, s.graph_files_rejected)
    };
    let answers = |index: &VectorIndex, items: &[(u64, ConversationId, Vec<f32>)]| -> Vec<Vec<u64>> {
        items[..50]
            .iter()
            .map(|(_, _, q)| {
                let q = normalize(q);
                index.search_namespace_ef(&q, 5, "ns", &HashSet::new(), 48).into_iter().map(|h| h.id).collect()
            })
            .collect()
    };

    let first = open("model-a", &items);
    assert_eq!(counts(&first), (1, 0, 0));
    assert!(graph_files(dir.path(), "ns").iter().all(|f| f.exists()), "saved after the build");
    let before = answers(&first, &items);
    drop(first);

    let second = open("model-a", &items);
    assert_eq!(counts(&second), (0, 1, 0), "loaded, not built");
    assert_eq!(answers(&second, &items), before, "the loaded graph answers as the saved one did");
    drop(second);

    // The store moved on: a conversation deleted, 100 messages added.
    let mut later: Vec<_> = items.iter().filter(|(_, c, _)| *c != convs[3]).cloned().collect();
    later.extend((2000..2100u64).map(|i| (i, convs[0], vector())));
    let third = open("model-a", &later);
    assert_eq!(counts(&third), (0, 1, 0));
    let s = third.stats();
    assert_eq!((s.namespace_vectors, s.tombstones), (2000, 100), "{s:?}");
    for (id, _, v) in &later[later.len() - 100..] {
        let hits = third.search_namespace_ef(&normalize(v), 1, "ns", &HashSet::new(), 48);
        assert_eq!(hits.first().map(|h| h.id), Some(*id), "added after the save, found");
    }
    let deleted = &items[3];
    let hits = third.search_namespace_ef(&normalize(&deleted.2), 10, "ns", &HashSet::new(), 48);
    assert!(hits.iter().all(|h| h.conversation_id != convs[3]), "deleted after the save, left out: {hits:?}");
    drop(third);

    // A damaged file is not used: the graph is built again, and counted.
    let [graph_file, ..] = graph_files(dir.path(), "ns");
    let mut bytes = std::fs::read(&graph_file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&graph_file, bytes).unwrap();
    let fourth = open("model-a", &later);
    assert_eq!(counts(&fourth), (1, 0, 1));
    assert_eq!(answers(&fourth, &later).len(), 50);
    drop(fourth);

    // So is a graph saved for another embedding model.
    let fifth = open("model-b", &later);
    assert_eq!(counts(&fifth), (1, 0, 1));
    drop(fifth);
    // A store whose vectors differ from the saved graph's (another data directory).
    let foreign: Vec<_> = later.iter().map(|(id, c, _)| (*id, *c, vector())).collect();
    let sixth = open("model-b", &foreign);
    assert_eq!(counts(&sixth), (1, 0, 1));
}

/// Clusters of near-identical messages (one message repeated many times
/// in one conversation, larger than the graph's construction beam): each
/// is found by namespace recall asked from its own conversation (the
/// graph, or the exact fallback when the graph missed it) and, from any
/// other conversation, by the graph itself.
#[test]
fn every_cluster_of_near_identical_messages_is_reachable_through_namespace_recall() {
    let dim = 32;
    let opts = IndexOptions { namespaces: true, graph_from: 1000, ..Default::default() };
    let index = Arc::new(VectorIndex::new(dim, opts));
    let mut next = rng(77);
    let (clusters, size) = (40usize, 150usize);
    let convs: Vec<_> = (0..clusters).map(|_| uuid::Uuid::new_v4()).collect();
    let centers: Vec<Vec<f32>> =
        (0..clusters).map(|_| normalize(&(0..dim).map(|_| next()).collect::<Vec<_>>())).collect();
    let mut near = |c: &[f32], by: f32| -> Vec<f32> { c.iter().map(|x| x + by * next()).collect() };
    let mut items = Vec::new();
    for (c, center) in centers.iter().enumerate() {
        let members: Vec<(u64, Vec<f32>)> = (0..size).map(|j| ((c * size + j) as u64, near(center, 0.002))).collect();
        index.load_conversation(convs[c], size, members.clone());
        items.extend(members.into_iter().map(|(id, v)| (id, convs[c], v)));
    }
    index.insert_namespace(items, "ns");
    assert!(index.wait_built(std::time::Duration::from_secs(120)));
    assert_eq!(index.stats().graphs, 1);
    let ns = Scope::Namespace("ns".into());
    let stranger = uuid::Uuid::new_v4();
    let mut graph_found = 0;
    for (c, center) in centers.iter().enumerate() {
        let query = near(center, 0.02);
        let own = index.recall(&query, 3, &ns, &convs[c], &HashSet::new());
        assert!(own.len() >= 3 && own.iter().all(|h| h.conversation_id == convs[c]), "cluster {c}: {own:?}");
        let other = index.recall(&query, 3, &ns, &stranger, &HashSet::new());
        graph_found += other.first().is_some_and(|h| h.conversation_id == convs[c]) as usize;
    }
    println!(
        "graph alone reached {graph_found} of {clusters} clusters; exact fallbacks {}",
        index.stats().exact_fallbacks
    );
    assert_eq!(graph_found, clusters, "every cluster is reachable from any conversation");
}

fn items_of(index: &VectorIndex, ns: &str, conv: &ConversationId) -> Vec<f32> {
    let spaces = index.ns.spaces.read().unwrap();
    let space = &spaces[ns];
    let slot = space.by_conv[conv][0] as usize;
    if let Some(v) = space.twin_vecs.get(&(slot as u32)) {
        return v.clone();
    }
    let graph = space.graph.as_ref().unwrap();
    let point = graph.get_point_indexation().into_iter().find(|p| p.get_origin_id() == slot).unwrap();
    let v = point.get_v().to_vec();
    v
}
