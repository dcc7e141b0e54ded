//! Every conversation stays warm: a conversation whose slot went to another
//! gets its KV cache back from the host-memory tier, after a restart from the
//! disk tier, by its own identity and never from another namespace; broken
//! or foreign cache files are never restored; a full disk stops only the
//! disk tier; the memory tier keeps to its budget; a stateless client's
//! cache is deleted by its id, or once unused past its lifetime. Real model,
//! real server.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{get_json, http_within, metrics, sample};
use common::server::Server;
use common::{greedy, slotted};
use modelpool_actors::engine::kv_tiers::{Fingerprint, KvTierOptions, KvTiers};
use modelpool_actors::{ChatMessage, LlamaEngine, PoolHandle, Usage};
use serde_json::{json, Value};

/// Every request of these scenarios fails after two minutes instead of hanging.
const REQUEST_LIMIT: Duration = Duration::from_secs(120);

/// One conversation over the stateless API: the whole history is resent each turn.
struct Conversation {
    id: String,
    messages: Vec<Value>,
    /// Prompt plus reply tokens of the last turn: what its cache held after it.
    held: u64,
    /// The API key it is sent with, if any.
    key: Option<&'static str>,
}

impl Conversation {
    fn new(id: String) -> Self {
        Self {
            id,
            messages: vec![json!({"role": "system", "content": "You are a helpful assistant."})],
            held: 0,
            key: None,
        }
    }

    /// Sent with API key `key` (in its namespace).
    fn keyed(id: &str, key: &'static str) -> Self {
        Self { key: Some(key), ..Self::new(id.into()) }
    }

    /// One greedy turn; returns (cached, prompt) tokens and the reply.
    async fn turn(&mut self, server: &Server, text: &str) -> (u64, u64, String) {
        self.messages.push(json!({"role": "user", "content": text}));
        let body = json!({"messages": self.messages, "max_tokens": 8, "temperature": 0});
        let mut req =
            http_within(REQUEST_LIMIT).post(server.url("/v1/chat/completions")).header("X-Conversation-Id", &self.id);
        if let Some(key) = self.key {
            req = req.bearer_auth(key);
        }
        let res = req.json(&body).send().await.unwrap();
        assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
        let r: Value = res.json().await.unwrap();
        let reply = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let u = &r["usage"];
        let (prompt, completion) = (u["prompt_tokens"].as_u64().unwrap(), u["completion_tokens"].as_u64().unwrap());
        let cached = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        self.messages.push(json!({"role": "assistant", "content": reply}));
        self.held = prompt + completion;
        (cached, prompt, reply)
    }

    /// What its next turn must find cached: the last prompt and reply, less
    /// the few tokens around the reply's end (the last sampled token is never
    /// decoded, and the end-of-turn marker is added by the template).
    fn expected(&self) -> u64 {
        self.held.saturating_sub(4)
    }
}

fn question(conv: usize, turn: usize) -> String {
    format!("Conversation {conv}, turn {turn}: name one thing to pack for a walk along the coast, and why.")
}

#[actix::test]
async fn twenty_four_conversations_on_four_slots_reuse_their_whole_history_every_turn() {
    let server = Server::start(&[], &[("MODELPOOL_SLOTS", "4"), ("MODELPOOL_MAX_QUEUE", "32")]);
    let mut convs: Vec<Conversation> = (0..24).map(|i| Conversation::new(format!("rot-{i}"))).collect();
    for turn in 1..=4 {
        // Four clients, each taking its six conversations in turn.
        let mut groups: Vec<Vec<(usize, &mut Conversation)>> = (0..4).map(|_| Vec::new()).collect();
        for (i, c) in convs.iter_mut().enumerate() {
            groups[i % 4].push((i, c));
        }
        let server = &server;
        futures::future::join_all(groups.into_iter().map(|group| async move {
            for (i, c) in group {
                let expected = c.expected();
                let (cached, prompt, _) = c.turn(server, &question(i, turn)).await;
                if turn > 1 {
                    assert!(
                        cached >= expected,
                        "conversation {i}, turn {turn}: {cached} of {prompt} prompt tokens cached, expected at least {expected}"
                    );
                }
            }
        }))
        .await;
    }
    let p = get_json(&server, "/pool").await;
    let kv = &p["kv"];
    assert!(kv["restores"]["memory"].as_u64().unwrap() > 0, "conversations came back from memory: {kv:#}");
    assert!(kv["parks"].as_u64().unwrap() >= 20, "{kv:#}");
    assert!(kv["memory"]["bytes"].as_u64().unwrap() <= kv["memory"]["budget_bytes"].as_u64().unwrap());
    let m = metrics(&server).await;
    assert!(sample(&m, "modelpool_kv_restores_total{tier=\"memory\"}") > 0.0, "{m}");
    assert!(sample(&m, "modelpool_kv_restored_tokens_total{tier=\"memory\"}") > 100.0, "{m}");
    assert!(m.contains("modelpool_kv_copy_seconds_bucket{op=\"restore\""), "{m}");
}

