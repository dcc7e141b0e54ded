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

/// Applies commands until the handle is gone; each sequence is a local task.
async fn serve(remote: Remote, props: RemoteProps, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut running: Vec<Option<Running>> = (0..props.slots).map(|_| None).collect();
    while let Some(command) = rx.recv().await {
        match command {
            Command::Start { slot, request, started, sink, .. } => {
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
                let job = Job { remote: remote.clone(), slot, n_ctx: props.n_ctx };
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
