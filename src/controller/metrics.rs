//! The controller's Prometheus metrics: recorded by the loop, rendered by the
//! local API.
//!
//! Counters and histograms are updated as reconciles finish; gauges that
//! describe the fleet (objects by condition, drifted objects) are computed
//! from the store when scraped, so they cannot drift from the records.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::Store;
use crate::store::records::ConditionKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabel {
    condition: String,
    status: String,
}

/// Every metric converge exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    durations: Family<KindLabel, Histogram>,
    failures: Family<ReasonLabel, Counter>,
    objects: Family<ConditionLabel, Gauge>,
    drifted: Gauge,
    queue: Gauge,
    source_refusals: Family<ReasonLabel, Counter>,
    /// Updated by the applier.
    pub queue_depth: Arc<AtomicUsize>,
    /// Updated by the notifier.
    pub notifications: super::notify::Counters,
}

fn duration_histogram() -> Histogram {
    Histogram::new([0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("converge");
        let durations = Family::<KindLabel, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let failures = Family::<ReasonLabel, Counter>::default();
        let objects = Family::<ConditionLabel, Gauge>::default();
        let drifted = Gauge::default();
        let queue = Gauge::default();
        let source_refusals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "source_refusals",
            "Tips of the Git source that were not applied, by cause",
            source_refusals.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciles by object kind",
            durations.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconciles by reason",
            failures.clone(),
        );
        registry.register(
            "objects",
            "Objects by condition and its status",
            objects.clone(),
        );
        registry.register(
            "drifted_objects",
            "Objects whose facts differ from what was applied",
            drifted.clone(),
        );
        registry.register(
            "queue_depth",
            "Objects pending or being reconciled",
            queue.clone(),
        );
        let notifications = super::notify::Counters::default();
        registry.register(
            "notifications_dropped",
            "Notifications dropped because a sink's queue was full",
            notifications.dropped.clone(),
        );
        registry.register(
            "notifications_failed",
            "Notifications given up on after their retries",
            notifications.failed.clone(),
        );
        Metrics {
            registry,
            notifications,
            durations,
            failures,
            objects,
            drifted,
            queue,
            source_refusals,
            queue_depth: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Records one finished reconcile.
    pub fn observe(&self, kind: &str, seconds: f64, failure_reason: Option<&str>) {
        self.durations
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .observe(seconds);
        if let Some(reason) = failure_reason {
            self.failures
                .get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                })
                .inc();
        }
    }

    /// Counts one refused tip of the Git source (`unsigned`,
    /// `unknown-signer`, `not-fast-forward`, `invalid`).
    pub fn source_refused(&self, cause: &str) {
        self.source_refusals
            .get_or_create(&ReasonLabel {
                reason: cause.to_owned(),
            })
            .inc();
    }

    /// Renders the text exposition format, refreshing fleet gauges from the store.
    pub fn render(&self, store: &Store) -> String {
        self.objects.clear();
        let mut drifted = 0;
        for (_, status) in store.statuses().unwrap_or_default() {
            for condition in &status.conditions {
                let name = match condition.kind {
                    ConditionKind::Ready => "Ready",
                    ConditionKind::Reconciling => "Reconciling",
                    ConditionKind::Stalled => "Stalled",
                    ConditionKind::Drifted => "Drifted",
                };
                if condition.kind == ConditionKind::Drifted && condition.status {
                    drifted += 1;
                }
                self.objects
                    .get_or_create(&ConditionLabel {
                        condition: name.to_owned(),
                        status: if condition.status { "True" } else { "False" }.to_owned(),
                    })
                    .inc();
            }
        }
        self.drifted.set(drifted);
        self.queue
            .set(i64::try_from(self.queue_depth.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
