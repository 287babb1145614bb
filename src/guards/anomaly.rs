//! Per-caller anomaly scoring. Each caller's baseline is learned from its own
//! calls (hour of day, call rate, input size, tools, source addresses, error
//! rate); a call scores in [0, 1] with the factors that contributed. The
//! baselines persist in a JSON file (written atomically) so they survive
//! restarts. Time comes from a [`Clock`] so tests control it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use serde::{Deserialize, Serialize};

use crate::api::AnomalySpec;

/// Source of the current time, in Unix seconds.
pub trait Clock: Send + Sync {
    fn now_unix(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        jiff::Timestamp::now().as_second()
    }
}

/// A clock that stands still until it is set, for tests: days, hours and
/// minutes after 2026-01-01T00:00:00Z.
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn at(day: i64, hour: i64, minute: i64) -> Arc<ManualClock> {
        let clock = Arc::new(ManualClock(AtomicI64::new(0)));
        clock.set(day, hour, minute);
        clock
    }

    pub fn set(&self, day: i64, hour: i64, minute: i64) {
        const BASE: i64 = 1_767_225_600;
        self.0.store(
            BASE + day * 86_400 + hour * 3_600 + minute * 60,
            Ordering::SeqCst,
        );
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AnomalyError {
    #[error("cannot read anomaly baselines {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("anomaly baselines {path} are not valid: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write anomaly baselines {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AnomalyError {
    pub fn reason(&self) -> &'static str {
        match self {
            AnomalyError::Read { .. } => "AnomalyBaselinesUnreadable",
            AnomalyError::Corrupt { .. } => "AnomalyBaselinesCorrupt",
            AnomalyError::Write { .. } => "AnomalyBaselinesUnwritable",
        }
    }
}

/// What is known about one call before it runs.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    pub tool: &'a str,
    pub input_bytes: usize,
    pub source: Option<IpAddr>,
}

/// What the score means for the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Decision {
    Allow,
    /// Runs, and is recorded as flagged.
    Flag,
    /// Refused as suspicious.
    Refuse,
}

/// One factor's contribution, each in [0, 1].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Factor {
    pub name: &'static str,
    pub value: f64,
}

/// The score of one call and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Assessment {
    pub score: f64,
    /// Factors above zero, largest first.
    pub factors: Vec<Factor>,
    pub decision: Decision,
    /// The caller is still in its cold-start period: nothing is refused.
    pub cold_start: bool,
}

/// How strongly each factor alone moves the score (combined as a noisy-or, so
/// one unusual property flags at most, and it takes several to refuse).
const WEIGHTS: [(&str, f64); 6] = [
    ("hourOfDay", 0.45),
    ("sourceAddress", 0.45),
    ("tool", 0.35),
    ("inputSize", 0.35),
    ("callRate", 0.5),
    ("errorRate", 0.3),
];
/// Most distinct tools and source addresses remembered per caller.
const MAX_DISTINCT: usize = 64;
/// Most callers remembered; the least recently seen is forgotten first.
const MAX_CALLERS: usize = 10_000;
/// Calls of the last minute remembered (beyond it the rate factor is 1 anyway).
const MAX_RECENT_CALLS: usize = 1_000;
/// Outcomes kept for the recent error rate.
const RECENT_OUTCOMES: usize = 20;

/// One caller's learned behaviour.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Baseline {
    calls: u64,
    hours: [u64; 24],
    /// Welford mean and sum of squares of ln(input bytes + 1).
    size_mean: f64,
    size_m2: f64,
    tools: BTreeMap<String, u64>,
    sources: BTreeMap<String, u64>,
    /// Calls per active minute, smoothed over minutes (not calls, so a burst
    /// does not become the norm while it happens).
    rate: f64,
    /// Start and count of the minute being counted.
    minute_start: i64,
    minute_calls: u64,
    /// Times of the calls of the last minute.
    recent_calls: VecDeque<i64>,
    errors: u64,
    outcomes: u64,
    recent_outcomes: VecDeque<bool>,
    last_seen: i64,
}

