//! Chat memory at scale, on the real embedding model and a real sled store:
//! recall that does not grow with the store, chat turns ahead of bulk
//! embeddings, deletion and compaction, restart, and a failing embedder.

mod common;

use std::time::{Duration, Instant};

use common::{chat_options, embed_model_path, eventually, options, start};
use modelpool_actors::chat::import::ImportMessage;
use modelpool_actors::memory::store::{open_sled, ConversationStore, NewMessage, StoreError};
use modelpool_actors::memory::{EmbedderOptions, IndexOptions, Priority};
use modelpool_actors::{
    ChatHandle, ChatOptions, Conversation, ConversationId, Durability, EmbedderHandle, EngineError, Role,
};

const FACT: &str = "My cat is called Biscuit and she is ginger.";
const QUESTION: &str = "What is the name of my cat?";

/// Texts unlike the fact, for other conversations and small talk.
const OTHER: [&str; 12] = [
    "The train to the coast leaves at eight in the morning.",
    "I repainted the kitchen a pale shade of green last weekend.",
    "Quarterly taxes are due in the middle of April.",
    "The football match was postponed because of the storm.",
    "Our team is migrating the billing service to a new database.",
    "Remember to water the tomatoes twice a week in summer.",
    "The museum opens late on Thursdays.",
    "My laptop battery drains quickly when the screen is bright.",
    "We are planning a hiking trip in the mountains in June.",
    "The recipe needs two cups of flour and a pinch of salt.",
    "The concert tickets sold out within an hour.",
    "Traffic on the bridge is heavy after five o'clock.",
];

async fn chat_on(store: ConversationStore, opts: ChatOptions) -> ChatHandle {
    let embedder = EmbedderHandle::start(&embed_model_path(), 1).await.unwrap();
    ChatHandle::start_on(start(options(1, 8)).await, embedder, store, opts).await.unwrap()
}

/// `n` distinct vectors near the embeddings of [`OTHER`]: real neighbourhoods
/// without embedding thousands of texts.
async fn other_vectors(embedder: &EmbedderHandle, n: usize) -> Vec<Vec<f32>> {
    let base = embedder.embed(OTHER.iter().map(|s| s.to_string()).collect()).await.unwrap();
    let mut state = 0x9E3779B97F4A7C15u64;
    (0..n)
        .map(|i| {
            base[i % base.len()]
                .iter()
                .map(|x| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    x + 0.01 * ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                })
                .collect()
        })
        .collect()
}

/// Stores `conversations` conversations of `per` messages with the given vectors.
async fn fill(
    store: &ConversationStore,
    vectors: &[Vec<f32>],
    conversations: usize,
    per: usize,
) -> Vec<ConversationId> {
    let mut ids = Vec::new();
    for c in 0..conversations {
        let conv = Conversation::new("default");
        let messages = (0..per)
            .map(|j| {
                let i = (c * per + j) % vectors.len();
                NewMessage {
                    role: if j % 2 == 0 { Role::User } else { Role::Assistant },
                    content: OTHER[i % OTHER.len()].to_string(),
                    created_at_ms: 0,
                    token_count: 12,
                    vector: vectors[i].clone(),
                }
            })
            .collect();
        store.import(&conv, messages).await.unwrap();
        ids.push(conv.id);
    }
    store.flush().await.unwrap();
    ids
}