#[actix::test]
async fn after_a_restart_a_conversation_resumes_from_disk_and_a_kill_never_restores_a_broken_file() {
    let mut server = Server::start(&[], &[("MODELPOOL_SLOTS", "2")]);
    let mut a = Conversation::new("restart-a".into());
    let mut b = Conversation::new("restart-b".into());
    for turn in 1..=2 {
        a.turn(&server, &format!("My name is Ada. Turn {turn}: say hello.")).await;
        b.turn(&server, &format!("My name is Bob. Turn {turn}: say hello.")).await;
    }
    // SIGTERM: what the slots hold goes to disk.
    assert!(server.terminate().success(), "{}", server.log_text());
    let kv_dir = server.data_dir.path().join("kv");
    let files = std::fs::read_dir(&kv_dir).unwrap().count();
    assert_eq!(files, 2, "one file per conversation in {}", kv_dir.display());
    server.kill_and_restart();
    assert!(server.log_text().contains("2 cache(s) kept from the last run"), "{}", server.log_text());
    let expected = a.expected();
    let (cached, prompt, reply) = a.turn(&server, "What is my name?").await;
    assert!(cached >= expected, "after a restart: {cached} of {prompt} cached, expected at least {expected}");
    let kv = get_json(&server, "/pool").await["kv"].clone();
    assert_eq!(kv["restores"]["disk"], 1, "{kv:#}");
    assert!(kv["restored_tokens"]["disk"].as_u64().unwrap() >= expected, "{kv:#}");
    // The restored cache is the conversation's own: the answer still knows it.
    // (Not compared with the text from an empty cache: restored, only the new
    // tokens are decoded; from nothing the whole prompt is decoded in one
    // batch, and llama.cpp's kernels may round the two differently.)
    assert!(!reply.is_empty());

    // kill -9: whatever the disk holds now is either restored whole or not at all.
    server.kill_and_restart();
    let expected = b.expected();
    let (cached, prompt, _) = b.turn(&server, "What is my name?").await;
    let kv = get_json(&server, "/pool").await["kv"].clone();
    assert!(
        cached == 0 || cached >= expected,
        "after kill -9: {cached} of {prompt} cached (a whole file gives at least {expected}, a re-read 0)"
    );
    assert_eq!(kv["disk"]["rejected_corrupt"], 0, "{kv:#}");
}

