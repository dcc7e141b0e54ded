//! A real llama.cpp `llama-server` process on loopback (the binary that
//! scripts/setup.sh --with-llama-server builds), killed on drop; it can be
//! killed hard, paused (SIGSTOP: the kernel still accepts connections, the
//! server never answers) and restarted on the same port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct LlamaServer {
    child: Child,
    pub port: u16,
    args: Vec<String>,
    log: Arc<Mutex<Vec<String>>>,
}

/// The llama-server binary (scripts/test.sh sets MODELPOOL_LLAMA_SERVER).
pub fn binary() -> String {
    std::env::var("MODELPOOL_LLAMA_SERVER").unwrap_or_else(|_| {
        panic!("MODELPOOL_LLAMA_SERVER is not set: run the suite with scripts/test.sh (it builds llama-server once)")
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
        self.resume();
        self.kill_hard();
    }
}

fn spawn(args: &[String], port: u16) -> (Child, Arc<Mutex<Vec<String>>>) {
    let bin = binary();
    let mut child = Command::new(&bin)
        .args(args)
        .args(["--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let log = Arc::new(Mutex::new(Vec::new()));
    let lines = log.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = lines.lock().unwrap();
            if l.len() > 200 {
                l.remove(0);
            }
            l.push(line);
        }
    });
    (child, log)
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
}

/// GET /health answers 200 within a second.
fn health_ok(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if write!(s, "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}
