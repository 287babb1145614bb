//! Per-tool concurrency: each tool runs at most so many calls at once, and a
//! call waits for one of its tool's slots only until a deadline, then is
//! answered `503` with `Retry-After`. Without it one slow tool's burst takes
//! every run slot of the sandbox engine and every other tool waits behind it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default calls of one tool at once: a quarter of the sandbox engine's 64
/// run slots, so a single tool can never occupy all of them.
pub const DEFAULT_CALLS_PER_TOOL: usize = 16;

/// Default time a call waits for a slot of its tool.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// The tool's slots stayed taken for the whole queue deadline.
#[derive(Debug, thiserror::Error)]
#[error(
    "{tool} already runs {limit} calls at once and none finished within {waited:?}; retry later"
)]
pub struct QueueTimeout {
    pub tool: String,
    pub limit: usize,
    pub waited: Duration,
}

impl QueueTimeout {
    pub fn reason(&self) -> &'static str {
        "QueueTimeout"
    }
}

/// The run slots of every tool, keyed by name so a reload (a new generation)
/// shares its predecessor's slots instead of doubling the limit.
pub struct Admission {
    calls_per_tool: usize,
    queue_timeout: Duration,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
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
        }
    }

    /// A run slot of `tool`, held until the permit is dropped. Waiting callers
    /// are served in arrival order.
    pub async fn admit(&self, tool: &str) -> Result<OwnedSemaphorePermit, QueueTimeout> {
        let slots = {
            let mut all = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            all.entry(tool.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.calls_per_tool)))
                .clone()
        };
        let timeout = QueueTimeout {
            tool: tool.to_string(),
            limit: self.calls_per_tool,
            waited: self.queue_timeout,
        };
        match tokio::time::timeout(self.queue_timeout, slots.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a full queue anyway.
            Ok(Err(_)) | Err(_) => Err(timeout),
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
}
