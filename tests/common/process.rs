//! What every server process the tests and benchmarks start needs around it:
//! a free port, signals, its stderr read on the side, and a blocking health
//! probe. Only std, so that the benchmarks include this file as it is.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The lines a process wrote to its stderr, oldest first.
pub type Log = Arc<Mutex<Vec<String>>>;

/// A loopback port no one listens on now, for a server that cannot be
/// told to take port 0 and say which one it got (llama-server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sends signal `name` (`TERM`, `KILL`, `STOP`, ...) to `pid` with kill(1):
/// no libc binding needed, and a process that has ended is no error.
pub fn signal(pid: u32, name: &str) {
    Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().expect("run kill");
}

/// Reads `child`'s stderr on a thread of its own, keeping its last `keep`
/// lines in the returned log (a pipe nobody reads would block the child
/// once full), and sends each address a line says it is "listening on".
pub fn follow_stderr(child: &mut Child, keep: usize) -> (Receiver<String>, Log) {
    let stderr = child.stderr.take().expect("stderr piped");
    let log = Log::default();
    let (tx, rx) = channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("listening on ").nth(1) {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or_default().to_string());
            }
            keep_last(&mut lines.lock().unwrap(), keep, line);
        }
    });
    (rx, log)
}

fn keep_last(log: &mut Vec<String>, keep: usize, line: String) {
    if keep == 0 {
        return;
    }
    if log.len() >= keep {
        log.remove(0);
    }
    log.push(line);
}

/// The status code of `GET path` on `addr` (host:port), with a plain
/// blocking HTTP/1.1 request that needs no runtime; a read that takes
/// longer than `read_limit` ends with what came. None when nothing answers.
pub fn http_status(addr: &str, path: &str, read_limit: Option<Duration>) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(read_limit).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.strip_prefix("HTTP/1.1 ")?.split_whitespace().next()?.parse().ok()
}
