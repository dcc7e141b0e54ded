//! A cache file of the disk tier: what produced it ([`Fingerprint`]), its
//! name, its bytes (a header with the fingerprint, the key, the lengths and a
//! checksum; the tokens; the state) and why a file is refused.

use std::io::Read;
use std::path::Path;

use llama_cpp_2::token::LlamaToken;

use super::super::key::CacheKey;

const MAGIC: &[u8; 8] = b"MPKVv001";
/// magic, fingerprint, namespace, conversation, token count, state length, checksum.
pub(super) const HEADER: usize = 8 + 8 + 8 + 8 + 4 + 8 + 4;
/// The llama-cpp-sys-2 release linked (pinned in actors/Cargo.toml; a test
/// checks it against Cargo.lock). It fixes the llama.cpp sources, whose
/// sequence-state format a file holds. Named here because Cargo tells a
/// crate no versions of its dependencies, and llama.cpp built from the
/// crate's sources (no git history) reports its commit as "unknown".
const LLAMA_CPP_SYS_2: &str = "0.1.161";

/// What produced a KV state: a file restores only into the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(pub u64);

impl Fingerprint {
    /// From the model file (its size and its first 8 MiB: the GGUF header,
    /// metadata and tokenizer), a description of the KV layout and state
    /// format (cache types, sequence layout) and the llama.cpp build that is
    /// linked ([`linked_llama_cpp`]: callers need not name it).
    pub fn of(model: &Path, layout: &str) -> std::io::Result<Self> {
        use sha2::Digest;
        let mut file = std::fs::File::open(model)?;
        let len = file.metadata()?.len();
        let mut head = Vec::with_capacity(8 << 20);
        (&mut file).take(8 << 20).read_to_end(&mut head)?;
        let mut h = sha2::Sha256::new();
        h.update(len.to_le_bytes());
        h.update(&head);
        h.update(layout.as_bytes());
        h.update([0]);
        h.update(linked_llama_cpp().as_bytes());
        let d = h.finalize();
        Ok(Self(u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))))
    }
}

/// The llama.cpp build that is linked, as the fingerprint names it: the
/// llama-cpp-sys-2 release that vendors it, and what the library itself
/// reports (ggml's version and commit).
pub(super) fn linked_llama_cpp() -> String {
    // SAFETY: both return static, NUL-terminated strings.
    let (version, commit) = unsafe {
        (
            std::ffi::CStr::from_ptr(llama_cpp_sys_2::ggml_version()),
            std::ffi::CStr::from_ptr(llama_cpp_sys_2::ggml_commit()),
        )
    };
    format!(
        "llama-cpp-sys-2 {LLAMA_CPP_SYS_2}, ggml {} (commit {})",
        version.to_string_lossy(),
        commit.to_string_lossy()
    )
}

pub(super) fn file_name(fingerprint: Fingerprint, key: CacheKey) -> String {
    format!("{:016x}-{:016x}-{:016x}.kv", fingerprint.0, key.namespace, key.conversation)
}

/// What a name in the directory is, to the start-up scan.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// A cache file of this fingerprint.
    Ours(CacheKey),
    /// Another fingerprint's, or named as before fingerprints were in names.
    Foreign,
    /// A write in progress, or one a crash left.
    Temp,
    /// Not the tier's: left alone.
    Other,
}

pub(super) fn classify(name: &str, fingerprint: Fingerprint) -> Found {
    if name.starts_with(".tmp-") {
        return Found::Temp;
    }
    let Some(stem) = name.strip_suffix(".kv") else { return Found::Other };
    let parts: Option<Vec<u64>> = stem.split('-').map(|p| u64::from_str_radix(p, 16).ok()).collect();
    match parts.as_deref() {
        Some(&[fp, namespace, conversation]) if fp == fingerprint.0 => {
            Found::Ours(CacheKey { namespace, conversation })
        }
        Some([_, _, _]) | Some([_, _]) => Found::Foreign,
        _ => Found::Other,
    }
}

/// A file's whole content: header, tokens (i32 LE), state.
pub(super) fn encode(fingerprint: Fingerprint, key: CacheKey, tokens: &[LlamaToken], state: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(tokens.len() * 4 + state.len());
    for t in tokens {
        body.extend_from_slice(&t.0.to_le_bytes());
    }
    body.extend_from_slice(state);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&fingerprint.0.to_le_bytes());
    out.extend_from_slice(&key.namespace.to_le_bytes());
    out.extend_from_slice(&key.conversation.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    out.extend_from_slice(&(state.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Why a file was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    Foreign,
    Corrupt,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks the header (magic, fingerprint, key) of a file's first bytes.
pub(super) fn check_header(b: &[u8], fingerprint: Fingerprint, key: CacheKey) -> Result<(), Refused> {
    if b.len() < HEADER {
        return Err(Refused::Corrupt);
    }
    if &b[..8] != MAGIC || u64_at(b, 8) != fingerprint.0 {
        return Err(Refused::Foreign);
    }
    if u64_at(b, 16) != key.namespace || u64_at(b, 24) != key.conversation {
        return Err(Refused::Corrupt);
    }
    Ok(())
}

/// The tokens and state of a whole file, checked.
pub(super) fn decode(b: &[u8], fingerprint: Fingerprint, key: CacheKey) -> Result<(Vec<LlamaToken>, Vec<u8>), Refused> {
    check_header(b, fingerprint, key)?;
    let n_tokens = u32_at(b, 32) as usize;
    let state_len = u64_at(b, 36) as usize;
    let crc = u32_at(b, 44);
    let body = &b[HEADER..];
    if n_tokens.checked_mul(4).and_then(|t| t.checked_add(state_len)) != Some(body.len()) {
        return Err(Refused::Corrupt);
    }
    if crc32fast::hash(body) != crc {
        return Err(Refused::Corrupt);
    }
    let tokens = body[..n_tokens * 4]
        .chunks_exact(4)
        .map(|c| LlamaToken(i32::from_le_bytes(c.try_into().expect("4 bytes"))))
        .collect();
    Ok((tokens, body[n_tokens * 4..].to_vec()))
}
