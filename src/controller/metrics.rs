//! The controller's Prometheus metrics: reconciles by outcome, errors by reason, duration.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `applied`, `refused` (invalid spec, missing reference: waits for a change) or `error`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The phase error's stable reason, e.g. `ApplyFailed`, `InvalidName`.
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<OutcomeLabel, Counter>,
    errors: Family<ReasonLabel, Counter>,
    duration: Histogram,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("toolwarden_controller");
        let reconciles = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "reconciles",
            "AgentTool reconciles by outcome",
            reconciles.clone(),
        );
        let errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed or refused a tool, by reason",
            errors.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Wall time of one reconcile",
            duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            leader,
        }
    }
}

impl Metrics {
    /// Records one reconcile; `reason` is set when it failed or refused the tool.
    pub fn reconciled(&self, outcome: &str, reason: Option<&str>, took: Duration) {
        self.reconciles
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
        if let Some(reason) = reason {
            self.errors
                .get_or_create(&ReasonLabel {
                    reason: reason.into(),
                })
                .inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
