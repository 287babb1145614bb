//! Per-tool concurrency: each tool runs at most so many calls at once, and a
//! call waits for one of its tool's slots (and then one of the runner's) only
//! until a deadline, then is answered `503` with `Retry-After`. Without it one
//! slow tool's burst takes every run slot of the sandbox engine and every
//! other tool waits behind it with no deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::sandbox::pool::DEFAULT_MAX_RUNNING;

/// Default calls of one tool at once: a quarter of the sandbox engine's run
/// slots, so a single tool can never occupy all of them.
pub const DEFAULT_CALLS_PER_TOOL: usize = DEFAULT_MAX_RUNNING / 4;

/// Default time a call waits for a slot of its tool.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// No run slot came free within the queue deadline.
#[derive(Debug, thiserror::Error)]
#[error(
    "{tool} already runs {limit} calls at once (or the runner runs {DEFAULT_MAX_RUNNING}) \
     and none finished within {waited:?}; retry later"
)]
pub struct QueueTimeout {
    pub tool: String,
    pub limit: usize,
    pub waited: Duration,
}

/// A call's run slots (its tool's and the runner's), freed on drop.
#[derive(Debug)]
pub struct RunSlot {
    _tool: OwnedSemaphorePermit,
    _runner: OwnedSemaphorePermit,
}

impl QueueTimeout {
    pub fn reason(&self) -> &'static str {
        "QueueTimeout"
    }
}

/// The run slots of every tool, keyed by name so a reload (a new generation)
/// shares its predecessor's slots instead of doubling the limit, and the
/// runner's slots, as many as the sandbox engine runs at once, so a call that
/// gets both never waits in the engine's queue (which has no deadline).
pub struct Admission {
    calls_per_tool: usize,
    queue_timeout: Duration,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    runner: Arc<Semaphore>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new(DEFAULT_CALLS_PER_TOOL, DEFAULT_QUEUE_TIMEOUT)
    }
}

impl Admission {
    pub fn new(calls_per_tool: usize, queue_timeout: Duration) -> Admission {
        Admission {
            calls_per_tool: calls_per_tool.max(1),
            queue_timeout,
            slots: Mutex::new(HashMap::new()),
            runner: Arc::new(Semaphore::new(DEFAULT_MAX_RUNNING)),
        }
    }

    /// A run slot of `tool` and one of the runner's, held until dropped.
    /// Waiting callers are served in arrival order.
    pub async fn admit(&self, tool: &str) -> Result<RunSlot, QueueTimeout> {
        let slots = {
            let mut all = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match all.get(tool) {
                Some(slots) => slots.clone(),
                None => all
                    .entry(tool.to_string())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.calls_per_tool)))
                    .clone(),
            }
        };
        let both = async {
            let tool = slots.acquire_owned().await?;
            let runner = self.runner.clone().acquire_owned().await?;
            Ok::<_, tokio::sync::AcquireError>(RunSlot {
                _tool: tool,
                _runner: runner,
            })
        };
        match tokio::time::timeout(self.queue_timeout, both).await {
            Ok(Ok(slot)) => Ok(slot),
            // The semaphores are never closed; treat that like a full queue anyway.
            Ok(Err(_)) | Err(_) => Err(QueueTimeout {
                tool: tool.to_string(),
                limit: self.calls_per_tool,
                waited: self.queue_timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_tool_times_out_while_another_tool_is_admitted() {
        let admission = Admission::new(2, Duration::from_millis(50));
        let _a = admission.admit("slow").await.unwrap();
        let _b = admission.admit("slow").await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = admission.admit("slow").await.unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!((refused.tool.as_str(), refused.limit), ("slow", 2));
        let _other = admission.admit("other").await.unwrap();
        drop(_a);
        let _freed = admission.admit("slow").await.unwrap();
    }

    #[tokio::test]
    async fn all_tools_together_never_exceed_the_engines_run_slots() {
        let admission = Admission::new(DEFAULT_MAX_RUNNING, Duration::from_millis(50));
        let mut held = Vec::new();
        for i in 0..DEFAULT_MAX_RUNNING {
            held.push(admission.admit(&format!("tool-{}", i % 5)).await.unwrap());
        }
        // A fresh tool waits for the runner's slots only until the deadline.
        let refused = admission.admit("fresh").await.unwrap_err();
        assert_eq!(refused.tool, "fresh");
        held.pop();
        let _slot = admission.admit("fresh").await.unwrap();
    }
}
