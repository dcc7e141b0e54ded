use super::*;
use crate::params::ChatMessage;

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
    let opts = KvTierOptions { ram_bytes: 1500, disk_bytes: 1 << 20, dir: Some(dir.clone()), ttl: None };
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

#[test]
fn a_cache_too_big_for_memory_replaces_the_older_entry_of_its_key() {
    let dir = std::env::temp_dir().join(format!("modelpool-kv-tiers-big-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = KvTierOptions { ram_bytes: 1500, disk_bytes: 1 << 20, dir: Some(dir.clone()), ttl: None };
    let tiers = KvTiers::open(&opts, Fingerprint(3));
    tiers.park(key(0), toks(4), vec![1; 1000], Duration::ZERO);
    // The conversation grew past the memory budget: straight to disk.
    tiers.park(key(0), toks(8), vec![2; 2000], Duration::ZERO);
    assert_eq!(tiers.status().memory.entries, 0, "the older cache stayed in memory: {:?}", tiers.status());
    // Other conversations push whatever memory holds out to disk.
    tiers.park(key(1), toks(4), vec![3; 1000], Duration::ZERO);
    tiers.park(key(2), toks(4), vec![4; 1000], Duration::ZERO);
    tiers.flush();
    assert!(tiers.prefetch(key(0)));
    let p = tiers.take(key(0)).expect("on disk");
    assert_eq!((p.tokens.len(), p.state[0], p.tier), (8, 2, Tier::Disk), "the newer cache");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tiers_on_disk(name: &str, ttl: Option<Duration>) -> (Arc<KvTiers>, KvTierOptions) {
    let dir = std::env::temp_dir().join(format!("modelpool-kv-tiers-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = KvTierOptions { ram_bytes: 1500, disk_bytes: 1 << 20, dir: Some(dir), ttl };
    (KvTiers::open(&opts, Fingerprint(3)), opts)
}

fn files_in(opts: &KvTierOptions) -> usize {
    std::fs::read_dir(opts.dir.as_ref().unwrap()).unwrap().count()
}

#[test]
fn forgetting_a_key_removes_its_cache_from_memory_and_disk_and_only_that_key() {
    let (tiers, opts) = tiers_on_disk("forget", None);
    // Key 0 goes to disk (key 1 pushes it out of memory); key 1 stays in memory.
    tiers.park(key(0), toks(4), vec![1; 1000], Duration::ZERO);
    tiers.park(key(1), toks(4), vec![2; 1000], Duration::ZERO);
    tiers.flush();
    let other_namespace = CacheKey { namespace: 2, conversation: 1 };
    tiers.park(other_namespace, toks(4), vec![3; 100], Duration::ZERO);
    assert_eq!((tiers.status().disk.entries, files_in(&opts)), (1, 1), "{:?}", tiers.status());
    assert!(tiers.forget_key(key(0)), "the file was there");
    assert_eq!((tiers.status().disk.entries, files_in(&opts)), (0, 0), "{:?}", tiers.status());
    assert!(!tiers.prefetch(key(0)));
    assert!(tiers.forget_key(key(1)), "the memory entry was there");
    assert!(!tiers.prefetch(key(1)));
    assert!(tiers.prefetch(other_namespace), "another namespace's cache of the same conversation is kept");
    assert!(!tiers.forget_key(key(9)), "nothing of an unknown key");
    // Nothing of them comes back after a restart either.
    assert_eq!(tiers.persist(Duration::from_millis(10)), 1);
    drop(tiers);
    let again = KvTiers::open(&opts, Fingerprint(3));
    assert!(again.tokens_of(key(0)).is_none() && again.tokens_of(key(1)).is_none());
    assert!(again.tokens_of(other_namespace).is_some());
    let _ = std::fs::remove_dir_all(opts.dir.as_ref().unwrap());
}

#[test]
fn a_key_forgotten_while_a_slot_holds_it_is_not_parked_again_until_a_request_of_it_starts() {
    let (tiers, opts) = tiers_on_disk("forget-slot", None);
    // A slot takes key 3's request: its cache is in the slot only.
    assert!(tiers.tokens_of(key(3)).is_none());
    assert!(tiers.forget_key(key(3)), "a cache in a slot counts");
    assert!(!tiers.forget_key(key(3)), "forgotten already");
    // The slot moves on to another conversation and parks key 3's old cache:
    // refused, and nothing is written at shutdown.
    tiers.park(key(3), toks(4), vec![1; 100], Duration::ZERO);
    assert!(!tiers.prefetch(key(3)), "the deleted cache was parked again");
    // A new request of the same id starts: its cache is kept as usual.
    assert!(tiers.tokens_of(key(3)).is_none());
    tiers.park(key(3), toks(6), vec![2; 100], Duration::ZERO);
    assert_eq!(tiers.tokens_of(key(3)).map(|t| t.len()), Some(6));
    let _ = std::fs::remove_dir_all(opts.dir.as_ref().unwrap());
}

#[test]
fn memory_entries_unused_past_the_lifetime_are_dropped_and_not_written_at_shutdown() {
    // A second: a slow machine still parks and persists within it.
    let ttl = Duration::from_secs(1);
    let (tiers, opts) = tiers_on_disk("ttl", Some(ttl));
    tiers.park(key(0), toks(4), vec![1; 100], Duration::ZERO);
    tiers.park(key(1), toks(4), vec![2; 100], Duration::ZERO);
    assert!(tiers.prefetch(key(0)), "used within the lifetime");
    std::thread::sleep(ttl + Duration::from_millis(100));
    // Parking another cache sweeps the memory tier.
    tiers.park(key(2), toks(4), vec![3; 100], Duration::ZERO);
    let s = tiers.status();
    assert_eq!((s.memory.entries, s.memory.bytes, s.memory.expired), (1, 100, 2), "{s:?}");
    assert!(!tiers.prefetch(key(0)) && !tiers.prefetch(key(1)));
    // At shutdown only the cache used within the lifetime is written.
    assert_eq!(tiers.persist(Duration::from_millis(10)), 1);
    assert_eq!(files_in(&opts), 1);
    let _ = std::fs::remove_dir_all(opts.dir.as_ref().unwrap());
}

#[test]
fn a_memory_entry_past_its_lifetime_is_not_restored_even_between_two_sweeps() {
    let ttl = Duration::from_secs(1);
    let tiers = KvTiers::open(&KvTierOptions { ttl: Some(ttl), ..KvTierOptions::memory(1 << 20) }, Fingerprint(3));
    tiers.park(key(0), toks(4), vec![1; 100], Duration::ZERO);
    std::thread::sleep(Duration::from_millis(700));
    tiers.park(key(1), toks(4), vec![1; 100], Duration::ZERO);
    std::thread::sleep(Duration::from_millis(400));
    // Key 0 is past its lifetime; the last sweep may be too recent to have seen it.
    tiers.mem().swept_at = Some(Instant::now());
    assert!(!tiers.prefetch(key(0)));
    assert!(tiers.prefetch(key(1)));
    assert_eq!(tiers.status().memory.expired, 1);
}
