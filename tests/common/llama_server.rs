//! A real llama.cpp `llama-server` process on loopback (the binary that
//! scripts/setup.sh --with-llama-server builds), killed on drop; it can be
//! killed hard, paused (SIGSTOP: the kernel still accepts connections, the
//! server never answers) and restarted on the same port.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{follow_stderr, free_port, http_status, signal, Log};

pub struct LlamaServer {
    pub child: Child,
    pub port: u16,
    args: Vec<String>,
    log: Log,
}

/// The llama-server binary (scripts/test.sh and scripts/bench.sh set
/// MODELPOOL_LLAMA_SERVER).
pub fn binary() -> String {
    std::env::var("MODELPOOL_LLAMA_SERVER").unwrap_or_else(|_| {
        panic!(
            "MODELPOOL_LLAMA_SERVER is not set: run the suite with scripts/test.sh, the benchmarks with \
             scripts/bench.sh (they build llama-server once)"
        )
    })
}

impl LlamaServer {
    /// `slots` sequences of `n_ctx` tokens each, on `threads` threads.
    /// `-nr`: on CPUs that report AMX the repacked kernels die with SIGILL.
    pub fn start(model: &Path, slots: usize, threads: usize, n_ctx: u32) -> Self {
        let args: Vec<String> = [
            "-m",
            model.to_str().unwrap(),
            "-np",
            &slots.to_string(),
            "-t",
            &threads.to_string(),
            "-c",
            &(slots as u32 * n_ctx).to_string(),
            "-nr",
            "--host",
            "127.0.0.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let port = free_port();
        let (child, log) = spawn(&args, port);
        let mut server = Self { child, port, args, log };
        server.wait_ready();
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL, as a crash would.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill_hard();
        let (child, log) = spawn(&self.args, self.port);
        (self.child, self.log) = (child, log);
        self.wait_ready();
    }

    /// SIGSTOP: connections are still accepted (by the kernel), nothing answers.
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        let addr = format!("127.0.0.1:{}", self.port);
        while !health_ok(&addr) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("llama-server exited with {status}:\n{}", self.log_text());
            }
            assert!(started.elapsed() < Duration::from_secs(120), "llama-server not ready:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        // Only one still running is signalled: the pid of one that ended
        // and was reaped (e.g. by the benchmarks' stop) may be another's.
        if let Ok(None) = self.child.try_wait() {
            self.resume();
        }
        self.kill_hard();
    }
}

fn spawn(args: &[String], port: u16) -> (Child, Log) {
    let bin = binary();
    let mut child = Command::new(&bin)
        .args(args)
        .args(["--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let (_, log) = follow_stderr(&mut child, 200);
    (child, log)
}

/// GET /health answers 200 within a second.
fn health_ok(addr: &str) -> bool {
    http_status(addr, "/health", Some(Duration::from_secs(1))) == Some(200)
}
