//! The binary as a user runs it: the console answers, bad settings and bad
//! model files stop start-up with one clear message.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::modelpool_command;

fn modelpool(args: &[&str]) -> Command {
    let mut cmd = modelpool_command();
    cmd.args(args).env("MODELPOOL_THREADS", "1").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn run_console(args: &[&str], input: &str) -> (bool, String, String) {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = modelpool(args);
    cmd.env("MODELPOOL_DATA_DIR", data.path()).env("MODELPOOL_CHAT_RECENT_MESSAGES", "2");
    let mut child = cmd.spawn().expect("start modelpool");
    // A process that fails at start-up may exit before reading its input.
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    // A hung process fails the test instead of hanging the suite.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("modelpool {args:?} did not exit within 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let (ok, _, stderr) = run_console(args, "/quit\n");
    assert!(!ok, "start-up should fail for {args:?}");
    for n in needles {
        assert!(stderr.contains(n), "stderr for {args:?} lacks {n:?}:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn console_answers_and_shows_pool_status() {
    let (ok, stdout, stderr) = run_console(
        &["--instances", "3", "--n-ctx", "512", "chat"],
        "My cat is called Biscuit.\nWhat is the capital of France?\n/pool\n/history\n/recall name of my pet\n/quit\n",
    );
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    for i in 1..=3 {
        assert!(stderr.contains(&format!("Instance {i}/3 ready")), "{stderr}");
    }
    assert!(
        stdout.contains("Pool Status:")
            && stdout.contains("Available: 12/12 slots on 3 instances")
            && stdout.contains("In Use: 0"),
        "{stdout}"
    );
    // Piped input gets no prompts (the line editor shows them on a terminal
    // only): the answers sit between the banner and the pool status.
    let answers = stdout.split("Pool Status:").next().unwrap_or("").lines().skip(1).collect::<String>();
    assert!(answers.trim().len() > 3, "no answer in:\n{stdout}");
    assert!(stdout.contains("you: My cat is called Biscuit."), "history: {stdout}");
    let recall_line = stdout.lines().find(|l| l.contains("] user: My cat is called Biscuit.")).unwrap_or_default();
    let score: f32 =
        recall_line.trim_start_matches(['>', ' ']).split_whitespace().next().unwrap_or("").parse().unwrap_or(0.0);
    assert!(score > 0.3, "/recall shows the fact with its score: {stdout}");
}

#[test]
fn bad_settings_fail_with_the_setting_named() {
    fails_with(&["--instances", "0", "chat"], &["instances", "at least 1", "got 0"]);
    fails_with(&["--profile", "huge", "chat"], &["unknown profile", "huge", "development"]);
    fails_with(&["--n-ctx", "100000", "chat"], &["n_ctx 100000", "training context"]);
    let mut cmd = modelpool(&["chat"]);
    cmd.env("MODELPOOL_INSTANCES", "many");
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MODELPOOL_INSTANCES"));
}

#[test]
fn bad_model_files_fail_with_a_clear_message() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let corrupt = fixtures.join("corrupt.gguf");
    fails_with(&["--model", corrupt.to_str().unwrap(), "chat"], &["corrupt.gguf", "could not be loaded"]);
    let text = fixtures.join("not-a-model.gguf");
    fails_with(&["--model", text.to_str().unwrap(), "chat"], &["not-a-model.gguf", "not a GGUF model"]);
    fails_with(&["--model", "/nonexistent/model.gguf", "chat"], &["/nonexistent/model.gguf", "setup.sh"]);
    // serve listens before it loads, and still exits with the error.
    fails_with(
        &["--model", corrupt.to_str().unwrap(), "serve", "--bind", "127.0.0.1:0"],
        &["corrupt.gguf", "could not be loaded"],
    );
}

#[test]
fn a_data_directory_in_use_is_refused_with_its_name() {
    let data = tempfile::tempdir().unwrap();
    let _held =
        modelpool_actors::memory::store::SledStore::open(data.path(), modelpool_actors::Durability::Sync).unwrap();
    let mut cmd = modelpool(&["--data-dir", data.path().to_str().unwrap(), "chat"]);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("in use by another modelpool process") && stderr.contains(data.path().to_str().unwrap()),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_unreachable_postgres_store_stops_start_up_with_one_line_and_no_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = std::time::Instant::now();
    let out = modelpool(&["serve", "--bind", "127.0.0.1:0"])
        .env("MODELPOOL_STORE", format!("postgres://mp:s3cret@127.0.0.1:{port}/chat"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(line.contains(&format!("postgres://mp:***@127.0.0.1:{port}/chat")), "{line}");
    assert!(line.to_lowercase().contains("refused"), "the cause is named: {line}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
    let loaded = stderr.lines().any(|l| l.starts_with("Model ") || l.starts_with("Pool ready"));
    assert!(!loaded, "the store is checked before the model is loaded: {stderr}");
}

#[test]
fn a_store_that_is_not_a_postgres_url_is_refused_by_name() {
    let out = modelpool(&["chat"]).env("MODELPOOL_STORE", "mysql://u:pw@db/chat").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid setting store") && stderr.contains("postgres://"), "{stderr}");
    assert!(!stderr.contains(":pw@"), "{stderr}");
}

/// The scripts', tests' and benchmarks' own variables (`scripts/env.sh`
/// exports some into every command) are not settings and are not warned
/// about; a misspelt setting still is.
#[test]
fn only_unknown_settings_are_warned_about_not_the_scripts_variables() {
    let data = tempfile::tempdir().unwrap();
    let scripts = [
        "MODELPOOL_TEST_SWA_MODEL",
        "MODELPOOL_FUZZ_SEED",
        "MODELPOOL_SCHEMATHESIS_EXAMPLES",
        "MODELPOOL_BENCH_MEMORY",
        "MODELPOOL_PORTABLE",
        "MODELPOOL_LLAMA_BUILD",
    ];
    let mut cmd = modelpool(&["--instances", "0", "chat"]);
    cmd.env("MODELPOOL_DATA_DIR", data.path()).env("MODELPOOL_INSTANCSE", "2");
    for var in scripts {
        cmd.env(var, "1");
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MODELPOOL_INSTANCSE") && stderr.contains("ignoring unknown"), "{stderr}");
    for var in scripts {
        assert!(!stderr.contains(var), "{var} is warned about:\n{stderr}");
    }
}
