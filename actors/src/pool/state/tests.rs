//! Unit tests of the pool's decisions, without actix.

use super::*;

fn ready_pool(n: usize, q: usize) -> PoolState {
    let mut p = PoolState::new(n, q);
    for i in 0..n {
        assert!(p.instance_ready(i, 0));
    }
    p
}

fn granted(a: Admission) -> (usize, LeaseId) {
    match a {
        Admission::Granted { instance, lease } => (instance, lease),
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[test]
fn grants_idle_then_queues_then_rejects() {
    let mut p = ready_pool(2, 1);
    granted(p.admit(None));
    granted(p.admit(None));
    assert!(matches!(p.admit(None), Admission::Queued(_)));
    assert_eq!(p.admit(None), Admission::Rejected);
    let s = p.status();
    assert_eq!((s.available, s.in_use, s.queued), (0, 2, 1));
}

#[test]
fn waiters_are_served_in_fifo_order() {
    let mut p = ready_pool(1, 3);
    let (i, l) = granted(p.admit(None));
    let w: Vec<WaiterId> = (0..3)
        .map(|_| match p.admit(None) {
            Admission::Queued(w) => w,
            other => panic!("{other:?}"),
        })
        .collect();
    let mut order = Vec::new();
    let (mut inst, mut lease) = (i, l);
    for _ in 0..3 {
        assert!(!p.release(inst, lease, Outcome::Ok { tokens: 1 }));
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
    let (i, l) = granted(p.admit(None));
    let Admission::Queued(first) = p.admit(None) else { panic!() };
    p.release(i, l, Outcome::Ok { tokens: 0 });
    // Released but not yet dispatched: a newcomer must queue behind `first`.
    assert!(matches!(p.admit(None), Admission::Queued(_)));
    assert_eq!(p.dispatch()[0].waiter, first);
}

#[test]
fn cancelled_waiter_and_undone_grant_leak_nothing() {
    let mut p = ready_pool(1, 2);
    let (i, l) = granted(p.admit(None));
    let Admission::Queued(w) = p.admit(None) else { panic!() };
    assert!(p.cancel_waiter(w));
    assert!(!p.cancel_waiter(w));
    let Admission::Queued(_) = p.admit(None) else { panic!() };
    p.release(i, l, Outcome::Ok { tokens: 0 });
    let g = p.dispatch();
    p.undo_grant(&g[0]);
    let s = p.status();
    assert_eq!((s.available, s.in_use, s.queued), (1, 0, 0));
    assert_eq!(s.instances[0].stats.requests, 1);
}

#[test]
fn fault_replaces_and_stale_release_is_ignored() {
    let mut p = ready_pool(2, 0);
    let (i, l) = granted(p.admit(None));
    assert!(p.release(i, l, Outcome::InstanceFault { reason: "decode".into() }));
    assert_eq!(p.status().unhealthy, 1);
    let gen = p.begin_replace(i);
    assert!(!p.release(i, l, Outcome::Ok { tokens: 3 }), "second release of one lease");
    assert!(!p.instance_ready(i, gen - 1), "stale ready");
    assert!(p.instance_ready(i, gen));
    let s = p.status();
    assert_eq!((s.available, s.replaced, s.instances[i].stats.failures), (2, 1, 1));
}

#[test]
fn probes_skip_busy_and_failed_probe_asks_replacement() {
    let mut p = ready_pool(2, 0);
    let (busy, _) = granted(p.admit(None));
    let probed = p.begin_probes();
    assert_eq!(probed, vec![1 - busy]);
    assert_eq!(p.admit(None), Admission::Rejected, "probing instance is not leased");
    assert!(p.probe_done(probed[0], 0, Err("nan".into())));
    assert_eq!(p.state(probed[0]), InstanceState::Unhealthy);
}

#[test]
fn stop_accepting_turns_waiters_away() {
    let mut p = ready_pool(1, 2);
    granted(p.admit(None));
    let Admission::Queued(w) = p.admit(None) else { panic!() };
    assert_eq!(p.stop_accepting(), vec![w]);
    assert_eq!(p.admit(None), Admission::ShuttingDown);
}

#[test]
fn display_matches_console_format() {
    let mut p = ready_pool(3, 0);
    granted(p.admit(None));
    let text = p.status().to_string();
    assert!(text.contains("Available: 2/3"), "{text}");
    assert!(text.contains("In Use: 1"), "{text}");
}

#[test]
fn a_request_goes_back_to_the_instance_that_served_its_conversation() {
    let mut p = ready_pool(3, 4);
    let Admission::Granted { instance: a, lease: la } = p.admit(Some(7)) else { panic!() };
    let Admission::Granted { instance: b, lease: lb } = p.admit(Some(9)) else { panic!() };
    assert!(!p.release(a, la, Outcome::Ok { tokens: 1 }));
    assert!(!p.release(b, lb, Outcome::Ok { tokens: 1 }));
    // Three idle: each conversation finds its own instance again.
    let Admission::Granted { instance, lease } = p.admit(Some(9)) else { panic!() };
    assert_eq!(instance, b);
    p.release(instance, lease, Outcome::Ok { tokens: 1 });
    let Admission::Granted { instance, .. } = p.admit(Some(7)) else { panic!() };
    assert_eq!(instance, a);
}

#[test]
fn without_a_match_the_least_recently_used_instance_is_taken() {
    let mut p = ready_pool(3, 4);
    let leases: Vec<_> = (0..3).map(|k| p.admit(Some(k))).collect();
    for adm in &leases {
        let Admission::Granted { instance, lease } = adm else { panic!() };
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.release(*instance, *lease, Outcome::Ok { tokens: 1 });
    }
    let Admission::Granted { instance: first_released, .. } = &leases[0] else { panic!() };
    let Admission::Granted { instance, .. } = p.admit(Some(99)) else { panic!() };
    assert_eq!(instance, *first_released, "the coldest cache is the one given away");
}

#[test]
fn affinity_never_makes_a_request_wait_or_jump_the_queue() {
    let mut p = ready_pool(2, 4);
    let Admission::Granted { instance: a, lease: la } = p.admit(Some(1)) else { panic!() };
    let Admission::Granted { instance: b, lease: lb } = p.admit(Some(2)) else { panic!() };
    // Both busy: a request for conversation 1 and then one for 3 queue in order.
    let Admission::Queued(w1) = p.admit(Some(3)) else { panic!() };
    let Admission::Queued(w2) = p.admit(Some(1)) else { panic!() };
    // Instance b frees first: the oldest waiter takes it (FIFO), match or not.
    p.release(b, lb, Outcome::Ok { tokens: 1 });
    assert_eq!(p.dispatch(), vec![Grant { waiter: w1, instance: b, lease: p_lease(&p, b) }]);
    p.release(a, la, Outcome::Ok { tokens: 1 });
    let grants = p.dispatch();
    assert_eq!((grants[0].waiter, grants[0].instance), (w2, a), "w2 gets its conversation's instance");
}

/// The current lease of a busy instance (read from the status through a release-free path).
fn p_lease(p: &PoolState, instance: usize) -> LeaseId {
    p.current_lease(instance).expect("leased")
}
