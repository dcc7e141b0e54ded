use super::*;

fn toks(n: i32) -> Vec<LlamaToken> {
    (0..n).map(LlamaToken).collect()
}

fn key(c: u64) -> CacheKey {
    CacheKey { namespace: 1, conversation: c }
}

#[test]
fn the_memory_tier_keeps_its_byte_budget_least_recently_used_out_first() {
    let tiers = KvTiers::memory_only(2500);
    for c in 0..3 {
        tiers.park(key(c), toks(4), vec![0; 1000], Duration::ZERO);
    }
    let s = tiers.status();
    assert_eq!((s.memory.entries, s.memory.bytes, s.evictions.memory), (2, 2000, 1), "{s:?}");
    assert!(tiers.tokens_of(key(0)).is_none(), "the oldest left first");
    // Parking the same conversation again replaces its entry.
    tiers.park(key(1), toks(8), vec![0; 1200], Duration::ZERO);
    let s = tiers.status();
    assert_eq!((s.memory.entries, s.memory.bytes), (2, 2200), "{s:?}");
    let p = tiers.take(key(1)).expect("parked");
    assert_eq!((p.tokens.len(), p.tier), (8, Tier::Memory));
    assert_eq!(tiers.status().memory.bytes, 1000);
    // A cache larger than the whole budget is not kept in memory.
    tiers.park(key(5), toks(4), vec![0; 3000], Duration::ZERO);
    assert!(tiers.tokens_of(key(5)).is_none());
}

#[test]
fn keys_differ_by_namespace_and_conversation() {
    assert_ne!(CacheKey::new("a", b"c1"), CacheKey::new("b", b"c1"));
    assert_ne!(CacheKey::new("a", b"c1"), CacheKey::new("a", b"c2"));
    assert_eq!(CacheKey::new("", b"c1").namespace, 0);
    // A conversation's opening names it on every turn, with or without a system prompt.
    let m = [ChatMessage::system("s"), ChatMessage::user("q"), ChatMessage::assistant("a"), ChatMessage::user("later")];
    assert_eq!(CacheKey::of_messages("", &m[..2]), CacheKey::of_messages("", &m));
    assert_eq!(CacheKey::of_messages("", &m[1..2]), CacheKey::of_messages("", &m[1..]));
    assert_ne!(CacheKey::of_messages("", &m[..2]), CacheKey::of_messages("", &m[1..]));
}

#[test]
fn caches_evicted_from_memory_go_to_disk_and_come_back_marked_as_disk() {
    let dir = std::env::temp_dir().join(format!("modelpool-kv-tiers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = KvTierOptions { ram_bytes: 1500, disk_bytes: 1 << 20, dir: Some(dir.clone()) };
    let tiers = KvTiers::open(&opts, Fingerprint(3));
    tiers.park(key(0), toks(4), vec![7; 1000], Duration::ZERO);
    tiers.park(key(1), toks(4), vec![8; 1000], Duration::ZERO);
    tiers.flush();
    assert_eq!(tiers.status().disk.entries, 1, "{:?}", tiers.status());
    assert!(tiers.prefetch(key(0)));
    let p = tiers.take(key(0)).expect("read back");
    assert_eq!((p.tier, p.state[0], p.tokens.len()), (Tier::Disk, 7, 4));
    // Reading key 0 back made room: key 1 went to disk.
    tiers.flush();
    assert_eq!(tiers.status().disk.entries, 2, "{:?}", tiers.status());
    // At shutdown what is left in memory is written, and a new process finds it.
    tiers.park(key(2), toks(6), vec![9; 1000], Duration::ZERO);
    assert_eq!(tiers.persist(Duration::from_millis(10)), 1);
    drop(tiers);
    let again = KvTiers::open(&opts, Fingerprint(3));
    assert_eq!(again.tokens_of(key(2)).map(|t| t.len()), Some(6));
    assert!(again.tokens_of(key(1)).is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
