//! A real `modelpool serve` process for the benchmarks, killed on drop.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{follow_stderr, http_status, signal};

pub struct Server(pub std::process::Child, pub String);

impl Server {
    /// Stops the server as a service manager would: SIGTERM, then waits for
    /// it to exit (its shutdown included).
    pub fn stop(mut self) {
        terminate(&mut self.0);
    }
}

/// SIGTERM to `child`, then waits up to 2 minutes for it to exit before
/// killing it.
pub fn terminate(child: &mut std::process::Child) {
    signal(child.id(), "TERM");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("[bench] pid {} still running 2 min after SIGTERM: killed", child.id());
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server with `instances` of `n_ctx` tokens and extra MODELPOOL_*
/// variables; returns once /health says 200.
pub fn start(instances: usize, n_ctx: u32, data: &std::path::Path, env: &[(&str, &str)]) -> Server {
    // MODELPOOL_BENCH_BIN: a saved build (e.g. the one before a change) in
    // place of the one cargo built, which a shared target directory may
    // replace while a benchmark runs.
    let bin = std::env::var("MODELPOOL_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_modelpool").to_string());
    let mut child = Command::new(&bin)
        .args([
            "--instances",
            &instances.to_string(),
            "--n-ctx",
            &n_ctx.to_string(),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("MODELPOOL_MAX_QUEUE", "64")
        .env("MODELPOOL_HEALTH_INTERVAL_MS", "0")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin} (run scripts/setup.sh first): {e}"));
    let (rx, _) = follow_stderr(&mut child, 0);
    let base = rx.recv_timeout(Duration::from_secs(60)).expect("server started");
    // Listening starts before the model is loaded: wait for /health to say 200.
    let addr = base.trim_start_matches("http://").to_string();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) && http_status(&addr, "/health", None) != Some(200) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child, base)
}
