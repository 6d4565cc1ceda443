//! tend: a GitOps reconciling controller for Linux hosts.
//!
//! See ARCHITECTURE.md for the code map. `core` is pure; everything else is
//! the shell around it.

// First, so that its printing macros are in scope in every module below: no
// command panics or fails on a closed pipe (see `output`).
#[macro_use]
pub mod output;

pub mod alloc;
pub mod apply;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod content_diff;
pub mod controller;
pub mod core;
pub mod dispatch;
pub mod guard;
pub mod metrics;
pub mod pass;
pub mod pending;
pub mod probe;
pub mod reconcile;
pub mod rollout;
pub mod serve;
pub mod settings;
pub mod shell;
pub mod source;
pub mod store;
pub mod tokens;
pub mod transport;
