//! The series `/metrics` reads at each scrape instead of recording them as
//! requests pass: the pool's instances and queue, the CPU watch and the KV
//! tiers. [`Scrape`] hands their values to prometheus-client as a
//! [`Collector`], which encodes them with the recorded ones
//! ([`render`]), and serves them at `/metrics`. Help texts end with a full stop,
//! as the registry writes the recorded ones.

use std::fmt::Result;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};

use actix_web::{web, HttpResponse};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;

use super::error::ApiError;
use super::kit::{ApiState, MetricsAccess};
use super::metric_names::*;
use super::metrics::Metrics;
use crate::engine::cpu::CpuStatus;
use crate::engine::kv_tiers::{Histo, KvStatus, Tier};
use crate::pool::state::{InstanceState, InstanceStatus, PoolStatus};

/// What one scrape read; encoded once, then dropped.
#[derive(Debug)]
pub(super) struct Scrape {
    pub pool: PoolStatus,
    pub cpu: Option<CpuStatus>,
    /// None without KV tiers (then no `modelpool_kv_*` series).
    pub kv: Option<KvStatus>,
}

/// All of `/metrics` in the Prometheus text format: the series `metrics`
/// recorded so far, then those read now from the pool, the CPU watch and
/// the KV tiers (none without tiers).
pub fn render(metrics: &Metrics, pool: PoolStatus, cpu: Option<CpuStatus>, kv: Option<KvStatus>) -> String {
    let mut now = Registry::default();
    now.register_collector(Box::new(Scrape { pool, cpu, kv }));
    let mut out = String::new();
    metrics.encode(&mut out);
    prometheus_text::encode(&mut out, &now).expect("writing to a String cannot fail");
    out
}

/// Prometheus text format, prefix `modelpool_`.
#[utoipa::path(get, path = "/metrics", tag = "status",
    responses((status = 200, content((String = "text/plain"))),
        (status = "default", description = "An error", body = super::error::ErrorBody)))]
pub(crate) async fn metrics(
    state: web::Data<ApiState>,
    _access: MetricsAccess,
) -> std::result::Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let pool = chat.pool();
    let status = pool.status().await?;
    let text = render(&state.metrics, status, pool.engine().cpu_status(), pool.kv_tiers().map(|t| t.status()));
    Ok(HttpResponse::Ok().content_type(prometheus_text::CONTENT_TYPE).body(text))
}

pub fn register(cfg: &mut web::ServiceConfig) {
    cfg.service(super::kit::resource("/metrics", "GET").route(web::get().to(metrics)));
}

impl Collector for Scrape {
    fn encode(&self, mut out: DescriptorEncoder) -> Result {
        pool(&mut out, &self.pool)?;
        cpu(&mut out, self.cpu.as_ref())?;
        if let Some(kv) = &self.kv {
            kv_tiers(&mut out, kv)?;
        }
        Ok(())
    }
}

/// One family: its help and type, then a sample per label set. A family
/// without samples is left out, as the registry leaves out an empty one.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result {
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut family = out.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One series without labels.
fn single<M: EncodeMetric + TypedMetric>(out: &mut DescriptorEncoder, name: &str, help: &str, metric: M) -> Result {
    metric.encode(out.encode_descriptor(name, help, None, M::TYPE)?)
}