#[actix::test]
async fn a_corrupted_file_and_a_file_of_another_model_are_removed_counted_and_the_turn_is_answered() {
    let mut server = Server::start(&[], &[("MODELPOOL_SLOTS", "2")]);
    let mut a = Conversation::new("bad-a".into());
    let mut b = Conversation::new("bad-b".into());
    a.turn(&server, "Tell me about lighthouses.").await;
    b.turn(&server, "Tell me about harbours.").await;
    assert!(server.terminate().success());
    let kv_dir = server.data_dir.path().join("kv");
    let mut files: Vec<_> = std::fs::read_dir(&kv_dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), 2);
    // One file gets bytes flipped in its body; the other is made another
    // model's (its fingerprint, bytes 8..16 of the header, changed).
    for (i, path) in files.iter().enumerate() {
        let mut bytes = std::fs::read(path).unwrap();
        let at = if i == 0 { bytes.len() / 2 } else { 8 };
        for b in &mut bytes[at..at + 4] {
            *b ^= 0x5a;
        }
        std::fs::write(path, bytes).unwrap();
    }
    server.kill_and_restart();
    // The foreign file is removed at start-up; the corrupted one when read.
    for c in [&mut a, &mut b] {
        let expected = c.expected();
        let (cached, prompt, reply) = c.turn(&server, "Say more.").await;
        // At most the system prompt, shared with the other conversation's slot.
        assert!(cached < expected, "{cached} of {prompt} restored from a bad file");
        assert!(!reply.is_empty());
    }
    let kv = get_json(&server, "/pool").await["kv"].clone();
    assert_eq!(
        (kv["disk"]["rejected_foreign"].as_u64(), kv["disk"]["rejected_corrupt"].as_u64()),
        (Some(1), Some(1)),
        "{kv:#}"
    );
    assert_eq!(kv["restores"]["disk"], 0, "{kv:#}");
    let m = metrics(&server).await;
    assert_eq!(sample(&m, "modelpool_kv_disk_rejected_files_total{reason=\"corrupt\"}"), 1.0, "{m}");
    assert_eq!(sample(&m, "modelpool_kv_disk_rejected_files_total{reason=\"foreign\"}"), 1.0, "{m}");
    assert!(std::fs::read_dir(&kv_dir).unwrap().all(|e| !files.contains(&e.unwrap().path())), "bad files deleted");
}

fn kv_files(server: &Server) -> usize {
    std::fs::read_dir(server.data_dir.path().join("kv")).unwrap().count()
}

/// `DELETE /conversations/{id}`, with API key `key` if any; returns the status.
async fn delete_as(server: &Server, id: &str, key: Option<&str>) -> u16 {
    let mut req = http_within(REQUEST_LIMIT).delete(server.url(&format!("/conversations/{id}")));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.unwrap().status().as_u16()
}

async fn delete(server: &Server, id: &str) -> u16 {
    delete_as(server, id, None).await
}

#[actix::test]
async fn deleting_a_stateless_conversation_id_deletes_its_cache_and_a_restart_does_not_bring_it_back() {
    let mut server = Server::start(&[], &[("MODELPOOL_SLOTS", "1")]);
    let mut a = Conversation::new("my-chat-1".into());
    let mut b = Conversation::new("my-chat-2".into());
    a.turn(&server, "My name is Ada. Say hello.").await;
    b.turn(&server, "My name is Bob. Say hello.").await;
    // SIGTERM writes both caches; after the restart they are on disk only.
    assert!(server.terminate().success(), "{}", server.log_text());
    assert_eq!(kv_files(&server), 2);
    server.kill_and_restart();
    assert_eq!(delete(&server, "my-chat-1").await, 204, "{}", server.log_text());
    assert_eq!(kv_files(&server), 1, "my-chat-1's file is gone, my-chat-2's kept");
    assert_eq!(delete(&server, "my-chat-1").await, 404, "deleted already");
    assert_eq!(delete(&server, "never-used").await, 404);

    // A cache that is only in a slot: not written at shutdown once deleted.
    let mut c = Conversation::new("my-chat-3".into());
    c.turn(&server, "My name is Cy. Say hello.").await;
    assert_eq!(delete(&server, "my-chat-3").await, 204);
    assert!(server.terminate().success(), "{}", server.log_text());
    assert_eq!(kv_files(&server), 1, "a deleted cache was written at shutdown");
    server.kill_and_restart();
    let (cached, prompt, _) = c.turn(&server, "What is my name?").await;
    assert_eq!(cached, 0, "{cached} of {prompt} tokens restored from a deleted cache");
    // At most the system prompt and "My name is", shared with c's slot.
    let expected = a.expected();
    let (cached, prompt, _) = a.turn(&server, "What is my name?").await;
    assert!(cached < expected, "{cached} of {prompt} tokens restored from a deleted cache");
    assert_eq!(get_json(&server, "/pool").await["kv"]["restores"]["disk"], 0);
    let expected = b.expected();
    let (cached, prompt, _) = b.turn(&server, "What is my name?").await;
    assert!(cached >= expected, "my-chat-2 resumes from disk: {cached} of {prompt} cached, expected {expected}");
}

