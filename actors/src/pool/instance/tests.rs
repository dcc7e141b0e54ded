//! The model actor with a fake backend: it steps while work remains,
//! answers between steps, and tells the pool when it is gone, saving the
//! slots only when it was retired.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::*;
use crate::engine::{Engine, EngineInfo, InstanceOptions, SeqEvent};
use crate::params::{ChatMessage, Completion, FinishReason, GenerateRequest, Usage};

#[derive(Default)]
struct Shared {
    steps: AtomicU32,
    /// Probes answered while a sequence was running.
    probes_while_running: AtomicU32,
    closed: AtomicBool,
    /// The next step fails (1) or panics (2).
    fault: AtomicU32,
    thread: Mutex<Option<String>>,
    /// Steps after which a sequence ends; 0: it runs until cancelled.
    limit: AtomicU32,
}

struct FakeBackend {
    shared: Arc<Shared>,
    running: Option<(SeqSink, u32)>,
}

impl InstanceBackend for FakeBackend {
    fn streams(&self) -> Arc<SlotStreams> {
        Arc::new(SlotStreams::new(1))
    }
    fn start(&mut self, _: usize, _: PreparedRequest, _: CacheKey, _: Instant, sink: SeqSink) {
        self.running = Some((sink, 0));
    }
    fn close(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
    }
    fn cancel(&mut self, _: usize) {
        if let Some((sink, _)) = self.running.take() {
            sink.done(Ok(Completion { usage: Usage::default(), finish_reason: FinishReason::Cancelled }));
        }
    }
    fn active(&self) -> usize {
        self.running.is_some() as usize
    }
    /// A token every 5 ms.
    fn step(&mut self) -> Result<bool, EngineError> {
        match self.shared.fault.swap(0, Ordering::SeqCst) {
            1 => return Err(EngineError::Decode("fake failure".into())),
            2 => panic!("fake panic in a step"),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(5));
        self.shared.steps.fetch_add(1, Ordering::SeqCst);
        let Some((sink, done)) = self.running.as_mut() else { return Ok(false) };
        *done += 1;
        let _ = sink.offer(SeqEvent::Piece("x".into()));
        if *done == self.shared.limit.load(Ordering::SeqCst) {
            let (sink, _) = self.running.take().expect("running");
            sink.done(Ok(Completion { usage: Usage::default(), finish_reason: FinishReason::Stop }));
        }
        Ok(true)
    }
    fn probe(&mut self) -> ProbeReply {
        if self.running.is_some() {
            self.shared.probes_while_running.fetch_add(1, Ordering::SeqCst);
        }
        Ok(()).into()
    }
    fn info(&self) -> InstanceInfo {
        InstanceInfo { weights_addr: 7, kv_bytes_estimate: 0, endpoint: None }
    }
    #[cfg(feature = "fault-injection")]
    fn inject_fault(&mut self, _: Fault) {}
}

struct FakeEngine(Arc<Shared>);

impl Engine for FakeEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo { model_name: "fake".into(), weights_bytes: 0, n_ctx_train: 0, per_request: false }
    }
    fn create_instance(&self, _: usize, _: &InstanceOptions) -> Result<Box<dyn InstanceBackend>, EngineError> {
        *self.0.thread.lock().unwrap() = std::thread::current().name().map(str::to_string);
        Ok(Box::new(FakeBackend { shared: self.0.clone(), running: None }))
    }
    fn count_tokens(&self, text: &str) -> u32 {
        text.len() as u32
    }
    fn prompt_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<i32>, EngineError> {
        Ok(vec![1; messages.len()])
    }
}

/// Stands in for the pool manager.
struct Pool(UnboundedSender<Heard>);

enum Heard {
    Up(Result<Addr<ModelActor>, EngineError>),
    Stopped(usize),
}

impl Actor for Pool {
    type Context = Context<Self>;
}

impl Handler<InstanceUp> for Pool {
    type Result = ();
    fn handle(&mut self, msg: InstanceUp, _: &mut Self::Context) {
        let _ = self.0.send(Heard::Up(msg.result.map(|(addr, ..)| addr)));
    }
}

