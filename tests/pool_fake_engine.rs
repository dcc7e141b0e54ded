//! The pool manager's wiring with a fake engine behind the `Engine` seam:
//! replacement back-off and start-up failure, which the real model cannot be
//! made to show on demand.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelpool_actors::engine::{CacheKey, InstanceBackend, ProbeReply, SeqEvent, SeqSink, SlotStreams};
use modelpool_actors::{
    ChatMessage, Completion, Engine, EngineError, EngineInfo, Fault, FinishReason, GenerateRequest, InstanceInfo,
    InstanceOptions, PoolError, PoolHandle, PoolOptions, PreparedRequest, Usage,
};

/// Creates instances until `fail_after`, then refuses; counts attempts and
/// notes when each was made.
struct FakeEngine {
    created: AtomicUsize,
    fail_after: usize,
    attempts: std::sync::Mutex<Vec<Instant>>,
    /// A tokenizer behind HTTP (a remote's `/tokenize`) that takes this long.
    slow_remote_tokenizer: Option<Duration>,
}

impl FakeEngine {
    fn new(fail_after: usize) -> Self {
        Self { created: AtomicUsize::new(0), fail_after, attempts: Default::default(), slow_remote_tokenizer: None }
    }
}

struct FakeInstance {
    fault: Option<Fault>,
    running: Vec<(usize, SeqSink)>,
}

impl InstanceBackend for FakeInstance {
    fn streams(&self) -> Arc<SlotStreams> {
        Arc::new(SlotStreams::new(1))
    }
    fn start(&mut self, slot: usize, _: PreparedRequest, _: CacheKey, _: Instant, sink: SeqSink) {
        self.running.push((slot, sink));
    }
    fn cancel(&mut self, slot: usize) {
        self.running.retain(|(s, _)| *s != slot);
    }
    fn active(&self) -> usize {
        self.running.len()
    }
    /// One step finishes every sequence with "ok", or fails them all.
    fn step(&mut self) -> Result<bool, EngineError> {
        let failed = self.fault.take().is_some();
        let worked = !self.running.is_empty();
        for (_, sink) in self.running.drain(..) {
            if failed {
                sink.done(Err(EngineError::Decode("fake failure".into())));
            } else {
                let _ = sink.offer(SeqEvent::Piece("ok".into()));
                let usage = Usage { completion_tokens: 1, ..Usage::default() };
                sink.done(Ok(Completion { usage, finish_reason: FinishReason::Stop }));
            }
        }
        if failed {
            return Err(EngineError::Decode("fake failure".into()));
        }
        Ok(worked)
    }
    fn probe(&mut self) -> ProbeReply {
        Ok(()).into()
    }
    fn info(&self) -> InstanceInfo {
        InstanceInfo { weights_addr: 1, kv_bytes_estimate: 0, endpoint: None }
    }
    fn inject_fault(&mut self, fault: Fault) {
        self.fault = Some(fault);
    }
}

impl Engine for FakeEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo { model_name: "fake".into(), weights_bytes: 0, n_ctx_train: 0, per_request: false }
    }
    fn create_instance(&self, _: usize, _: &InstanceOptions) -> Result<Box<dyn InstanceBackend>, EngineError> {
        self.attempts.lock().unwrap().push(Instant::now());
        if self.created.fetch_add(1, Ordering::SeqCst) >= self.fail_after {
            return Err(EngineError::Context("fake: out of memory".into()));
        }
        Ok(Box::new(FakeInstance { fault: None, running: Vec::new() }))
    }
    /// One token per message.
    fn prompt_tokens(&self, m: &[ChatMessage]) -> Result<Vec<i32>, EngineError> {
        if let Some(wait) = self.slow_remote_tokenizer {
            std::thread::sleep(wait);
        }
        Ok(vec![0; m.len()])
    }
    fn count_tokens(&self, t: &str) -> u32 {
        t.len() as u32
    }
    fn tokenizer(&self) -> (&'static str, String) {
        match self.slow_remote_tokenizer {
            Some(_) => ("remote", "http://fake/tokenize".into()),
            None => ("local", "fake".into()),
        }
    }
}

fn opts(n: usize) -> PoolOptions {
    PoolOptions {
        instances: n,
        max_queue: 4,
        acquire_timeout: Duration::from_secs(5),
        max_generation: Duration::from_secs(5),
        health_interval: Duration::ZERO,
        instance: InstanceOptions::single(1024, 1),
        remotes: Vec::new(),
        max_per_client: 0,
    }
}

