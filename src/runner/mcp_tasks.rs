//! The tasks extension (`io.modelcontextprotocol/tasks`, 2026-07-28 era): a
//! `tools/call` from a client that declares the extension in its request's
//! capabilities, still running after [`TASK_AFTER`], is answered with a task
//! handle (`resultType: "task"`) instead of its result; the call keeps running
//! and the client polls `tasks/get` until the task holds the result. This is how
//! a call outlives a client's request timeout without a stream held open.
//!
//! The book of tasks is in memory and bounded ([`MAX_TASKS`], [`MAX_PER_CALLER`]):
//! when a caller's share is full its oldest finished task goes first, and when
//! none is finished the call is simply answered inline (the server decides, per
//! request, whether to make a task). A task is shown only to the caller who made
//! it (anyone else is told it does not exist, so ids cannot be probed), and is
//! forgotten [`TASK_TTL`] after it was created. Forgetting a task never stops its
//! call: the call runs, and is audited, to its end whether or not it is collected.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// The extension's identifier, in capabilities both ways.
pub const EXTENSION: &str = "io.modelcontextprotocol/tasks";
/// How long a call is answered inline before it becomes a task: quick calls
/// cost the client no polling, slow ones never meet its request timeout.
pub const TASK_AFTER: Duration = Duration::from_secs(2);
/// Suggested time between polls.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long a task is kept after it was created: well past the longest a call
/// may wait for a run slot and run (300 s), with time left to collect it.
pub const TASK_TTL: Duration = Duration::from_secs(15 * 60);
/// Tasks held at once: each may hold a tool's output (1 MiB by default).
pub const MAX_TASKS: usize = 1_000;
/// Tasks one caller holds at once, so one caller cannot take the whole book.
pub const MAX_PER_CALLER: usize = 100;

/// Whether the request's `_meta` capabilities declare the tasks extension.
pub fn client_declares(params: &Value) -> bool {
    params
        .pointer("/_meta/io.modelcontextprotocol~1clientCapabilities/extensions")
        .and_then(|extensions| extensions.get(EXTENSION))
        .is_some_and(Value::is_object)
}

/// Where a task stands, with the payload its status carries.
#[derive(Clone, Debug, PartialEq)]
enum State {
    Working,
    /// The call's result (a tool error included).
    Completed(Value),
    /// The JSON-RPC error the call ended with.
    Failed(Value),
    Cancelled,
}

/// A task as `tasks/get` and the task handle show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskView {
    task_id: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_message: Option<&'static str>,
    created_at: Timestamp,
    last_updated_at: Timestamp,
    ttl_ms: u64,
    poll_interval_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
}

struct Entry {
    /// Who made the task: the only caller shown it.
    owner: String,
    state: State,
    created_at: Timestamp,
    last_updated_at: Timestamp,
    /// When the task is forgotten (the runtime's clock, so tests can pause it).
    expires: Instant,
    /// Stops the call's future when the task is cancelled.
    abort: Option<AbortHandle>,
}

impl TaskView {
    pub fn task_id(&self) -> &str {
        &self.task_id
    }
}

impl Entry {
    fn view(&self, task_id: &str) -> TaskView {
        let (status, status_message, result, error) = match &self.state {
            State::Working => ("working", Some("The tool is running."), None, None),
            State::Completed(result) => ("completed", None, Some(result.clone()), None),
            State::Failed(error) => (
                "failed",
                Some("The call failed."),
                None,
                Some(error.clone()),
            ),
            State::Cancelled => ("cancelled", Some("Cancelled by the caller."), None, None),
        };
        TaskView {
            task_id: task_id.to_string(),
            status,
            status_message,
            created_at: self.created_at,
            last_updated_at: self.last_updated_at,
            ttl_ms: TASK_TTL.as_millis() as u64,
            poll_interval_ms: POLL_INTERVAL.as_millis() as u64,
            result,
            error,
        }
    }
}

#[derive(Default)]
struct Book {
    by_id: HashMap<String, Entry>,
    /// Ids oldest first, for expiry and eviction.
    order: VecDeque<String>,
}

impl Book {
    fn forget_expired(&mut self, now: Instant) {
        while let Some(oldest) = self.order.front() {
            match self.by_id.get(oldest) {
                Some(entry) if entry.expires > now => break,
                _ => {
                    let oldest = self.order.pop_front().expect("a front element");
                    self.by_id.remove(&oldest);
                }
            }
        }
    }

