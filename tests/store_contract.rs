//! The guarantees of a conversation store, checked on both: sled (embedded)
//! and PostgreSQL (a throwaway cluster). Two handles on one PostgreSQL
//! database stand for two replicas.

mod common;

use common::postgres::Postgres;
use modelpool_actors::memory::store::{self, Conversation, ConversationStore, NewMessage, StoreError, StoreSpec};
use modelpool_actors::{Durability, Role};

/// Appends from several tasks at once, on one or two handles: every
/// acknowledged message is stored once, and the conversation's order is the
/// order in which the appends committed (ids grow along it).
async fn concurrent_appends_keep_exact_order(a: ConversationStore, b: ConversationStore) {
    let conv = Conversation::new("ns");
    a.append(&conv, true, Role::User, "first", 1, &[1.0, 0.0]).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (store, conv) = (if t % 2 == 0 { a.clone() } else { b.clone() }, conv.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..10 {
                    let m = store
                        .append(
                            &conv,
                            false,
                            Role::Assistant,
                            &format!("task {t} message {i}"),
                            3,
                            &[t as f32, i as f32],
                        )
                        .await
                        .unwrap();
                    acked.push(m);
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    for store in [&a, &b] {
        let all = store.messages(&conv.id, None, 1000).await.unwrap();
        assert_eq!(all.len(), 81);
        assert_eq!(store.count(&conv.id).await.unwrap(), 81);
        assert_eq!(all[0].content, "first");
        let ids: Vec<u64> = all.iter().map(|m| m.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "order and ids disagree: {ids:?}");
        // Each task's own messages appear in the order it sent them.
        for t in 0..8 {
            let mine: Vec<&str> = all
                .iter()
                .filter(|m| m.content.starts_with(&format!("task {t} ")))
                .map(|m| m.content.as_str())
                .collect();
            let expected: Vec<String> = (0..10).map(|i| format!("task {t} message {i}")).collect();
            assert_eq!(mine, expected);
        }
        for m in &acked {
            assert_eq!(all.iter().filter(|s| s.id == m.id).count(), 1, "acknowledged {m:?} stored once");
        }
        // Paging after an id, the last n, lookups by id.
        let page = store.messages(&conv.id, Some(ids[39]), 5).await.unwrap();
        assert_eq!(page.iter().map(|m| m.id).collect::<Vec<_>>(), ids[40..45]);
        let recent = store.recent(&conv.id, 3).await.unwrap();
        assert_eq!(recent.iter().map(|m| m.id).collect::<Vec<_>>(), ids[78..]);
        let some = store.messages_by_id(&[(conv.id, ids[5]), (conv.id, ids[7])]).await.unwrap();
        assert_eq!(some.len(), 2);
        assert_eq!(store.vectors(Some(&conv.id)).await.unwrap().len(), 81);
    }

    // Deleting the conversation deletes its vectors, on every handle.
    let other = Conversation::new("ns");
    a.append(&other, true, Role::User, "kept", 1, &[0.0, 1.0]).await.unwrap();
    let deleted = b.delete_conversation(&conv.id).await.unwrap();
    assert_eq!(deleted.len(), 81);
    for store in [&a, &b] {
        assert!(matches!(store.conversation(&conv.id).await, Err(StoreError::NotFound(_))));
        let vectors = store.vectors(None).await.unwrap();
        assert_eq!(vectors.len(), 1, "only the other conversation's vector is left");
        assert_eq!(vectors[0].1, other.id);
        assert!(store.messages(&conv.id, None, 10).await.unwrap().is_empty());
    }
    // Appending to a conversation that is gone is NotFound, not a new one.
    let err = a.append(&conv, false, Role::User, "late", 1, &[1.0, 1.0]).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    assert_eq!(a.list_conversations().await.unwrap().len(), 1);
}

/// An imported conversation arrives whole, in order, with its title, dates
/// and vectors, and appends continue after it.
async fn import_is_whole_and_ordered(store: ConversationStore) {
    let mut conv = Conversation::new("imports");
    conv.title = Some("Trip planning".into());
    let messages: Vec<NewMessage> = (0..5)
        .map(|i| NewMessage {
            role: if i % 2 == 0 { Role::User } else { Role::Assistant },
            content: format!("message {i}"),
            created_at_ms: 1_600_000_000_000 + i,
            token_count: 2,
            vector: vec![i as f32, 1.0],
        })
        .collect();
    let stored = store.import(&conv, messages).await.unwrap();
    assert_eq!(stored.len(), 5);
    let back = store.messages(&conv.id, None, 100).await.unwrap();
    assert_eq!(back, stored);
    assert_eq!(back[3].created_at_ms, 1_600_000_000_003);
    assert_eq!(store.conversation(&conv.id).await.unwrap().title.as_deref(), Some("Trip planning"));
    assert_eq!(store.vectors(Some(&conv.id)).await.unwrap().len(), 5);
    let next = store.append(&conv, false, Role::User, "after the import", 3, &[9.0, 9.0]).await.unwrap();
    let all = store.messages(&conv.id, None, 100).await.unwrap();
    assert_eq!(all.last(), Some(&next));
    assert_eq!(store.count(&conv.id).await.unwrap(), 6);
}

/// `GET /conversations` pages in the store: newest first, one namespace
/// (or all), from a cursor, leaving out what was deleted; a multi-message
/// append is one write.
async fn pages_by_namespace_newest_first(store: ConversationStore) {
    let mut made = Vec::new();
    for i in 0..7u64 {
        let mut conv = Conversation::new(if i % 2 == 0 { "tenant-a" } else { "tenant-b" });
        conv.created_at_ms = 1_700_000_000_000 + i / 2; // ties on the date: ordered by id
        store.append(&conv, true, Role::User, &format!("conversation {i}"), 1, &[1.0, 0.0]).await.unwrap();
        made.push(conv);
    }
    let key = |c: &Conversation| std::cmp::Reverse((c.created_at_ms, c.id));
    let mut a: Vec<Conversation> = made.iter().filter(|c| c.namespace == "tenant-a").cloned().collect();
    a.sort_by_key(key);
    let mut all = made.clone();
    all.sort_by_key(key);
    let ids = |v: &[Conversation]| v.iter().map(|c| c.id).collect::<Vec<_>>();

    let page1 = store.conversations_page(Some("tenant-a"), None, 3).await.unwrap();
    assert_eq!(ids(&page1), ids(&a[..3]));
    let last = page1.last().unwrap();
    let page2 = store.conversations_page(Some("tenant-a"), Some((last.created_at_ms, last.id)), 3).await.unwrap();
    assert_eq!(ids(&page2), ids(&a[3..]));
    assert_eq!(ids(&store.conversations_page(None, None, 100).await.unwrap()), ids(&all));
    assert!(store.conversations_page(Some("tenant-c"), None, 10).await.unwrap().is_empty());
    assert!(
        store.conversations_page(Some("tenant"), None, 10).await.unwrap().is_empty(),
        "a prefix is not a namespace"
    );

    // A deleted conversation is left out of the pages.
    store.delete_conversation(&a[1].id).await.unwrap();
    let page = store.conversations_page(Some("tenant-a"), None, 10).await.unwrap();
    assert_eq!(ids(&page), [a[0].id, a[2].id, a[3].id]);
    assert_eq!(store.conversations_page(None, None, 100).await.unwrap().len(), 6);

    // A turn stores its user message and reply together, after the conversation's last.
    let turn = vec![
        NewMessage::now(Role::User, "question", 1, vec![0.0, 1.0]),
        NewMessage::now(Role::Assistant, "answer", 1, Vec::new()),
    ];
    let stored = store.append_messages(&a[0], false, turn).await.unwrap();
    let back = store.messages(&a[0].id, None, 10).await.unwrap();
    assert_eq!(back.len(), 3);
    assert_eq!(back[1..], stored[..]);
    assert_eq!(store.count(&a[0].id).await.unwrap(), 3);
    let gone = vec![NewMessage::now(Role::User, "late", 1, Vec::new())];
    assert!(matches!(store.append_messages(&a[1], false, gone).await, Err(StoreError::NotFound(_))));
}

#[actix::test]
async fn sled_store_keeps_order_and_deletes_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let spec = StoreSpec::Sled { data_dir: dir.path().to_path_buf(), durability: Durability::Sync };
    let s = store::open(&spec).await.unwrap();
    concurrent_appends_keep_exact_order(s.clone(), s.clone()).await;
    import_is_whole_and_ordered(s).await;
}

#[actix::test]
async fn sled_store_pages_conversations_by_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let spec = StoreSpec::Sled { data_dir: dir.path().to_path_buf(), durability: Durability::Sync };
    pages_by_namespace_newest_first(store::open(&spec).await.unwrap()).await;
}

