//! `reconcile --once` on a terminal (a real pseudo-terminal, from
//! util-linux's `script`) draws a line per object as it ends, with its
//! reason; with stderr not a terminal it prints no progress, only log lines
//! and the summary.

use std::process::Command;

use super::support::{Converge as _, Fleet};

const BIN: &str = env!("CARGO_BIN_EXE_converge");

fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn a_terminal_gets_a_line_per_object_and_a_pipe_gets_none() {
    let fleet = Fleet::new();
    fleet.write(
        "web.yaml",
        &fleet.machine("web", &[], &["v1", "sleep=1"], ""),
    );
    fleet.write(
        "db.yaml",
        &fleet.machine("db", &[], &["v1", "activate-exit=1"], ""),
    );
    let dir = fleet.dir();
    let state = fleet.state();
    let command = format!(
        "{} reconcile --once --attempts 1 --dir {} --state {}",
        quoted(BIN),
        quoted(dir.to_str().expect("utf-8")),
        quoted(state.to_str().expect("utf-8")),
    );
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("run script (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "db fails: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // A line that ends: `✓ KEY REASON: message` (running lines say `KEY
    // 1.2s build✓ → …` instead).
    let ended = |mark: char, key: &str| {
        let needle = format!("{mark} {key}");
        text.split(['\r', '\n'])
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no line {needle:?}:\n{text}"))
            .to_owned()
    };
    let web = ended('✓', "machine/web");
    assert!(web.contains("Converged"), "{web}");
    let db = ended('✗', "machine/db");
    assert!(db.contains("ActivationFailed"), "{db}");
    assert!(
        text.contains("build✓ → install switch activate"),
        "a running line names the steps done and sent:\n{text}"
    );
    assert!(text.contains("revision "), "the summary follows:\n{text}");

    // Not a terminal: no progress lines at all.
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2"], ""));
    let piped = fleet.reconcile_once(&["--attempts", "1"]);
    assert!(
        !piped.stderr.contains('✓') && !piped.stdout.contains('✓'),
        "{}\n{}",
        piped.stdout,
        piped.stderr
    );
}
