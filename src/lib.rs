//! tend: a GitOps reconciling controller for Linux hosts.
//!
//! See ARCHITECTURE.md for the code map. `core` is pure; everything else is
//! the shell around it.

pub mod cli;
pub mod commands;
pub mod core;
pub mod settings;
pub mod source;
pub mod store;
pub mod transport;
