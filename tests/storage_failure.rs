//! A store that cannot write (its disk is full) turns readiness and liveness
//! to 503 `storage_unavailable` with the cause, every refused turn says so,
//! and after a restart with room again nothing acknowledged is missing.
//! Needs root to mount a tmpfs for the data directory, which it then fills.

mod common;

use std::process::Command;
use std::time::Duration;

use common::server::Server;
use serde_json::{json, Value};

/// A tmpfs of `mib` MiB mounted on a fresh temporary directory; unmounted on drop.
struct Tmpfs(Option<tempfile::TempDir>, std::path::PathBuf);

impl Tmpfs {
    fn mount(mib: u32) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs", path.to_str().unwrap()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "this test mounts a tmpfs to fill a disk: run the suite as root (as CI does)");
        Tmpfs(Some(dir), path)
    }

    /// Fills the free space with a file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.1.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", self.1.to_str().unwrap()]).status();
    }
}

async fn get(server: &Server, path: &str) -> (u16, Value) {
    let r = reqwest::get(server.url(path)).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[actix::test]
async fn a_full_disk_turns_readiness_503_and_loses_nothing_acknowledged() {
    let disk = Tmpfs::mount(32);
    let dir = disk.0.as_ref().map(|d| tempfile::TempDir::new_in(d.path()).unwrap()).unwrap();
    let mut server = Server::start_in(dir, &["--instances", "1"], &[]);
    let client = reqwest::Client::new();

    // A few turns are stored; then the disk fills up and the next writes fail.
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    let mut refusal = None;
    let mut filler = None;
    for i in 0..40 {
        if i == 4 {
            filler = Some(disk.fill());
        }
        let text = format!("Note {i}: the lighthouse keeper counts the ships.");
        let r =
            client.post(server.url("/chat")).json(&json!({ "message": text, "max_tokens": 1 })).send().await.unwrap();
        let status = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").is_some();
        let body: Value = r.json().await.unwrap();
        match status {
            200 => acknowledged.push((body["conversation_id"].as_str().unwrap().to_string(), text)),
            _ => {
                refusal = Some((status, retry_after, body));
                break;
            }
        }
    }
    let (status, retry_after, body) = refusal.expect("writes kept succeeding on a full disk");
    assert_eq!(status, 503, "{body}");
    assert!(retry_after, "503 without Retry-After");
    assert_eq!(body["error"]["type"], "storage_unavailable", "{body}");
    assert!(acknowledged.len() >= 4, "only {} turns were stored before the disk filled", acknowledged.len());

    let (status, ready) = get(&server, "/health/ready").await;
    assert_eq!((status, ready["status"].as_str()), (503, Some("storage_unavailable")), "{ready}");
    assert!(ready["cause"].as_str().is_some_and(|c| !c.is_empty()), "{ready}");
    let (status, live) = get(&server, "/health/live").await;
    assert_eq!(status, 503, "liveness asks for the restart that reopens the store: {live}");
    // Reads still work meanwhile.
    let (status, _) = get(&server, &format!("/conversations/{}", acknowledged[0].0)).await;
    assert_eq!(status, 200);

    // Room again, and a restart: ready, and every acknowledged message is there.
    std::fs::remove_file(filler.unwrap()).unwrap();
    server.kill_and_restart();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(get(&server, "/health/ready").await.0, 200);
    for (conv, text) in &acknowledged {
        let (status, page) = get(&server, &format!("/conversations/{conv}")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["messages"][0]["content"].as_str(), Some(text.as_str()), "lost: {}", &text[..12]);
    }
}
