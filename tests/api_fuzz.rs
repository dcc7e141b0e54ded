//! The whole HTTP API against its own OpenAPI document: Schemathesis reads
//! `GET /openapi.json` from a live server and sends every route what the
//! document allows and what it does not, from a fixed seed, then sequences
//! of calls that feed one answer into the next request (the stateful
//! phase). Every answer must be no 5xx, a status, content type, headers and
//! body the document declares for it, a refusal for what the document
//! forbids, and within a few seconds; the server must be alive and healthy
//! afterwards. `MODELPOOL_FUZZ_SEED` and `MODELPOOL_SCHEMATHESIS_EXAMPLES`
//! run other and longer rounds.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::server::{health_status, Server};

/// The seed of the round the suite runs (`MODELPOOL_FUZZ_SEED`, as in
/// tests/hostile_input.rs, runs another).
const SEED: u64 = 36;
/// Most cases per operation in the fuzzing phase, which also sizes the
/// stateful phase (`MODELPOOL_SCHEMATHESIS_EXAMPLES`): about 3 minutes on 2
/// cores, most of it in the generations the document allows. The coverage
/// phase's cases (each bound, just past it and at it) come on top.
const EXAMPLES: u64 = 150;
/// The slowest answer any request may have. The server below is set up so
/// that every answer fits well within it: 256 tokens of context at most
/// (~2.5 s of generation on one thread), 32 when a request names no limit.
const MAX_RESPONSE_SECONDS: u64 = 5;
/// A request with no answer after this long is a hang, reported as an error.
const REQUEST_TIMEOUT_SECONDS: u64 = 30;

/// Schemathesis from the set-up's venv (`scripts/setup.sh --with-test-tools`).
fn schemathesis() -> PathBuf {
    let venv = std::env::var_os("MODELPOOL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/modelpool/venv"));
    let bin = venv.join("bin/schemathesis");
    assert!(bin.is_file(), "{} is missing: run scripts/setup.sh --with-test-tools", bin.display());
    bin
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// `schemathesis run` against the document `base` serves, every check but
/// one that cannot hold for this API by nature. Against the same build, a
/// seed sends the same requests in the same order.
fn schemathesis_run(bin: &Path, base: &str, seed: u64, examples: u64) -> Command {
    let mut cmd = Command::new(bin);
    // Per-route settings: tests/fixtures/schemathesis.toml.
    cmd.args(["--config-file", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schemathesis.toml")])
        .args(["--no-color", "run", &format!("{base}/openapi.json")])
        // The document's own `servers` (if any) name no port of this run.
        .args(["--url", base])
        // One request at a time: the same order on every run of a seed, and
        // the second core stays with the server.
        .args(["--workers", "1"])
        .args(["--seed", &seed.to_string()])
        .args(["--max-examples", &examples.to_string()])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        // Every check, less one that cannot hold by nature.
        // positive_data_acceptance: a request the document allows must be
        // answered 2xx. A schema cannot say what the server rightly refuses
        // after reading it: a grammar that does not parse, a JSON schema
        // llama.cpp cannot convert, a prompt plus max_tokens over n_ctx (422),
        // a well-formed conversation id that does not exist (404), a token id
        // outside the vocabulary. (Schemathesis still warns, "Schema
        // validation mismatch", where most such requests were refused.)
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args(["--max-response-time", &MAX_RESPONSE_SECONDS.to_string()])
        .args(["--request-timeout", &REQUEST_TIMEOUT_SECONDS.to_string()])
        // Every failure of the round, not only the first of each operation.
        .arg("--continue-on-failure")
        // The seed alone decides what is sent: no examples remembered from
        // earlier rounds (nor requests replayed from the cache Schemathesis
        // keeps in its working directory: a fresh one per run).
        .args(["--generation-database", "none"])
        // Field names like `max_tokens` would be shown as "[Filtered]" in the
        // reproducing curl commands.
        .args(["--output-sanitize", "false"])
        // Ollama's NDJSON streams, read line by line and checked
        // (tests/fixtures/schemathesis_hooks.py).
        .env("PYTHONPATH", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks");
    cmd
}

/// Runs `cmd` in `dir` with its output in `dir/report.txt`; kills it after
/// `limit`. Returns its exit status (None: killed) and its output.
fn run_logged(mut cmd: Command, dir: &Path, limit: Duration) -> (Option<ExitStatus>, String) {
    let path = dir.join("report.txt");
    let out = std::fs::File::create(&path).unwrap();
    let mut child = cmd
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    (status, std::fs::read_to_string(&path).unwrap_or_default())
}

/// What the server wrote that explains a failure: its last warnings and
/// errors (a handler's panic, a failed store write), then its last lines.
fn server_tail(server: &Server) -> String {
    let log = server.log_text();
    let lines: Vec<&str> = log.lines().collect();
    let notable: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    format!(
        "--- server log: its last warnings and errors ---\n{}\n--- server log: its last lines ---\n{}",
        notable[notable.len().saturating_sub(30)..].join("\n"),
        lines[lines.len().saturating_sub(20)..].join("\n")
    )
}

#[test]
fn every_route_answers_as_its_openapi_document_says_and_the_server_lives() {
    let bin = schemathesis();
    let seed = env_number("MODELPOOL_FUZZ_SEED", SEED);
    let examples = env_number("MODELPOOL_SCHEMATHESIS_EXAMPLES", EXAMPLES).max(1);
    // Short generations: 256 tokens of context bound any max_tokens (about
    // 2.5 s on one thread), and a request that names none gets 32.
    let mut server = Server::start(&["--n-ctx", "256"], &[("MODELPOOL_SAMPLING_MAX_TOKENS_DEFAULT", "32")]);
    let dir = tempfile::tempdir().unwrap();
    let cmd = schemathesis_run(&bin, &server.base, seed, examples);
    let line =
        format!("{} {}", bin.display(), cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    eprintln!("running: {line}");
    let started = Instant::now();
    // A round of the default size takes minutes; a longer one in proportion.
    let limit = Duration::from_secs(900 * examples.div_ceil(EXAMPLES));
    let (status, report) = run_logged(cmd, dir.path(), limit);
    let took = started.elapsed();
    let round = format!("seed {seed}, {examples} examples, {took:.0?}");
    if let Some(exit) = server.child.try_wait().unwrap() {
        panic!("the server ended ({exit}) during the round ({round}):\n{report}\n{}", server_tail(&server));
    }
    match status {
        None => panic!("schemathesis ran past {limit:?} ({round}):\n{report}\n{}", server_tail(&server)),
        Some(s) if !s.success() => {
            panic!("schemathesis failed ({s}; {round}):\n{report}\n{}\n--- command ---\n{line}", server_tail(&server))
        }
        Some(_) => eprintln!("{report}\nschemathesis passed ({round})"),
    }
    assert_eq!(health_status(&server.base), Some(200), "/health after the round:\n{}", server_tail(&server));
    let tail = server_tail(&server);
    assert_eq!(server.terminate().code(), Some(0), "the server's exit after the round:\n{tail}");
}
