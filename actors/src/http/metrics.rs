//! Prometheus metrics. Every name is a constant here, prefixed `modelpool_`;
//! labels carry the endpoint, the outcome and the instance id.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::{web, HttpResponse};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use super::{ApiError, ApiState, MetricsAccess};
use crate::params::Usage;
use crate::pool::state::{InstanceState, PoolStatus};

pub const REQUESTS: &str = "modelpool_requests";
pub const PROMPT_TOKENS: &str = "modelpool_prompt_tokens";
pub const PROMPT_TOKENS_CACHED: &str = "modelpool_prompt_tokens_cached";
pub const GENERATED_TOKENS: &str = "modelpool_generated_tokens";
pub const QUEUE_WAIT: &str = "modelpool_queue_wait_seconds";
pub const TIME_TO_FIRST_TOKEN: &str = "modelpool_time_to_first_token_seconds";
pub const REQUEST_DURATION: &str = "modelpool_request_duration_seconds";
pub const INSTANCES: &str = "modelpool_instances";
pub const QUEUE_DEPTH: &str = "modelpool_queue_depth";
pub const INSTANCE_REQUESTS: &str = "modelpool_instance_requests";
pub const INSTANCE_TOKENS: &str = "modelpool_instance_tokens";
pub const INSTANCE_BUSY: &str = "modelpool_instance_busy_seconds";
pub const INSTANCE_FAILURES: &str = "modelpool_instance_failures";
pub const INSTANCE_REPLACEMENTS: &str = "modelpool_instance_replacements";
pub const INSTANCE_STATE: &str = "modelpool_instance_state";
pub const INSTANCE_SLOTS: &str = "modelpool_instance_slots";
pub const INSTANCE_SLOTS_BUSY: &str = "modelpool_instance_slots_busy";
pub const INSTANCE_INFO: &str = "modelpool_instance_info";
pub const INSTANCE_PROBE: &str = "modelpool_instance_probe_seconds";
pub const REQUESTS_RUNNING: &str = "modelpool_requests_running";
pub const CHAT_STORE: &str = "modelpool_chat_store_seconds";
pub const CHAT_MEMORY: &str = "modelpool_chat_memory_seconds";
pub const INSTANCE_THREADS: &str = "modelpool_instance_threads";
pub const CPU_OTHERS_BUSY: &str = "modelpool_cpu_others_busy_cores";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceInfoLabels {
    pub instance: String,
    /// "local" or "remote".
    pub kind: String,
    /// A remote's URL without credentials; empty for a local instance.
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceStateLabels {
    pub instance: String,
    pub state: String,
}

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The metrics of one server.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Counter,
    prompt_tokens_cached: Counter,
    generated_tokens: Counter,
    queue_wait: Histogram,
    ttft: Histogram,
    duration: Family<EndpointLabels, Histogram>,
    instances: Family<StateLabels, Gauge>,
    queue_depth: Gauge,
    instance_requests: Family<InstanceLabels, Counter>,
    instance_tokens: Family<InstanceLabels, Counter>,
    instance_busy: Family<InstanceLabels, FloatCounter>,
    instance_failures: Family<InstanceLabels, Counter>,
    instance_replacements: Family<InstanceLabels, Counter>,
    instance_state: Family<InstanceStateLabels, FloatGauge>,
    instance_slots: Family<InstanceLabels, Gauge>,
    instance_slots_busy: Family<InstanceLabels, Gauge>,
    instance_info: Family<InstanceInfoLabels, Gauge>,
    instance_probe: Family<InstanceLabels, FloatGauge>,
    requests_running: Gauge,
    instance_threads: Family<InstanceLabels, Gauge>,
    cpu_others_busy: FloatGauge,
    chat_store: Histogram,
    chat_memory: Histogram,
    /// Serialises scrapes: pool counters are copied in by difference.
    scrape: Mutex<()>,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            prompt_tokens_cached: Counter::default(),
            generated_tokens: Counter::default(),
            queue_wait: seconds_histogram(),
            ttft: seconds_histogram(),
            duration: Family::new_with_constructor(seconds_histogram),
            instances: Family::default(),
            queue_depth: Gauge::default(),
            instance_requests: Family::default(),
            instance_tokens: Family::default(),
            instance_busy: Family::default(),
            instance_failures: Family::default(),
            instance_replacements: Family::default(),
            instance_state: Family::default(),
            instance_slots: Family::default(),
            instance_slots_busy: Family::default(),
            instance_info: Family::default(),
            instance_probe: Family::default(),
            requests_running: Gauge::default(),
            instance_threads: Family::default(),
            cpu_others_busy: FloatGauge::default(),
            chat_store: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            chat_memory: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(REQUESTS, "HTTP requests by endpoint and outcome", m.requests.clone());
        registry.register(
            CHAT_STORE,
            "Time each completed /chat turn waited on the conversation store before its answer (reads and both appends)",
            m.chat_store.clone(),
        );
        registry.register(
            CHAT_MEMORY,
            "Time each completed /chat turn spent on memory work before its answer: embedding the message, \
             recall, building the prompt and the store calls (not the wait for an instance, not generation)",
            m.chat_memory.clone(),
        );
        registry.register(
            PROMPT_TOKENS,
            "Prompt tokens of finished generations, cached and decoded",
            m.prompt_tokens.clone(),
        );
        registry.register(
            PROMPT_TOKENS_CACHED,
            "Prompt tokens served from an instance's KV cache instead of being decoded",
            m.prompt_tokens_cached.clone(),
        );
        registry.register(GENERATED_TOKENS, "Tokens generated", m.generated_tokens.clone());
        registry.register(QUEUE_WAIT, "Time requests waited for a sequence slot", m.queue_wait.clone());
        registry.register(
            TIME_TO_FIRST_TOKEN,
            "Time from the request's arrival to its first generated token (memory, queue wait and prompt processing included)",
            m.ttft.clone(),
        );
        registry.register(REQUEST_DURATION, "Duration of generation requests by endpoint", m.duration.clone());
        registry.register(INSTANCES, "Model instances by state", m.instances.clone());
        registry.register(QUEUE_DEPTH, "Requests waiting for a sequence slot", m.queue_depth.clone());
        registry.register(INSTANCE_REQUESTS, "Requests served per instance", m.instance_requests.clone());
        registry.register(INSTANCE_TOKENS, "Tokens generated per instance", m.instance_tokens.clone());
        registry.register(
            INSTANCE_BUSY,
            "Seconds during which at least one slot of each instance was leased",
            m.instance_busy.clone(),
        );
        registry.register(INSTANCE_FAILURES, "Failures per instance", m.instance_failures.clone());
        registry.register(INSTANCE_REPLACEMENTS, "Times each instance was replaced", m.instance_replacements.clone());
        registry.register(
            INSTANCE_STATE,
            "Current state of each instance (1 for the state it is in)",
            m.instance_state.clone(),
        );
        registry.register(INSTANCE_SLOTS, "Sequence slots of each instance", m.instance_slots.clone());
        registry.register(
            INSTANCE_SLOTS_BUSY,
            "Sequence slots of each instance leased to a request now",
            m.instance_slots_busy.clone(),
        );
        registry.register(
            INSTANCE_INFO,
            "Each instance's kind (local or remote) and a remote's URL; the value is always 1",
            m.instance_info.clone(),
        );
        registry.register(
            INSTANCE_PROBE,
            "How long each instance's last health probe took (a remote's /health round trip)",
            m.instance_probe.clone(),
        );
        registry.register(
            REQUESTS_RUNNING,
            "Requests generating now (leased sequence slots); waiting ones are modelpool_queue_depth",
            m.requests_running.clone(),
        );
        registry.register(
            INSTANCE_THREADS,
            "Threads each local instance decodes with now: its setting, lowered while other processes keep cores busy",
            m.instance_threads.clone(),
        );
        registry.register(
            CPU_OTHERS_BUSY,
            "Cores other processes kept busy over the last second on the CPUs this process may use \
             (measured only while an instance adapts its threads)",
            m.cpu_others_busy.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts one finished request.
    pub fn request(&self, endpoint: &str, outcome: &str, duration: Option<Duration>) {
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.into(), outcome: outcome.into() }).inc();
        if let Some(d) = duration {
            self.duration.get_or_create(&EndpointLabels { endpoint: endpoint.into() }).observe(d.as_secs_f64());
        }
    }

    /// Records one generation's tokens and timings; `ttft` counts from the request's arrival.
    pub fn generation(&self, prompt_tokens: u32, generated: u32, queue_wait: Duration, ttft: Option<Duration>) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.generated_tokens.inc_by(generated as u64);
        self.queue_wait.observe(queue_wait.as_secs_f64());
        if let Some(t) = ttft {
            self.ttft.observe(t.as_secs_f64());
        }
    }

    /// Records the end of one generation request: its tokens and timings, or
    /// its error type as the outcome.
    pub fn finished(&self, endpoint: &str, started: Instant, result: Result<&Usage, &ApiError>) {
        match result {
            Ok(u) => {
                let queue_wait = Duration::from_secs_f64(u.queue_wait_ms / 1e3);
                let ttft = u.first_token_at.map(|t| t.saturating_duration_since(started));
                self.generation(u.prompt_tokens, u.completion_tokens, queue_wait, ttft);
                self.prompt_tokens_cached.inc_by(u.cached_tokens as u64);
                self.request(endpoint, "ok", Some(started.elapsed()));
            }
            Err(e) => self.request(endpoint, e.error_type(), Some(started.elapsed())),
        }
    }

    /// Records a completed chat turn's time on the store and on memory work.
    pub fn chat_turn(&self, reply: &crate::chat::types::ChatReply) {
        self.chat_store.observe(reply.store_ms / 1e3);
        self.chat_memory.observe(reply.memory_ms / 1e3);
    }

    /// Brings the pool series up to date and encodes everything.
    pub fn render(&self, status: &PoolStatus, cpu: Option<crate::engine::cpu::CpuStatus>) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for state in InstanceState::ALL {
            let n = status.instances.iter().filter(|i| i.state == state).count();
            self.instances.get_or_create(&StateLabels { state: state.as_str().into() }).set(n as i64);
        }
        self.queue_depth.set(status.queued as i64);
        self.requests_running.set(status.in_use as i64);
        for inst in &status.instances {
            let l = InstanceLabels { instance: inst.id.to_string() };
            let catch_up = |c: &Counter, v: u64| {
                c.inc_by(v.saturating_sub(c.get()));
            };
            catch_up(&self.instance_requests.get_or_create(&l), inst.stats.requests);
            catch_up(&self.instance_tokens.get_or_create(&l), inst.stats.tokens);
            catch_up(&self.instance_failures.get_or_create(&l), inst.stats.failures);
            catch_up(&self.instance_replacements.get_or_create(&l), inst.stats.replacements);
            self.instance_slots.get_or_create(&l).set(inst.slots as i64);
            self.instance_slots_busy.get_or_create(&l).set(inst.slots_busy as i64);
            let info = InstanceInfoLabels {
                instance: inst.id.to_string(),
                kind: inst.kind.into(),
                endpoint: inst.endpoint.clone().unwrap_or_default(),
            };
            self.instance_info.get_or_create(&info).set(1);
            if let Some(ms) = inst.probe_ms {
                self.instance_probe.get_or_create(&l).set(ms / 1e3);
            }
            let busy = self.instance_busy.get_or_create(&l);
            let delta = inst.stats.busy_seconds - busy.get();
            if delta > 0.0 {
                busy.inc_by(delta);
            }
            for state in InstanceState::ALL {
                let v = if inst.state == state { 1.0 } else { 0.0 };
                self.instance_state
                    .get_or_create(&InstanceStateLabels { instance: inst.id.to_string(), state: state.as_str().into() })
                    .set(v);
            }
        }
        if let Some(cpu) = cpu {
            if cpu.adaptive {
                self.cpu_others_busy.set(cpu.others_busy);
            }
            for t in &cpu.instances {
                self.instance_threads
                    .get_or_create(&InstanceLabels { instance: t.instance.to_string() })
                    .set(t.current as i64);
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        to_prometheus_text(&out)
    }
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has the
/// sample `x_total`. The classic Prometheus text format (what `promtool
/// check metrics` and most scrapers expect by default) names the family
/// `x_total` too, and has no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Prometheus text format, prefix `modelpool_`.
#[utoipa::path(get, path = "/metrics", tag = "status",
    responses((status = 200, content((String = "text/plain"))),
        (status = "default", description = "An error", body = super::error::ErrorBody)))]
