//! Decode threads that follow the cores other processes leave free. llama.cpp's
//! OpenMP threads wait for each other at every barrier of a decode; when another
//! process holds one of their cores, the others spin while it waits for a turn
//! and a step takes several times longer. A monitor thread reads `/proc/stat`
//! once a second, counts the cores other processes kept busy on the CPUs this
//! process may use, and each local instance decodes with its share of the
//! rest ([`CpuShare::threads`], read before every decode).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use serde::Serialize;

/// How often the monitor measures.
const INTERVAL: Duration = Duration::from_secs(1);
/// Threads are lowered once other processes take this much of a core that
/// the instances counted on (0.45: a busy neighbour under spinning threads
/// gets about 2/3 of a core, so it is seen; a daemon's few percent are not).
const LOWER_MARGIN: f64 = 0.45;
/// …and raised again once this much of a core more is free than counted.
const RAISE_MARGIN: f64 = 0.7;

/// The threads one instance decodes with: its setting, lowered while other
/// processes keep cores busy.
#[derive(Debug)]
pub struct CpuShare {
    instance: usize,
    configured: u32,
    /// Whether the monitor changes `current`.
    adapts: bool,
    current: AtomicU32,
}

impl CpuShare {
    /// Threads for the next decode.
    pub fn threads(&self) -> u32 {
        self.current.load(Ordering::Relaxed)
    }
}

/// What `/pool` and `/metrics` show about the adaptation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuStatus {
    /// Whether any instance's threads follow the free cores.
    pub adaptive: bool,
    /// Why the monitor does not measure, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// CPUs this process may run on (0: not measured).
    pub cores: u32,
    /// Cores other processes kept busy over the last second, on those CPUs.
    pub others_busy: f64,
    /// Cores the local instances may use now.
    pub budget: u32,
    /// Each local instance's threads: its setting and what it uses now.
    pub instances: Vec<InstanceThreads>,
}

#[derive(Clone, Debug, Serialize)]
pub struct InstanceThreads {
    pub instance: usize,
    pub configured: u32,
    pub current: u32,
    /// Whether its threads follow the free cores.
    pub adapts: bool,
}

/// The cores the instances may use next, from `budget` (what they may use
/// now) and the cores other processes kept busy. Lowered when others take
/// more than [`LOWER_MARGIN`] of a core counted on, raised when
/// [`RAISE_MARGIN`] of a core more is free: between the two it stays, so
/// the thread count does not flap.
pub fn next_budget(cores: u32, budget: u32, others_busy: f64) -> u32 {
    let free = (cores as f64 - others_busy.max(0.0)).max(1.0);
    let down = (free + LOWER_MARGIN).floor() as u32;
    let up = (free + 1.0 - RAISE_MARGIN).floor() as u32;
    let next = if down < budget {
        down
    } else if up > budget {
        up
    } else {
        budget
    };
    next.clamp(1, cores.max(1))
}

/// One instance's threads when the local instances want `demand` threads in
/// all on `cores` CPUs and may use `budget` cores: its part of what is left
/// once the cores lost to other processes are taken away, at least one.
/// Threads set beyond the cores on purpose stay beyond them.
pub fn share(configured: u32, demand: u32, cores: u32, budget: u32) -> u32 {
    let available = budget + demand.saturating_sub(cores);
    if demand == 0 || available >= demand {
        return configured.max(1);
    }
    ((configured as u64 * available as u64 / demand as u64) as u32).clamp(1, configured.max(1))
}

/// Busy ticks on the CPUs this process may use, and this process's own ticks.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ticks {
    busy: u64,
    own: u64,
}

