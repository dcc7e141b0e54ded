//! Hostile grammars and JSON schemas (`tests/common/hostile.rs`: each bound
//! just past its limit and at it, then a seeded random mix) sent to a real
//! server through the routes clients use, one at a time, while another
//! client polls /health: how long each refusal or answer took, the statuses,
//! the slowest /health. Asserts nothing; the test suite checks the bounds.
//!
//!   scripts/bench.sh --bench bounds
//!   MODELPOOL_FUZZ_SEED=7 MODELPOOL_FUZZ_CASES=2000 scripts/bench.sh --bench bounds

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/hostile.rs"]
mod hostile;
#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;

fn main() {
    let rt = actix::System::new();
    rt.block_on(async {
        let data = tempfile::tempdir().unwrap();
        let mut srv = server::start(1, 512, data.path(), &[]);
        let base = srv.1.clone();
        let seed: u64 = std::env::var("MODELPOOL_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(36);
        let n: usize = std::env::var("MODELPOOL_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
        let fixed = hostile::fixed();
        let n_fixed = fixed.len();
        let mut cases = fixed;
        cases.extend(hostile::random(seed, n));

        let stop = Arc::new(AtomicBool::new(false));
        let health = {
            let (stop, base) = (stop.clone(), base.clone());
            std::thread::spawn(move || {
                let addr = base.trim_start_matches("http://").to_string();
                let mut times = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let ok = process::http_status(&addr, "/health", Some(Duration::from_secs(60))) == Some(200);
                    times.push((started.elapsed(), ok));
                    std::thread::sleep(Duration::from_millis(20));
                }
                times
            })
        };
        let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        let mut slowest: Vec<(Duration, String, u16)> = Vec::new();
        println!(
            "bounds: {} fixed cases, {n} random (seed {seed}), one server (1 instance, 4 slots, n_ctx 512)",
            n_fixed
        );
        for (i, case) in cases.iter().enumerate() {
            let started = Instant::now();
            let status = match client.post(format!("{base}{}", case.path)).json(&case.body).send().await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    let _ = r.bytes().await;
                    s
                }
                Err(_) => 0,
            };
            let took = started.elapsed();
            *statuses.entry(status).or_default() += 1;
            if i < n_fixed {
                println!("  {:>8.1} ms  {status}  {}", took.as_secs_f64() * 1e3, case.name);
            }
            slowest.push((took, case.name.clone(), status));
            if srv.0.try_wait().unwrap().is_some() {
                println!("  THE SERVER DIED at {}", case.name);
                break;
            }
        }
        stop.store(true, Ordering::SeqCst);
        let health = health.join().unwrap();
        slowest.sort_by(|a, b| b.0.cmp(&a.0));
        let refusals: Vec<&(Duration, String, u16)> = slowest.iter().filter(|s| s.2 == 400).collect();
        println!("requests: {}, statuses (0: no answer): {statuses:?}", slowest.len());
        for (took, name, status) in slowest.iter().take(3) {
            println!("slowest: {:.1} ms ({status}) {name}", took.as_secs_f64() * 1e3);
        }
        if let Some((took, name, _)) = refusals.first() {
            println!("slowest refusal: {:.1} ms ({name})", took.as_secs_f64() * 1e3);
        }
        let worst = health.iter().map(|h| h.0).max().unwrap_or_default();
        let failed = health.iter().filter(|h| !h.1).count();
        println!(
            "/health meanwhile: {} polls, slowest {:.1} ms, {failed} not 200; server alive: {}",
            health.len(),
            worst.as_secs_f64() * 1e3,
            srv.0.try_wait().unwrap().is_none()
        );
        srv.stop();
    });
}
