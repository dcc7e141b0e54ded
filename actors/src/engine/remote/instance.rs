//! One remote `llama-server` as an instance: its slots, what each holds as
//! far as this pool sent it, and a local task per running sequence.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::client::{Remote, RemoteProps};
use super::job::Job;
use super::{Expected, RemoteSpec};
#[cfg(feature = "fault-injection")]
use crate::engine::Fault;
use crate::engine::{CacheKey, InstanceBackend, InstanceInfo, ProbeReply, SeqSink, SlotStreams};
use crate::error::EngineError;
use crate::params::PreparedRequest;

/// A sequence running on the remote.
struct Running {
    cancel: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// What a remote slot holds, as far as this pool sent it: whose prompt,
/// its tokens, and how many tokens were generated after them (set by the
/// sequence's job when it ends).
struct SlotContent {
    namespace: u64,
    prompt: Vec<i32>,
    generated: std::rc::Rc<std::cell::Cell<u32>>,
}

/// Whether a request of `namespace` may reuse what the remote slot holds
/// (`cache_prompt`). llama-server keeps a slot's tokens for the next
/// request only when the common prefix is more than a tenth of the new
/// prompt (`--slot-prompt-similarity`, 0.1 by default) and at least half of
/// the slot; otherwise it saves the slot to its host-memory prompt cache and
/// loads the best match of every slot's earlier prompts, any tenant's. So
/// reuse is asked only when the slot holds this namespace's tokens (sent by
/// this pool: what a remote held before is nobody's to reuse) and the prefix
/// of what was sent that the new prompt repeats (a lower bound of what
/// llama-server finds) passes both tests: then nothing but this namespace's
/// own tokens can be reused, and `cached_tokens` tells no tenant of
/// another's prompts. (A remote run with a higher similarity threshold
/// needs that threshold here.)
fn may_reuse(held: Option<&SlotContent>, namespace: u64, prompt: &[i32]) -> bool {
    let Some(held) = held.filter(|h| h.namespace == namespace) else { return false };
    let common = held.prompt.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    let slot_len = held.prompt.len() + held.generated.get() as usize;
    common > 0 && 2 * common >= slot_len && 10 * common > prompt.len()
}

/// One remote `llama-server` as an instance. Its sequences run as local
/// tasks of the thread that connected it (inside a
/// [`tokio::task::LocalSet`]); they need no steps.
pub struct RemoteInstance {
    remote: Remote,
    props: RemoteProps,
    streams: Arc<SlotStreams>,
    running: Vec<Option<Running>>,
    held: Vec<Option<SlotContent>>,
}

impl RemoteInstance {
    /// Connects: checks `/health`, `/props` and `/v1/models` (up, serving
    /// the pool's model, how many slots).
    pub async fn connect(id: usize, spec: RemoteSpec, expect: Expected) -> Result<Self, EngineError> {
        let remote = Remote::new(spec)?;
        let props = remote.connect(&expect).await?;
        tracing::info!(instance = id, remote = %remote.shown, slots = props.slots, n_ctx = props.n_ctx, "remote instance connected");
        Ok(Self {
            streams: Arc::new(SlotStreams::new(props.slots)),
            running: (0..props.slots).map(|_| None).collect(),
            held: (0..props.slots).map(|_| None).collect(),
            remote,
            props,
        })
    }
}

impl InstanceBackend for RemoteInstance {
    fn streams(&self) -> Arc<SlotStreams> {
        self.streams.clone()
    }

    fn start(&mut self, slot: usize, request: PreparedRequest, key: CacheKey, started: Instant, sink: SeqSink) {
        if slot >= self.running.len() {
            let slots = self.running.len();
            return sink.done(Err(EngineError::Remote(format!("slot {slot} is out of range ({slots} slots)"))));
        }
        self.running.iter_mut().for_each(|r| {
            if r.as_ref().is_some_and(|r| r.task.is_finished()) {
                *r = None;
            }
        });
        self.cancel(slot);
        let (cancel, cancelled) = oneshot::channel();
        let reuse = may_reuse(self.held[slot].as_ref(), key.namespace, request.prompt());
        let generated = std::rc::Rc::new(std::cell::Cell::new(0));
        self.held[slot] = Some(SlotContent {
            namespace: key.namespace,
            prompt: request.prompt().to_vec(),
            generated: generated.clone(),
        });
        let job = Job { remote: self.remote.clone(), slot, n_ctx: self.props.n_ctx, reuse, generated };
        let task = tokio::task::spawn_local(job.run(request, started, sink, cancelled));
        self.running[slot] = Some(Running { cancel: Some(cancel), task });
    }

    /// Dropping the tasks closes their connections, and llama-server stops
    /// those slots (its prompt cache is its own to keep).
    fn close(&mut self) {
        for r in self.running.iter_mut().filter_map(Option::take) {
            r.task.abort();
        }
    }

    fn cancel(&mut self, slot: usize) {
        if let Some(Some(r)) = self.running.get_mut(slot) {
            if let Some(c) = r.cancel.take() {
                let _ = c.send(());
            }
        }
    }

    /// Its sequences are tasks of their own: nothing to step.
    fn active(&self) -> usize {
        0
    }

    fn step(&mut self) -> Result<bool, EngineError> {
        Ok(false)
    }

    fn probe(&mut self) -> ProbeReply {
        let remote = self.remote.clone();
        ProbeReply::Later(Box::pin(async move { remote.health().await }))
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo { weights_addr: 0, kv_bytes_estimate: 0, endpoint: Some(self.remote.shown.clone()) }
    }

    #[cfg(feature = "fault-injection")]
    fn inject_fault(&mut self, fault: Fault) {
        tracing::warn!(?fault, "fault injection applies to local instances only; ignored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(namespace: u64, prompt: &[i32], generated: u32) -> SlotContent {
        SlotContent { namespace, prompt: prompt.to_vec(), generated: std::rc::Rc::new(std::cell::Cell::new(generated)) }
    }

    #[test]
    fn a_remote_slot_is_reused_only_by_its_own_namespace_and_only_when_llama_server_keeps_it() {
        let turn1: Vec<i32> = (0..100).collect();
        let turn2: Vec<i32> = (0..160).collect();
        // The same namespace's next turn: reused.
        assert!(may_reuse(Some(&held(1, &turn1, 40)), 1, &turn2));
        // Another namespace's, even with the same tokens: never.
        assert!(!may_reuse(Some(&held(1, &turn1, 40)), 2, &turn2));
        // An empty slot, or one whose tokens llama-server would swap for its
        // prompt cache (little in common): not asked.
        assert!(!may_reuse(None, 1, &turn2));
        assert!(!may_reuse(Some(&held(1, &turn1, 400)), 1, &turn2));
        let other: Vec<i32> = (0..10).chain(1000..1200).collect();
        assert!(!may_reuse(Some(&held(1, &turn1, 0)), 1, &other));
        // A long new prompt that starts with the slot's: kept by llama-server.
        let long: Vec<i32> = (0..900).collect();
        assert!(may_reuse(Some(&held(1, &turn1, 20)), 1, &long));
        assert!(!may_reuse(Some(&held(1, &turn1, 20)), 1, &(0..1100).collect::<Vec<i32>>()));
    }
}