/// Sums user, nice, system, irq, softirq and steal (time a hypervisor gave
/// the CPU to someone else) of the `cpuN` lines whose N is in `allowed`.
fn busy_ticks(proc_stat: &str, allowed: &[usize]) -> Option<u64> {
    let mut total = 0u64;
    let mut seen = 0;
    for line in proc_stat.lines() {
        let Some(rest) = line.strip_prefix("cpu") else { continue };
        let mut fields = rest.split_ascii_whitespace();
        let Some(Ok(n)) = fields.next().map(str::parse::<usize>) else { continue };
        if !allowed.contains(&n) {
            continue;
        }
        let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
        if v.len() < 8 {
            return None;
        }
        // user nice system idle iowait irq softirq steal (guest is inside user)
        total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        seen += 1;
    }
    (seen == allowed.len()).then_some(total)
}

/// utime + stime of `/proc/self/stat` (every thread of this process).
fn own_ticks(self_stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &self_stat[self_stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `Cpus_allowed_list` of `/proc/self/status`, e.g. "0-3,8".
fn allowed_cpus(self_status: &str) -> Option<Vec<usize>> {
    let list = self_status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?.trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.trim().parse::<usize>().ok()?..=b.trim().parse::<usize>().ok()?),
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    Some(cpus)
}

fn read_ticks(allowed: &[usize]) -> Option<Ticks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    Some(Ticks { busy: busy_ticks(&stat, allowed)?, own: own_ticks(&own)? })
}

/// Cores other processes kept busy between two readings `wall_ticks` apart.
fn others_busy(before: Ticks, after: Ticks, wall_ticks: f64) -> f64 {
    let busy = after.busy.saturating_sub(before.busy) as f64;
    let own = after.own.saturating_sub(before.own) as f64;
    ((busy - own) / wall_ticks).max(0.0)
}

/// What the monitor knows: whether it measures (and why not), and its last reading.
#[derive(Clone, Debug)]
struct Measured {
    measuring: bool,
    note: Option<String>,
    cores: u32,
    others_busy: f64,
    budget: u32,
    /// When a change of the budget was last logged at INFO (at most one a
    /// minute: a busy neighbour moves it every second or two; the rest go to DEBUG).
    logged_at: Option<std::time::Instant>,
}

/// The least time between two INFO lines about the decode-thread budget.
const BUDGET_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether the monitor can measure here, and on which CPUs. Off where
/// `/proc` is missing, or where a CPU quota (cgroup) lets this process use
/// fewer cores than the CPUs it may run on: other processes' load on those
/// CPUs then says little about what this process gets.
fn measurable() -> Result<Vec<usize>, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
    let allowed = allowed_cpus(&status).ok_or("no Cpus_allowed_list in /proc/self/status")?;
    let usable = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if usable < allowed.len() {
        return Err(format!(
            "a CPU quota lets this process use {usable} of the {} CPUs it may run on; threads stay as set",
            allowed.len()
        ));
    }
    read_ticks(&allowed).ok_or("/proc/stat cannot be read")?;
    Ok(allowed)
}

/// The CPU monitor of one engine: every live local instance's share, and
/// what the monitor thread (started with the first instance) measured. The
/// engine owns it; `/pool` and `/metrics` read it through the engine.
#[derive(Default)]
pub struct CpuMonitor {
    shares: Mutex<Vec<Weak<CpuShare>>>,
    measured: OnceLock<Mutex<Measured>>,
}

impl CpuMonitor {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Its findings; the first call starts the thread that measures (it
    /// ends with the monitor).
    fn measured(self: &Arc<Self>) -> &Mutex<Measured> {
        self.measured.get_or_init(|| {
            let (cores, started) = match measurable() {
                Ok(allowed) => {
                    let cores = allowed.len() as u32;
                    let monitor = Arc::downgrade(self);
                    let spawned =
                        std::thread::Builder::new().name("cpu-monitor".into()).spawn(move || run(monitor, allowed));
                    (cores, spawned.map(drop).map_err(|e| format!("the monitor thread did not start: {e}")))
                }
                Err(note) => (std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1), Err(note)),
            };
            if let Err(note) = &started {
                tracing::warn!(%note, "decode threads will not follow the free cores");
            }
            Mutex::new(Measured {
                measuring: started.is_ok(),
                note: started.err(),
                cores,
                others_busy: 0.0,
                budget: cores,
                logged_at: None,
            })
        })
    }

