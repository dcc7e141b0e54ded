//! A client that stops reading: a real `modelpool serve` (1 instance, 4
//! slots) serves three clients streaming from /v1/chat/completions: alone,
//! beside a fourth streaming a long answer (`/v1/completions`, the model
//! counting on) that it reads, and beside the
//! same fourth request whose stream nobody reads for 30 s (its socket's
//! receive buffer kept small; once the socket buffers and the sequence's
//! channel are full, its sequence pauses). The three clients run twice
//! beside the stalled stream: at once, while its sequence still fills the
//! buffers (it decodes as a reading one does), and again once it has
//! paused (the server's CPU time stops growing). Prints the three clients'
//! tokens/s each way with the ratios, the server's resident memory over the
//! stall, and what the stalled stream did when read again. Asserts nothing.
//!
//!   scripts/bench.sh --bench stall

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "support/client.rs"]
mod client;
#[path = "../tests/common/process.rs"]
mod process;
#[path = "support/server.rs"]
mod server;

const STALL: Duration = Duration::from_secs(30);
/// Each slot's context, and the long answer's length: with 20 alternatives
/// a token (~700 bytes a chunk) the answer is ~5 MB, more than the kernel's
/// socket buffers hold (Linux lets a send buffer grow to 4 MiB), so the
/// stopped stream's sequence must pause before it ends.
const N_CTX: u32 = 8192;
const LONG_TOKENS: u32 = 8000;
/// A raw prompt whose continuation is long: the model counts on and on.
const LONG_PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,";
/// The stopped stream's prompt: another conversation than the reader's, so
/// that it is not sent back to the slot the reader had (the pool's affinity)
/// but takes a free slot as any new request does, between busy ones or not
/// (the last line of figures says whether it had to be moved).
const STALLED_PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,";

/// The server's resident memory, MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The server's CPU time (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0)
}

/// Waits (up to `deadline`) until the server with nothing else to do spends
/// under a tenth of a core for a second: the stalled sequence has paused.
async fn until_idle(pid: u32, deadline: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut last = cpu_ticks(pid);
    while started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_ticks(pid);
        // 100 ticks a second (Linux's USER_HZ): 10 ticks is a tenth of a core.
        if now.saturating_sub(last) < 10 {
            return Some(started.elapsed());
        }
        last = now;
    }
    None
}

/// The fourth client's request: the model counting on, with log-probabilities.
fn long_request(prompt: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 20, "stream": true })
}

/// Opens a streaming completion of `max_tokens` on a socket whose receive
/// buffer is 4 KiB, reads its first bytes, and returns the socket unread.
async fn stalled_stream(addr: &str, max_tokens: u32) -> (tokio::net::TcpStream, usize) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let body = long_request(STALLED_PROMPT, max_tokens).to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut first = vec![0u8; 1024];
    let n = stream.read(&mut first).await.unwrap();
    (stream, n)
}