impl Handler<InstanceStopped> for Pool {
    type Result = ();
    fn handle(&mut self, msg: InstanceStopped, _: &mut Self::Context) {
        let _ = self.0.send(Heard::Stopped(msg.id));
    }
}

async fn start(shared: &Arc<Shared>) -> (Addr<ModelActor>, UnboundedReceiver<Heard>) {
    let (tx, mut heard) = unbounded_channel();
    let pool = Pool(tx).start();
    let engine: Arc<dyn Engine> = Arc::new(FakeEngine(shared.clone()));
    let source = InstanceSource::Local { engine, opts: InstanceOptions::single(64, 1) };
    spawn(7, 0, source, pool.clone().recipient(), pool.recipient()).unwrap();
    match heard.recv().await {
        Some(Heard::Up(Ok(addr))) => (addr, heard),
        _ => panic!("the instance did not come up"),
    }
}

fn generate(addr: &Addr<ModelActor>) -> crate::engine::SeqEvents {
    let (sink, events) = SeqSink::channel();
    let request = PreparedRequest::checked(GenerateRequest::default(), vec![1], 32, 64);
    addr.do_send(Generate { slot: 0, request, key: CacheKey::default(), started: Instant::now(), sink });
    events
}

async fn stopped(heard: &mut UnboundedReceiver<Heard>) -> bool {
    let within = tokio::time::timeout(Duration::from_secs(5), heard.recv()).await;
    matches!(within, Ok(Some(Heard::Stopped(7))))
}

#[actix::test]
async fn steps_run_while_work_remains_and_messages_are_answered_between_them() {
    let shared = Arc::new(Shared::default());
    let (addr, mut heard) = start(&shared).await;
    assert_eq!(shared.thread.lock().unwrap().as_deref(), Some("instance-7"), "created on the instance's thread");
    let mut events = generate(&addr);
    assert!(matches!(events.recv().await, Some(SeqEvent::Piece(_))));
    // Answered between two steps, while the sequence still runs.
    addr.send(Probe).await.unwrap().unwrap();
    assert_eq!(addr.send(Describe).await.unwrap().weights_addr, 7);
    assert_eq!(shared.probes_while_running.load(Ordering::SeqCst), 1);
    addr.do_send(CancelSlot(0));
    loop {
        match events.recv().await {
            Some(SeqEvent::Piece(_)) => {}
            Some(SeqEvent::Done(done)) => break assert_eq!(done.unwrap().finish_reason, FinishReason::Cancelled),
            other => panic!("unexpected {other:?}"),
        }
    }
    // No step without work.
    let steps = shared.steps.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(shared.steps.load(Ordering::SeqCst), steps);
    // A sequence that ends by itself: steps until it does, then none.
    shared.limit.store(3, Ordering::SeqCst);
    let mut events = generate(&addr);
    while let Some(SeqEvent::Piece(_)) = events.recv().await {}
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(shared.steps.load(Ordering::SeqCst), steps + 3);
    addr.do_send(Retire);
    assert!(stopped(&mut heard).await, "the pool hears that a retired instance is gone");
    assert!(shared.closed.load(Ordering::SeqCst), "a retired instance saves its slots");
}

#[actix::test]
async fn a_failed_step_or_a_panic_stops_the_instance_without_saving_its_slots() {
    for fault in [1, 2] {
        let shared = Arc::new(Shared::default());
        let (addr, mut heard) = start(&shared).await;
        shared.fault.store(fault, Ordering::SeqCst);
        let mut events = generate(&addr);
        assert!(stopped(&mut heard).await, "fault {fault}: the pool hears that the instance is gone");
        assert!(!shared.closed.load(Ordering::SeqCst), "fault {fault}: a broken context is not saved");
        // The sequence's sink went with the instance.
        assert!(events.recv().await.is_none());
        assert!(addr.send(Probe).await.is_err(), "fault {fault}: nothing answers any more");
    }
}