    fn live_shares(&self) -> Vec<Arc<CpuShare>> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        shares.retain(|w| w.strong_count() > 0);
        shares.iter().filter_map(Weak::upgrade).collect()
    }

    /// Applies one measurement: a new budget, and each adapting instance's share of it.
    fn update(self: &Arc<Self>, others: f64) {
        let adapting: Vec<Arc<CpuShare>> = self.live_shares().into_iter().filter(|s| s.adapts).collect();
        let mut m = self.measured().lock().unwrap_or_else(|e| e.into_inner());
        let budget = next_budget(m.cores, m.budget, others);
        if budget != m.budget {
            let cores = m.cores;
            let message = format!("other processes' CPU use changed: instances decode on {budget} of {cores} cores");
            let (others_busy, from) = (format!("{others:.2}"), m.budget);
            if m.logged_at.is_none_or(|at| at.elapsed() >= BUDGET_LOG_EVERY) {
                m.logged_at = Some(std::time::Instant::now());
                tracing::info!(others_busy, from, to = budget, "{message} (further changes within a minute: DEBUG)");
            } else {
                tracing::debug!(others_busy, from, to = budget, "{message}");
            }
        }
        m.others_busy = (others * 100.0).round() / 100.0;
        m.budget = budget;
        let demand: u32 = adapting.iter().map(|s| s.configured).sum();
        for s in &adapting {
            s.current.store(share(s.configured, demand, m.cores, budget), Ordering::Relaxed);
        }
    }

    /// The share of a new local instance that wants `configured` threads. It
    /// follows the free cores when `adapt` is set, the instance has more than
    /// one thread (one thread has no barrier to wait at) and the monitor can
    /// measure.
    pub fn register(self: &Arc<Self>, instance: usize, configured: u32, adapt: bool) -> Arc<CpuShare> {
        let configured = configured.max(1);
        let adapts = adapt && configured > 1 && self.measured().lock().unwrap_or_else(|e| e.into_inner()).measuring;
        let share = Arc::new(CpuShare { instance, configured, adapts, current: AtomicU32::new(configured) });
        self.shares.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&share));
        share
    }

    /// The local instances' threads, and the monitor's findings where one
    /// runs; `None` before any local instance exists.
    pub fn status(&self) -> Option<CpuStatus> {
        let live = self.live_shares();
        if live.is_empty() {
            return None;
        }
        let instances = live
            .iter()
            .map(|s| InstanceThreads {
                instance: s.instance,
                configured: s.configured,
                current: s.threads(),
                adapts: s.adapts,
            })
            .collect();
        let adaptive = live.iter().any(|s| s.adapts);
        Some(match self.measured.get().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone()) {
            Some(m) => CpuStatus {
                adaptive,
                note: m.note,
                cores: m.cores,
                others_busy: m.others_busy,
                budget: m.budget,
                instances,
            },
            None => CpuStatus {
                adaptive,
                note: Some("no instance adapts: adapt_threads is off, or each instance has one thread".into()),
                instances,
                ..CpuStatus::default()
            },
        })
    }
}

