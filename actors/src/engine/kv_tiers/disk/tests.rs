use super::*;

fn key() -> CacheKey {
    CacheKey { namespace: 7, conversation: 42 }
}

#[test]
fn a_file_round_trips_and_any_flipped_byte_is_refused() {
    let fp = Fingerprint(99);
    let tokens: Vec<LlamaToken> = (0..10).map(LlamaToken).collect();
    let state: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
    let bytes = encode(fp, key(), &tokens, &state);
    assert_eq!(decode(&bytes, fp, key()), Ok((tokens.clone(), state.clone())));
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        assert!(decode(&bad, fp, key()).is_err(), "flipped byte {i} was accepted");
    }
    assert_eq!(decode(&bytes[..bytes.len() - 1], fp, key()), Err(Refused::Corrupt), "torn");
    assert_eq!(decode(&bytes, Fingerprint(98), key()), Err(Refused::Foreign));
    assert_eq!(decode(&bytes, fp, CacheKey { namespace: 8, conversation: 42 }), Err(Refused::Corrupt));
}

#[test]
fn file_names_carry_the_key() {
    assert_eq!(parse_name(&file_name(key())), Some(key()));
    assert_eq!(parse_name(".tmp-x.kv"), None);
}

#[test]
fn the_budget_evicts_the_least_recently_used_file_and_a_restart_finds_the_rest() {
    let dir = tempfile_dir();
    let fp = Fingerprint(1);
    let state = vec![1u8; 1000];
    let tokens: Vec<LlamaToken> = (0..4).map(LlamaToken).collect();
    let one = encode(fp, key(), &tokens, &state).len() as u64;
    let tier = DiskTier::open(dir.clone(), one * 2 + one / 2, fp);
    for c in 0..3 {
        tier.write(CacheKey { namespace: 0, conversation: c }, tokens.clone(), state.clone());
    }
    tier.flush();
    let s = tier.status(0);
    assert_eq!((s.entries, s.bytes), (2, one * 2), "{s:?}");
    assert!(tier.read(CacheKey { namespace: 0, conversation: 0 }).is_none(), "the oldest went first");
    assert!(tier.read(CacheKey { namespace: 0, conversation: 2 }).is_some());
    drop(tier);
    // Another model's tier sees foreign files and deletes them.
    let other = DiskTier::open(dir.clone(), one * 4, Fingerprint(2));
    assert_eq!((other.status(0).entries, other.status(0).rejected_foreign), (0, 2));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "modelpool-kv-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
