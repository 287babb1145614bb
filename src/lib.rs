//! toolwarden: makes the tools AI agents call safe to run in production.

pub mod api;
pub mod cli;
pub mod guards;
pub mod policy;
pub mod runner;
pub mod sandbox;
