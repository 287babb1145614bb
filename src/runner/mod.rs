//! The runner: what an agent talks to. Every call passes the security
//! checklist (authenticate, rate limit, size and shape, validate, sanitize,
//! authorize, approval) before a fresh sandbox run, and every step is audited.
//!
//! Pure decisions live in their own files; `rest.rs` and `mcp.rs` are thin
//! HTTP layers over [`pipeline::Runner::invoke`], routed by `router.rs`.
//! No two files import each other (`tests/runner_imports.rs` checks it).

pub mod admission;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod authorize;
pub mod body_limits;
pub mod executor;
#[cfg(test)]
pub mod fake;
pub mod image_volumes;
pub mod images;
pub mod kube_identity;
pub mod listener;
pub mod mcp;
pub mod mcp_tasks;
pub mod metrics;
pub mod oauth;
pub mod openapi;
pub mod pipeline;
pub mod problem;
pub mod ratelimit;
pub mod redact;
pub mod registry;
pub mod reload;
pub mod request;
pub mod rest;
pub mod router;
pub mod sandbox_executor;
pub mod sanitize;
pub mod termination;
pub mod tool;
pub mod tool_metadata;
pub mod unsandboxed;
pub mod validate;
pub mod volumes;
pub mod watch;