fn run(monitor: Weak<CpuMonitor>, allowed: Vec<usize>) {
    // SAFETY: sysconf has no preconditions.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    let Some(mut before) = read_ticks(&allowed) else { return };
    let mut at = std::time::Instant::now();
    loop {
        std::thread::sleep(INTERVAL);
        let Some(monitor) = monitor.upgrade() else { return };
        let Some(after) = read_ticks(&allowed) else { continue };
        let now = std::time::Instant::now();
        let others = others_busy(before, after, now.duration_since(at).as_secs_f64() * hz);
        (before, at) = (after, now);
        monitor.update(others);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_neighbour_lowers_two_threads_to_one_and_its_end_raises_them() {
        // Two spinning threads and a busy loop share 2 cores: ~2/3 each.
        assert_eq!(next_budget(2, 2, 0.67), 1);
        // Down to one thread, the neighbour gets its whole core: stay.
        assert_eq!(next_budget(2, 1, 1.0), 1);
        assert_eq!(next_budget(2, 1, 0.5), 1);
        // It ends.
        assert_eq!(next_budget(2, 1, 0.05), 2);
        assert_eq!(next_budget(2, 1, 0.25), 2);
    }

    #[test]
    fn background_noise_changes_nothing_and_the_band_between_does_not_flap() {
        assert_eq!(next_budget(2, 2, 0.0), 2);
        assert_eq!(next_budget(2, 2, 0.3), 2);
        assert_eq!(next_budget(2, 2, 0.44), 2);
        // Between the two margins the budget stays where it is, either way.
        for others in [0.31, 0.35, 0.4, 0.44] {
            assert_eq!(next_budget(2, 2, others), 2, "{others}");
            assert_eq!(next_budget(2, 1, others), 1, "{others}");
        }
    }

    #[test]
    fn larger_machines_lose_only_the_cores_taken() {
        assert_eq!(next_budget(8, 8, 1.1), 7);
        assert_eq!(next_budget(8, 8, 2.9), 5);
        assert_eq!(next_budget(8, 5, 0.1), 8);
        // Never below one core, never above the machine.
        assert_eq!(next_budget(2, 2, 9.0), 1);
        assert_eq!(next_budget(4, 4, -1.0), 4);
    }

    #[test]
    fn each_instance_gives_up_its_part_of_the_lost_cores() {
        // 1 instance × 2 threads on 2 cores, one core lost.
        assert_eq!(share(2, 2, 2, 1), 1);
        assert_eq!(share(2, 2, 2, 2), 2);
        // 2 instances × 4 threads on 8 cores, 2 lost: 6 threads in all.
        assert_eq!(share(4, 8, 8, 6), 3);
        // 2 × 1 thread: nothing to give up.
        assert_eq!(share(1, 2, 2, 1), 1);
        // Fewer threads set than cores: the cores lost first were not used.
        assert_eq!(share(2, 2, 4, 3), 2);
        assert_eq!(share(2, 2, 4, 1), 1);
        // 2 instances × 2 threads on 2 cores (oversubscribed on purpose), one lost.
        assert_eq!(share(2, 4, 2, 1), 1);
    }

    #[test]
    fn proc_files_are_parsed_and_others_exclude_this_process() {
        let stat = "cpu  10 0 10 100 0 0 0 0 0 0\n\
                    cpu0 100 5 50 1000 7 1 2 3 0 0\n\
                    cpu1 200 0 100 900 0 0 0 0 0 0\n\
                    cpu2 999 0 0 0 0 0 0 0 0 0\n\
                    intr 1 2 3\n";
        assert_eq!(busy_ticks(stat, &[0, 1]), Some(100 + 5 + 50 + 1 + 2 + 3 + 200 + 100));
        assert_eq!(busy_ticks(stat, &[0, 7]), None, "a CPU missing from /proc/stat");
        let own = "4242 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 9 0";
        assert_eq!(own_ticks(own), Some(200));
        assert_eq!(allowed_cpus("Name:\tx\nCpus_allowed_list:\t0-2,5\n"), Some(vec![0, 1, 2, 5]));
        let before = Ticks { busy: 1000, own: 400 };
        let after = Ticks { busy: 1300, own: 500 };
        assert!((others_busy(before, after, 100.0) - 2.0).abs() < 1e-9);
        assert_eq!(others_busy(after, before, 100.0), 0.0);
    }

    #[test]
    fn this_machines_proc_files_parse() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let allowed = allowed_cpus(&status).expect("Cpus_allowed_list");
        assert!(!allowed.is_empty());
        let t = read_ticks(&allowed).unwrap();
        assert!(t.busy > 0);
    }
}
