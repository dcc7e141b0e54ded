//! llama.cpp's own `llama-server` for the benchmarks, killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::server;

pub struct LlamaServer(Child);

impl LlamaServer {
    /// SIGTERM, then waits for it to exit.
    pub fn stop(mut self) {
        server::terminate(&mut self.0);
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// llama-server with `slots` slots of `n_ctx` tokens each on `threads` threads.
/// `-nr`: on CPUs that report AMX the repacked kernels die with SIGILL.
pub fn start(model: &str, slots: u32, n_ctx: u32, threads: usize) -> (LlamaServer, String) {
    let bin = std::env::var("MODELPOOL_LLAMA_SERVER")
        .expect("MODELPOOL_LLAMA_SERVER is not set: run through scripts/bench.sh (it builds llama-server once)");
    let port = free_port();
    let child = Command::new(&bin)
        .args(["-m", model, "-np", &slots.to_string(), "-t", &threads.to_string()])
        .args(["-c", &(slots * n_ctx).to_string(), "-nr", "--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let mut child = LlamaServer(child);
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || for _ in BufReader::new(stderr).lines().map_while(Result::ok) {});
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    while !server::answers_200(&addr, "/health") {
        assert!(started.elapsed() < Duration::from_secs(120), "llama-server did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, format!("http://{addr}"))
}