/// A conversation whose first message is the fact, pushed out of a recent
/// window of 2 by small talk; returns it and the median time of the recall
/// path (after embedding) over 30 calls.
async fn fact_and_recall_median(chat: &ChatHandle) -> (ConversationId, f64) {
    let first = chat.say(None, FACT).await.unwrap();
    let id = first.conversation_id;
    for t in &OTHER[..3] {
        chat.say(Some(id), t).await.unwrap();
    }
    let recalled = chat.recall(&id, QUESTION).await.unwrap();
    assert_eq!(recalled.first().map(|r| r.id), Some(first.user_message_id), "the fact is recalled: {recalled:?}");
    let q = chat.embedder().embed_one(QUESTION).await.unwrap();
    let mut ms = Vec::new();
    for _ in 0..30 {
        let s = Instant::now();
        let hits = chat.recall_vector(&id, &q).await.unwrap();
        ms.push(s.elapsed().as_secs_f64() * 1e3);
        assert_eq!(hits.first().map(|r| r.id), Some(first.user_message_id));
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    (id, ms[ms.len() / 2])
}

/// Acceptance 1: with 2,000 other conversations (40,000 messages) in the
/// store, a conversation's recall finds its pushed-out fact, and the recall
/// path takes no longer than twice what it takes on an empty store.
#[actix::test]
async fn recall_with_2000_other_conversations_finds_the_fact_as_fast_as_on_an_empty_store() {
    let empty_dir = tempfile::tempdir().unwrap();
    let chat = chat_on(open_sled(empty_dir.path(), Durability::Sync).unwrap(), chat_options(2, 4)).await;
    let (_, empty_ms) = fact_and_recall_median(&chat).await;
    chat.pool().shutdown().await;
    chat.shutdown().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = open_sled(dir.path(), Durability::Async).unwrap();
    let embedder = EmbedderHandle::start(&embed_model_path(), 1).await.unwrap();
    let vectors = other_vectors(&embedder, 4000).await;
    let started = Instant::now();
    fill(&store, &vectors, 2000, 20).await;
    println!("2,000 conversations stored in {:.1} s", started.elapsed().as_secs_f64());
    let chat = chat_on(store, chat_options(2, 4)).await;
    let (_, full_ms) = fact_and_recall_median(&chat).await;
    println!("recall path median: empty store {empty_ms:.3} ms, 40,000 other messages {full_ms:.3} ms");
    // Below a millisecond, scheduler noise is of the order of the figure itself.
    assert!(full_ms <= 2.0 * empty_ms.max(1.0), "recall slowed down with the store: {full_ms:.3} vs {empty_ms:.3} ms");
    let stats = chat.index_stats();
    assert!(stats.cached_conversations <= 2, "only the conversations used are in memory: {stats:?}");
    chat.pool().shutdown().await;
    chat.shutdown().await.unwrap();
}

/// Acceptance 2: a 256-input embeddings request running at the same time
/// delays a chat turn's recall by at most one batch: turns go first.
#[actix::test]
async fn a_256_input_embeddings_request_delays_a_chat_turns_recall_by_at_most_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let chat = chat_on(open_sled(dir.path(), Durability::Sync).unwrap(), chat_options(2, 4)).await;
    let (id, _) = fact_and_recall_median(&chat).await;
    let embedder = chat.embedder().clone();
    let bulk: Vec<String> = (0..256).map(|i| format!("{} (note {i})", OTHER[i % OTHER.len()])).collect();

    // One batch of bulk work, alone, and a recall alone.
    let s = Instant::now();
    embedder.embed(bulk[..16].to_vec()).await.unwrap();
    let batch_ms = s.elapsed().as_secs_f64() * 1e3;
    let s = Instant::now();
    chat.recall(&id, QUESTION).await.unwrap();
    let alone_ms = s.elapsed().as_secs_f64() * 1e3;

    let running = {
        let embedder = embedder.clone();
        let bulk = bulk.clone();
        actix::spawn(async move {
            let s = Instant::now();
            let v = embedder.embed(bulk).await.unwrap();
            (v.len(), s.elapsed().as_secs_f64() * 1e3)
        })
    };
    let before = embedder.health().batches;
    while embedder.health().batches < before + 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = Instant::now();
    let batches_before = embedder.health().batches;
    let recalled = chat.recall(&id, QUESTION).await.unwrap();
    let batches_during = embedder.health().batches - batches_before;
    let bulk_left = !running.is_finished();
    let during_ms = s.elapsed().as_secs_f64() * 1e3;
    assert!(recalled.first().is_some_and(|r| r.content == FACT), "{recalled:?}");
    let (n, bulk_ms) = running.await.unwrap();
    assert_eq!(n, 256, "the bulk request still gets every vector");
    println!(
        "one batch of 16: {batch_ms:.0} ms; recall alone {alone_ms:.0} ms, beside 256 inputs {during_ms:.0} ms; \
         the 256 inputs took {bulk_ms:.0} ms"
    );
    // The recall waited for the batch in progress when it arrived, at most,
    // and then went first: two batches ended meanwhile (that one and its
    // own), whatever the machine's speed, while bulk texts still waited.
    assert!(batches_during <= 2, "a chat turn waited behind {} bulk batches", batches_during.saturating_sub(1));
    assert!(bulk_left, "the bulk request was still running when the recall was answered");
    chat.pool().shutdown().await;
    chat.shutdown().await.unwrap();
}

