//! What notifications cost: `Notifier::notify` on the reconcile path (JSON
//! encoding, HMAC signing, a `try_send` per sink) per call, and delivery to
//! a local HTTP receiver (a plain `TcpListener` on 127.0.0.1 in this
//! binary): the latency of one POST end to end, one at a time, and how long
//! a full queue (256) takes to drain. No prerequisites.
//!
//! Run in release: `cargo run --release -p converge-bench --bin bench-notify`.
//! Prints numbers; asserts nothing about time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use converge::controller::notify::{Counters, Event, Notification, Notifier, Options, Secret};
use converge::driver::sink::Sink;
use converge::driver::webhook::{WebhookSink, WebhookUrl};
use converge::store::Reason;

const ENQUEUES: usize = 10_000;
const ONE_BY_ONE: usize = 500;
const CAPACITY: usize = 256;

/// Answers 204 to every request; counts the bodies it read.
fn receiver() -> anyhow::Result<(u16, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let got = Arc::new(AtomicUsize::new(0));
    let counter = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let line = line.trim_end().to_ascii_lowercase();
                if let Some(value) = line.strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if line.is_empty() {
                    break;
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                let _ = reader
                    .into_inner()
                    .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    Ok((port, got))
}

fn note(i: usize) -> Notification {
    Notification::new(
        format!("machine/m{i}"),
        Event::Failed,
        Reason::HealthCheckFailed,
        "health check `systemctl is-system-running --wait` failed: exit status 1",
        Some("3f2a9c1e".to_owned()),
    )
}

async fn wait_count(got: &AtomicUsize, n: usize) {
    while got.load(Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (port, got) = receiver()?;
    let url = WebhookUrl::parse(&format!("http://127.0.0.1:{port}/hook"))?;
    let sink: Arc<dyn Sink> = Arc::new(WebhookSink::new(url, Duration::from_secs(10)));
    let secret = Secret::from_file_content(b"0123456789abcdef0123456789abcdef\n".to_vec())?;
    let counters = Counters::default();
    let options = Options {
        capacity: CAPACITY,
        ..Options::default()
    };
    let notifier = Notifier::start(vec![sink], Some(secret), options, counters.clone());

    // One at a time: notify, wait for the receiver.
    let mut latencies = Vec::with_capacity(ONE_BY_ONE);
    for i in 0..ONE_BY_ONE {
        let before = got.load(Ordering::SeqCst);
        let started = Instant::now();
        notifier.notify(&note(i));
        wait_count(&got, before + 1).await;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];

    // A burst that fills the queue, then drains.
    let before = got.load(Ordering::SeqCst);
    let started = Instant::now();
    for i in 0..CAPACITY {
        notifier.notify(&note(i));
    }
    wait_count(&got, before + CAPACITY).await;
    let drain = started.elapsed();

    // What a reconcile pays: notify() with the queue full (so no delivery
    // competes), ENQUEUES times.
    let dropped_before = counters.dropped.get();
    let started = Instant::now();
    for i in 0..ENQUEUES {
        notifier.notify(&note(i));
    }
    let enqueue = started.elapsed();
    let dropped = counters.dropped.get() - dropped_before;
    notifier.flush(Duration::from_secs(60)).await;

    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| one notification, notify() → POST read by the receiver (p50 / p99 of {ONE_BY_ONE}) | {:.2} / {:.2} ms |",
        pct(50).as_secs_f64() * 1e3,
        pct(99).as_secs_f64() * 1e3
    );
    println!(
        "| a full queue ({CAPACITY}) drained to the receiver | {:.1} ms ({:.0} POST/s) |",
        drain.as_secs_f64() * 1e3,
        CAPACITY as f64 / drain.as_secs_f64()
    );
    println!(
        "| notify() on the reconcile path (encode, sign, try_send), {ENQUEUES} calls | {:.2} µs per call ({dropped} dropped and counted) |",
        enqueue.as_secs_f64() * 1e6 / ENQUEUES as f64
    );
    Ok(())
}