#[actix::test]
async fn failing_replacements_back_off_instead_of_spinning() {
    let engine = Arc::new(FakeEngine::new(2));
    let pool = PoolHandle::start(engine.clone(), opts(2), Arc::new(|_| {})).await.unwrap();
    let lease = pool.acquire().await.unwrap();
    pool.inject_fault(lease.instance(), Fault::FailNextDecode).await;
    let err = lease
        .run(
            pool.prepare(GenerateRequest { messages: vec![ChatMessage::user("hi")], ..Default::default() }).unwrap(),
            Duration::from_secs(5),
        )
        .collect_text()
        .await
        .unwrap_err();
    assert!(matches!(err, PoolError::InstanceFailed { .. }), "{err:?}");
    // Three failed replacements (the first at once), each after a wait
    // that doubles: 200, 400, 800 ms. A busy machine only makes the gaps longer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine.created.load(Ordering::SeqCst) < 2 + 4 {
        assert!(Instant::now() < deadline, "replacements stopped being tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let times = engine.attempts.lock().unwrap()[2..6].to_vec();
    for (i, pair) in times.windows(2).enumerate() {
        let (gap, least) = (pair[1] - pair[0], Duration::from_millis(200 << i));
        assert!(
            gap >= least,
            "replacement attempt {} came {gap:?} after the one before, under the {least:?} back-off",
            i + 2
        );
    }
    let s = pool.status().await.unwrap();
    assert_eq!((s.available, s.unhealthy + s.loading), (1, 1), "{s}");
    // The healthy instance keeps serving meanwhile.
    let (text, _) = pool
        .generate(GenerateRequest { messages: vec![ChatMessage::user("hi")], ..Default::default() })
        .await
        .unwrap()
        .collect_text()
        .await
        .unwrap();
    assert_eq!(text, "ok");
    pool.shutdown().await;
}

#[actix::test]
async fn start_up_fails_with_the_instance_named_when_a_context_cannot_be_made() {
    let engine = Arc::new(FakeEngine::new(1));
    let err = PoolHandle::start(engine, opts(3), Arc::new(|_| {})).await.err().unwrap();
    assert!(err.to_string().contains("instance 2") && err.to_string().contains("out of memory"), "{err}");
}

#[actix::test]
async fn a_waiter_dropped_before_its_queue_reply_does_not_hold_a_queue_place() {
    let mut o = opts(1);
    o.max_queue = 1;
    let pool = PoolHandle::start(Arc::new(FakeEngine::new(9)), o, Arc::new(|_| {})).await.unwrap();
    let held = pool.acquire().await.unwrap();
    // Polled once: the Acquire is in the manager's mailbox; dropped before the reply.
    {
        let mut early = Box::pin(pool.acquire());
        assert!(futures::poll!(&mut early).is_pending());
    }
    // The manager queued it, then found nobody to tell: the place is free for the next caller.
    let next = {
        let pool = pool.clone();
        actix::spawn(async move { pool.acquire().await.map(|l| l.instance()) })
    };
    // The live waiter gets the one place (a leaked place would refuse it).
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = pool.status().await.unwrap();
        if status.queued >= 1 || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status.queued, 1, "only the live waiter is queued: {status:?}");
    drop(held);
    assert_eq!(next.await.unwrap().unwrap(), 0);
    pool.shutdown().await;
}

/// A prompt counted by a remote's `/tokenize` waits on a blocking thread:
/// the caller's executor (an actix-web worker, the chat layer) keeps running
/// its other tasks meanwhile.
#[actix::test]
async fn a_slow_remote_tokenizer_never_blocks_the_callers_executor() {
    let engine = FakeEngine { slow_remote_tokenizer: Some(Duration::from_millis(800)), ..FakeEngine::new(9) };
    let pool = PoolHandle::start(Arc::new(engine), opts(1), Arc::new(|_| {})).await.unwrap();
    let ticks = Arc::new(AtomicUsize::new(0));
    let ticker = {
        let ticks = ticks.clone();
        actix::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let request = GenerateRequest { messages: vec![ChatMessage::user("hi")], ..Default::default() };
    let (text, _) = pool.generate(request).await.unwrap().collect_text().await.unwrap();
    assert_eq!(text, "ok");
    ticker.abort();
    // Blocked, the single-threaded executor would not have ticked at all during the 800 ms.
    let n = ticks.load(Ordering::SeqCst);
    assert!(n >= 10, "the executor ran {n} ticks while the tokenizer answered: it was blocked");
    pool.shutdown().await;
}
