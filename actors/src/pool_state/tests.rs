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
    granted(p.admit());
    granted(p.admit());
    assert!(matches!(p.admit(), Admission::Queued(_)));
    assert_eq!(p.admit(), Admission::Rejected);
    let s = p.status();
    assert_eq!((s.available, s.in_use, s.queued), (0, 2, 1));
}

#[test]
fn waiters_are_served_in_fifo_order() {
    let mut p = ready_pool(1, 3);
    let (i, l) = granted(p.admit());
    let w: Vec<WaiterId> = (0..3)
        .map(|_| match p.admit() {
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
    let (i, l) = granted(p.admit());
    let Admission::Queued(first) = p.admit() else { panic!() };
    p.release(i, l, Outcome::Ok { tokens: 0 });
    // Released but not yet dispatched: a newcomer must queue behind `first`.
    assert!(matches!(p.admit(), Admission::Queued(_)));
    assert_eq!(p.dispatch()[0].waiter, first);
}

#[test]
fn cancelled_waiter_and_undone_grant_leak_nothing() {
    let mut p = ready_pool(1, 2);
    let (i, l) = granted(p.admit());
    let Admission::Queued(w) = p.admit() else { panic!() };
    assert!(p.cancel_waiter(w));
    assert!(!p.cancel_waiter(w));
    let Admission::Queued(_) = p.admit() else { panic!() };
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
    let (i, l) = granted(p.admit());
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
    let (busy, _) = granted(p.admit());
    let probed = p.begin_probes();
    assert_eq!(probed, vec![1 - busy]);
    assert_eq!(p.admit(), Admission::Rejected, "probing instance is not leased");
    assert!(p.probe_done(probed[0], 0, Err("nan".into())));
    assert_eq!(p.state(probed[0]), InstanceState::Unhealthy);
}

#[test]
fn stop_accepting_turns_waiters_away() {
    let mut p = ready_pool(1, 2);
    granted(p.admit());
    let Admission::Queued(w) = p.admit() else { panic!() };
    assert_eq!(p.stop_accepting(), vec![w]);
    assert_eq!(p.admit(), Admission::ShuttingDown);
}

#[test]
fn display_matches_console_format() {
    let mut p = ready_pool(3, 0);
    granted(p.admit());
    let text = p.status().to_string();
    assert!(text.contains("Available: 2/3"), "{text}");
    assert!(text.contains("In Use: 1"), "{text}");
}