async fn metrics(state: web::Data<ApiState>, _access: MetricsAccess) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let status = chat.pool().status().await?;
    let mut text = state.metrics.render(&status, chat.pool().engine().cpu_status());
    if let Some(tiers) = chat.pool().kv_tiers() {
        text.push_str(&super::metrics_kv::render(&tiers.status()));
    }
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(text))
}

pub fn register(cfg: &mut web::ServiceConfig) {
    cfg.service(super::resource("/metrics", "GET").route(web::get().to(metrics)));
}

/// One generation request's outcome, recorded exactly once: as it ended
/// ([`Meter::ok`], [`Meter::fail`]), or as `cancelled` when every copy is
/// dropped before that (the client left mid-stream, or its handler was
/// dropped). The route's handler makes it; its answer, or the stream that
/// carries the answer, holds a copy.
#[derive(Clone)]
pub(crate) struct Meter(std::sync::Arc<MeterInner>);

struct MeterInner {
    metrics: std::sync::Arc<Metrics>,
    endpoint: &'static str,
    started: Instant,
    recorded: std::sync::atomic::AtomicBool,
}

impl Meter {
    /// A request to `endpoint` that arrived at `started`.
    pub(crate) fn new(metrics: std::sync::Arc<Metrics>, endpoint: &'static str, started: Instant) -> Self {
        let recorded = std::sync::atomic::AtomicBool::new(false);
        Self(std::sync::Arc::new(MeterInner { metrics, endpoint, started, recorded }))
    }