/// Acceptance 3: deleting a conversation takes its messages out of recall
/// at once, and out of memory once the namespace graph is compacted.
#[actix::test]
async fn a_deleted_conversation_leaves_recall_at_once_and_memory_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = chat_options(2, 4);
    opts.cross_conversation = true;
    // A small namespace gets its graph early, so that compaction is exercised.
    opts.index = IndexOptions { graph_from: 32, ..IndexOptions::default() };
    let chat = chat_on(open_sled(dir.path(), Durability::Sync).unwrap(), opts).await;
    let import = |texts: Vec<String>| -> Vec<ImportMessage> {
        texts.into_iter().map(|content| ImportMessage { role: Role::User, content, created_at_ms: None }).collect()
    };
    let (kept, _) = chat
        .import("default", None, import((0..40).map(|i| format!("{} ({i})", OTHER[i % OTHER.len()])).collect()))
        .await
        .unwrap();
    let mut doomed: Vec<String> = vec![FACT.to_string()];
    doomed.extend((0..29).map(|i| format!("{} (again {i})", OTHER[i % OTHER.len()])));
    let (gone, _) = chat.import("default", None, import(doomed)).await.unwrap();
    assert!(chat.index().wait_built(Duration::from_secs(60)));
    let s = chat.index_stats();
    assert_eq!((s.graphs, s.namespace_vectors), (1, 70), "{s:?}");

    // Cross-conversation recall from the kept conversation finds the other's fact...
    let before = chat.recall(&kept.id, QUESTION).await.unwrap();
    assert!(before.first().is_some_and(|r| r.content == FACT), "{before:?}");
    chat.delete(gone.id).await.unwrap();
    // ...and not once it is deleted, whatever the compaction is doing.
    let after = chat.recall(&kept.id, QUESTION).await.unwrap();
    assert!(after.iter().all(|r| r.content != FACT && !r.content.contains("again")), "{after:?}");
    assert!(chat.index().wait_built(Duration::from_secs(60)));
    let s = chat.index_stats();
    assert_eq!((s.namespace_vectors, s.namespace_slots, s.tombstones), (40, 40, 0), "compacted: {s:?}");
    chat.pool().shutdown().await;
    chat.shutdown().await.unwrap();
}

