//! Calls that wait for a human approval, as their callers can see them.
//!
//! The approval flow itself (ToolApproval objects, deciding, resuming the call)
//! is not built: a call that needs approval is answered `202` and never runs.
//! The answer's `Location` names `GET /v1/approvals/{approvalId}`, served from
//! this book: `pending` until the tool's `approval.timeoutSeconds` pass, then
//! `expired`. Only the caller who asked sees an approval (anyone else gets
//! `404`, so ids cannot be probed). The book is in memory and bounded: past
//! [`MAX_HELD`] entries the oldest goes first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

/// Approvals held at once; a flood of calls that need approval costs bounded memory.
pub const MAX_HELD: usize = 10_000;

/// A call that waits for a decision: what its caller is told, now and later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingApproval {
    pub approval_id: String,
    pub invocation_id: String,
    pub tool: String,
    pub requested_at: Timestamp,
    pub expires_at: Timestamp,
    /// `caller.sub` of who asked: the only caller shown this approval.
    #[serde(skip)]
    pub requested_by: String,
}

/// Where an approval stands. Without the approval flow nothing decides, so a
/// held approval is pending until it expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ApprovalStatus {
    Pending,
    Expired,
}

/// An approval as `GET /v1/approvals/{id}` and the `202` answer show it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalView<'a> {
    pub status: ApprovalStatus,
    #[serde(flatten)]
    pub approval: &'a PendingApproval,
    /// The status URL, also sent as `Location`.
    pub location: String,
}

impl PendingApproval {
    pub fn new(
        approval_id: String,
        invocation_id: String,
        tool: &str,
        requested_by: &str,
        timeout_seconds: u32,
        now: Timestamp,
    ) -> Self {
        let expires_at = now
            .checked_add(SignedDuration::from_secs(i64::from(timeout_seconds)))
            .unwrap_or(Timestamp::MAX);
        PendingApproval {
            approval_id,
            invocation_id,
            tool: tool.to_string(),
            requested_at: now,
            expires_at,
            requested_by: requested_by.to_string(),
        }
    }

    pub fn status(&self, now: Timestamp) -> ApprovalStatus {
        match now < self.expires_at {
            true => ApprovalStatus::Pending,
            false => ApprovalStatus::Expired,
        }
    }

    /// The path of this approval's status.
    pub fn location(&self) -> String {
        format!("/v1/approvals/{}", self.approval_id)
    }

    pub fn view(&self, now: Timestamp) -> ApprovalView<'_> {
        ApprovalView {
            status: self.status(now),
            approval: self,
            location: self.location(),
        }
    }
}

#[derive(Default)]
struct Book {
    by_id: HashMap<String, PendingApproval>,
    /// Ids oldest first, for eviction.
    order: VecDeque<String>,
}

/// Every approval this runner handed out, newest [`MAX_HELD`].
#[derive(Default)]
pub struct Approvals {
    book: Mutex<Book>,
}

impl Approvals {
    pub fn hold(&self, approval: PendingApproval) {
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        while book.order.len() >= MAX_HELD {
            if let Some(oldest) = book.order.pop_front() {
                book.by_id.remove(&oldest);
            }
        }
        book.order.push_back(approval.approval_id.clone());
        book.by_id.insert(approval.approval_id.clone(), approval);
    }

    /// The approval `id`, when `caller_sub` is who asked for it.
    pub fn lookup(&self, id: &str, caller_sub: &str) -> Option<PendingApproval> {
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.by_id
            .get(id)
            .filter(|a| a.requested_by == caller_sub)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval(n: usize, now: Timestamp) -> PendingApproval {
        PendingApproval::new(
            format!("approval-{n}"),
            n.to_string(),
            "notes",
            "alice",
            60,
            now,
        )
    }

    #[test]
    fn only_the_caller_who_asked_sees_an_approval() {
        let book = Approvals::default();
        let now = Timestamp::now();
        book.hold(approval(1, now));
        assert_eq!(book.lookup("approval-1", "alice"), Some(approval(1, now)));
        assert_eq!(book.lookup("approval-1", "mallory"), None);
        assert_eq!(book.lookup("approval-2", "alice"), None);
    }

    #[test]
    fn an_approval_expires_after_the_tools_timeout() {
        let now = Timestamp::now();
        let held = approval(1, now);
        assert_eq!(held.status(now), ApprovalStatus::Pending);
        let later = now.checked_add(SignedDuration::from_secs(59)).unwrap();
        assert_eq!(held.status(later), ApprovalStatus::Pending);
        let expired = now.checked_add(SignedDuration::from_secs(60)).unwrap();
        assert_eq!(held.status(expired), ApprovalStatus::Expired);
        let view = serde_json::to_value(held.view(expired)).unwrap();
        assert_eq!(view["status"], "expired");
        assert_eq!(view["location"], "/v1/approvals/approval-1");
        assert!(view.get("requestedBy").is_none(), "{view}");
    }

    #[test]
    fn the_book_keeps_the_newest_approvals_only() {
        let book = Approvals::default();
        let now = Timestamp::now();
        for n in 0..MAX_HELD + 2 {
            book.hold(approval(n, now));
        }
        assert_eq!(book.lookup("approval-0", "alice"), None);
        assert_eq!(book.lookup("approval-1", "alice"), None);
        assert!(book.lookup("approval-2", "alice").is_some());
        assert!(
            book.lookup(&format!("approval-{}", MAX_HELD + 1), "alice")
                .is_some()
        );
    }
}