#[actix::test]
async fn deleting_a_conversation_id_removes_only_the_callers_own_cache_of_it() {
    let keys = [("MODELPOOL_SERVER_API_KEYS", "ka,kb"), ("MODELPOOL_SERVER_KEY_NAMESPACES", "ka=team-a,kb=team-b")];
    let mut server = Server::start(&[], &[&keys[..], &[("MODELPOOL_SLOTS", "1")]].concat());
    // Two tenants happen to use the same id.
    let mut a = Conversation::keyed("shared-id", "ka");
    let mut b = Conversation::keyed("shared-id", "kb");
    a.turn(&server, "My name is Ada. Say hello.").await;
    b.turn(&server, "My name is Bob. Say hello.").await;
    assert!(server.terminate().success(), "{}", server.log_text());
    assert_eq!(kv_files(&server), 2);
    server.kill_and_restart();
    assert_eq!(delete_as(&server, "shared-id", Some("kb")).await, 204);
    assert_eq!(kv_files(&server), 1);
    assert_eq!(delete_as(&server, "shared-id", Some("kb")).await, 404, "team-a's cache is not team-b's to delete");
    // Team A's cache of the id is still there.
    let expected = a.expected();
    let (cached, prompt, _) = a.turn(&server, "What is my name?").await;
    assert!(cached >= expected, "team-a's cache was deleted: {cached} of {prompt} cached, expected {expected}");
}

