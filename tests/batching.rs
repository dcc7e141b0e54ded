//! Continuous batching on the real model: the sequences of one instance's
//! slots are decoded together, each streams on its own, and a cancelled one
//! frees its slot for the next request at once.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{one_at_a_time, request, slotted, start, wait_for};
use futures::StreamExt;
use modelpool_actors::{FinishReason, GenEvent, PoolHandle};

const PROMPTS: [&str; 4] = [
    "Write a short poem about the sea.",
    "Explain what a compiler does.",
    "List three fruits and their colours.",
    "Describe a walk in the mountains.",
];

/// When each stream's first piece and its end arrived, and its text.
struct Timeline {
    first: Option<Instant>,
    done: Option<Instant>,
    text: String,
    finish: Option<FinishReason>,
}

async fn follow(pool: &PoolHandle, text: &str, max_tokens: u32) -> Timeline {
    let mut stream = pool.generate(request(text, max_tokens)).await.expect("a slot");
    let mut t = Timeline { first: None, done: None, text: String::new(), finish: None };
    while let Some(event) = stream.next().await {
        match event {
            GenEvent::Token(piece) => {
                t.first.get_or_insert_with(Instant::now);
                t.text.push_str(&piece);
            }
            GenEvent::Done(c) => {
                t.done = Some(Instant::now());
                t.finish = Some(c.finish_reason);
            }
            GenEvent::Error(e) => panic!("{e}"),
            GenEvent::Logprob(_) => {}
        }
    }
    t
}

