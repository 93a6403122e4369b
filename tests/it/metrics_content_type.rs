//! `/metrics` on the daemon's socket answers Prometheus text with the
//! content type Prometheus expects of its text format, version included.

use super::support::{Fleet, WAIT_LIMIT};

#[test]
fn metrics_carry_prometheus_text_content_type() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let mut daemon = fleet.start_daemon(&[]);
    fleet.wait_api(&mut daemon);
    fleet.wait_ready("machine/web", WAIT_LIMIT);

    let answer = fleet.api_get("/metrics");
    let (head, body) = (answer.head, answer.body);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no content-type: {head}"));
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(body.contains("# TYPE"), "Prometheus text: {body}");
}
