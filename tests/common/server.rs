//! A real `modelpool serve` process on an ephemeral port, killed on drop.
#![allow(dead_code)]

use std::process::{Child, Stdio};
use std::time::Duration;

use super::modelpool_command;
use super::process::{follow_stderr, http_status, signal, Log};

pub struct Server {
    pub child: Child,
    pub base: String,
    pub data_dir: tempfile::TempDir,
    pub log: Log,
    flags: Vec<String>,
    env: Vec<(String, String)>,
}

impl Server {
    /// Starts the server with extra CLI flags and MODELPOOL_* variables.
    pub fn start(flags: &[&str], env: &[(&str, &str)]) -> Server {
        let data_dir = tempfile::tempdir().unwrap();
        Self::start_in(data_dir, flags, env)
    }

    pub fn start_in(data_dir: tempfile::TempDir, flags: &[&str], env: &[(&str, &str)]) -> Server {
        let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (child, base, log) = spawn(data_dir.path(), &flags, &env);
        let mut server = Server { child, base, data_dir, log, flags, env };
        server.wait_ready();
        server
    }

    /// Kills the process (SIGKILL, no drain; nothing when it has ended, e.g.
    /// after [`Self::terminate`]) and starts a new one on the same data directory.
    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, base, log) = spawn(self.data_dir.path(), &self.flags, &self.env);
        (self.child, self.base, self.log) = (child, base, log);
        self.wait_ready();
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// Starts `modelpool serve` on `data_dir`; returns once it listens.
fn spawn(data_dir: &std::path::Path, flags: &[String], env: &[(String, String)]) -> (Child, String, Log) {
    let mut cmd = modelpool_command();
    cmd.args(["--data-dir", data_dir.to_str().unwrap()]);
    // One thread and 512 tokens of context unless the test names its own.
    for (flag, value) in [("--threads", "1"), ("--n-ctx", "512")] {
        if !flags.iter().any(|f| f == flag) {
            cmd.args([flag, value]);
        }
    }
    cmd.args(flags)
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("MODELPOOL_HEALTH_INTERVAL_MS", "0")
        // One sequence per instance unless a test asks for more: these tests
        // count instances; the batching tests set MODELPOOL_SLOTS themselves.
        .env("MODELPOOL_SLOTS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start modelpool serve");
    let (rx, log) = follow_stderr(&mut child, usize::MAX);
    let base = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(b) => b,
        Err(_) => {
            let _ = child.kill();
            panic!("server did not start:\n{}", log.lock().unwrap().join("\n"));
        }
    };
    (child, base, log)
}

impl Server {
    /// Waits until GET /health answers 200 (the model is loaded).
    fn wait_ready(&mut self) {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if health_status(&self.base) == Some(200) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("server exited with {status} while loading:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server not ready within 60 s:\n{}", self.log_text());
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        self.child.wait().unwrap()
    }
}

/// The status code of GET /health.
pub fn health_status(base: &str) -> Option<u16> {
    http_status(base.trim_start_matches("http://"), "/health", Some(Duration::from_secs(5)))
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses a server-sent-events body into (event, data) pairs.
/// The JSON objects of an OpenAI-style event stream's `data:` lines (`[DONE]` and comments left out).
pub fn sse_json(body: &str) -> Vec<serde_json::Value> {
    sse_events(body)
        .into_iter()
        .filter(|(_, d)| !d.is_empty() && d != "[DONE]")
        .filter_map(|(_, d)| serde_json::from_str(&d).ok())
        .collect()
}

pub fn sse_events(body: &str) -> Vec<(String, String)> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = "message".to_string();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            (event, data)
        })
        .collect()
}
