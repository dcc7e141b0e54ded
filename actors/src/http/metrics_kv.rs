//! The KV tiers' series on `/metrics` (classic Prometheus text), read from
//! the tiers' own counters at each scrape.

use std::fmt::Write;

use crate::engine::kv_tiers::{Histo, KvStatus, Tier};

pub const KV_RESTORES: &str = "modelpool_kv_restores";
pub const KV_RESTORED_TOKENS: &str = "modelpool_kv_restored_tokens";
pub const KV_DECODED_TOKENS: &str = "modelpool_kv_decoded_prompt_tokens";
pub const KV_MISSES: &str = "modelpool_kv_misses";
pub const KV_EVICTIONS: &str = "modelpool_kv_evictions";
pub const KV_PARKS: &str = "modelpool_kv_parks";
pub const KV_MOVES: &str = "modelpool_kv_stream_moves";
pub const KV_BYTES: &str = "modelpool_kv_bytes";
pub const KV_ENTRIES: &str = "modelpool_kv_entries";
pub const KV_BUDGET: &str = "modelpool_kv_budget_bytes";
pub const KV_DISK_WRITTEN: &str = "modelpool_kv_disk_written_bytes";
pub const KV_DISK_READ: &str = "modelpool_kv_disk_read_bytes";
pub const KV_DISK_REJECTED: &str = "modelpool_kv_disk_rejected_files";
pub const KV_DISK_ENABLED: &str = "modelpool_kv_disk_enabled";
pub const KV_COPY: &str = "modelpool_kv_copy_seconds";

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, op: &str, bounds: &[f64], h: &Histo) {
    for (b, n) in bounds.iter().zip(&h.buckets) {
        let _ = writeln!(out, "{KV_COPY}_bucket{{op=\"{op}\",le=\"{b}\"}} {n}");
    }
    let _ = writeln!(out, "{KV_COPY}_bucket{{op=\"{op}\",le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{KV_COPY}_sum{{op=\"{op}\"}} {}", h.sum);
    let _ = writeln!(out, "{KV_COPY}_count{{op=\"{op}\"}} {}", h.count);
}

/// The tiers' series.
pub fn render(kv: &KvStatus) -> String {
    let mut out = String::new();
    let by_tier = |out: &mut String, name: &str, help: &str, get: &dyn Fn(Tier) -> u64| {
        head(out, &format!("{name}_total"), "counter", help);
        for t in Tier::ALL {
            let _ = writeln!(out, "{name}_total{{tier=\"{}\"}} {}", t.as_str(), get(t));
        }
    };
    by_tier(
        &mut out,
        KV_RESTORES,
        "Prompts that reused a cached prefix, by where it was: slot (the request's own slot or another of its namespace), memory, disk",
        &|t| kv.restores.get(t),
    );
    by_tier(&mut out, KV_RESTORED_TOKENS, "Prompt tokens served from each tier instead of being decoded", &|t| {
        kv.restored_tokens.get(t)
    });
    by_tier(
        &mut out,
        KV_EVICTIONS,
        "Caches that left a tier for lack of room (memory: moved to disk or dropped; disk: deleted)",
        &|t| {
            if t == Tier::Slot {
                0
            } else {
                kv.evictions.get(t)
            }
        },
    );
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        head(out, &format!("{name}_total"), "counter", help);
        let _ = writeln!(out, "{name}_total {v}");
    };
    counter(&mut out, KV_DECODED_TOKENS, "Prompt tokens decoded because no cache held them", kv.decoded_tokens);
    counter(&mut out, KV_MISSES, "Prompts that reused nothing from any cache", kv.misses);
    counter(&mut out, KV_PARKS, "Slot caches moved to the memory tier to make room for another conversation", kv.parks);
    counter(
        &mut out,
        KV_MOVES,
        "Sequences paused for their reader moved out from between decoding ones (their KV traded streams with an edge sequence's), so that a step stays one pass",
        kv.moves,
    );
    counter(&mut out, KV_DISK_WRITTEN, "Bytes of KV cache files written", kv.disk.bytes_written);
    counter(&mut out, KV_DISK_READ, "Bytes of KV cache files read back", kv.disk.bytes_read);
    head(
        &mut out,
        &format!("{KV_DISK_REJECTED}_total"),
        "counter",
        "KV cache files deleted unread: from another model or format (foreign), or torn or corrupted (corrupt)",
    );
    let _ = writeln!(out, "{KV_DISK_REJECTED}_total{{reason=\"foreign\"}} {}", kv.disk.rejected_foreign);
    let _ = writeln!(out, "{KV_DISK_REJECTED}_total{{reason=\"corrupt\"}} {}", kv.disk.rejected_corrupt);
    let gauges: [(&str, &str, u64, u64); 3] = [
        (KV_BYTES, "Bytes each tier holds now", kv.memory.bytes, kv.disk.bytes),
        (KV_ENTRIES, "Caches each tier holds now", kv.memory.entries as u64, kv.disk.entries as u64),
        (KV_BUDGET, "Bytes each tier may hold", kv.memory.budget_bytes, kv.disk.budget_bytes),
    ];
    for (name, help, memory, disk) in gauges {
        head(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name}{{tier=\"memory\"}} {memory}");
        let _ = writeln!(out, "{name}{{tier=\"disk\"}} {disk}");
    }
    head(
        &mut out,
        KV_DISK_ENABLED,
        "gauge",
        "1 while cache files are written (0: off, or stopped after a write failed)",
    );
    let _ = writeln!(out, "{KV_DISK_ENABLED} {}", u8::from(kv.disk.enabled));
    head(
        &mut out,
        KV_COPY,
        "histogram",
        "Time one park (slot to memory) or restore (tier to slot) took on the instance's thread, and reading a cache file back (disk_read, before the request reaches its instance)",
    );
    histogram(&mut out, "park", &kv.copy_seconds.bounds, &kv.copy_seconds.park);
    histogram(&mut out, "restore", &kv.copy_seconds.bounds, &kv.copy_seconds.restore);
    histogram(&mut out, "disk_read", &kv.copy_seconds.bounds, &kv.copy_seconds.disk_read);
    out
}
