//! Namespace graphs on disk, so that a restart loads a graph instead of
//! building it again (about 100 s for 100,000 vectors on two cores).
//!
//! One directory per namespace under the index's `graph_dir`, named by a
//! digest of the namespace: hnsw_rs's dump (`graph.hnsw.graph`,
//! `graph.hnsw.data`), the slots (`slots.bin`: message id, conversation,
//! alive, the graph point it is a twin of, in graph data-id order) and `meta.json` (format, namespace,
//! embedding model, dimension, point count and a CRC-32 of each file). A save
//! writes a new directory beside the old one and renames it into place, so a
//! crash leaves the old save or the new one, never half of each.
//!
//! hnsw_rs asserts and panics on malformed input and sizes allocations from
//! what it reads, so a file reaches it only after its checksum matched; the
//! load also runs under `catch_unwind`. The caller then checks every loaded
//! vector against the store's before it uses the graph: a file of another
//! data directory or another embedding model is rejected, never used.

use std::fs::{self, File};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use hnsw_rs::api::AnnT;
use hnsw_rs::hnswio::HnswIo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::score::UnitCosine;
use super::space::{Graph, Slot};

const FORMAT: u32 = 1;
const BASENAME: &str = "graph";
/// One slot in `slots.bin`: message id (8), conversation (16), alive (1),
/// the graph point it is a twin of (4; `u32::MAX`: none).
const SLOT_BYTES: usize = 29;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Meta {
    format: u32,
    namespace: String,
    model: String,
    dim: usize,
    points: usize,
    slots: usize,
    /// CRC-32 of `graph.hnsw.graph`, `graph.hnsw.data`, `slots.bin`.
    crc: [u32; 3],
}

/// A graph read back from disk, with the slots it was saved with and,
/// for each, the graph point it is a twin of (`u32::MAX`: none).
pub(super) struct SavedGraph {
    pub(super) graph: Graph,
    pub(super) slots: Vec<Slot>,
    pub(super) reps: Vec<u32>,
}

/// Why a saved graph was not used.
#[derive(Debug)]
pub(super) enum LoadError {
    /// Nothing saved for this namespace.
    Missing,
    /// A file that is damaged, foreign or of another format: rebuilt, and counted.
    Rejected(String),
}

fn namespace_dir(root: &Path, namespace: &str) -> PathBuf {
    let digest = Sha256::digest(namespace.as_bytes());
    let name: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    root.join(name)
}

fn crc_of(path: &Path) -> io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

fn encode_slots(slots: &[Slot], reps: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(slots.len() * SLOT_BYTES);
    for (s, rep) in slots.iter().zip(reps) {
        out.extend_from_slice(&s.id.to_le_bytes());
        out.extend_from_slice(s.conv.as_bytes());
        out.push(s.alive as u8);
        out.extend_from_slice(&rep.to_le_bytes());
    }
    out
}

fn decode_slots(bytes: &[u8]) -> Option<(Vec<Slot>, Vec<u32>)> {
    if !bytes.len().is_multiple_of(SLOT_BYTES) {
        return None;
    }
    bytes
        .chunks_exact(SLOT_BYTES)
        .map(|c| {
            let id = u64::from_le_bytes(c[..8].try_into().ok()?);
            let conv = uuid::Uuid::from_slice(&c[8..24]).ok()?;
            let alive = match c[24] {
                0 => false,
                1 => true,
                _ => return None,
            };
            let rep = u32::from_le_bytes(c[25..29].try_into().ok()?);
            Some((Slot { id, conv, alive }, rep))
        })
        .collect::<Option<Vec<_>>>()
        .map(|v| v.into_iter().unzip())
}

