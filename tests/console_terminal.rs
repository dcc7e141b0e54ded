//! `modelpool chat` under a real terminal (tmux): typed lines are edited and
//! recalled with the up arrow, the history survives a restart (it lives in
//! the data directory), Ctrl-C stops a reply being streamed without leaving
//! (the pool is idle again), and Ctrl-D leaves.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{embed_model_path, model_path};

struct Session {
    name: String,
}

impl Session {
    /// Starts the console in a detached tmux session of 160 × 50 cells.
    fn start(name: &str, data: &std::path::Path) -> Session {
        let bin = env!("CARGO_BIN_EXE_modelpool");
        let command = format!(
            "env MODELPOOL_MODEL={} MODELPOOL_EMBEDDING_MODEL={} MODELPOOL_SAMPLING_MAX_TOKENS=200 \
             MODELPOOL_SLOTS=1 MODELPOOL_LOG=error {bin} --data-dir {} --threads 1 --n-ctx 512 chat",
            model_path().display(),
            embed_model_path().display(),
            data.display()
        );
        let _ = Command::new("tmux").args(["kill-session", "-t", name]).status();
        let ok = Command::new("tmux")
            .args(["new-session", "-d", "-s", name, "-x", "160", "-y", "50", &command])
            .status()
            .expect("tmux (package tmux; scripts/test.sh installs it)");
        assert!(ok.success(), "tmux new-session failed");
        let s = Session { name: name.to_string() };
        s.wait_for("modelpool console", Duration::from_secs(60));
        s.wait_prompt(Duration::from_secs(10));
        s
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux").args(["capture-pane", "-p", "-t", &self.name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.name];
        args.extend_from_slice(keys);
        assert!(Command::new("tmux").args(&args).status().unwrap().success());
    }

    /// Types text literally (no key names).
    fn type_text(&self, text: &str) {
        assert!(Command::new("tmux").args(["send-keys", "-t", &self.name, "-l", text]).status().unwrap().success());
    }

    fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if screen.contains(needle) {
                return screen;
            }
            assert!(started.elapsed() < limit, "{needle:?} not on screen within {limit:?}:\n{screen}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last non-empty line of the screen.
    fn last_line(&self) -> String {
        self.screen().lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().to_string()
    }

    /// Waits until the last line is an empty prompt.
    fn wait_prompt(&self, limit: Duration) {
        let started = Instant::now();
        while self.last_line().trim_end() != ">" {
            assert!(started.elapsed() < limit, "no prompt within {limit:?}:\n{}", self.screen());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn alive(&self) -> bool {
        Command::new("tmux").args(["has-session", "-t", &self.name]).status().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.name]).status();
    }
}

#[test]
fn the_console_edits_recalls_cancels_and_leaves() {
    let data = tempfile::tempdir().unwrap();
    let s = Session::start("modelpool-console-test", data.path());

    // A message, edited before it is sent (Backspace), then answered.
    s.type_text("Say hello in one wordX");
    s.keys(&["BSpace", "Enter"]);
    s.wait_for("> Say hello in one word\n", Duration::from_secs(5));
    s.wait_prompt(Duration::from_secs(60));

    // The up arrow recalls it (no ^[[A on screen).
    s.keys(&["Up"]);
    let screen = s.wait_for("> Say hello in one word\n", Duration::from_secs(5));
    assert_eq!(s.last_line().trim_end(), "> Say hello in one word", "{screen}");
    assert!(!screen.contains("^[["), "{screen}");
    s.keys(&["C-u"]);

    // Ctrl-C while a reply streams stops it; the console stays.
    s.type_text("Write a very long story about a dragon who bakes bread.");
    s.keys(&["Enter"]);
    let started = Instant::now();
    loop {
        let screen = s.screen();
        let after = screen.rsplit("> Write a very long story").next().unwrap_or("");
        if after.lines().nth(1).is_some_and(|l| l.trim().len() > 10) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the reply did not start:\n{screen}");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.keys(&["C-c"]);
    s.wait_for("(reply stopped)", Duration::from_secs(5));
    s.wait_prompt(Duration::from_secs(5));
    assert!(s.alive(), "Ctrl-C does not leave the console");
    // /pool shows the slot free again (asked again until it does: the
    // cancellation lands at the instance's next step).
    let started = Instant::now();
    loop {
        s.keys(&["C-l"]);
        s.type_text("/pool");
        s.keys(&["Enter"]);
        let screen = s.wait_for("In Use:", Duration::from_secs(5));
        s.wait_prompt(Duration::from_secs(5));
        if screen.contains("In Use: 0") {
            assert!(screen.contains("Available: 1/1 slots on 1 instance"), "{screen}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the pool is not idle after Ctrl-C:\n{screen}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Ctrl-D leaves.
    s.keys(&["C-d"]);
    let started = Instant::now();
    while s.alive() {
        assert!(started.elapsed() < Duration::from_secs(10), "Ctrl-D did not leave:\n{}", s.screen());
        std::thread::sleep(Duration::from_millis(50));
    }

    // The history survives: a new session recalls the last line typed.
    let history = std::fs::read_to_string(data.path().join("console_history.txt")).unwrap();
    assert!(history.contains("Say hello in one word"), "{history}");
    let s = Session::start("modelpool-console-test-2", data.path());
    s.keys(&["Up"]);
    s.wait_for("> /pool", Duration::from_secs(5));
    s.keys(&["Up"]);
    s.wait_for("> Write a very long story", Duration::from_secs(5));
}
