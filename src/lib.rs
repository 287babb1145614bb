//! toolwarden: makes the tools AI agents call safe to run in production.

// Unsafe code lives in the sandbox module alone, where the system calls are.
#![deny(unsafe_code)]

pub mod api;
pub mod cli;
pub mod controller;
pub mod egress;
pub mod guards;
pub mod policy;
pub mod runner;
#[allow(unsafe_code)]
pub mod sandbox;
pub mod webhook;