/// Writes `graph` and its `slots` for `namespace` under `root`, replacing
/// the earlier save. No insert may run on `graph` meanwhile.
pub(super) fn save(
    root: &Path,
    namespace: &str,
    model: &str,
    dim: usize,
    graph: &Graph,
    slots: &[Slot],
    reps: &[u32],
) -> io::Result<()> {
    fs::create_dir_all(root)?;
    let target = namespace_dir(root, namespace);
    let tmp = target.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    fs::create_dir_all(&tmp)?;
    let written = (|| -> io::Result<()> {
        // hnsw_rs panics when it cannot create its files.
        catch_unwind(AssertUnwindSafe(|| graph.file_dump(&tmp, BASENAME)))
            .map_err(|_| io::Error::other("hnsw_rs panicked while writing the graph"))?
            .map_err(|e| io::Error::other(format!("hnsw_rs could not write the graph: {e}")))?;
        let slot_bytes = encode_slots(slots, reps);
        fs::write(tmp.join("slots.bin"), &slot_bytes)?;
        let files = [tmp.join(format!("{BASENAME}.hnsw.graph")), tmp.join(format!("{BASENAME}.hnsw.data"))];
        let meta = Meta {
            format: FORMAT,
            namespace: namespace.to_string(),
            model: model.to_string(),
            dim,
            points: graph.get_nb_point(),
            slots: slots.len(),
            crc: [crc_of(&files[0])?, crc_of(&files[1])?, crc32fast::hash(&slot_bytes)],
        };
        fs::write(tmp.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
        for f in files.iter().chain([&tmp.join("slots.bin"), &tmp.join("meta.json")]) {
            File::open(f)?.sync_all()?;
        }
        File::open(&tmp)?.sync_all()?;
        let old = target.with_extension(format!("old-{}", uuid::Uuid::new_v4().simple()));
        if target.exists() {
            fs::rename(&target, &old)?;
        }
        fs::rename(&tmp, &target)?;
        File::open(root)?.sync_all()?;
        let _ = fs::remove_dir_all(&old);
        Ok(())
    })();
    if written.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    written
}

/// Reads the graph saved for `namespace`, if its files are whole and were
/// written for this embedding model and dimension.
pub(super) fn load(root: &Path, namespace: &str, model: &str, dim: usize) -> Result<SavedGraph, LoadError> {
    let dir = namespace_dir(root, namespace);
    let meta_path = dir.join("meta.json");
    if !dir.exists() {
        return Err(LoadError::Missing);
    }
    let reject = |why: String| LoadError::Rejected(why);
    let meta: Meta = fs::read(&meta_path)
        .map_err(|e| reject(format!("{}: {e}", meta_path.display())))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| reject(format!("{}: {e}", meta_path.display()))))?;
    if meta.format != FORMAT {
        return Err(reject(format!("format {} (this build reads {FORMAT})", meta.format)));
    }
    if meta.namespace != namespace {
        return Err(reject(format!("saved for namespace {:?}", meta.namespace)));
    }
    if meta.model != model || meta.dim != dim {
        return Err(reject(format!(
            "saved for embedding model {} ({} dimensions), this one is {model} ({dim})",
            meta.model, meta.dim
        )));
    }
    let files = [dir.join(format!("{BASENAME}.hnsw.graph")), dir.join(format!("{BASENAME}.hnsw.data"))];
    for (file, expected) in files.iter().zip(meta.crc) {
        let crc = crc_of(file).map_err(|e| reject(format!("{}: {e}", file.display())))?;
        if crc != expected {
            return Err(reject(format!("{}: checksum {crc:08x}, saved {expected:08x}", file.display())));
        }
    }
    let slot_bytes = fs::read(dir.join("slots.bin")).map_err(|e| reject(format!("slots.bin: {e}")))?;
    if crc32fast::hash(&slot_bytes) != meta.crc[2] {
        return Err(reject("slots.bin: checksum mismatch".into()));
    }
    let decoded = decode_slots(&slot_bytes).filter(|(s, _)| s.len() == meta.slots);
    let (slots, reps) = decoded.ok_or_else(|| reject("slots.bin: malformed".into()))?;
    // The loaded graph borrows its reader for its whole life, and lives as
    // long as the index: the reader (a few hundred bytes, no data: mmap is
    // off) is leaked once per load.
    let io: &'static HnswIo = Box::leak(Box::new(HnswIo::new(&dir, BASENAME)));
    let graph = catch_unwind(AssertUnwindSafe(|| io.load_hnsw_with_dist::<f32, UnitCosine>(UnitCosine)))
        .map_err(|_| reject("hnsw_rs panicked while reading the graph".into()))?
        .map_err(|e| reject(format!("hnsw_rs could not read the graph: {e}")))?;
    if graph.get_nb_point() != meta.points {
        return Err(reject(format!("{} points, saved {}", graph.get_nb_point(), meta.points)));
    }
    Ok(SavedGraph { graph, slots, reps })
}

/// Removes what an interrupted save left behind.
pub(super) fn clean(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") || name.contains(".old-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The files of `namespace`'s saved graph (tests damage them).
pub fn graph_files(root: &Path, namespace: &str) -> [PathBuf; 4] {
    let dir = namespace_dir(root, namespace);
    [
        dir.join(format!("{BASENAME}.hnsw.graph")),
        dir.join(format!("{BASENAME}.hnsw.data")),
        dir.join("slots.bin"),
        dir.join("meta.json"),
    ]
}
