//! A remote instance: a llama.cpp `llama-server` reached over HTTP, behind
//! the same [`super::InstanceBackend`] as a local context and owned the same
//! way, by a model actor on the instance's own thread ([`RemoteInstance`]).
//! Each sequence is one streaming `/completion` request pinned to the slot
//! the pool leased (`id_slot`, `cache_prompt`), run as a local task on that
//! thread, so the remote's own prefix cache serves a conversation's next
//! turn. The prompt goes as the token ids the pool made when it checked the
//! request ([`super::Engine::prepare`]): message text is never parsed for
//! special tokens, exactly as for a local instance.
//!
//! This file holds how a remote is named and what it must serve; `instance`
//! the backend, `client` the HTTP side and the checks made when connecting,
//! `job` one sequence's stream, `tokenizer` the tokenizer of a pool whose
//! model file is not on this machine.

mod client;
mod instance;
mod job;
pub mod tokenizer;

use std::time::Duration;

pub use instance::RemoteInstance;

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
