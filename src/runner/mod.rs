//! The runner: what an agent talks to. Every call passes the security
//! checklist (authenticate, rate limit, size and shape, validate, sanitize,
//! authorize, approval) before a fresh sandbox run, and every step is audited.
//!
//! Pure decisions live in their own files; `rest.rs` and `mcp.rs` are thin
//! HTTP layers over [`pipeline::Runner::invoke`].

pub mod admission;
pub mod audit;
pub mod auth;
pub mod authorize;
pub mod executor;
pub mod image_volumes;
pub mod images;
pub mod limits;
pub mod listener;
pub mod mcp;
pub mod metrics;
pub mod pipeline;
pub mod problem;
pub mod ratelimit;
pub mod redact;
pub mod registry;
pub mod rest;
pub mod sandbox_executor;
pub mod sanitize;
pub mod validate;
pub mod volumes;