impl Baseline {
    fn calls_last_minute(&self, now: i64) -> usize {
        self.recent_calls.iter().filter(|&&t| now - t < 60).count()
    }

    fn factors(&self, now: i64, call: &Call) -> [f64; 6] {
        let n = self.calls as f64;
        if self.calls == 0 {
            return [0.0; 6];
        }
        let hour = hour_of(now);
        // Calls within an hour either side, as a share of all calls.
        let near: u64 = [23, 0, 1].iter().map(|d| self.hours[(hour + d) % 24]).sum();
        let hour_of_day = 1.0 - near as f64 / n;
        let source_address = match call.source {
            Some(ip) => f64::from(u8::from(!self.sources.contains_key(&ip.to_string()))),
            None => 0.0,
        };
        let tool = f64::from(u8::from(!self.tools.contains_key(call.tool)));
        // Standard deviation of at least 0.5 in log space (a factor of 1.6).
        let std = (self.size_m2 / n).sqrt().max(0.5);
        let z = (size_feature(call.input_bytes) - self.size_mean).abs() / std;
        let input_size = (z / 4.0).min(1.0);
        let current = (self.calls_last_minute(now) + 1) as f64;
        let call_rate =
            ((current - self.rate.max(1.0)) / (4.0 * self.rate.max(1.0))).clamp(0.0, 1.0);
        let recent_errors = self.recent_outcomes.iter().filter(|ok| !**ok).count() as f64
            / self.recent_outcomes.len().max(1) as f64;
        let usual_errors = self.errors as f64 / self.outcomes.max(1) as f64;
        let error_rate = ((recent_errors - usual_errors) * 2.0).clamp(0.0, 1.0);
        [
            hour_of_day,
            source_address,
            tool,
            input_size,
            call_rate,
            error_rate,
        ]
    }

    fn learn(&mut self, now: i64, call: &Call) {
        self.calls += 1;
        self.hours[hour_of(now)] += 1;
        let x = size_feature(call.input_bytes);
        let delta = x - self.size_mean;
        self.size_mean += delta / self.calls as f64;
        self.size_m2 += delta * (x - self.size_mean);
        bump(&mut self.tools, call.tool.to_string());
        if let Some(ip) = call.source {
            bump(&mut self.sources, ip.to_string());
        }
        if now - self.minute_start >= 60 {
            if self.minute_calls > 0 {
                let finished = self.minute_calls as f64;
                self.rate = if self.rate == 0.0 {
                    finished
                } else {
                    0.8 * self.rate + 0.2 * finished
                };
            }
            self.minute_start = now;
            self.minute_calls = 0;
        }
        self.minute_calls += 1;
        self.recent_calls.retain(|&t| now - t < 60);
        self.recent_calls.push_back(now);
        if self.recent_calls.len() > MAX_RECENT_CALLS {
            self.recent_calls.pop_front();
        }
        self.last_seen = now;
    }
}

/// Counts `key`, forgetting the rarest entry when the map is full.
fn bump(map: &mut BTreeMap<String, u64>, key: String) {
    if !map.contains_key(&key)
        && map.len() >= MAX_DISTINCT
        && let Some(rarest) = map.iter().min_by_key(|(_, n)| **n).map(|(k, _)| k.clone())
    {
        map.remove(&rarest);
    }
    *map.entry(key).or_default() += 1;
}

fn hour_of(unix: i64) -> usize {
    (unix.rem_euclid(86_400) / 3_600) as usize
}

fn size_feature(bytes: usize) -> f64 {
    (bytes as f64 + 1.0).ln()
}

/// Baselines of every caller, optionally backed by a file.
pub struct AnomalyDetector {
    baselines: HashMap<String, Baseline>,
    path: Option<PathBuf>,
    clock: Arc<dyn Clock>,
}

impl AnomalyDetector {
    /// An empty, in-memory detector.
    pub fn new(clock: Arc<dyn Clock>) -> AnomalyDetector {
        AnomalyDetector {
            baselines: HashMap::new(),
            path: None,
            clock,
        }
    }