#[actix::test]
async fn postgres_store_pages_conversations_by_namespace() {
    let pg = Postgres::start();
    let spec = StoreSpec::Postgres { url: pg.create_database("listing") };
    pages_by_namespace_newest_first(store::open(&spec).await.unwrap()).await;
}

#[actix::test]
async fn postgres_store_keeps_order_across_two_replicas_and_deletes_vectors() {
    let pg = Postgres::start();
    let url = pg.create_database("contract");
    let spec = StoreSpec::Postgres { url: url.clone() };
    // Two replicas starting together both migrate: one does it, the other waits.
    let (a, b) = tokio::join!(store::open(&spec), store::open(&spec));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.shared());
    assert!(!a.describe().contains("unused-password"), "{}", a.describe());
    concurrent_appends_keep_exact_order(a.clone(), b).await;
    let seqs = pg.sql("contract", "SELECT count(*), count(DISTINCT seq) FROM messages");
    assert_eq!(seqs.trim(), "1|1");
    import_is_whole_and_ordered(a).await;
}

#[actix::test]
async fn postgres_unreachable_is_one_clear_error_without_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spec = StoreSpec::Postgres { url: format!("postgres://mp:s3cret@127.0.0.1:{port}/chat") };
    let started = std::time::Instant::now();
    let err = store::open(&spec).await.map(|_: ConversationStore| ()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{text}");
    assert!(text.contains(&format!("postgres://mp:***@127.0.0.1:{port}/chat")), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.to_lowercase().contains("refused"), "the cause is named: {text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}
