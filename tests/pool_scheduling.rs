//! The pool on the real model: FIFO queueing, admission errors, no leaked leases.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{options, request, start, wait_for};
use modelpool_actors::PoolError;

#[actix::test]
async fn two_instances_four_requests_run_two_at_a_time_in_fifo_order() {
    let pool = start(options(2, 4)).await;
    let s = pool.status().await.unwrap();
    assert_eq!((s.total, s.available, s.in_use, s.queued), (2, 2, 0, 0));

    // Watch the pool the whole time: never more than 2 in use.
    let max_in_use = Arc::new(Mutex::new(0usize));
    let watcher = {
        let (pool, max_in_use) = (pool.clone(), max_in_use.clone());
        actix::spawn(async move {
            loop {
                let s = pool.status().await.unwrap();
                {
                    let mut m = max_in_use.lock().unwrap();
                    *m = (*m).max(s.in_use);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // A and B take both instances; A is short, B is long.
    let a = pool.generate(request("Count from one to five.", 16)).await.unwrap();
    let b = pool.generate(request("Write a long story about a cat.", 96)).await.unwrap();
    let s = pool.status().await.unwrap();
    assert_eq!((s.available, s.in_use, s.queued), (0, 2, 0), "{s}");

    // C then D queue, in that order.
    let order = Arc::new(Mutex::new(Vec::new()));
    let waiter = |name: &'static str| {
        let (pool, order) = (pool.clone(), order.clone());
        actix::spawn(async move {
            let lease = pool.acquire().await.expect("queued request gets an instance");
            order.lock().unwrap().push(name);
            let (text, done) = lease
                .run(pool.prepare(request("Say hello.", 8)).unwrap(), Duration::from_secs(60))
                .collect_text()
                .await
                .unwrap();
            (text, done)
        })
    };
    let c = waiter("C");
    wait_for(&pool, Duration::from_secs(5), |s| s.queued == 1).await;
    let d = waiter("D");
    let s = wait_for(&pool, Duration::from_secs(5), |s| s.queued == 2).await;
    assert_eq!((s.available, s.in_use), (0, 2), "{s}");

    let (a_text, a_done) = a.collect_text().await.unwrap();
    let (b_text, _) = b.collect_text().await.unwrap();
    let (c_text, _) = c.await.unwrap();
    let (d_text, _) = d.await.unwrap();
    assert!(a_done.usage.completion_tokens > 0 && !a_text.is_empty());
    assert!(!b_text.is_empty() && !c_text.is_empty() && !d_text.is_empty());
    assert_eq!(*order.lock().unwrap(), vec!["C", "D"], "waiters are served first in, first out");

    let s = wait_for(&pool, Duration::from_secs(5), |s| s.in_use == 0).await;
    watcher.abort();
    assert_eq!(*max_in_use.lock().unwrap(), 2, "exactly two ran at once");
    assert_eq!((s.available, s.queued), (2, 0), "{s}");
    assert_eq!(s.totals().requests, 4);
    assert!(s.totals().tokens >= 4);
    pool.shutdown().await;
}

#[actix::test]
async fn acquire_timeout_and_full_queue_are_typed_errors_and_leak_nothing() {
    let mut opts = options(1, 1);
    opts.acquire_timeout = Duration::from_millis(400);
    let pool = start(opts).await;

    let held = pool.acquire().await.unwrap();
    // The second request waits in the queue...
    let waiting = {
        let pool = pool.clone();
        actix::spawn(async move {
            let t = Instant::now();
            (pool.acquire().await.map(|_| ()), t.elapsed())
        })
    };
    wait_for(&pool, Duration::from_secs(2), |s| s.queued == 1).await;
    // ...so a third finds the queue full, at once.
    let full = pool.acquire().await.map(|_| ());
    assert!(matches!(full, Err(PoolError::QueueFull { max_queue: 1 })), "{full:?}");
    // Refused, not queued: the second request still holds the one place.
    assert_eq!(pool.status().await.unwrap().queued, 1, "queue full is immediate");

    let (res, waited) = waiting.await.unwrap();
    assert!(matches!(res, Err(PoolError::AcquireTimeout { timeout_ms: 400 })), "{res:?}");
    assert!(waited >= Duration::from_millis(390), "gave up before the timeout: waited {waited:?}");

    drop(held);
    let s = wait_for(&pool, Duration::from_secs(2), |s| s.available == 1).await;
    assert_eq!((s.in_use, s.queued), (0, 0), "no leaked lease: {s}");
    // And the instance still serves.
    let (text, _) = pool.generate(request("Hi", 4)).await.unwrap().collect_text().await.unwrap();
    assert!(!text.is_empty());
    pool.shutdown().await;
}

#[actix::test]
async fn a_lease_dropped_without_use_returns_the_instance() {
    let pool = start(options(1, 1)).await;
    for _ in 0..3 {
        let lease = pool.acquire().await.unwrap();
        assert_eq!(pool.status().await.unwrap().in_use, 1);
        drop(lease);
        wait_for(&pool, Duration::from_secs(2), |s| s.available == 1).await;
    }
    pool.shutdown().await;
}

#[actix::test]
async fn a_waiter_that_goes_away_leaves_the_queue_at_once() {
    let pool = start(options(1, 1)).await;
    let held = pool.acquire().await.unwrap();
    let gone = {
        let pool = pool.clone();
        actix::spawn(async move { pool.acquire().await.map(|_| ()) })
    };
    wait_for(&pool, Duration::from_secs(2), |s| s.queued == 1).await;
    gone.abort();
    // Its place is free again long before the acquire timeout (60 s here).
    wait_for(&pool, Duration::from_secs(1), |s| s.queued == 0).await;
    let next = {
        let pool = pool.clone();
        actix::spawn(async move { pool.acquire().await.map(|l| l.instance()) })
    };
    wait_for(&pool, Duration::from_secs(2), |s| s.queued == 1).await;
    drop(held);
    assert_eq!(next.await.unwrap().unwrap(), 0, "the live waiter gets the instance");
    wait_for(&pool, Duration::from_secs(2), |s| s.available == 1 && s.queued == 0).await;
    pool.shutdown().await;
}
