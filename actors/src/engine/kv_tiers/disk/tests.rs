use super::format::linked_llama_cpp;
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
fn file_names_carry_the_fingerprint_and_the_key() {
    let fp = Fingerprint(99);
    assert_eq!(classify(&file_name(fp, key()), fp), Found::Ours(key()));
    assert_eq!(classify(&file_name(Fingerprint(98), key()), fp), Found::Foreign);
    // Named as before fingerprints were in names.
    assert_eq!(classify("0000000000000007-000000000000002a.kv", fp), Found::Foreign);
    assert_eq!(classify(".tmp-1-2-3-x.kv", fp), Found::Temp);
    assert_eq!(classify("notes.kv", fp), Found::Other);
}

#[test]
fn the_budget_evicts_the_least_recently_used_file_and_a_restart_finds_the_rest() {
    let dir = tempfile_dir();
    let fp = Fingerprint(1);
    let state = vec![1u8; 1000];
    let tokens: Vec<LlamaToken> = (0..4).map(LlamaToken).collect();
    let one = encode(fp, key(), &tokens, &state).len() as u64;
    let tier = DiskTier::open(dir.clone(), one * 2 + one / 2, None, fp);
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
    let other = DiskTier::open(dir.clone(), one * 4, None, Fingerprint(2));
    assert_eq!((other.status(0).entries, other.status(0).rejected_foreign), (0, 2));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn cache() -> (Vec<LlamaToken>, Vec<u8>) {
    ((0..4).map(LlamaToken).collect(), vec![5u8; 1000])
}

fn conv(c: u64) -> CacheKey {
    CacheKey { namespace: 7, conversation: c }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_write_queued_before_its_conversation_is_deleted_never_lands() {
    let dir = tempfile_dir();
    let tier = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(1));
    let (tokens, state) = cache();
    // Both writes wait in the queue while the conversation is deleted.
    let held = tier.hold_writer();
    tier.write(key(), tokens.clone(), state.clone());
    tier.write(conv(43), tokens.clone(), state.clone());
    tier.remove_conversation(key().conversation);
    drop(held);
    tier.flush();
    assert!(tier.read(key()).is_none(), "a deleted conversation's cache was written");
    assert_eq!(tier.status(0).entries, 1);
    assert!(!tier.write_sync(key(), &tokens, &state), "written at shutdown");
    drop(tier);
    let again = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(1));
    assert!(again.read(key()).is_none(), "a deleted conversation's cache survived a restart");
    assert!(again.read(conv(43)).is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_write_queued_before_its_key_is_removed_never_lands_and_one_asked_for_after_does() {
    let dir = tempfile_dir();
    let tier = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(1));
    let (tokens, state) = cache();
    let same_id_elsewhere = CacheKey { namespace: 8, conversation: key().conversation };
    tier.write(key(), tokens.clone(), state.clone());
    tier.flush();
    assert!(tier.remove_key(key()), "its file was there");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    // A write waits in the queue while the key is removed.
    let held = tier.hold_writer();
    tier.write(key(), tokens.clone(), state.clone());
    tier.write(same_id_elsewhere, tokens.clone(), state.clone());
    assert!(!tier.remove_key(key()), "nothing on disk yet");
    drop(held);
    tier.flush();
    assert!(tier.read(key()).is_none(), "a write queued before the key was removed landed");
    assert!(tier.read(same_id_elsewhere).is_some(), "another namespace's cache of the id is kept");
    // The id is used again: its new cache is kept.
    tier.write(key(), tokens.clone(), state.clone());
    tier.flush();
    assert!(tier.read(key()).is_some(), "a write asked for after the removal was dropped");
    drop(tier);
    let again = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(1));
    assert_eq!(again.status(0).entries, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sets `key`'s file's modification time `ago` back.
fn age(dir: &Path, key: CacheKey, ago: Duration) {
    let path = dir.join(file_name(Fingerprint(1), key));
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(std::time::SystemTime::now() - ago).unwrap();
}

fn modified_ago(dir: &Path, key: CacheKey) -> Duration {
    let meta = std::fs::metadata(dir.join(file_name(Fingerprint(1), key))).unwrap();
    meta.modified().unwrap().elapsed().unwrap_or_default()
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn files_unused_past_the_lifetime_are_deleted_at_start_up_and_when_asked_for_and_a_read_is_a_use() {
    let dir = tempfile_dir();
    let (tokens, state) = cache();
    let tier = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(1));
    for c in 0..4 {
        tier.write(conv(c), tokens.clone(), state.clone());
    }
    tier.flush();
    drop(tier);
    // Two days unused; another file 30 minutes.
    age(&dir, conv(0), 48 * HOUR);
    age(&dir, conv(1), 48 * HOUR);
    age(&dir, conv(2), HOUR / 2);
    let tier = DiskTier::open(dir.clone(), 1 << 20, Some(HOUR), Fingerprint(1));
    let s = tier.status(0);
    assert_eq!((s.entries, s.expired), (2, 2), "{s:?}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    // Read back, a file is used: its lifetime starts again.
    assert!(tier.read(conv(2)).is_some());
    assert!(modified_ago(&dir, conv(2)) < Duration::from_secs(60), "a read did not touch the file");
    // A file past its lifetime since the last sweep is not restored.
    age(&dir, conv(3), 2 * HOUR);
    assert!(tier.read(conv(3)).is_none(), "an expired file was restored");
    let s = tier.status(0);
    assert_eq!((s.entries, s.expired), (1, 3), "{s:?}");
    // Without a lifetime, files live until the budget evicts them.
    drop(tier);
    age(&dir, conv(2), 48 * HOUR);
    let forever = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(1));
    assert_eq!(forever.status(0).entries, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_writer_deletes_files_unused_past_the_lifetime_while_running() {
    let dir = tempfile_dir();
    let (tokens, state) = cache();
    let ttl = Duration::from_millis(300);
    let tier = DiskTier::open(dir.clone(), 1 << 20, Some(ttl), Fingerprint(1));
    tier.write(conv(0), tokens.clone(), state.clone());
    tier.write(conv(1), tokens.clone(), state.clone());
    tier.flush();
    // Another process on the directory uses conv 1's file (a modification
    // time ahead of now: it stays fresh however slowly this test runs).
    let path = dir.join(file_name(Fingerprint(1), conv(1)));
    let ahead = std::time::SystemTime::now() + HOUR;
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(ahead).unwrap();
    let wait_for = |entries: usize| {
        let started = std::time::Instant::now();
        while tier.status(0).entries > entries && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(ttl / 6);
        }
        tier.status(0)
    };
    // Nothing asks for conv 0: the writer's sweeps delete it.
    let s = wait_for(1);
    assert_eq!((s.entries, s.expired), (1, 1), "{s:?}");
    assert!(path.exists());
    // Read, conv 1's file is used now; then nothing touches it.
    assert!(tier.read(conv(1)).is_some());
    let s = wait_for(0);
    assert_eq!((s.entries, s.expired), (0, 2), "{s:?}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_directory_and_its_files_are_for_the_service_user_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile_dir();
    // A directory made by an older version (or by hand) is fixed too.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tier = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(1));
    assert_eq!(mode(&dir), 0o700);
    let (tokens, state) = cache();
    tier.write(key(), tokens, state);
    tier.flush();
    let files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    assert_eq!(mode(&files[0]), 0o600, "{}", files[0].display());
    drop(tier);
    // A new directory: its parents are made as usual, itself private.
    let fresh = dir.with_extension("fresh").join("kv");
    let _tier = DiskTier::open(fresh.clone(), 1 << 20, None, Fingerprint(1));
    assert_eq!(mode(&fresh), 0o700);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(dir.with_extension("fresh"));
}

/// Replaces the cache directory by a regular file (writes then fail, root's
/// included) until the returned guard puts it back.
fn break_dir(dir: &Path) -> impl Drop + '_ {
    struct Back<'a>(&'a Path, PathBuf);
    impl Drop for Back<'_> {
        fn drop(&mut self) {
            std::fs::remove_file(self.0).unwrap();
            std::fs::rename(&self.1, self.0).unwrap();
        }
    }
    let aside = dir.with_extension("aside");
    std::fs::rename(dir, &aside).unwrap();
    std::fs::write(dir, b"not a directory").unwrap();
    Back(dir, aside)
}

#[test]
fn a_failed_write_is_dropped_and_counted_and_the_next_one_lands() {
    let dir = tempfile_dir();
    let tier = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(1));
    let (tokens, state) = cache();
    let broken = break_dir(&dir);
    tier.write(conv(1), tokens.clone(), state.clone());
    tier.flush();
    drop(broken);
    let s = tier.status(0);
    assert!(s.enabled, "one failed write turned the tier off: {s:?}");
    assert_eq!((s.entries, s.write_errors), (0, 1), "{s:?}");
    tier.write(conv(2), tokens, state);
    tier.flush();
    assert_eq!(tier.status(0).entries, 1, "{:?}", tier.status(0));
    assert!(tier.read(conv(2)).is_some());
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn writes_that_keep_failing_pause_the_tier_for_a_while_not_for_good() {
    let dir = tempfile_dir();
    let tier = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(1));
    let (tokens, state) = cache();
    let broken = break_dir(&dir);
    for c in 0..FAILURES_BEFORE_PAUSE as u64 {
        tier.write(conv(c), tokens.clone(), state.clone());
    }
    tier.flush();
    let s = tier.status(0);
    assert!(!s.enabled, "{s:?}");
    assert!(s.disabled_cause.as_deref().is_some_and(|c| c.contains("retrying")), "{s:?}");
    // Paused: the next write is skipped, not tried.
    tier.write(conv(10), tokens.clone(), state.clone());
    tier.flush();
    let s = tier.status(0);
    assert_eq!((s.write_errors, s.skipped_writes), (FAILURES_BEFORE_PAUSE as u64, 1), "{s:?}");
    drop(broken);
    // The pause over (as if its time had passed), writing goes on.
    tier.shared.index().retry_at = Some(std::time::Instant::now());
    tier.write(conv(11), tokens, state);
    tier.flush();
    let s = tier.status(0);
    assert!(s.enabled && s.disabled_cause.is_none(), "{s:?}");
    assert_eq!(s.entries, 1, "{s:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_process_on_the_directory_deletes_neither_the_first_ones_caches_nor_its_writes_in_progress() {
    let dir = tempfile_dir();
    let (tokens, state) = cache();
    let first = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(1));
    first.write(key(), tokens.clone(), state.clone());
    first.flush();
    // Another process's write in progress, and one left by a crash two hours ago.
    let in_progress = dir.join(".tmp-999999-00000000deadbeef-0-x.kv");
    let stale = dir.join(".tmp-999998-00000000deadbeef-0-x.kv");
    std::fs::write(&in_progress, b"half").unwrap();
    std::fs::write(&stale, b"half").unwrap();
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(two_hours_ago).unwrap();
    // A second process of another model starts on the same directory.
    let second = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(2));
    assert_eq!(second.status(0).rejected_foreign, 0, "{:?}", second.status(0));
    assert!(in_progress.exists(), "another process's write in progress was deleted");
    assert!(!stale.exists(), "a temporary file two hours old is left over");
    // Same conversation, other model: neither overwrites the other.
    second.write(key(), tokens.clone(), vec![6u8; 1000]);
    second.flush();
    assert_eq!(first.read(key()).map(|(_, s)| s), Some(state.clone()), "the first process's cache is gone");
    assert_eq!(second.read(key()).map(|(_, s)| s[0]), Some(6));
    drop(first);
    drop(second);
    // Alone on the directory, a process removes what is not its own.
    let alone = DiskTier::open(dir.clone(), 1 << 20, None, Fingerprint(2));
    assert_eq!((alone.status(0).entries, alone.status(0).rejected_foreign), (1, 1), "{:?}", alone.status(0));
    assert!(!in_progress.exists(), "left by a process that is gone");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_fingerprint_names_the_llama_cpp_build_that_is_linked() {
    // The version in the code is checked against the one Cargo really built.
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    let locked = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"llama-cpp-sys-2\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"'))
        .expect("llama-cpp-sys-2 in Cargo.lock");
    let build = linked_llama_cpp();
    assert!(build.contains(&format!("llama-cpp-sys-2 {locked}")), "{build}");
    assert!(build.contains("ggml 0."), "the linked library's own version: {build}");
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
