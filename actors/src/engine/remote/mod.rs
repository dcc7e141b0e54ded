//! A remote instance: a llama.cpp `llama-server` reached over HTTP, driven by
//! the same command channel as a local step loop. Its thread runs a small
//! tokio runtime; each sequence is one streaming `/completion` request pinned
//! to the slot the pool leased (`id_slot`, `cache_prompt`), so the remote's
//! own prefix cache serves a conversation's next turn. The prompt goes as
//! the token ids the pool made when it checked the request
//! ([`super::Engine::prepare`]): message text is never parsed for special
//! tokens, exactly as for a local instance.
//!
//! `client` holds the HTTP side and the checks made when connecting, `job`
//! one sequence's stream, `tokenizer` the tokenizer of a pool whose model
//! file is not on this machine.

mod client;
mod job;
pub mod tokenizer;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use self::client::{Remote, RemoteProps};
use self::job::Job;
use super::step_loop::{Command, ExitGuard, LoopSender};
use super::{InstanceInfo, SlotStreams};
use crate::error::EngineError;

/// How to reach one remote `llama-server`.
#[derive(Clone, Debug)]
pub struct RemoteSpec {
    /// Base URL, e.g. `http://10.0.0.5:8080` (no path).
    pub url: String,
    /// Sent as `Authorization: Bearer …` when set (llama-server's `--api-key`).
    pub api_key: Option<String>,
    /// Slots to lease on it; `None` reads `total_slots` from its `/props`.
    pub slots: Option<usize>,
    /// Longest wait for the remote's answer to start, and between two events
    /// of a stream; past it the remote counts as broken.
    pub timeout: Duration,
    /// The model file it must serve (file name, or its stem); `None` means
    /// the pool's own model.
    pub model: Option<String>,
}

impl RemoteSpec {
    /// The URL as shown in status and logs: without credentials or query.
    pub fn display_url(&self) -> String {
        display_url(&self.url)
    }
}

/// `url` without user information, query or fragment.
pub fn display_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.as_str().trim_end_matches('/').to_string()
        }
        Err(_) => "(invalid URL)".into(),
    }
}

/// True for an absolute http:// or https:// URL with a host.
pub fn is_http_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

/// What every remote of a pool must serve.
#[derive(Clone, Debug)]
pub struct Expected {
    /// File stem of the pool's model.
    pub model_stem: String,
    /// Vocabulary size of the local tokenizer.
    pub n_vocab: Option<u32>,
}

/// Starts a remote instance's thread: it connects (checks `/health`,
/// `/props`, `/v1/models`), reports with `on_ready`, then serves commands
/// until every sender is gone; `on_exit` runs when it ends after a good start.
pub fn spawn(
    id: usize,
    spec: RemoteSpec,
    expect: Expected,
    on_ready: impl FnOnce(Result<(LoopSender, InstanceInfo, Arc<SlotStreams>), EngineError>) + Send + 'static,
    on_exit: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new().name(format!("remote-{id}")).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return on_ready(Err(EngineError::RemoteSetup(format!("runtime: {e}")))),
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let remote = match Remote::new(spec) {
                Ok(r) => r,
                Err(e) => return on_ready(Err(e)),
            };
            let props = match remote.connect(&expect).await {
                Ok(p) => p,
                Err(e) => return on_ready(Err(e)),
            };
            tracing::info!(instance = id, remote = %remote.shown, slots = props.slots, n_ctx = props.n_ctx, "remote instance connected");
            let _exit = ExitGuard::new(on_exit);
            let (tx, rx) = mpsc::unbounded_channel();
            let info = InstanceInfo { weights_addr: 0, kv_bytes_estimate: 0, endpoint: Some(remote.shown.clone()) };
            on_ready(Ok((LoopSender::task(tx), info, Arc::new(SlotStreams::new(props.slots)))));
            serve(remote, props, rx).await;
        });
    })?;
    Ok(())
}

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

/// Applies commands until the handle is gone; each sequence is a local task.
async fn serve(remote: Remote, props: RemoteProps, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut running: Vec<Option<Running>> = (0..props.slots).map(|_| None).collect();
    let mut held: Vec<Option<SlotContent>> = (0..props.slots).map(|_| None).collect();
    while let Some(command) = rx.recv().await {
        match command {
            Command::Start { slot, request, key, started, sink } => {
                if slot >= running.len() {
                    sink.done(Err(EngineError::Remote(format!(
                        "slot {slot} is out of range ({} slots)",
                        running.len()
                    ))));
                    continue;
                }
                if let Some(mut old) = running[slot].take() {
                    if let Some(c) = old.cancel.take() {
                        let _ = c.send(());
                    }
                }
                let (cancel, cancelled) = oneshot::channel();
                let reuse = may_reuse(held[slot].as_ref(), key.namespace, request.prompt());
                let generated = std::rc::Rc::new(std::cell::Cell::new(0));
                held[slot] = Some(SlotContent {
                    namespace: key.namespace,
                    prompt: request.prompt().to_vec(),
                    generated: generated.clone(),
                });
                let job = Job { remote: remote.clone(), slot, n_ctx: props.n_ctx, reuse, generated };
                let task = tokio::task::spawn_local(job.run(request, started, sink, cancelled));
                running[slot] = Some(Running { cancel: Some(cancel), task });
            }
            Command::Cancel(slot) => {
                if let Some(Some(r)) = running.get_mut(slot) {
                    if let Some(c) = r.cancel.take() {
                        let _ = c.send(());
                    }
                }
            }
            Command::Probe(reply) => {
                let remote = remote.clone();
                tokio::task::spawn_local(async move {
                    let _ = reply.send(remote.health().await);
                });
            }
            #[cfg(feature = "fault-injection")]
            Command::Fault(f) => tracing::warn!(?f, "fault injection applies to local instances only; ignored"),
        }
        running.iter_mut().for_each(|r| {
            if r.as_ref().is_some_and(|r| r.task.is_finished()) {
                *r = None;
            }
        });
    }
    // The handle is gone: dropping the tasks closes their connections, and
    // llama-server stops those slots.
    for r in running.into_iter().flatten() {
        r.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::client::model_stem;
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

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(display_url("http://user:secret@10.0.0.5:8080/?key=x"), "http://10.0.0.5:8080");
        assert_eq!(display_url("not a url"), "(invalid URL)");
    }

    #[test]
    fn model_names_compare_by_file_stem() {
        assert_eq!(model_stem("/models/SmolLM2-135M-Instruct.Q4_1.gguf"), "SmolLM2-135M-Instruct.Q4_1");
        assert_eq!(model_stem("SmolLM2-135M-Instruct.Q4_1"), "SmolLM2-135M-Instruct.Q4_1");
    }
}