// These scenarios compare times measured on the machine's two cores:
// they run one at a time, so that another one's decoding is not counted.
#[actix::test]
async fn four_sequences_on_one_instance_stream_at_once_and_slots_are_counted_at_every_step() {
    let _one = one_at_a_time();
    let pool = start(slotted(1, 4, 4)).await;
    let s = pool.status().await.unwrap();
    assert_eq!((s.total, s.available, s.in_use), (4, 4, 0));
    assert!(s.to_string().contains("Available: 4/4 slots on 1 instance"), "{s}");

    // Watch the pool the whole time: slots always add up, never more than 4 leased.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (pool, seen) = (pool.clone(), seen.clone());
        actix::spawn(async move {
            loop {
                let s = pool.status().await.unwrap();
                assert_eq!(s.available + s.in_use, s.total, "{s}");
                assert_eq!(s.instances[0].slots_busy, s.in_use, "{s:?}");
                seen.lock().unwrap().push(s.in_use);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let runs = futures::future::join_all(PROMPTS.iter().map(|p| follow(&pool, p, 48))).await;
    watcher.abort();
    let last_first = runs.iter().map(|t| t.first.expect("a first piece")).max().unwrap();
    let first_done = runs.iter().map(|t| t.done.expect("an end")).min().unwrap();
    assert!(last_first < first_done, "every sequence streamed before any finished: they ran at once");
    let seen = seen.lock().unwrap().clone();
    assert!(seen.contains(&4), "all four slots leased at once: {seen:?}");
    let s = pool.status().await.unwrap();
    assert_eq!((s.available, s.in_use, s.totals().requests), (4, 0, 4), "{s}");
    pool.shutdown().await;
}

#[actix::test]
async fn greedy_text_batched_with_three_others_equals_the_text_alone() {
    let _one = one_at_a_time();
    let alone_pool = start(slotted(1, 4, 4)).await;
    let mut alone = Vec::new();
    for p in PROMPTS {
        alone.push(follow(&alone_pool, p, 32).await.text);
    }
    alone_pool.shutdown().await;
    let pool = start(slotted(1, 4, 4)).await;
    let batched = futures::future::join_all(PROMPTS.iter().map(|p| follow(&pool, p, 32))).await;
    // Each sequence has a KV stream of its own, so batching changes nothing
    // in its arithmetic: the weights' matrix products are computed row by
    // row, and its attention covers only its own cells, in the same order.
    // (In one KV buffer shared by all slots, 3 of these 4 texts differed:
    // a batched sequence's cells sat elsewhere, so its attention sums added
    // the same terms in another order and near ties went the other way.)
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a, &b.text, "prompt {i}: alone vs batched");
    }
    pool.shutdown().await;
}

#[actix::test]
async fn a_cancelled_sequence_leaves_the_others_streaming_and_its_slot_serves_the_next() {
    let _one = one_at_a_time();
    let pool = start(slotted(1, 4, 4)).await;
    let mut streams = Vec::new();
    for p in PROMPTS {
        streams.push(pool.generate(request(p, 64)).await.unwrap());
    }
    // Everyone has started streaming; then the client of sequence 2 leaves.
    for s in &mut streams {
        assert!(matches!(s.next().await, Some(GenEvent::Token(_))));
    }
    let gone = streams.remove(2);
    drop(gone);
    wait_for(&pool, Duration::from_secs(5), |s| s.in_use == 3).await;
    // Its slot serves a new request while the other three still stream.
    let next = {
        let pool = pool.clone();
        actix::spawn(async move { follow(&pool, "Say hello.", 8).await })
    };
    let mut ends = Vec::new();
    for mut s in streams {
        let mut last = None;
        while let Some(event) = s.next().await {
            if let GenEvent::Done(c) = event {
                last = Some((c.finish_reason, c.usage.completion_tokens));
            }
        }
        ends.push(last.expect("each of the other three ends normally"));
    }
    let next = next.await.unwrap();
    assert!(next.finish.is_some() && !next.text.is_empty());
    assert!(next.done.unwrap() < Instant::now());
    for (reason, tokens) in ends {
        assert!(reason == FinishReason::Length && tokens == 64 || reason == FinishReason::Stop, "{reason:?} {tokens}");
    }
    wait_for(&pool, Duration::from_secs(2), |s| s.in_use == 0 && s.available == 4).await;
    pool.shutdown().await;
}

#[actix::test]
async fn a_request_dropped_during_its_prompt_stops_within_a_chunk() {
    let _one = one_at_a_time();
    // One slot: whatever comes next waits for the loop to let go of the long prompt.
    let pool = start(slotted(1, 1, 4)).await;
    let long = "Tell me about rivers, lakes and the sea. ".repeat(80);
    // The whole prompt, read to its end, as a yardstick.
    let t = Instant::now();
    let done = follow(&pool, &long, 1).await;
    let full_prompt = t.elapsed();
    assert!(done.finish.is_some());
    // Again with a different opening (nothing cached), dropped after its first chunk started.
    let other = format!("Rivers first. {long}");
    let stream = pool.generate(request(&other, 1)).await.unwrap();
    tokio::time::sleep(full_prompt / 8).await;
    drop(stream);
    let t = Instant::now();
    let next = follow(&pool, "Say hi.", 2).await;
    assert!(next.finish.is_some());
    assert!(
        t.elapsed() < full_prompt / 2,
        "the next request waited {:?}: the dropped prompt ({full_prompt:?} in full) went on being read",
        t.elapsed()
    );
    pool.shutdown().await;
}

/// A reader that stops reading pauses its own sequence only: the other
/// sequence runs to its end meanwhile, the stopped one holds no more than
/// its channel's events (never the whole reply), and once read again it
/// resumes and ends with every token, none lost.
#[actix::test]
async fn a_reader_that_stops_reading_pauses_its_own_sequence_only_and_loses_nothing() {
    let _one = one_at_a_time();
    use futures::FutureExt;
    use modelpool_actors::engine::SEQ_BUFFER;
    let pool = start(slotted(1, 2, 2)).await;
    // With log-probabilities: one event per token, never merged or held
    // back by the text, so the events read count the tokens delivered.
    let mut asked = request(PROMPTS[0], 400);
    asked.sampling.logprobs = Some(1);
    let mut idle = pool.generate(asked).await.expect("a slot");
    let mut logprobs = 0;
    // Its first token shows it runs; then nobody reads it.
    while let Some(event) = idle.next().await {
        if matches!(event, GenEvent::Logprob(_)) {
            logprobs += 1;
            break;
        }
    }
    let busy = follow(&pool, PROMPTS[1], 64).await;
    assert_eq!(busy.finish, Some(FinishReason::Length), "the other sequence ran to its end: {}", busy.text);
    // Time enough for an unpaused sequence to run far past its channel.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // What waits for the idle reader is its channel's worth: it filled, then paused.
    let mut ready = 0;
    while let Some(Some(event)) = idle.next().now_or_never() {
        assert!(!matches!(event, GenEvent::Done(_) | GenEvent::Error(_)), "still running: {event:?}");
        logprobs += matches!(event, GenEvent::Logprob(_)) as u32;
        ready += 1;
    }
    assert!(
        (SEQ_BUFFER / 2..=SEQ_BUFFER).contains(&ready),
        "{ready} events waited for the reader (channel: {SEQ_BUFFER})"
    );
    // Read again, it goes on to its end, every token delivered.
    let mut text = String::new();
    let mut done = None;
    while let Some(event) = idle.next().await {
        match event {
            GenEvent::Token(t) => text.push_str(&t),
            GenEvent::Done(c) => done = Some(c),
            GenEvent::Error(e) => panic!("{e}"),
            GenEvent::Logprob(_) => logprobs += 1,
        }
    }
    let done = done.expect("a result");
    assert!(done.usage.completion_tokens as usize > SEQ_BUFFER, "it ran past its channel: {done:?}");
    assert_eq!(logprobs, done.usage.completion_tokens, "every token's event arrived: {text}");
    wait_for(&pool, Duration::from_secs(10), |s| s.in_use == 0).await;
}

/// A sequence whose reader stopped, between two that decode, would split
/// every step into two passes over the weights: the instance moves its KV
/// to the edge stream (trading places with an edge sequence's), and all
/// three go on from where they were. llama.cpp refuses a token whose
/// position does not follow its sequence's cache, so a cache left behind or
/// swapped wrongly would end the run with an error, not a reply.
#[actix::test]
async fn a_paused_sequence_between_decoding_ones_moves_to_the_edge_and_all_go_on() {
    let _one = one_at_a_time();
    let mut opts = slotted(1, 3, 3);
    let tiers = opts.instance.kv_tiers();
    opts.instance.kv = Some(tiers.clone());
    let pool = start(opts).await;
    let with_logprobs = |text: &str, max_tokens: u32| {
        let mut r = request(text, max_tokens);
        r.sampling.logprobs = Some(1);
        r
    };
    // Fresh requests take neighbouring slots in arrival order: the second
    // one sits between the other two.
    let first = pool.generate(with_logprobs(PROMPTS[0], 300)).await.expect("a slot");
    let mut stopped = pool.generate(with_logprobs(PROMPTS[1], 300)).await.expect("a slot");
    let third = pool.generate(with_logprobs(PROMPTS[2], 300)).await.expect("a slot");
    let read = |mut s: modelpool_actors::GenerationStream| async move {
        let (mut text, mut done, mut logprobs) = (String::new(), None, 0u32);
        while let Some(event) = s.next().await {
            match event {
                GenEvent::Token(t) => text.push_str(&t),
                GenEvent::Done(c) => done = Some(c),
                GenEvent::Error(e) => panic!("{e}"),
                GenEvent::Logprob(_) => logprobs += 1,
            }
        }
        (text, done.expect("a result"), logprobs)
    };
    let outer = [actix::spawn(read(first)), actix::spawn(read(third))];
    // The middle one's first event shows it runs; then nobody reads it.
    let first_event = stopped.next().await.expect("it runs");
    let read_first = u32::from(matches!(first_event, GenEvent::Logprob(_)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while tiers.status().moves == 0 {
        assert!(Instant::now() < deadline, "the paused sequence was never moved out of the way");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for reader in outer {
        let (text, done, logprobs) = reader.await.expect("reader");
        assert_ne!(done.finish_reason, FinishReason::Cancelled, "it ran on to its end after the move: {text}");
        assert_eq!(logprobs, done.usage.completion_tokens, "every token's event arrived: {text}");
    }
    let (text, done, logprobs) = read(stopped).await;
    assert_eq!(logprobs + read_first, done.usage.completion_tokens, "every token's event arrived: {text}");
    assert_ne!(done.finish_reason, FinishReason::Cancelled, "the moved one resumed and ran to its end: {text}");
    // Its channel holds SEQ_BUFFER events, two per token here: past that it
    // decoded in the stream it was moved to.
    assert!(
        done.usage.completion_tokens as usize > modelpool_actors::engine::SEQ_BUFFER,
        "it went on after the move: {done:?}"
    );
    let s = pool.status().await.unwrap();
    assert_eq!((s.replaced, s.instances[0].stats.failures), (0, 0), "no decode failed: {s:?}");
    pool.shutdown().await;
}