/// Acceptance 4: with 20,000 stored vectors a restart is ready within 5 s
/// and recalls the same messages as before. With cross-conversation recall
/// the namespace graph is built once, saved, and loaded at the next start
/// (never built again) answering the same recall; a damaged graph file is
/// rebuilt, never used, and counted.
#[actix::test]
async fn a_restart_with_20000_vectors_is_ready_within_5_s_and_recalls_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let graphs = dir.path().join("graphs");
    let ids = {
        let store = open_sled(dir.path(), Durability::Async).unwrap();
        let embedder = EmbedderHandle::start(&embed_model_path(), 1).await.unwrap();
        let vectors = other_vectors(&embedder, 20_000).await;
        fill(&store, &vectors, 400, 50).await
    };
    let queries: Vec<&str> = vec![QUESTION, "when does the train leave?", "what colour is the kitchen?"];
    let picks = [ids[3], ids[150], ids[399]];
    let mut runs = Vec::new();
    // (cross-conversation, namespace graph). Without a graph the namespace is
    // searched exactly, so results compare exactly across restarts; with one,
    // the first start builds it, the second loads it, the third finds its
    // file damaged.
    let plan = [(false, false), (true, false), (false, false), (true, false), (true, true), (true, true), (true, true)];
    for (run, (cross, graph)) in plan.into_iter().enumerate() {
        let mut opts = chat_options(4, 4);
        opts.cross_conversation = cross;
        opts.index = if graph {
            IndexOptions { graph_dir: Some(graphs.clone()), ..IndexOptions::default() }
        } else {
            IndexOptions { graph_from: usize::MAX, ..IndexOptions::default() }
        };
        if run == 6 {
            let [graph_file, ..] = modelpool_actors::memory::index::graph_files(&graphs, "default");
            let mut bytes = std::fs::read(&graph_file).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x5a;
            std::fs::write(&graph_file, bytes).unwrap();
        }
        let pool = start(options(1, 8)).await;
        let embedder = EmbedderHandle::start(&embed_model_path(), 1).await.unwrap();
        // The previous run's store lets go of the directory once its last task ends.
        let deadline = Instant::now() + Duration::from_secs(30);
        let store = loop {
            match open_sled(dir.path(), Durability::Sync) {
                Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => break other.unwrap(),
            }
        };
        let started = Instant::now();
        let chat = ChatHandle::start_on(pool, embedder, store, opts).await.unwrap();
        let ready_s = started.elapsed().as_secs_f64();
        println!("run {run}, cross-conversation {cross}: ready in {ready_s:.2} s, {:?}", chat.index_stats());
        assert!(ready_s <= 5.0, "start-up took {ready_s:.1} s");
        if cross {
            assert_eq!(chat.index_stats().namespace_vectors, 20_000);
        }
        if run == 4 {
            // Ready while the graph builds; recall answers meanwhile (exactly).
            assert_eq!(chat.index_stats().building, 1);
            let hits = chat.recall(&picks[0], queries[1]).await.unwrap();
            assert!(hits.first().is_some_and(|r| r.content.contains("train")), "{hits:?}");
        }
        if graph {
            assert!(chat.index().wait_built(Duration::from_secs(300)), "the namespace graph is ready");
            let s = chat.index_stats();
            println!("run {run}: graph ready {:.2} s after the start, {s:?}", started.elapsed().as_secs_f64());
            assert_eq!(s.graphs, 1);
            let expected = match run {
                4 => (1, 0, 0),
                5 => (0, 1, 0), // loaded: no rebuild
                _ => (1, 0, 1), // damaged: rebuilt, counted
            };
            assert_eq!((s.graphs_built, s.graphs_loaded, s.graph_files_rejected), expected, "run {run}: {s:?}");
        }
        let mut results = Vec::new();
        for id in picks {
            for q in &queries {
                let hits: Vec<(u64, String)> =
                    chat.recall(&id, q).await.unwrap().into_iter().map(|r| (r.id, r.content)).collect();
                results.push(hits);
            }
        }
        runs.push(results);
        chat.pool().shutdown().await;
        chat.shutdown().await.unwrap();
    }
    assert_eq!(runs[0], runs[2], "per-conversation recall is the same after a restart");
    assert_eq!(runs[1], runs[3], "namespace recall is the same after a restart");
    assert_eq!(runs[4], runs[5], "the loaded graph recalls what the saved one did");
}