fn instance(i: &InstanceStatus) -> [(&'static str, String); 1] {
    [("instance", i.id.to_string())]
}

fn pool(out: &mut DescriptorEncoder, pool: &PoolStatus) -> Result {
    let each = || pool.instances.iter();
    let per_instance = |v: fn(&InstanceStatus) -> u64| each().map(move |i| (instance(i), ConstCounter::new(v(i))));
    family(
        out,
        INSTANCES,
        "Model instances by state.",
        InstanceState::ALL.map(|s| {
            let n = pool.instances.iter().filter(|i| i.state == s).count();
            ([("state", s.as_str())], ConstGauge::new(n as i64))
        }),
    )?;
    single(
        out,
        QUEUE_DEPTH,
        "Requests waiting for a sequence slot (chat turns waiting for their conversation's earlier turn included).",
        ConstGauge::new(pool.queued as i64),
    )?;
    family(
        out,
        INSTANCE_REQUESTS,
        "Requests given a sequence slot of each instance, whatever their outcome.",
        per_instance(|i| i.stats.requests),
    )?;
    family(
        out,
        INSTANCE_TOKENS,
        "Tokens each instance generated for completed generations (a failed or cancelled one's are not counted).",
        per_instance(|i| i.stats.tokens),
    )?;
    family(
        out,
        INSTANCE_BUSY,
        "Seconds during which at least one slot of each instance was leased.",
        each().map(|i| (instance(i), ConstCounter::new(i.stats.busy_seconds))),
    )?;
    family(
        out,
        INSTANCE_FAILURES,
        "Times each instance was marked unhealthy: a request or health probe failed on it, \
         it could not start, or its thread stopped.",
        per_instance(|i| i.stats.failures),
    )?;
    family(out, INSTANCE_REPLACEMENTS, "Times each instance was replaced.", per_instance(|i| i.stats.replacements))?;
    family(
        out,
        INSTANCE_STATE,
        "Current state of each instance (1 for the state it is in).",
        each().flat_map(|i| {
            InstanceState::ALL.map(|s| {
                let v = if i.state == s { 1.0 } else { 0.0 };
                ((instance(i), [("state", s.as_str())]), ConstGauge::new(v))
            })
        }),
    )?;
    family(
        out,
        INSTANCE_SLOTS,
        "Sequence slots of each instance.",
        each().map(|i| (instance(i), ConstGauge::new(i.slots as i64))),
    )?;
    family(
        out,
        INSTANCE_SLOTS_BUSY,
        "Sequence slots of each instance leased to a request now.",
        each().map(|i| (instance(i), ConstGauge::new(i.slots_busy as i64))),
    )?;
    family(
        out,
        INSTANCE_INFO,
        "Each instance's kind (local or remote) and a remote's URL; the value is always 1.",
        each().map(|i| {
            let endpoint = i.endpoint.clone().unwrap_or_default();
            ([("instance", i.id.to_string()), ("kind", i.kind.to_string()), ("endpoint", endpoint)], ConstGauge::new(1))
        }),
    )?;
    family(
        out,
        INSTANCE_PROBE,
        "How long each instance's last health probe took, from sending it to its answer \
         (a local instance decodes one token between steps; a remote answers its /health).",
        each().filter_map(|i| Some((instance(i), ConstGauge::new(i.probe_ms? / 1e3)))),
    )?;
    single(
        out,
        REQUESTS_RUNNING,
        "Requests generating now (leased sequence slots); waiting ones are modelpool_queue_depth.",
        ConstGauge::new(pool.in_use as i64),
    )
}

fn cpu(out: &mut DescriptorEncoder, cpu: Option<&CpuStatus>) -> Result {
    family(
        out,
        INSTANCE_THREADS,
        "Threads each local instance decodes with now: its setting, lowered while other processes keep cores busy.",
        cpu.iter()
            .flat_map(|c| &c.instances)
            .map(|t| ([("instance", t.instance.to_string())], ConstGauge::new(t.current as i64))),
    )?;
    single(
        out,
        CPU_OTHERS_BUSY,
        "Cores other processes kept busy over the last second on the CPUs this process may use \
         (measured only while an instance adapts its threads).",
        ConstGauge::new(cpu.filter(|c| c.adaptive).map_or(0.0, |c| c.others_busy)),
    )
}

fn kv_tiers(out: &mut DescriptorEncoder, kv: &KvStatus) -> Result {
    let by_tier = |get: &dyn Fn(Tier) -> u64| Tier::ALL.map(|t| ([("tier", t.as_str())], ConstCounter::new(get(t))));
    family(
        out,
        KV_RESTORES,
        "Prompts that reused a cached prefix, by where it was: slot (the request's own slot or another of its \
         namespace), memory, disk.",
        by_tier(&|t| kv.restores.get(t)),
    )?;
    family(
        out,
        KV_RESTORED_TOKENS,
        "Prompt tokens served from each tier instead of being decoded.",
        by_tier(&|t| kv.restored_tokens.get(t)),
    )?;
    family(
        out,
        KV_EVICTIONS,
        "Caches that left a tier for lack of room (memory: moved to disk or dropped; disk: deleted; \
         slot: always 0, a slot's cache leaving is a park).",
        by_tier(&|t| if t == Tier::Slot { 0 } else { kv.evictions.get(t) }),
    )?;
    single(
        out,
        KV_DECODED_TOKENS,
        "Prompt tokens decoded rather than restored from a cache (a prompt's last token always is, for its logits).",
        ConstCounter::new(kv.decoded_tokens),
    )?;
    single(out, KV_MISSES, "Prompts that reused nothing from any cache.", ConstCounter::new(kv.misses))?;
    single(
        out,
        KV_PARKS,
        "Slot caches copied out to the memory tier (to disk when too big for memory): when their slot takes \
         another conversation, and at shutdown.",
        ConstCounter::new(kv.parks),
    )?;
    single(
        out,
        KV_MOVES,
        "Sequences paused for their reader moved out from between decoding ones (their KV traded streams with \
         an edge sequence's), so that a step stays one pass.",
        ConstCounter::new(kv.moves),
    )?;
    single(out, KV_DISK_WRITTEN, "Bytes of KV cache files written.", ConstCounter::new(kv.disk.bytes_written))?;
    single(
        out,
        KV_DISK_READ,
        "Bytes of KV cache files read back (valid ones; a rejected file is not counted).",
        ConstCounter::new(kv.disk.bytes_read),
    )?;
    family(
        out,
        KV_DISK_REJECTED,
        "KV cache files deleted unread: from another model or format (foreign), or torn or corrupted (corrupt).",
        [("foreign", kv.disk.rejected_foreign), ("corrupt", kv.disk.rejected_corrupt)]
            .map(|(reason, n)| ([("reason", reason)], ConstCounter::new(n))),
    )?;
    let memory_and_disk =
        |memory: u64, disk: u64| [("memory", memory), ("disk", disk)].map(|(t, v)| ([("tier", t)], ConstGauge::new(v)));
    family(out, KV_BYTES, "Bytes each tier holds now.", memory_and_disk(kv.memory.bytes, kv.disk.bytes))?;
    family(
        out,
        KV_ENTRIES,
        "Caches each tier holds now.",
        memory_and_disk(kv.memory.entries as u64, kv.disk.entries as u64),
    )?;
    family(out, KV_BUDGET, "Bytes each tier may hold.", memory_and_disk(kv.memory.budget_bytes, kv.disk.budget_bytes))?;
    single(
        out,
        KV_DISK_ENABLED,
        "1 while cache files are written (0: no disk tier, its directory could not be made, or writing pauses \
         after failed writes).",
        ConstGauge::new(i64::from(kv.disk.enabled)),
    )?;
    let mut copy = out.encode_descriptor(
        KV_COPY,
        "Time one park (a slot's cache copied out) or restore (a cache copied into a slot from another slot, \
         memory or disk) took on the instance's thread, and reading a cache file back (disk_read, mostly before \
         the request reaches its instance).",
        None,
        MetricType::Histogram,
    )?;
    let c = &kv.copy_seconds;
    for (op, h) in [("park", &c.park), ("restore", &c.restore), ("disk_read", &c.disk_read)] {
        copy.encode_family(&[("op", op)])?.encode_histogram::<NoLabelSet>(
            h.sum,
            h.count,
            &own_counts(&c.bounds, h),
            None,
        )?;
    }
    Ok(())
}

/// The tiers keep each bucket's count of observations at or below its bound
/// (cumulative); prometheus-client takes each bucket's own and adds them up.
fn own_counts(bounds: &[f64], h: &Histo) -> Vec<(f64, u64)> {
    let mut below = 0;
    let mut own: Vec<(f64, u64)> = bounds
        .iter()
        .zip(&h.buckets)
        .map(|(bound, n)| {
            let mine = n.saturating_sub(below);
            below = below.max(*n);
            (*bound, mine)
        })
        .collect();
    own.push((f64::INFINITY, h.count.saturating_sub(below)));
    own
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv_tiers::KvTiers;

    #[test]
    fn the_tiers_series_read_their_counters_and_keep_cumulative_buckets() {
        let tiers = KvTiers::memory_only(1 << 20);
        tiers.record(Some(Tier::Memory), 10, 5, Some(std::time::Duration::from_millis(3)));
        tiers.record(Some(Tier::Memory), 4, 1, Some(std::time::Duration::from_millis(30)));
        tiers.record(None, 0, 7, None);
        let pool = crate::pool::state::PoolState::new(1, 1, 0);
        let text = render(&Metrics::new(), pool.status(), None, Some(tiers.status()));
        for line in [
            "# TYPE modelpool_kv_restores_total counter\n",
            "modelpool_kv_restores_total{tier=\"memory\"} 2\n",
            "modelpool_kv_restored_tokens_total{tier=\"memory\"} 14\n",
            "modelpool_kv_evictions_total{tier=\"slot\"} 0\n",
            "modelpool_kv_decoded_prompt_tokens_total 13\n",
            "modelpool_kv_misses_total 1\n",
            "modelpool_kv_disk_rejected_files_total{reason=\"corrupt\"} 0\n",
            "modelpool_kv_budget_bytes{tier=\"memory\"} 1048576\n",
            "modelpool_kv_disk_enabled 0\n",
            "# TYPE modelpool_kv_copy_seconds histogram\n",
            "modelpool_kv_copy_seconds_bucket{op=\"restore\",le=\"0.002\"} 0\n",
            "modelpool_kv_copy_seconds_bucket{op=\"restore\",le=\"0.005\"} 1\n",
            "modelpool_kv_copy_seconds_bucket{op=\"restore\",le=\"0.05\"} 2\n",
            "modelpool_kv_copy_seconds_bucket{op=\"restore\",le=\"1\"} 2\n",
            "modelpool_kv_copy_seconds_bucket{op=\"restore\",le=\"+Inf\"} 2\n",
            "modelpool_kv_copy_seconds_count{op=\"restore\"} 2\n",
            "modelpool_kv_copy_seconds_bucket{op=\"park\",le=\"+Inf\"} 0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
    }

    #[test]
    fn a_family_without_samples_is_left_out() {
        let pool = crate::pool::state::PoolState::new(1, 1, 0);
        let text = render(&Metrics::new(), pool.status(), None, None);
        assert!(!text.contains("modelpool_kv_"), "{text}");
        assert!(!text.contains("modelpool_instance_threads") && !text.contains("modelpool_instance_probe"), "{text}");
        assert!(text.contains("modelpool_cpu_others_busy_cores 0.0\n"), "{text}");
    }

    #[test]
    fn counters_are_named_total_in_the_prometheus_text_format() {
        let m = Metrics::new();
        m.request("chat", "ok", None);
        let pool = crate::pool::state::PoolState::new(1, 1, 0);
        let text = render(&m, pool.status(), None, None);
        for line in [
            "# HELP modelpool_requests_total Requests to the generation routes",
            "# TYPE modelpool_requests_total counter\n",
            "modelpool_requests_total{endpoint=\"chat\",outcome=\"ok\"} 1\n",
            "# TYPE modelpool_instance_requests_total counter\n",
            "# TYPE modelpool_instance_state gauge\n",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        assert!(text.lines().filter(|l| l.starts_with("# HELP")).all(|l| l.ends_with('.')), "{text}");
    }

    #[test]
    fn every_instance_has_its_own_series() {
        let m = Metrics::new();
        let mut pool = crate::pool::state::PoolState::new(3, 4, 0);
        for i in 0..3 {
            pool.instance_ready(i, 0, 0);
        }
        pool.admit(None, None);
        let text = render(&m, pool.status(), None, None);
        assert!(text.contains(&format!("{INSTANCE_SLOTS}{{instance=\"2\"}} 4")), "{text}");
        assert!(text.contains(&format!("{INSTANCE_SLOTS_BUSY}{{instance=\"0\"}} 1")), "{text}");
        for i in 0..3 {
            let requests = if i == 0 { 1 } else { 0 };
            assert!(text.contains(&format!("{INSTANCE_REQUESTS}_total{{instance=\"{i}\"}} {requests}")), "{text}");
            let state = if i == 0 { "busy" } else { "idle" };
            assert!(text.contains(&format!("{INSTANCE_STATE}{{instance=\"{i}\",state=\"{state}\"}} 1")), "{text}");
        }
        assert!(text.contains(&format!("{INSTANCES}{{state=\"idle\"}} 2")), "{text}");
    }
}
