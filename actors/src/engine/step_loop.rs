//! An instance's own thread: it creates the instance's context, then runs the
//! step loop, driven by a command channel. While sequences are active it takes
//! whatever commands have arrived, then decodes one step for all of them;
//! while none are, it sleeps on the channel. The loop ends when every sender
//! is gone (the slots' caches are then saved) or the context breaks; `on_exit`
//! runs however it ends (a panic too).

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

#[cfg(feature = "fault-injection")]
use super::Fault;
use super::{CacheKey, InstanceBackend, InstanceInfo, SeqSink, SlotStreams};
use crate::error::EngineError;
use crate::params::PreparedRequest;

/// What the instance's handle asks of its loop.
pub enum Command {
    /// Starts a sequence in a slot; its events go to `sink`.
    Start { slot: usize, request: PreparedRequest, key: CacheKey, started: Instant, sink: SeqSink },
    /// Ends a slot's sequence as cancelled (the watchdog's first resort).
    Cancel(usize),
    /// Runs a health probe between two steps.
    Probe(oneshot::Sender<Result<(), EngineError>>),
    #[cfg(feature = "fault-injection")]
    Fault(Fault),
}

/// The sending side of a running loop (a local step loop's thread, or a
/// remote instance's task): the loop ends when every sender is dropped.
#[derive(Clone)]
pub struct LoopSender(Channel);

#[derive(Clone)]
enum Channel {
    Thread(Sender<Command>),
    Task(tokio::sync::mpsc::UnboundedSender<Command>),
}

impl LoopSender {
    /// False when the loop has ended.
    pub fn send(&self, command: Command) -> bool {
        match &self.0 {
            Channel::Thread(tx) => tx.send(command).is_ok(),
            Channel::Task(tx) => tx.send(command).is_ok(),
        }
    }

    /// The sender of a loop that runs as an async task.
    pub(crate) fn task(tx: tokio::sync::mpsc::UnboundedSender<Command>) -> Self {
        Self(Channel::Task(tx))
    }
}

/// Runs `on_exit` when dropped: at the loop's end, also when it panics.
pub(crate) struct ExitGuard<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> ExitGuard<F> {
    pub(crate) fn new(f: F) -> Self {
        Self(Some(f))
    }
}

impl<F: FnOnce()> Drop for ExitGuard<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// How long the loop waits while every sequence is paused before it looks
/// at their readers again.
const PAUSED_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

pub type CreateFn = Box<dyn FnOnce() -> Result<Box<dyn InstanceBackend>, EngineError> + Send>;

/// Starts an instance's thread. `create` makes the backend on that thread;
/// `on_ready` gets the loop's sender and the instance's description (or the
/// creation error); `on_exit` runs when the loop ends after a successful start.
pub fn spawn(
    name: String,
    create: CreateFn,
    on_ready: impl FnOnce(Result<(LoopSender, InstanceInfo, Arc<SlotStreams>), EngineError>) + Send + 'static,
    on_exit: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    // The loop compiles each request's grammar and samples under it:
    // llama.cpp recurses over its rules, within the bounds of [`super::grammar`].
    std::thread::Builder::new().name(name).stack_size(super::grammar::PARSER_STACK_BYTES).spawn(move || {
        let mut backend = match create() {
            Ok(b) => b,
            Err(e) => return on_ready(Err(e)),
        };
        let _exit = ExitGuard(Some(on_exit));
        let (tx, rx) = channel();
        on_ready(Ok((LoopSender(Channel::Thread(tx)), backend.info(), backend.streams())));
        run(backend.as_mut(), &rx);
    })?;
    Ok(())
}

fn run(backend: &mut dyn InstanceBackend, rx: &Receiver<Command>) {
    loop {
        // Every command that has arrived is applied before the next step, so
        // a new sequence joins at once and a cancelled one frees its slot.
        let command = if backend.active() == 0 {
            match rx.recv() {
                Ok(c) => c,
                Err(_) => return backend.close(),
            }
        } else {
            match rx.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty) => match backend.step() {
                    Ok(true) => continue,
                    // Every sequence is paused (its reader lags): wait for a
                    // command or a moment, not spin.
                    Ok(false) => match rx.recv_timeout(PAUSED_WAIT) {
                        Ok(c) => c,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return backend.close(),
                    },
                    Err(e) => {
                        tracing::error!(error = %e, "the context failed; the instance stops");
                        return;
                    }
                },
                Err(TryRecvError::Disconnected) => return backend.close(),
            }
        };
        match command {
            Command::Start { slot, request, key, started, sink } => backend.start(slot, request, key, started, sink),
            Command::Cancel(slot) => backend.cancel(slot),
            Command::Probe(reply) => {
                let _ = reply.send(backend.probe());
            }
            #[cfg(feature = "fault-injection")]
            Command::Fault(f) => backend.inject_fault(f),
        }
    }
}