#[actix::test]
async fn a_stateless_cache_unused_past_kv_disk_ttl_s_is_deleted_while_running_and_at_start_up() {
    // No memory tier: a cache that leaves its slot goes straight to disk.
    let env = [("MODELPOOL_SLOTS", "1"), ("MODELPOOL_KV_RAM_MIB", "0"), ("MODELPOOL_KV_DISK_TTL_S", "1")];
    let mut server = Server::start(&[], &env);
    let mut a = Conversation::new("ttl-a".into());
    let mut b = Conversation::new("ttl-b".into());
    a.turn(&server, "Say hello.").await;
    b.turn(&server, "Say hello.").await;
    // a's cache went to disk when b took the slot; a second later it is gone.
    let started = Instant::now();
    let disk = loop {
        let disk = get_json(&server, "/pool").await["kv"]["disk"].clone();
        if disk["expired"].as_u64() >= Some(1) || started.elapsed() > Duration::from_secs(20) {
            break disk;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((disk["expired"].as_u64(), disk["entries"].as_u64()), (Some(1), Some(0)), "{disk:#}");
    assert_eq!(kv_files(&server), 0);
    // Written at shutdown, b's cache is past its lifetime at the next start.
    assert!(server.terminate().success(), "{}", server.log_text());
    assert_eq!(kv_files(&server), 1);
    std::thread::sleep(Duration::from_millis(1500));
    server.kill_and_restart();
    let disk = get_json(&server, "/pool").await["kv"]["disk"].clone();
    assert_eq!((disk["expired"].as_u64(), disk["entries"].as_u64()), (Some(1), Some(0)), "{disk:#}");
    assert_eq!(kv_files(&server), 0);
}

/// One greedy /chat turn in `namespace`; returns the reply.
async fn chat(server: &Server, namespace: &str, message: &str, conversation: Option<&str>) -> Value {
    let mut body = json!({ "message": message, "namespace": namespace, "max_tokens": 8, "temperature": 0 });
    if let Some(id) = conversation {
        body["conversation_id"] = id.into();
    }
    let res = http_within(REQUEST_LIMIT).post(server.url("/chat")).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[actix::test]
async fn a_namespace_never_reuses_another_namespaces_cache() {
    let server = Server::start(&[], &[("MODELPOOL_SLOTS", "2")]);
    let secret = "My locker code is 4471 and my locker is in the east wing of the building, next to the gym.";
    let a = chat(&server, "tenant-a", secret, None).await;
    let a_id = a["conversation_id"].as_str().unwrap().to_string();
    chat(&server, "tenant-a", "Thanks, remember that.", Some(&a_id)).await;
    // B sends exactly A's opening: the same prompt tokens A's slot and A's parked cache hold.
    let b = chat(&server, "tenant-b", secret, None).await;
    assert_eq!(b["usage"]["cached_tokens"], 0, "tenant B reused tenant A's cache: {b}");
    let b2 = chat(&server, "tenant-b", secret, None).await;
    // Within B, the same opening is shared: the check above can fail.
    assert!(b2["usage"]["cached_tokens"].as_u64().unwrap() > 16, "{b2}");
    // And A's next turn still has its own cache back.
    let a3 = chat(&server, "tenant-a", "What is my locker code?", Some(&a_id)).await;
    assert!(a3["usage"]["cached_tokens"].as_u64().unwrap() > 16, "{a3}");
}

/// A tmpfs of `kib` KiB mounted on `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, kib: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs", dir.to_str().unwrap()])
            .output()
            .expect("mount (util-linux)");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[actix::test]
async fn a_full_disk_stops_the_disk_tier_with_its_cause_and_turns_are_still_answered() {
    let data = tempfile::tempdir().unwrap();
    // Room for no cache file (one takes ~23 KiB per token).
    let _full = Tmpfs::mount(&data.path().join("kv"), 64);
    // No memory tier: every parked cache goes straight to the disk.
    let mut server = Server::start_in(data, &[], &[("MODELPOOL_SLOTS", "1"), ("MODELPOOL_KV_RAM_MIB", "0")]);
    let mut convs: Vec<Conversation> = (0..3).map(|i| Conversation::new(format!("full-{i}"))).collect();
    for turn in 1..=2 {
        for (i, c) in convs.iter_mut().enumerate() {
            let (_, _, reply) = c.turn(&server, &question(i, turn)).await;
            assert!(!reply.is_empty());
        }
    }
    let started = Instant::now();
    let disk = loop {
        let disk = get_json(&server, "/pool").await["kv"]["disk"].clone();
        if disk["enabled"] == false || started.elapsed() > Duration::from_secs(20) {
            break disk;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(disk["enabled"], false, "{disk:#}");
    let cause = disk["disabled_cause"].as_str().unwrap_or_default();
    assert!(cause.contains("No space left"), "{cause}");
    assert_eq!(sample(&metrics(&server).await, "modelpool_kv_disk_enabled"), 0.0);
    let warnings = server.log_text().matches("no longer written to disk").count();
    assert_eq!(warnings, 1, "one warning:\n{}", server.log_text());
    // Still answering, and a shutdown on the full disk is clean.
    convs[0].turn(&server, "One more question.").await;
    assert!(server.terminate().success(), "{}", server.log_text());
}

#[actix::test]
async fn the_memory_tier_stays_within_its_budget_while_64_conversations_rotate() {
    let server =
        Server::start(&[], &[("MODELPOOL_SLOTS", "2"), ("MODELPOOL_KV_RAM_MIB", "8"), ("MODELPOOL_KV_DISK_MIB", "0")]);
    let budget = 8u64 << 20;
    let mut convs: Vec<Conversation> = (0..64).map(|i| Conversation::new(format!("budget-{i}"))).collect();
    // A first round warms the process (allocator, buffers) before RSS is read.
    for (i, c) in convs.iter_mut().enumerate().take(8) {
        c.turn(&server, &question(i, 0)).await;
    }
    let rss_before = server.rss_kib() * 1024;
    let mut peak = 0;
    for turn in 1..=2 {
        for (i, c) in convs.iter_mut().enumerate() {
            c.turn(&server, &question(i, turn)).await;
            if i % 8 == 7 {
                let kv = get_json(&server, "/pool").await["kv"].clone();
                let bytes = kv["memory"]["bytes"].as_u64().unwrap();
                assert!(bytes <= budget, "memory tier at {bytes} bytes, budget {budget}: {kv:#}");
                peak = peak.max(bytes);
            }
        }
    }
    let kv = get_json(&server, "/pool").await["kv"].clone();
    assert!(kv["evictions"]["memory"].as_u64().unwrap() > 0, "64 conversations overflow 8 MiB: {kv:#}");
    assert!(peak > budget / 2, "the tier was used: peak {peak}");
    let grew = (server.rss_kib() * 1024).saturating_sub(rss_before);
    assert!(grew < budget + (48 << 20), "RSS grew by {} MiB with an 8 MiB tier", grew >> 20);
}

/// Conversation A's second turn, after `between` ran on the pool's one slot
/// (nothing, or B's first turn, which parks A's cache). Returns A's second
/// reply and its usage.
async fn second_turn(engine: Arc<LlamaEngine>, tiers: Arc<KvTiers>, between: bool, repeats: usize) -> (String, Usage) {
    let mut opts = slotted(1, 1, 4);
    opts.instance.kv = Some(tiers.clone());
    let pool = PoolHandle::start(engine, opts, Arc::new(|_| {})).await.expect("pool");
    let story = "Here is a short story. A lighthouse keeper on a rocky island kept a logbook of every ship that \
                 passed, the weather each morning, and the birds that nested on the cliffs. One winter a storm \
                 cut the island off for six weeks, and the keeper wrote down everything he ate and every sound he \
                 heard at night. Summarise the story in one sentence.";
    let a1 = vec![ChatMessage::user(story.repeat(repeats))];
    let (reply, _) = pool.generate(greedy(a1.clone(), 16)).await.unwrap().collect_text().await.unwrap();
    if between {
        let b1 = vec![ChatMessage::user("Name three birds that nest on cliffs.")];
        pool.generate(greedy(b1, 16)).await.unwrap().collect_text().await.unwrap();
        tiers.flush();
    }
    let mut a2 = a1;
    a2.push(ChatMessage::assistant(reply));
    a2.push(ChatMessage::user("What did the keeper write down during the storm?"));
    let (text, done) = pool.generate(greedy(a2, 16)).await.unwrap().collect_text().await.unwrap();
    pool.shutdown().await;
    (text, done.usage)
}

/// The same conversation turn from a cache that never left its slot, from
/// the memory tier and from the disk tier: the same cached tokens and the same
/// greedy text. (Here the text may be compared: in all three runs the same
/// binary decoded the same tokens in the same batches; a restore copies the
/// KV cells bit for bit, so anything it lost or misplaced would change the
/// answer or the count.)
async fn restores_are_exact(engine: Arc<LlamaEngine>, repeats: usize, min_cached: u32) {
    let dir = tempfile::tempdir().unwrap();
    let (kept, kept_usage) = second_turn(engine.clone(), KvTiers::memory_only(256 << 20), false, repeats).await;
    let memory = KvTiers::memory_only(256 << 20);
    let (from_memory, memory_usage) = second_turn(engine.clone(), memory.clone(), true, repeats).await;
    assert_eq!(memory.status().restores.memory, 1, "{:?}", memory.status());
    let disk_only = KvTierOptions { ram_bytes: 0, disk_bytes: 1 << 30, dir: Some(dir.path().to_path_buf()), ttl: None };
    let disk = KvTiers::open(&disk_only, Fingerprint(1));
    let (from_disk, disk_usage) = second_turn(engine.clone(), disk.clone(), true, repeats).await;
    assert_eq!(disk.status().restores.disk, 1, "{:?}", disk.status());
    assert!(kept_usage.cached_tokens > min_cached, "{kept_usage:?}");
    assert_eq!(memory_usage.cached_tokens, kept_usage.cached_tokens);
    assert_eq!(disk_usage.cached_tokens, kept_usage.cached_tokens);
    assert_eq!(from_memory, kept, "restored from memory");
    assert_eq!(from_disk, kept, "restored from disk");
}

#[actix::test]
async fn a_cache_restored_from_memory_or_disk_answers_exactly_as_the_one_that_stayed_in_its_slot() {
    restores_are_exact(common::engine(), 1, 60).await;
}

/// Gemma 3 attends to the last 512 positions only in five of every six
/// layers (sliding-window attention). Its contexts keep a full-size window
/// cache (llama.cpp's default for library contexts), and a sequence's saved
/// state holds both caches: a conversation of 700 tokens, parked and
/// restored, answers as the one that stayed in its slot.
#[actix::test]
async fn a_sliding_window_model_restores_exactly_too() {
    let path = std::path::PathBuf::from(std::env::var_os("MODELPOOL_TEST_SWA_MODEL").unwrap_or_default());
    assert!(path.is_file(), "{} is missing: run scripts/setup.sh --with-test-tools", path.display());
    let engine = LlamaEngine::load(&path).expect("load Gemma-3-270M");
    // More than the window: the restored sequence must hold what the window dropped too.
    restores_are_exact(engine, 7, 512).await;
}
