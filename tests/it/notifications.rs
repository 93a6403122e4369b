//! Notifications from the real daemon: a local HTTP receiver (a plain
//! `TcpListener` on 127.0.0.1 in this test) gets a POST for the first
//! converge (Ready), for a drift and for a rollback, each signed with
//! HMAC-SHA256 of its raw body under the secret file's content; a
//! `--notify-exec` command gets the same JSON on stdin. `converge events`
//! then lists the rollback before the drift (newest first), as a table and
//! as JSON.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::support::{Fleet, WAIT_LIMIT, api_get, ready_of, repoint, wait_for};
use crate::support::Converge as _;

/// One request the receiver got: its headers (lowercased names) and body.
#[derive(Debug, Clone)]
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

/// An HTTP receiver on 127.0.0.1 that answers 204 to every POST and keeps
/// what it got; stops on drop.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
        listener.set_nonblocking(true).expect("nonblocking accept");
        let port = listener.local_addr().expect("its address").port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (got, stop) = (got.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Some(received) = serve(stream) {
                                got.lock().expect("lock").push(received);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Receiver {
            port,
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/converge?token=t0k3n", self.port)
    }

    /// Waits for a notification whose JSON matches `event` and `object`.
    fn wait(&self, event: &str, object: &str) -> Received {
        wait_for(
            &format!("a `{event}` notification about {object}"),
            WAIT_LIMIT,
            || {
                self.got
                    .lock()
                    .expect("lock")
                    .iter()
                    .find(|r| {
                        let v = r.json();
                        v["event"] == event && v["object"] == object
                    })
                    .cloned()
            },
        )
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request and answers 204.
fn serve(stream: std::net::TcpStream) -> Option<Received> {
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    assert!(
        request_line.starts_with("POST /hooks/converge?token=t0k3n HTTP/1.1"),
        "{request_line:?}"
    );
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")?
        .1
        .parse()
        .ok()?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let mut stream = reader.into_inner();
    stream
        .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .ok()?;
    Some(Received { headers, body })
}

/// Asserts that `received` carries the HMAC-SHA256 of its raw body under `secret`.
fn assert_signed(received: &Received, secret: &[u8]) {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(&received.body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        received.header("x-converge-signature-256"),
        Some(format!("sha256={expected}").as_str()),
        "signature of {}",
        String::from_utf8_lossy(&received.body)
    );
    assert_eq!(received.header("content-type"), Some("application/json"));
}

fn assert_fields(v: &Value, event: &str, reason: &str) {
    assert_eq!(v["event"], event, "{v}");
    assert_eq!(v["object"], "machine/web", "{v}");
    assert_eq!(v["reason"], reason, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(v["revision"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    assert!(
        v["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 24),
        "RFC 3339 time: {v}"
    );
}

#[test]
fn transitions_are_posted_signed_run_through_the_hook_and_listed_as_events() {
    let fleet = Fleet::new();
    let receiver = Receiver::start();
    // The trailing newline is not part of the key.
    let secret_file = fleet.path("notify-secret");
    std::fs::write(&secret_file, "s3cr3t-for-tests\n").expect("write the secret");
    let hook_out = fleet.path("hook.jsonl");
    let hook = format!(
        "cat >> '{}'; echo >> '{}'",
        hook_out.display(),
        hook_out.display()
    );

    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    fleet.reconcile_once(&[]).assert_code(0);
    let v1 = fleet.assert_current_complete("web");
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2"], ""));

    let url = receiver.url();
    let mut daemon = fleet.start_daemon(&[
        "--notify",
        &url,
        "--notify-secret-file",
        secret_file.to_str().expect("utf-8"),
        "--notify-exec",
        &hook,
    ]);
    fleet.wait_api(&mut daemon);
    let ready = receiver.wait("ready", "machine/web");
    assert_signed(&ready, b"s3cr3t-for-tests");
    assert_fields(&ready.json(), "ready", "Converged");
    let v2 = fleet.assert_current_complete("web");
    assert_ne!(v1, v2);

    // Drift: `current` moved by hand, seen at the next reconcile.
    repoint(&fleet.machine_dir("web"), &v1);
    let state = fleet.state();
    fleet
        .converge(&[
            "reconcile",
            "machine/web",
            "--state",
            state.to_str().expect("utf-8"),
        ])
        .assert_code(0);
    let drift = receiver.wait("driftDetected", "machine/web");
    assert_signed(&drift, b"s3cr3t-for-tests");
    assert_fields(&drift.json(), "driftDetected", "DriftDetected");

    // A generation whose activation fails is rolled back.
    fleet.write(
        "web.yaml",
        &fleet.machine("web", &[], &["v3", "activate-exit=1"], ""),
    );
    let rolled = receiver.wait("rolledBack", "machine/web");
    assert_signed(&rolled, b"s3cr3t-for-tests");
    assert_fields(&rolled.json(), "rolledBack", "RolledBack");
    let (is_ready, reason) = ready_of(&fleet.status("machine/web"));
    assert!(!is_ready);
    assert_eq!(reason, "RolledBack");

    // The hook got the same documents on stdin.
    let hooked: Vec<Value> = wait_for("the hook to run for the rollback", WAIT_LIMIT, || {
        let lines: Vec<Value> = std::fs::read_to_string(&hook_out)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).expect("one JSON document per line"))
            .collect();
        lines
            .iter()
            .any(|v| v["event"] == "rolledBack")
            .then_some(lines)
    });
    assert_eq!(
        hooked[0],
        ready.json(),
        "the hook gets the body the POST had"
    );
    assert!(hooked.iter().any(|v| v["event"] == "driftDetected"));

    // Events, newest first: the rollback, then the drift.
    let run = fleet.converge(&[
        "events",
        "--state",
        state.to_str().expect("utf-8"),
        "--output",
        "json",
    ]);
    run.assert_code(0);
    let events = run.json();
    let reasons: Vec<&str> = events
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or(""))
        .collect();
    let rollback = reasons.iter().position(|r| *r == "RolledBack");
    let drifted = reasons.iter().position(|r| *r == "DriftDetected");
    assert!(
        matches!((rollback, drifted), (Some(r), Some(d)) if r < d),
        "the rollback, then the drift, newest first: {reasons:?}"
    );
    let seqs: Vec<u64> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seqs:?}"
    );
    let table = fleet.converge(&["events", "--state", state.to_str().expect("utf-8")]);
    table.assert_code(0);
    assert!(table.stdout.starts_with("TIME"), "{}", table.stdout);
    assert!(table.stdout.contains("RolledBack"), "{}", table.stdout);

    // Nothing was dropped or given up on, and the metrics say so.
    let metrics = api_get(&state.join("converge.sock"), "/metrics").body;
    assert!(
        metrics.contains("converge_notifications_dropped_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("converge_notifications_failed_total 0"),
        "{metrics}"
    );

    // No log line carries the secret.
    daemon.assert_running();
    drop(daemon);
    for entry in std::fs::read_dir(fleet.path("logs")).expect("the logs") {
        let log = entry.expect("a log").path();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !text.contains("s3cr3t"),
            "the secret is in {}",
            log.display()
        );
        assert!(
            !text.contains("t0k3n"),
            "the URL's query is in {}",
            log.display()
        );
    }
}

#[test]
fn bad_notify_arguments_stop_the_start_with_what_to_do() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let dir = fleet.dir();
    let state = fleet.state();
    let base = [
        "run",
        "--dir",
        dir.to_str().expect("utf-8"),
        "--state",
        state.to_str().expect("utf-8"),
    ];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        fleet.converge(&args)
    };
    let https = with(&["--notify", "https://ntfy.example/topic"]);
    https.assert_code(1);
    assert!(https.stderr.contains("--notify-exec"), "{}", https.stderr);
    assert!(https.stderr.contains("curl"), "{}", https.stderr);

    let unsigned = with(&["--notify", "http://127.0.0.1:9/"]);
    unsigned.assert_code(1);
    assert!(
        unsigned.stderr.contains("--notify-secret-file"),
        "{}",
        unsigned.stderr
    );

    let missing = fleet.path("no-such-secret");
    let run = with(&[
        "--notify",
        "http://127.0.0.1:9/",
        "--notify-secret-file",
        missing.to_str().expect("utf-8"),
    ]);
    run.assert_code(1);
    assert!(run.stderr.contains("no-such-secret"), "{}", run.stderr);

    let empty = fleet.path("empty-secret");
    std::fs::write(&empty, "\n").expect("write");
    let run = with(&[
        "--notify",
        "http://127.0.0.1:9/",
        "--notify-secret-file",
        empty.to_str().expect("utf-8"),
    ]);
    run.assert_code(1);
    assert!(run.stderr.contains("empty"), "{}", run.stderr);

    let help = fleet.converge(&["run", "--help"]);
    help.assert_code(0);
    assert!(
        help.stdout.contains("--notify-secret-file"),
        "{}",
        help.stdout
    );
}