    /// The detector saved at `path`; empty when the file does not exist yet.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<AnomalyDetector, AnomalyError> {
        let baselines = match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| AnomalyError::Corrupt {
                    path: path.into(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(source) => {
                return Err(AnomalyError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        Ok(AnomalyDetector {
            baselines,
            path: Some(path.into()),
            clock,
        })
    }

    /// Writes the baselines to the file (a temporary file renamed over it,
    /// so a crash leaves the old or the new version, never half of one).
    pub fn save(&self) -> Result<(), AnomalyError> {
        self.snapshot().write()
    }

    /// The baselines as they are now, to be written without holding the
    /// detector (writing syncs the disk).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            path: self.path.clone(),
            json: serde_json::to_vec(&self.baselines).expect("baselines always serialize"),
        }
    }

    /// Scores a call without learning from it.
    pub fn score(&self, caller: &str, call: &Call, spec: &AnomalySpec) -> Assessment {
        let now = self.clock.now_unix();
        let baseline = self.baselines.get(caller);
        let values = baseline.map_or([0.0; 6], |b| b.factors(now, call));
        let mut factors: Vec<Factor> = WEIGHTS
            .iter()
            .zip(values)
            .filter(|(_, v)| *v > 0.0)
            .map(|((name, _), value)| Factor { name, value })
            .collect();
        factors.sort_by(|a, b| b.value.total_cmp(&a.value));
        let calm: f64 = WEIGHTS
            .iter()
            .zip(values)
            .map(|((_, weight), v)| 1.0 - weight * v)
            .product();
        let score = 1.0 - calm;
        let calls = baseline.map_or(0, |b| b.calls);
        let cold_start = calls < u64::from(spec.cold_start_calls);
        let decision = if score > spec.threshold && !cold_start {
            Decision::Refuse
        } else if spec.flag_above.is_some_and(|f| score > f) || score > spec.threshold {
            Decision::Flag
        } else {
            Decision::Allow
        };
        Assessment {
            score,
            factors,
            decision,
            cold_start,
        }
    }

    /// Adds a call to the caller's baseline.
    pub fn learn(&mut self, caller: &str, call: &Call) {
        let now = self.clock.now_unix();
        if !self.baselines.contains_key(caller) && self.baselines.len() >= MAX_CALLERS {
            let oldest = self
                .baselines
                .iter()
                .min_by_key(|(_, b)| b.last_seen)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.baselines.remove(&oldest);
            }
        }
        self.baselines
            .entry(caller.to_string())
            .or_default()
            .learn(now, call);
    }

    /// Scores the call and learns from it unless it is refused (so a refused
    /// attacker cannot train its way in).
    pub fn assess(&mut self, caller: &str, call: &Call, spec: &AnomalySpec) -> Assessment {
        let assessment = self.score(caller, call, spec);
        if assessment.decision != Decision::Refuse {
            self.learn(caller, call);
        }
        assessment
    }

    /// Records whether a call the caller made succeeded.
    pub fn record_outcome(&mut self, caller: &str, ok: bool) {
        if let Some(b) = self.baselines.get_mut(caller) {
            b.outcomes += 1;
            b.errors += u64::from(!ok);
            if b.recent_outcomes.len() == RECENT_OUTCOMES {
                b.recent_outcomes.pop_front();
            }
            b.recent_outcomes.push_back(ok);
        }
    }
}

/// Baselines serialized by [`AnomalyDetector::snapshot`].
pub struct Snapshot {
    path: Option<PathBuf>,
    json: Vec<u8>,
}

impl Snapshot {
    /// Writes to the detector's file, if it has one (a temporary file renamed
    /// over it, so a crash leaves the old or the new version, never half of one).
    pub fn write(&self) -> Result<(), AnomalyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let write = |source| AnomalyError::Write {
            path: path.clone(),
            source,
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let mut file =
            tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new("."))).map_err(write)?;
        file.write_all(&self.json).map_err(write)?;
        file.as_file().sync_all().map_err(write)?;
        file.persist(path).map_err(|e| write(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