    /// When the request arrived (its time to first token counts from here).
    pub(crate) fn started(&self) -> Instant {
        self.0.started
    }

    /// True the first time only.
    fn first(&self) -> bool {
        !self.0.recorded.swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// It generated: its tokens and timings.
    pub(crate) fn ok(&self, usage: &Usage) {
        if self.first() {
            self.0.metrics.finished(self.0.endpoint, self.0.started, Ok(usage));
        }
    }

    /// It generated nothing and failed nothing (Ollama's model load): not counted.
    pub(crate) fn skip(&self) {
        self.first();
    }

    /// It failed: its error type is the outcome.
    pub(crate) fn fail(&self, e: &ApiError) {
        if self.first() {
            self.0.metrics.finished(self.0.endpoint, self.0.started, Err(e));
        }
    }

    /// A handler's answer: an error is recorded; a success recorded itself
    /// (or its stream will).
    pub(crate) fn answer(&self, result: Result<HttpResponse, ApiError>) -> Result<HttpResponse, ApiError> {
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }
}

impl Drop for MeterInner {
    fn drop(&mut self) {
        if !*self.recorded.get_mut() {
            self.metrics.request(self.endpoint, "cancelled", Some(self.started.elapsed()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_renamed_and_eof_dropped() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn every_instance_has_its_own_series() {
        let m = Metrics::new();
        let mut pool = crate::pool::state::PoolState::new(3, 4, 0);
        for i in 0..3 {
            pool.instance_ready(i, 0, 0);
        }
        pool.admit(None, None);
        let text = m.render(&pool.status(), None);
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