fn main() {
    let rt = actix::System::new();
    rt.block_on(async {
        let data = tempfile::tempdir().unwrap();
        // The stalled stream may take minutes in all: longer than the default
        // 120 s bound on one generation.
        let env = [
            ("MODELPOOL_SLOTS", "4"),
            ("MODELPOOL_ACQUIRE_TIMEOUT_MS", "600000"),
            ("MODELPOOL_MAX_GENERATION_MS", "600000"),
        ];
        let srv = server::start(1, N_CTX, data.path(), &env);
        let base = srv.1.clone();
        let addr = base.trim_start_matches("http://").to_string();
        let pid = srv.0.id();
        println!("A reader that stops: 3 clients × 4 requests of 128 tokens, streaming, 1 instance with 4 slots");
        // Warm-up, then the three clients alone.
        client::throughput(&base, 3, 1).await;
        let alone = client::throughput(&base, 3, 4).await;
        // The same three beside a fourth that reads its long answer.
        let reader = {
            let base = base.clone();
            actix::spawn(async move {
                let body = long_request(LONG_PROMPT, LONG_TOKENS);
                let res = client::client().post(format!("{base}/v1/completions")).json(&body).send().await;
                if let Ok(res) = res {
                    use futures::StreamExt;
                    let mut body = res.bytes_stream();
                    while body.next().await.is_some() {}
                }
            })
        };
        let reading = client::throughput(&base, 3, 4).await;
        reader.abort();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_before = rss_mib(pid);
        // The same three beside a stream nobody reads.
        let (mut stalled, first_bytes) = stalled_stream(&addr, LONG_TOKENS).await;
        let started = Instant::now();
        let sampler = {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let peak = std::sync::Arc::new(std::sync::Mutex::new(0f64));
            let (s, p) = (stop.clone(), peak.clone());
            let handle = std::thread::spawn(move || {
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = rss_mib(pid);
                    let mut peak = p.lock().unwrap();
                    *peak = peak.max(r);
                    drop(peak);
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
            (stop, peak, handle)
        };
        let beside = client::throughput(&base, 3, 4).await;
        let paused_after = until_idle(pid, Duration::from_secs(120)).await.map(|_| started.elapsed());
        let after_pause = client::throughput(&base, 3, 4).await;
        let left = STALL.saturating_sub(started.elapsed());
        let stalled_for = STALL.max(started.elapsed());
        tokio::time::sleep(left).await;
        let rss_end = rss_mib(pid);
        sampler.0.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.2.join().unwrap();
        let peak = *sampler.1.lock().unwrap();
        // Read the stalled stream to its end.
        let read_from = Instant::now();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        // Chunks waiting in the socket buffers when reading resumes: what it
        // generated before it paused.
        let mut buffered = None;
        loop {
            match tokio::time::timeout(Duration::from_secs(300), stalled.read(&mut buf)).await {
                Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    if buffered.is_none() && read_from.elapsed() > Duration::from_millis(300) {
                        buffered = Some(String::from_utf8_lossy(&got).matches("data: {").count());
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got[got.len().saturating_sub(n + 12)..].windows(12).any(|w| w == b"data: [DONE]") {
                        break;
                    }
                }
            }
        }
        let reread = read_from.elapsed();
        // The three alone once more, so that the machine's drift over the
        // run hits both sides of the ratio alike (the mean of both).
        let again = client::throughput(&base, 3, 4).await;
        let alone = client::Throughput {
            tok_s: (alone.tok_s + again.tok_s) / 2.0,
            ttft: [(alone.ttft[0] + again.ttft[0]) / 2.0, (alone.ttft[1] + again.ttft[1]) / 2.0],
            total: [(alone.total[0] + again.total[0]) / 2.0, (alone.total[1] + again.total[1]) / 2.0],
            texts: Vec::new(),
        };
        let text = String::from_utf8_lossy(&got);
        let chunks = text.matches("data: {").count();
        let finish = text.split("\"finish_reason\":\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("none");
        println!("   {:<44} {:>9} {:>11} {:>11}", "", "tok/s", "TTFT p50", "total p50");
        println!(
            "   {:<44} {:>9.1} {:>8.0} ms {:>8.0} ms",
            "3 clients alone (first and last, mean)", alone.tok_s, alone.ttft[0], alone.total[0]
        );
        println!(
            "   {:<44} {:>9.1} {:>8.0} ms {:>8.0} ms",
            "3 clients beside a 4th that reads", reading.tok_s, reading.ttft[0], reading.total[0]
        );
        println!(
            "   {:<44} {:>9.1} {:>8.0} ms {:>8.0} ms",
            "3 clients beside a 4th stopped, still filling", beside.tok_s, beside.ttft[0], beside.total[0]
        );
        println!(
            "   {:<44} {:>9.1} {:>8.0} ms {:>8.0} ms",
            "3 clients beside a 4th stopped, paused", after_pause.tok_s, after_pause.ttft[0], after_pause.total[0]
        );
        println!(
            "   ratios: stopped and filling / beside the reading one {:.3}; stopped and paused / alone {:.3}",
            beside.tok_s / reading.tok_s,
            after_pause.tok_s / alone.tok_s,
        );
        match paused_after {
            Some(t) => println!("   the stopped stream's sequence paused {:.1} s after its client stopped reading", t.as_secs_f64()),
            None => println!("   the stopped stream's sequence did not pause within 120 s (the server stayed busy)"),
        }
        // Whether the paused sequence had to be moved out from between busy ones.
        let metrics = match client::client().get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let moves = metrics
            .lines()
            .find_map(|l| l.strip_prefix("modelpool_kv_stream_moves_total "))
            .unwrap_or("-");
        println!("   paused sequences moved out from between busy ones (modelpool_kv_stream_moves_total): {moves}");
        let stall = stalled_for.as_secs_f64();
        println!(
            "   server RSS: {rss_before:.1} MiB before the stalled stream, peak {peak:.1} MiB during its {stall:.0} s, \
             {rss_end:.1} MiB at its end ({:+.1} MiB)",
            rss_end - rss_before
        );
        println!(
            "   the stalled stream: {first_bytes} bytes read at first; read again after {stall:.0} s: {} chunks were \
             waiting (generated before it paused), {chunks} in all in {:.1} s, finish_reason {finish}",
            buffered.unwrap_or(chunks),
            reread.as_secs_f64()
        );
        srv.stop();
    });
}
