//! Prometheus metrics (prometheus-client), served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::sandbox::Enforcement;

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

/// A resource alert of a tool's call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub tool: String,
    /// `duration` or `memory`.
    pub kind: String,
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

/// One protection a served tool runs without.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DegradedLabels {
    pub tool: String,
    /// `userNamespace`, `cgroups` or `sandbox`.
    pub missing: String,
}

pub struct Metrics {
    registry: Registry,
    enforcement: Family<EnforcementLabels, Gauge>,
    degraded: Family<DegradedLabels, Gauge>,
    calls: Family<CallLabels, Counter>,
    run_seconds: Family<ToolLabel, Histogram>,
    alerts: Family<AlertLabels, Counter>,
    in_flight: Gauge,
    pub tools_served: Gauge,
    pub audit_healthy: Gauge,
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
        let alerts = Family::<AlertLabels, Counter>::default();
        registry.register(
            "alerts",
            "Calls that ran longer or peaked higher in memory than their tool's spec.alerts",
            alerts.clone(),
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
        let audit_healthy = Gauge::default();
        registry.register(
            "audit_healthy",
            "1 while audit records can be written; 0 while calls are refused for a failed audit log",
            audit_healthy.clone(),
        );
        let enforcement = Family::<EnforcementLabels, Gauge>::default();
        registry.register(
            "sandbox_enforcement",
            "1 for the mechanism that enforced each sandbox limit of a tool's last run",
            enforcement.clone(),
        );
        let degraded = Family::<DegradedLabels, Gauge>::default();
        registry.register(
            "sandbox_degraded",
            "1 for each protection a served tool runs without (allowed by allowDegraded or --allow-degraded)",
            degraded.clone(),
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
            degraded,
            calls,
            run_seconds,
            alerts,
            in_flight,
            tools_served,
            audit_healthy,
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
    pub fn enforcement(&self, tool: &str, enforced: &Enforcement) {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let limits = [
            ("memory", enforced.memory.as_str()),
            ("pids", enforced.pids.as_str()),
            ("cpu", enforced.cpu.as_str()),
            ("fileSize", enforced.file_size.as_str()),
            ("tmpSize", enforced.tmp_size.as_str()),
            ("devices", enforced.devices.as_str()),
            ("userNamespace", yes_no(enforced.user_namespace)),
            ("seccomp", yes_no(enforced.seccomp)),
        ];
        for (limit, mechanism) in limits {
            self.enforcement
                .get_or_create(&EnforcementLabels {
                    tool: tool.into(),
                    limit: limit.into(),
                    mechanism: mechanism.into(),
                })
                .set(1);
        }
    }

    /// Replaces the degraded-isolation series with `(tool, missing protection)` pairs.
    pub fn set_degraded<'a>(&self, missing: impl IntoIterator<Item = (&'a str, &'a str)>) {
        self.degraded.clear();
        for (tool, what) in missing {
            self.degraded
                .get_or_create(&DegradedLabels {
                    tool: tool.into(),
                    missing: what.into(),
                })
                .set(1);
        }
    }

    pub fn run(&self, tool: &str, seconds: f64) {
        self.run_seconds
            .get_or_create(&ToolLabel { tool: tool.into() })
            .observe(seconds);
    }

    pub fn alert(&self, tool: &str, kind: &str) {
        self.alerts
            .get_or_create(&AlertLabels {
                tool: tool.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// Counts a call in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// The OpenMetrics text format.
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

    /// The Prometheus text format 0.0.4, for scrapers and parsers that do not ask for
    /// OpenMetrics.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode())
    }
}

/// `Content-Type` of [`Metrics::encode`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of [`Metrics::encode_prometheus`].
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4. Hand-written:
/// prometheus-client encodes only OpenMetrics, and the formats differ in a few lines a
/// classic parser trips on. A counter family is named without `_total` in OpenMetrics
/// (`# TYPE toolwarden_calls counter` over `toolwarden_calls_total` samples), so a classic
/// parser sees a family with no samples and an untyped `_total`; Prometheus text names it
/// by its samples. `# UNIT` and `# EOF` do not exist there, `unknown` is `untyped`, and
/// `info` families are gauges named `_info`. Samples pass through unchanged (no
/// exemplars or `_created` samples are produced here).
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    let mut infos = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            match rest.split_once(' ') {
                Some((name, "counter")) => counters.insert(name),
                Some((name, "info")) => infos.insert(name),
                _ => false,
            };
        }
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# TYPE ", "# HELP "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            let (name, tail) = if counters.contains(name) {
                (format!("{name}_total"), tail.to_string())
            } else if infos.contains(name) {
                let tail = if *prefix == "# TYPE " { "gauge" } else { tail };
                (format!("{name}_info"), tail.to_string())
            } else if *prefix == "# TYPE " && tail == "unknown" {
                (name.to_string(), "untyped".to_string())
            } else {
                return None;
            };
            Some(format!("{prefix}{name} {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod prometheus_text_tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_samples_and_openmetrics_only_lines_go() {
        let metrics = Metrics::default();
        metrics.call("echo", "ok");
        metrics.run("echo", 0.01);
        let open = metrics.encode();
        assert!(open.contains("# TYPE toolwarden_calls counter\n"), "{open}");
        assert!(open.ends_with("# EOF\n"), "{open}");
        let text = metrics.encode_prometheus();
        assert!(
            text.contains("# TYPE toolwarden_calls_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP toolwarden_calls_total "), "{text}");
        assert!(
            text.contains("toolwarden_calls_total{tool=\"echo\",outcome=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        // Every sample belongs to the family a TYPE line named just before it.
        let mut family = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap();
            } else if !line.starts_with('#') {
                let sample = line.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| sample.strip_suffix(s))
                    .unwrap_or(sample);
                assert!(sample == family || base == family, "{line} under {family}");
            }
        }
    }

    #[test]
    fn info_and_unknown_families_get_their_classic_types() {
        let open = "# HELP build Build.\n# TYPE build info\nbuild_info{v=\"1\"} 1\n\
                    # TYPE odd unknown\nodd 2\n# UNIT x_seconds seconds\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(open),
            "# HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{v=\"1\"} 1\n\
             # TYPE odd untyped\nodd 2\n"
        );
    }
}
