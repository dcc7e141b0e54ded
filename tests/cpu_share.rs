//! Decode threads that follow the free cores, on the real model: with a busy
//! process beside it, an instance decodes with fewer threads (and the same
//! greedy text); once the process ends it gets all of them back. An instance
//! with `adapt_threads` off keeps its threads throughout.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{slotted, start};
use futures::StreamExt;
use modelpool_actors::engine::cpu::CpuStatus;
use modelpool_actors::{ChatMessage, GenEvent, GenerateRequest, InstanceOptions, PoolHandle, SamplingParams};

/// A shell loop that never sleeps; killed on drop.
struct Neighbour(Child);

impl Drop for Neighbour {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn greedy(pool: &PoolHandle) -> String {
    let request = GenerateRequest {
        messages: vec![ChatMessage::user("Explain what a compiler does.")],
        sampling: SamplingParams::greedy(48),
        ..Default::default()
    };
    let mut stream = pool.generate(request).await.expect("a slot");
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event {
            GenEvent::Token(piece) => text.push_str(&piece),
            GenEvent::Done(_) => {}
            GenEvent::Error(e) => panic!("{e}"),
            GenEvent::Logprob(_) => {}
        }
    }
    text
}

/// (configured, current) threads of the instance that adapts, or of the one that does not.
fn threads(status: &CpuStatus, adapts: bool) -> (u32, u32) {
    let t = status.instances.iter().find(|t| t.adapts == adapts).expect("the instance is registered");
    (t.configured, t.current)
}

/// Polls the monitor's status until `cond` holds; panics with the last one after `limit`.
/// (Both pools of the test share one engine, and so its monitor.)
async fn wait_for_cpu(pool: &PoolHandle, limit: Duration, cond: impl Fn(&CpuStatus) -> bool) -> CpuStatus {
    let started = Instant::now();
    loop {
        let s = pool.engine().cpu_status().expect("local instances exist");
        if cond(&s) {
            return s;
        }
        assert!(started.elapsed() < limit, "not reached within {limit:?}; last status: {s:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix::test]
async fn a_busy_neighbour_lowers_an_instances_threads_and_its_end_gives_them_back() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u32;
    assert!(cores >= 2, "this test needs 2 cores or more (has {cores}): one thread has nothing to give up");
    // One pool's instance adapts (the default); another pool's has its threads fixed.
    let mut adapting = slotted(1, 1, 4);
    adapting.instance.n_threads = cores;
    let pool = start(adapting).await;
    let mut fixed = slotted(1, 1, 4);
    fixed.instance = InstanceOptions { n_threads: cores, adapt_threads: false, ..fixed.instance };
    let fixed_pool = start(fixed).await;

    // Each pool's first answer decodes the whole prompt in one batch; every
    // later one reuses all of it but its last token. Greedy text repeats
    // only from the same cache state, so the text compared is a later one.
    greedy(&pool).await;
    greedy(&fixed_pool).await;
    let quiet_text = greedy(&pool).await;
    let s = wait_for_cpu(&pool, Duration::from_secs(5), |s| s.others_busy < 0.3).await;
    assert!(s.adaptive, "{s:#?}");
    assert_eq!(s.instances.len(), 2, "{s:#?}");
    assert_eq!(threads(&s, true), (cores, cores), "quiet: all threads; {s:#?}");
    assert_eq!(threads(&s, false), (cores, cores), "{s:#?}");

    let neighbour = Neighbour(Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh"));
    // The monitor reads once a second; it needs a reading or two to see the neighbour.
    let s = wait_for_cpu(&pool, Duration::from_secs(10), |s| threads(s, true).1 < cores).await;
    assert!(s.others_busy > 0.45, "a busy loop takes most of a core: {s:#?}");
    assert_eq!(s.budget, cores - 1, "one core lost to the neighbour: {s:#?}");
    assert_eq!(threads(&s, true), (cores, cores - 1), "{s:#?}");
    assert_eq!(threads(&s, false), (cores, cores), "adapt_threads off: threads stay as set; {s:#?}");
    // Fewer threads, the same answer: each row of a matrix product is summed
    // by one thread, so the thread count does not change the floats.
    assert_eq!(greedy(&pool).await, quiet_text, "greedy text with {} thread(s)", cores - 1);
    assert_eq!(greedy(&fixed_pool).await, quiet_text);

    drop(neighbour);
    let s = wait_for_cpu(&pool, Duration::from_secs(10), |s| threads(s, true).1 == cores).await;
    assert_eq!(s.budget, cores, "{s:#?}");
    assert_eq!(greedy(&pool).await, quiet_text);
}
