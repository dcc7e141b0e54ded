//! llama.cpp's own `llama-server` for the benchmarks: the process the tests
//! start (tests/common/llama_server.rs), with the benchmarks' arguments,
//! stopped as a service manager would stop it.
#![allow(dead_code)]

use std::path::Path;

// The shared file finds its helpers as `super::process`.
use super::process;
use super::server;

#[path = "../../tests/common/llama_server.rs"]
mod shared;

pub use shared::LlamaServer;

impl LlamaServer {
    /// SIGTERM, then waits for it to exit.
    pub fn stop(mut self) {
        server::terminate(&mut self.child);
    }
}

/// llama-server with `slots` slots of `n_ctx` tokens each on `threads`
/// threads, ready; with its URL.
pub fn start(model: &str, slots: u32, n_ctx: u32, threads: usize) -> (LlamaServer, String) {
    let server = LlamaServer::start(Path::new(model), slots as usize, threads, n_ctx);
    let url = server.url();
    (server, url)
}
