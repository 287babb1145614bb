//! Prometheus metrics (prometheus-client), served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// Empty for calls to unknown tools, so callers cannot grow the label set.
    pub tool: String,
    /// `ok` or the problem type (`validation`, `rate-limited`, ...).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabel {
    pub tool: String,
}

/// Which mechanism enforces one limit of a tool's sandbox.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnforcementLabels {
    pub tool: String,
    /// `memory`, `pids`, `cpu`, `fileSize`, `tmpSize`, `devices`, `userNamespace`, `seccomp`.
    pub limit: String,
    /// `cgroup v1`, `cgroup v2`, `rlimits`, `tmpfs`, `none`, or `yes`/`no`.
    pub mechanism: String,
}

pub struct Metrics {
    registry: Registry,
    enforcement: Family<EnforcementLabels, Gauge>,
    calls: Family<CallLabels, Counter>,
    run_seconds: Family<ToolLabel, Histogram>,
    in_flight: Gauge,
    pub tools_served: Gauge,
    zombies: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("toolwarden");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("calls", "Tool calls by outcome", calls.clone());
        let run_seconds = Family::<ToolLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register(
            "tool_run_seconds",
            "Wall time of tool runs",
            run_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "calls_in_flight",
            "Calls being processed",
            in_flight.clone(),
        );
        let tools_served = Gauge::default();
        registry.register(
            "tools_served",
            "Tools currently served",
            tools_served.clone(),
        );
        let enforcement = Family::<EnforcementLabels, Gauge>::default();
        registry.register(
            "sandbox_enforcement",
            "1 for the mechanism that enforced each sandbox limit of a tool's last run",
            enforcement.clone(),
        );
        let zombies = Gauge::default();
        registry.register(
            "pid_namespace_zombies",
            "Exited processes of the runner's pid namespace nobody reaped yet (counted at each scrape)",
            zombies.clone(),
        );
        Metrics {
            registry,
            zombies,
            enforcement,
            calls,
            run_seconds,
            in_flight,
            tools_served,
        }
    }
}

impl Metrics {
    pub fn call(&self, tool: &str, outcome: &str) {
        self.calls
            .get_or_create(&CallLabels {
                tool: tool.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Records what enforced the limits of `tool`'s last run.
    pub fn enforcement(&self, tool: &str, limits: &[(&str, &str)]) {
        for (limit, mechanism) in limits {
            self.enforcement
                .get_or_create(&EnforcementLabels {
                    tool: tool.into(),
                    limit: (*limit).into(),
                    mechanism: (*mechanism).into(),
                })
                .set(1);
        }
    }

    pub fn run(&self, tool: &str, seconds: f64) {
        self.run_seconds
            .get_or_create(&ToolLabel { tool: tool.into() })
            .observe(seconds);
    }

    /// Counts a call in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        self.zombies.set(
            crate::sandbox::reaper::zombies()
                .try_into()
                .unwrap_or(i64::MAX),
        );
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
