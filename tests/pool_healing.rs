//! Broken instances are replaced on the shared weights: failed decode, a
//! panicking thread, a stuck generation, a failed health probe.

mod common;

use std::time::{Duration, Instant};

use common::{engine, options, start, wait_for};
use modelpool_actors::{ChatMessage, Fault, GenerateRequest, PoolError, PoolHandle, SamplingParams};

fn request(max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        messages: vec![ChatMessage::user("Tell me about the sea.")],
        sampling: SamplingParams::greedy(max_tokens),
        ..Default::default()
    }
}

async fn assert_weights_shared(pool: &PoolHandle, n: usize) {
    for i in 0..n {
        let info = pool.instance_info(i).await.expect("instance is live");
        assert_eq!(info.weights_addr, engine().weights_addr(), "instance {i} uses the one shared copy of the weights");
    }
}

async fn fail_one(pool: &PoolHandle, fault: Fault) -> PoolError {
    let lease = pool.acquire().await.unwrap();
    let instance = lease.instance();
    assert!(pool.inject_fault(instance, fault).await);
    let err =
        lease.run(pool.prepare(request(16)).unwrap(), pool.options().max_generation).collect_text().await.unwrap_err();
    let s = wait_for(pool, Duration::from_secs(10), |s| s.replaced >= 1 && s.available == s.total).await;
    assert_eq!(s.instances[instance].stats.replacements, 1, "{s:#?}");
    assert_eq!(s.instances[instance].stats.failures, 1);
    assert!(s.instances[instance].last_error.is_some());
    err
}

#[actix::test]
async fn failed_decode_replaces_the_instance() {
    let pool = start(options(2, 2)).await;
    let err = fail_one(&pool, Fault::FailNextDecode).await;
    assert!(matches!(err, PoolError::InstanceFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("decode"), "{err}");
    assert_weights_shared(&pool, 2).await;
    // Both instances serve again.
    let a = pool.generate(request(8)).await.unwrap();
    let b = pool.generate(request(8)).await.unwrap();
    assert!(a.collect_text().await.is_ok() && b.collect_text().await.is_ok());
    pool.shutdown().await;
}

#[actix::test]
async fn panicking_instance_thread_is_replaced() {
    let pool = start(options(2, 2)).await;
    let err = fail_one(&pool, Fault::PanicNextDecode).await;
    assert!(matches!(err, PoolError::InstanceFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("died"), "{err}");
    assert_weights_shared(&pool, 2).await;
    let (text, _) = pool.generate(request(8)).await.unwrap().collect_text().await.unwrap();
    assert!(!text.is_empty());
    pool.shutdown().await;
}

#[actix::test]
async fn stuck_generation_is_cut_off_and_replaced() {
    let mut opts = options(2, 2);
    opts.max_generation = Duration::from_millis(600);
    let pool = start(opts).await;
    let lease = pool.acquire().await.unwrap();
    // A stall far longer than the limit: an answer before it ends is the limit's.
    let stall = Duration::from_secs(20);
    assert!(pool.inject_fault(lease.instance(), Fault::StallNextDecode(stall)).await);
    let t = Instant::now();
    let err =
        lease.run(pool.prepare(request(16)).unwrap(), Duration::from_millis(600)).collect_text().await.unwrap_err();
    assert!(matches!(err, PoolError::GenerationTimeout { limit_ms: 600 }), "{err:?}");
    assert!(t.elapsed() < stall, "the client is answered at the limit, not after the stall");
    let s = wait_for(&pool, Duration::from_secs(10), |s| s.replaced == 1 && s.available == 2).await;
    assert_eq!(s.totals().failures, 1);
    assert_weights_shared(&pool, 2).await;
    pool.shutdown().await;
}

#[actix::test]
async fn failed_health_probe_replaces_an_idle_instance() {
    let mut opts = options(1, 1);
    opts.health_interval = Duration::from_millis(100);
    let pool = start(opts).await;
    assert!(pool.inject_fault(0, Fault::FailNextDecode).await);
    let s = wait_for(&pool, Duration::from_secs(5), |s| s.replaced == 1 && s.available == 1).await;
    assert!(s.instances[0].last_error.as_deref().unwrap_or("").contains("probe"), "{s:#?}");
    pool.shutdown().await;
}

#[actix::test]
async fn a_stalled_probe_replaces_the_instance_while_the_others_serve() {
    let mut opts = options(2, 4);
    // Probes run between steps, on busy instances too: the limit leaves room
    // for a step of a request that the replacement serves meanwhile.
    opts.health_interval = Duration::from_millis(1000);
    let pool = start(opts).await;
    // Instance 0's next decode (its probe) blocks for 10 s.
    assert!(pool.inject_fault(0, Fault::StallNextDecode(Duration::from_secs(10))).await);
    let s = wait_for(&pool, Duration::from_secs(5), |s| s.replaced >= 1).await;
    assert!(s.instances[0].last_error.as_deref().unwrap_or("").contains("did not answer within 1000 ms"), "{s:#?}");
    // The other instance serves meanwhile, and the pool comes back to full size.
    let (text, _) = pool.generate(request(4)).await.unwrap().collect_text().await.unwrap();
    assert!(!text.is_empty());
    wait_for(&pool, Duration::from_secs(5), |s| s.available == 2 && s.replaced >= 1).await;
    pool.shutdown().await;
}