    /// Makes room for one more task of `owner`: `false` when it cannot.
    fn make_room(&mut self, owner: &str) -> bool {
        let held = self.by_id.values().filter(|e| e.owner == owner).count();
        if held < MAX_PER_CALLER && self.by_id.len() < MAX_TASKS {
            return true;
        }
        // Only the caller's own finished tasks give way: another caller's
        // flood must not evict results this caller has yet to collect.
        let finished = self.order.iter().position(|id| {
            self.by_id
                .get(id)
                .is_some_and(|e| e.owner == owner && e.state != State::Working)
        });
        let Some(position) = finished else {
            return false;
        };
        let id = self.order.remove(position).expect("a listed id");
        self.by_id.remove(&id);
        held - 1 < MAX_PER_CALLER && self.by_id.len() < MAX_TASKS
    }
}

/// Every task this runner holds.
#[derive(Default)]
pub struct TaskBook {
    book: Mutex<Book>,
}

impl TaskBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a working task for `owner`: its handle, or `None` when the book has no room.
    pub fn open(&self, owner: &str) -> Option<TaskView> {
        let mut book = self.lock();
        book.forget_expired(Instant::now());
        if !book.make_room(owner) {
            return None;
        }
        // 122 random bits: unguessable, as the extension requires of ids that
        // stand for a caller's stored results.
        let task_id = uuid::Uuid::new_v4().to_string();
        let now = Timestamp::now();
        let entry = Entry {
            owner: owner.to_string(),
            state: State::Working,
            created_at: now,
            last_updated_at: now,
            expires: Instant::now() + TASK_TTL,
            abort: None,
        };
        let view = entry.view(&task_id);
        book.order.push_back(task_id.clone());
        book.by_id.insert(task_id, entry);
        Some(view)
    }

    /// Ties the running call to its task, for `tasks/cancel` (a call that
    /// already ended has nothing left to stop).
    pub fn attach(&self, task_id: &str, abort: AbortHandle) {
        if let Some(entry) = self.lock().by_id.get_mut(task_id)
            && entry.state == State::Working
        {
            entry.abort = Some(abort);
        }
    }

    /// Records how the call ended: its result, or its JSON-RPC error. A task
    /// cancelled or forgotten meanwhile stays as it is.
    pub fn finish(&self, task_id: &str, outcome: Result<Value, Value>) {
        let mut book = self.lock();
        let Some(entry) = book.by_id.get_mut(task_id) else {
            return;
        };
        if entry.state == State::Working {
            entry.state = match outcome {
                Ok(result) => State::Completed(result),
                Err(error) => State::Failed(error),
            };
            entry.last_updated_at = Timestamp::now();
            entry.abort = None;
        }
    }

    /// The task `task_id`, when `owner` made it and it is not forgotten.
    pub fn get(&self, task_id: &str, owner: &str) -> Option<TaskView> {
        let mut book = self.lock();
        book.forget_expired(Instant::now());
        book.by_id
            .get(task_id)
            .filter(|e| e.owner == owner)
            .map(|e| e.view(task_id))
    }

    /// Cancels the task `task_id` of `owner`: a working task stops its call
    /// (whose run, once started, still ends and is audited, as `abandoned`); a
    /// finished one keeps its outcome. `false` when there is no such task.
    pub fn cancel(&self, task_id: &str, owner: &str) -> bool {
        let mut book = self.lock();
        book.forget_expired(Instant::now());
        let Some(entry) = book.by_id.get_mut(task_id).filter(|e| e.owner == owner) else {
            return false;
        };
        if entry.state == State::Working {
            entry.state = State::Cancelled;
            entry.last_updated_at = Timestamp::now();
            if let Some(abort) = entry.abort.take() {
                abort.abort();
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn id(view: &TaskView) -> &str {
        &view.task_id
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_caller_who_made_a_task_sees_or_cancels_it() {
        let book = TaskBook::default();
        let task = book.open("token:alice").unwrap();
        assert_eq!(task.status, "working");
        assert_eq!(book.get(id(&task), "token:alice"), Some(task.clone()));
        // Another caller, the same name from another authenticator, a made-up id.
        for owner in ["token:mallory", "jwt:alice"] {
            assert_eq!(book.get(id(&task), owner), None);
            assert!(!book.cancel(id(&task), owner));
        }
        assert_eq!(
            book.get("786512e2-9e0d-44bd-8f29-789f320fe840", "token:alice"),
            None
        );
        assert_eq!(
            book.get(id(&task), "token:alice").unwrap().status,
            "working"
        );

        book.finish(id(&task), Ok(json!({"isError": false})));
        let done = book.get(id(&task), "token:alice").unwrap();
        assert_eq!(done.status, "completed");
        assert_eq!(done.result, Some(json!({"isError": false})));
        // Cancelling a finished task keeps its outcome.
        assert!(book.cancel(id(&task), "token:alice"));
        assert_eq!(
            book.get(id(&task), "token:alice").unwrap().status,
            "completed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_task_stops_its_call_and_ignores_its_late_outcome() {
        let book = TaskBook::default();
        let task = book.open("token:alice").unwrap();
        let call = tokio::spawn(std::future::pending::<()>());
        book.attach(id(&task), call.abort_handle());
        assert!(book.cancel(id(&task), "token:alice"));
        assert!(call.await.unwrap_err().is_cancelled());
        book.finish(id(&task), Err(json!({"code": -32603})));
        let view = book.get(id(&task), "token:alice").unwrap();
        assert_eq!((view.status, view.error), ("cancelled", None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_is_forgotten_after_its_ttl() {
        let book = TaskBook::default();
        let task = book.open("token:alice").unwrap();
        assert_eq!(task.ttl_ms, TASK_TTL.as_millis() as u64);
        tokio::time::advance(TASK_TTL - Duration::from_millis(1)).await;
        assert!(book.get(id(&task), "token:alice").is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(book.get(id(&task), "token:alice"), None);
        assert!(!book.cancel(id(&task), "token:alice"));
        // Its call ending later finds nothing to write to.
        book.finish(id(&task), Ok(json!({})));
        assert_eq!(book.lock().by_id.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_flooding_the_book_evicts_only_its_own_finished_tasks() {
        let book = TaskBook::default();
        let alices = book.open("token:alice").unwrap();
        book.finish(id(&alices), Ok(json!({"mine": true})));
        // Mallory fills her share with working tasks: the next one is not a task.
        let mut mallorys = Vec::new();
        for _ in 0..MAX_PER_CALLER {
            mallorys.push(book.open("token:mallory").unwrap());
        }
        assert_eq!(book.open("token:mallory"), None);
        // Once one finished, her oldest finished task gives way to her new one.
        book.finish(id(&mallorys[5]), Ok(json!({})));
        let newest = book.open("token:mallory").unwrap();
        assert_eq!(book.get(id(&mallorys[5]), "token:mallory"), None);
        assert!(book.get(id(&newest), "token:mallory").is_some());
        // Alice's uncollected result survived the flood.
        assert!(book.get(id(&alices), "token:alice").is_some());

        // The whole book full of others' working tasks: no task, Alice's kept.
        let held = book.lock().by_id.len();
        for n in 0..MAX_TASKS - held {
            book.open(&format!("token:caller-{}", n / MAX_PER_CALLER))
                .unwrap();
        }
        assert_eq!(book.lock().by_id.len(), MAX_TASKS);
        assert_eq!(book.open("token:bob"), None);
        assert!(book.get(id(&alices), "token:alice").is_some());
        // Alice's own finished task makes room for her next one.
        assert!(book.open("token:alice").is_some());
        assert_eq!(book.get(id(&alices), "token:alice"), None);
    }

    #[test]
    fn only_a_declared_extension_counts() {
        let caps = |c: Value| json!({"_meta": {"io.modelcontextprotocol/clientCapabilities": c}});
        assert!(client_declares(&caps(
            json!({"extensions": {EXTENSION: {}}})
        )));
        assert!(!client_declares(&caps(
            json!({"extensions": {EXTENSION: true}})
        )));
        assert!(!client_declares(&caps(json!({"extensions": {}}))));
        assert!(!client_declares(&caps(json!({EXTENSION: {}}))));
        assert!(!client_declares(&json!({"extensions": {EXTENSION: {}}})));
    }
}
