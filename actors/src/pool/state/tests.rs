//! Unit tests of the pool's decisions, without actix.

use super::*;

fn ready_pool(n: usize, q: usize) -> PoolState {
    let mut p = PoolState::new(n, 1, q);
    for i in 0..n {
        assert!(p.instance_ready(i, 0, 0));
    }
    p
}

fn granted(a: Admission) -> (usize, LeaseId) {
    match a {
        Admission::Granted { instance, lease, .. } => (instance, lease),
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[test]
fn grants_idle_then_queues_then_rejects() {
    let mut p = ready_pool(2, 1);
    granted(p.admit(None, None));
    granted(p.admit(None, None));
    assert!(matches!(p.admit(None, None), Admission::Queued(_)));
    assert_eq!(p.admit(None, None), Admission::Rejected);
    let s = p.status();
    assert_eq!((s.available, s.in_use, s.queued), (0, 2, 1));
}

#[test]
fn waiters_are_served_in_fifo_order() {
    let mut p = ready_pool(1, 3);
    let (i, l) = granted(p.admit(None, None));
    let w: Vec<WaiterId> = (0..3)
        .map(|_| match p.admit(None, None) {
            Admission::Queued(w) => w,
            other => panic!("{other:?}"),
        })
        .collect();
    let mut order = Vec::new();
    let (mut inst, mut lease) = (i, l);
    for _ in 0..3 {
        assert!(!p.release(inst, 0, lease, Outcome::Ok { tokens: 1 }));
        let g = p.dispatch();
        assert_eq!(g.len(), 1);
        order.push(g[0].waiter);
        inst = g[0].instance;
        lease = g[0].lease;
    }
    assert_eq!(order, w);
}

#[test]
fn new_request_does_not_jump_the_queue() {
    let mut p = ready_pool(1, 2);
    let (i, l) = granted(p.admit(None, None));
    let Admission::Queued(first) = p.admit(None, None) else { panic!() };
    p.release(i, 0, l, Outcome::Ok { tokens: 0 });
    // Released but not yet dispatched: a newcomer must queue behind `first`.
    assert!(matches!(p.admit(None, None), Admission::Queued(_)));
    assert_eq!(p.dispatch()[0].waiter, first);
}

#[test]
fn cancelled_waiter_and_undone_grant_leak_nothing() {
    let mut p = ready_pool(1, 2);
    let (i, l) = granted(p.admit(None, None));
    let Admission::Queued(w) = p.admit(None, None) else { panic!() };
    assert!(p.cancel_waiter(w));
    assert!(!p.cancel_waiter(w));
    let Admission::Queued(_) = p.admit(None, None) else { panic!() };
    p.release(i, 0, l, Outcome::Ok { tokens: 0 });
    let g = p.dispatch();
    p.undo_grant(&g[0]);
    let s = p.status();
    assert_eq!((s.available, s.in_use, s.queued), (1, 0, 0));
    assert_eq!(s.instances[0].stats.requests, 1);
}

#[test]
fn fault_replaces_and_stale_release_is_ignored() {
    let mut p = ready_pool(2, 0);
    let (i, l) = granted(p.admit(None, None));
    assert!(p.release(i, 0, l, Outcome::InstanceFault { reason: "decode".into() }));
    assert_eq!(p.status().unhealthy, 1);
    let gen = p.begin_replace(i);
    assert!(!p.release(i, 0, l, Outcome::Ok { tokens: 3 }), "second release of one lease");
    assert!(!p.instance_ready(i, gen - 1, 0), "stale ready");
    assert!(p.instance_ready(i, gen, 0));
    let s = p.status();
    assert_eq!((s.available, s.replaced, s.instances[i].stats.failures), (2, 1, 1));
}

#[test]
fn probes_go_to_busy_instances_too_and_a_failed_probe_asks_replacement() {
    let mut p = ready_pool(2, 0);
    let (busy, lease) = granted(p.admit(None, None));
    // The probe runs between steps, on an idle slot's sequence: busy or not, and
    // without taking a slot away from requests.
    assert_eq!(p.begin_probes(), vec![0, 1]);
    assert!(p.begin_probes().is_empty(), "one probe out per instance");
    granted(p.admit(None, None));
    assert!(!p.probe_done(1 - busy, 0, Ok(()), None));
    assert!(p.probe_done(busy, 0, Err("nan".into()), None));
    assert_eq!(p.state(busy), InstanceState::Unhealthy);
    // The lease it was serving ended with it; its late release is ignored.
    assert!(!p.release(busy, 0, lease, Outcome::Ok { tokens: 1 }));
    assert_eq!(p.status().in_use, 1);
}

#[test]
fn stop_accepting_turns_waiters_away() {
    let mut p = ready_pool(1, 2);
    granted(p.admit(None, None));
    let Admission::Queued(w) = p.admit(None, None) else { panic!() };
    assert_eq!(p.stop_accepting(), vec![w]);
    assert_eq!(p.admit(None, None), Admission::ShuttingDown);
}

#[test]
fn display_matches_console_format() {
    let mut p = ready_pool(3, 0);
    granted(p.admit(None, None));
    let text = p.status().to_string();
    assert!(text.contains("Available: 2/3"), "{text}");
    assert!(text.contains("In Use: 1"), "{text}");
}

#[test]
fn a_request_goes_back_to_the_instance_that_served_its_conversation() {
    let mut p = ready_pool(3, 4);
    let Admission::Granted { instance: a, lease: la, .. } = p.admit(Some(7), None) else { panic!() };
    let Admission::Granted { instance: b, lease: lb, .. } = p.admit(Some(9), None) else { panic!() };
    assert!(!p.release(a, 0, la, Outcome::Ok { tokens: 1 }));
    assert!(!p.release(b, 0, lb, Outcome::Ok { tokens: 1 }));
    // Three idle: each conversation finds its own instance again.
    let Admission::Granted { instance, lease, .. } = p.admit(Some(9), None) else { panic!() };
    assert_eq!(instance, b);
    p.release(instance, 0, lease, Outcome::Ok { tokens: 1 });
    let Admission::Granted { instance, .. } = p.admit(Some(7), None) else { panic!() };
    assert_eq!(instance, a);
}

#[test]
fn without_a_match_the_least_recently_used_instance_is_taken() {
    let mut p = ready_pool(3, 4);
    let leases: Vec<_> = (0..3).map(|k| p.admit(Some(k), None)).collect();
    for adm in &leases {
        let Admission::Granted { instance, lease, .. } = adm else { panic!() };
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.release(*instance, 0, *lease, Outcome::Ok { tokens: 1 });
    }
    let Admission::Granted { instance: first_released, .. } = &leases[0] else { panic!() };
    let Admission::Granted { instance, .. } = p.admit(Some(99), None) else { panic!() };
    assert_eq!(instance, *first_released, "the coldest cache is the one given away");
}

#[test]
fn affinity_never_makes_a_request_wait_or_jump_the_queue() {
    let mut p = ready_pool(2, 4);
    let Admission::Granted { instance: a, lease: la, .. } = p.admit(Some(1), None) else { panic!() };
    let Admission::Granted { instance: b, lease: lb, .. } = p.admit(Some(2), None) else { panic!() };
    // Both busy: a request for conversation 1 and then one for 3 queue in order.
    let Admission::Queued(w1) = p.admit(Some(3), None) else { panic!() };
    let Admission::Queued(w2) = p.admit(Some(1), None) else { panic!() };
    // Instance b frees first: the oldest waiter takes it (FIFO), match or not.
    p.release(b, 0, lb, Outcome::Ok { tokens: 1 });
    assert_eq!(p.dispatch(), vec![Grant { waiter: w1, instance: b, slot: 0, lease: p_lease(&p, b) }]);
    p.release(a, 0, la, Outcome::Ok { tokens: 1 });
    let grants = p.dispatch();
    assert_eq!((grants[0].waiter, grants[0].instance), (w2, a), "w2 gets its conversation's instance");
}

/// The current lease of a busy instance (read from the status through a release-free path).
fn p_lease(p: &PoolState, instance: usize) -> LeaseId {
    p.current_lease(instance, 0).expect("leased")
}

fn slotted_pool(n: usize, slots: usize, q: usize) -> PoolState {
    let mut p = PoolState::new(n, slots, q);
    for i in 0..n {
        assert!(p.instance_ready(i, 0, 0));
    }
    p
}

fn grant3(a: Admission) -> (usize, usize, LeaseId) {
    match a {
        Admission::Granted { instance, slot, lease } => (instance, slot, lease),
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[test]
fn slots_are_leased_spread_over_instances_and_counted() {
    let mut p = slotted_pool(2, 4, 2);
    let s = p.status();
    assert_eq!((s.total, s.available, s.in_use), (8, 8, 0));
    assert!(s.to_string().contains("Available: 8/8 slots on 2 instances"), "{s}");
    let grants: Vec<_> = (0..8).map(|_| grant3(p.admit(None, None))).collect();
    // Least loaded first: the instances alternate.
    let firsts: Vec<usize> = grants.iter().take(4).map(|g| g.0).collect();
    assert_eq!(firsts, vec![0, 1, 0, 1]);
    let mut pairs: Vec<(usize, usize)> = grants.iter().map(|g| (g.0, g.1)).collect();
    pairs.sort();
    pairs.dedup();
    assert_eq!(pairs.len(), 8, "every slot leased once");
    let s = p.status();
    assert_eq!((s.available, s.in_use, s.instances[0].slots_busy), (0, 8, 4));
    assert!(matches!(p.admit(None, None), Admission::Queued(_)));
    let (i, j, l) = grants[5];
    assert!(!p.release(i, j, l, Outcome::Ok { tokens: 5 }));
    let g = p.dispatch();
    assert_eq!((g[0].instance, g[0].slot), (i, j));
    assert_eq!(p.status().available, 0);
}

#[test]
fn a_conversation_goes_back_to_its_own_slot_even_on_a_busier_instance() {
    let mut p = slotted_pool(2, 4, 2);
    let (i7, s7, l7) = grant3(p.admit(Some(7), None));
    let others: Vec<_> = (0..3).map(|k| grant3(p.admit(Some(100 + k), None))).collect();
    p.release(i7, s7, l7, Outcome::Ok { tokens: 1 });
    // Instance i7 is busier than the other now, but its slot holds conversation 7.
    let (i, s, _) = grant3(p.admit(Some(7), None));
    assert_eq!((i, s), (i7, s7));
    drop(others);
}

#[test]
fn a_broken_instance_frees_its_slots_and_stale_releases_are_ignored() {
    let mut p = slotted_pool(1, 3, 0);
    let a = grant3(p.admit(None, None));
    let b = grant3(p.admit(None, None));
    assert!(p.release(a.0, a.1, a.2, Outcome::InstanceFault { reason: "decode".into() }));
    assert!(!p.release(b.0, b.1, b.2, Outcome::InstanceFault { reason: "decode".into() }), "replaced once");
    let s = p.status();
    assert_eq!((s.in_use, s.available, s.unhealthy), (0, 0, 1));
    assert!(!s.ready());
    let generation = p.begin_replace(0);
    assert!(p.instance_ready(0, generation, 0));
    assert_eq!(p.status().available, 3);
}

#[test]
fn a_remote_reports_its_slots_when_it_connects_and_a_down_one_serves_nothing() {
    // A local instance with 2 slots; a remote assumed to have 1 until it says 3.
    let mut p = PoolState::with_slots(vec![2, 1], 0);
    p.set_endpoint(1, "http://10.0.0.5:8080".into());
    assert!(p.instance_ready(0, 0, 2));
    p.mark_unhealthy(1, "remote http://10.0.0.5:8080: connection refused".into());
    let s = p.status();
    assert_eq!((s.available, s.total), (2, 3), "a down remote offers nothing");
    assert_eq!((s.instances[1].kind, s.instances[1].endpoint.as_deref()), ("remote", Some("http://10.0.0.5:8080")));
    let generation = p.begin_replace(1);
    assert!(p.instance_ready(1, generation, 3));
    let s = p.status();
    assert_eq!((s.available, s.total, s.instances[1].slots), (5, 5, 3));
    assert_eq!(s.instances[0].kind, "local");
    // Three requests at once: the least loaded member takes each.
    let firsts: Vec<usize> = (0..3).map(|_| grant3(p.admit(None, None)).0).collect();
    assert_eq!(firsts, vec![0, 1, 0]);
}

#[test]
fn fresh_requests_take_neighbouring_slots_so_a_step_stays_one_pass() {
    let mut p = PoolState::new(1, 8, 0);
    assert!(p.instance_ready(0, 0, 0));
    let leases: Vec<(usize, LeaseId)> = (0..8)
        .map(|k| match p.admit(Some(k), None) {
            Admission::Granted { slot, lease, .. } => (slot, lease),
            other => panic!("{other:?}"),
        })
        .collect();
    // Released so that the coldest caches lie apart: 0, 2, 4, 6, then the rest.
    for &k in &[0usize, 2, 4, 6, 1, 3, 5, 7] {
        let (slot, lease) = leases.iter().copied().find(|(s, _)| *s == k).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.release(0, slot, lease, Outcome::Ok { tokens: 1 });
    }
    let mut slots: Vec<usize> = (0..4)
        .map(|k| match p.admit(Some(100 + k), None) {
            Admission::Granted { slot, .. } => slot,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(slots[0], 0, "the coldest cache goes first");
    slots.sort();
    assert!(slots.windows(2).all(|w| w[1] == w[0] + 1), "four fresh requests in neighbouring slots: {slots:?}");
}

#[test]
fn with_moved_streams_a_fresh_request_takes_the_slot_whose_stream_is_next_to_the_busy_ones() {
    let mut p = PoolState::new(1, 6, 0);
    assert!(p.instance_ready(0, 0, 0));
    let streams = std::sync::Arc::new(crate::engine::SlotStreams::new(6));
    p.set_streams(0, streams.clone());
    // Slots 0 and 1 busy; slot 1's sequence now lives in stream 5 and slot
    // 5's cache in stream 1. Streams 0 and 5 are busy: by slot number slot 2
    // would be next to them, by stream only slot 5 (stream 1) or slot 4
    // (stream 4) is.
    let slot_of = |a: Admission| match a {
        Admission::Granted { slot, .. } => slot,
        other => panic!("{other:?}"),
    };
    assert_eq!(slot_of(p.admit(Some(1), None)), 0);
    assert_eq!(slot_of(p.admit(Some(2), None)), 1);
    streams.swap(1, 5);
    let next = slot_of(p.admit(Some(3), None));
    assert!(next == 5 || next == 4, "a slot whose stream is next to stream 0 or 5, got slot {next}");
}

fn queued(a: Admission) -> WaiterId {
    match a {
        Admission::Queued(w) => w,
        other => panic!("expected a queue place, got {other:?}"),
    }
}

#[test]
fn a_client_alone_uses_every_slot_but_not_beyond_its_share_while_another_waits() {
    const A: Option<u64> = Some(1);
    const B: Option<u64> = Some(2);
    let mut p = ready_pool(4, 8).with_client_limit(3);
    // Alone, A takes all four slots and queues: nothing is left idle.
    let leases: Vec<(usize, LeaseId)> = (0..4).map(|_| granted(p.admit(None, A))).collect();
    queued(p.admit(None, A));
    assert_eq!(p.held_by(1), 5);
    // B waits; now A, over its share of 3, is refused more.
    let b = queued(p.admit(None, B));
    assert_eq!(p.admit(None, A), Admission::ClientLimit { limit: 3 });
    assert_eq!(p.held_by(1), 5, "a refusal holds nothing");
    // The first freed slot goes to B, although A queued first.
    let (i, l) = leases[0];
    p.release(i, 0, l, Outcome::Ok { tokens: 1 });
    let g = p.dispatch();
    assert_eq!(g.iter().map(|g| g.waiter).collect::<Vec<_>>(), vec![b]);
    assert_eq!((p.held_by(1), p.held_by(2)), (4, 1));
    // Leases and queue places are all counted back.
    for &(i, l) in &leases[1..] {
        p.release(i, 0, l, Outcome::Ok { tokens: 1 });
    }
    let g = p.dispatch();
    assert_eq!(g.len(), 1);
    p.release(g[0].instance, 0, g[0].lease, Outcome::Ok { tokens: 1 });
    assert_eq!(p.held_by(1), 0);
}

#[test]
fn a_full_queue_gives_the_flooding_clients_newest_place_to_a_client_within_its_share() {
    const A: Option<u64> = Some(1);
    const B: Option<u64> = Some(2);
    let mut p = ready_pool(1, 3).with_client_limit(1);
    granted(p.admit(None, A));
    let first = queued(p.admit(None, A));
    let _second = queued(p.admit(None, A));
    let newest = queued(p.admit(None, A));
    // The queue is full of A's places; B still gets one: A's newest.
    let b = queued(p.admit(None, B));
    assert_eq!(p.take_evicted(), vec![newest]);
    assert_eq!((p.held_by(1), p.held_by(2)), (3, 1));
    // Without a share, a full queue is full for everyone.
    let mut open = ready_pool(1, 1);
    granted(open.admit(None, A));
    queued(open.admit(None, A));
    assert_eq!(open.admit(None, B), Admission::Rejected);
    assert!(open.take_evicted().is_empty());
    // An instance that breaks gives its clients' slots back.
    p.mark_unhealthy(0, "test".into());
    assert_eq!(p.held_by(1), 2, "A's lease went with the instance, its queue places stay");
    assert!(p.cancel_waiter(first) && p.cancel_waiter(b));
    assert_eq!((p.held_by(1), p.held_by(2)), (1, 0));
}
