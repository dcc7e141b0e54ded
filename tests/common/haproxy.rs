//! HAProxy (Debian's package) running the shipped `deploy/haproxy.cfg` with
//! its ports rewritten, killed on drop. Used by the replica tests and the
//! replica benchmark.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};

pub struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The port of a base URL such as `http://127.0.0.1:4242`.
pub fn port_of(base: &str) -> String {
    base.trim_end_matches('/').rsplit(':').next().unwrap().to_string()
}

/// The shipped configuration in front of the replicas at `node1` and
/// `node2` (base URLs), on a free port; returns the proxy's base URL.
pub fn start(node1: &str, node2: &str, dir: &std::path::Path) -> (Proxy, String) {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let rewritten = shipped
        .replace("bind :8080", &format!("bind 127.0.0.1:{port}"))
        .replace("server node1 127.0.0.1:8081", &format!("server node1 127.0.0.1:{}", port_of(node1)))
        .replace("server node2 127.0.0.1:8082", &format!("server node2 127.0.0.1:{}", port_of(node2)));
    assert_ne!(rewritten, shipped);
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, rewritten).unwrap();
    let check =
        Command::new("haproxy").args(["-c", "-f", cfg.to_str().unwrap()]).output().expect("haproxy (package haproxy)");
    assert!(check.status.success(), "the shipped config is valid: {}", String::from_utf8_lossy(&check.stderr));
    let child = Command::new("haproxy")
        .args(["-db", "-f", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Proxy(child), format!("http://127.0.0.1:{port}"))
}