/// Acceptance 5: an embedder that fails, hangs or whose queue is full gives a
/// clear error within its timeout; a hung context is replaced and the next
/// call works. (A dead thread: `chat_memory.rs`.)
#[actix::test]
async fn a_failing_hanging_or_full_embedder_is_a_clear_error_within_its_timeout() {
    use modelpool_actors::Fault;
    // Long timeouts except where a timeout is the point: other tests load
    // the machine, and a slow answer must not pass for a hang.
    let opts = EmbedderOptions { timeout: Duration::from_secs(30), ..EmbedderOptions::default() };
    let embedder = EmbedderHandle::start_with(&embed_model_path(), opts).await.unwrap();

    embedder.inject_fault(Fault::FailNextDecode).await;
    let err = embedder.embed_one("pasta").await.unwrap_err();
    assert!(matches!(err, EngineError::Decode(_)), "{err:?}");
    assert_eq!(embedder.embed_one("pasta").await.unwrap().len(), 384, "a failed batch does not break the context");

    let embedder = embedder.with_timeout(Duration::from_millis(800));
    // The stall outlasts any test run: an answer at all is the timeout's.
    embedder.inject_fault(Fault::StallNextDecode(Duration::from_secs(60))).await;
    let err = embedder.embed_one("pasta").await.unwrap_err();
    assert!(err.to_string().contains("embed_timeout_ms (800 ms)") && err.to_string().contains("restarted"), "{err}");
    assert_eq!(embedder.health().restarts, 1);
    let embedder = embedder.with_timeout(Duration::from_secs(30));
    assert_eq!(embedder.embed_one("pasta").await.unwrap().len(), 384, "the fresh context answers");

    // A queue of 16 texts: with the context busy and 16 waiting, one more is
    // refused at once, by name.
    let opts = EmbedderOptions { timeout: Duration::from_secs(10), max_queued: 16, ..EmbedderOptions::default() };
    let embedder = EmbedderHandle::start_with(&embed_model_path(), opts).await.unwrap();
    embedder.inject_fault(Fault::StallNextDecode(Duration::from_millis(1500))).await;
    let busy = embedder.clone();
    let busy = actix::spawn(async move { busy.embed_one("keeps the context busy").await });
    eventually(Duration::from_secs(10), "the stalled text is being embedded", || embedder.health().embedding == 1)
        .await;
    let waiting = embedder.clone();
    let many: Vec<String> = (0..16).map(|i| format!("text {i}")).collect();
    let waiting = actix::spawn(async move { waiting.embed_as(many, Priority::Bulk).await });
    eventually(Duration::from_secs(10), "16 texts queued", || embedder.health().queued == 16).await;
    // Refused, not queued: the answer comes while the context is still stalled.
    let err = embedder.embed_one("one more").await.unwrap_err();
    let h = embedder.health();
    assert_eq!((h.embedding, h.queued), (1, 16), "refused while the queue was full");
    assert!(matches!(err, EngineError::EmbedQueueFull { max_queued: 16 }), "{err:?}");
    assert!(err.to_string().contains("embed_queue") && err.to_string().contains("retry after 1 s"), "{err}");
    assert_eq!(busy.await.unwrap().unwrap().len(), 384);
    assert_eq!(waiting.await.unwrap().unwrap().len(), 16, "the waiting texts are served");
    assert_eq!(embedder.health().queued, 0);
}

/// A reply is answered before its embedding exists; the next turn of the
/// conversation still recalls it, and a message stored without a vector (a
/// restart between the two) is embedded when its conversation is loaded.
#[actix::test]
async fn a_reply_embedded_after_the_answer_is_recalled_and_a_missing_vector_is_made_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_sled(dir.path(), Durability::Sync).unwrap();
    let chat = chat_on(store.clone(), chat_options(2, 4)).await;
    let first = chat.say(None, "Hello!").await.unwrap();
    let id = first.conversation_id;
    let conv = chat.conversation(&id).await.unwrap();
    // Recall waits for the turn to end, the reply's embedding included.
    chat.recall(&id, "greetings").await.unwrap();
    assert_eq!(store.vectors(Some(&id)).await.unwrap().len(), 2, "user message and reply have vectors");
    // As if the process stopped between storing a message and its vector.
    store.append(&conv, false, Role::User, FACT, 12, &[]).await.unwrap();
    for t in &OTHER[..2] {
        chat.say(Some(id), t).await.unwrap();
    }
    let recalled = chat.recall(&id, QUESTION).await.unwrap();
    assert!(recalled.first().is_some_and(|r| r.content == FACT), "{recalled:?}");
    assert_eq!(store.vectors(Some(&id)).await.unwrap().len(), 7, "every message has its vector now");
    chat.pool().shutdown().await;
    chat.shutdown().await.unwrap();
}
