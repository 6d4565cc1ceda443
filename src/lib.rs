//! tend: a GitOps reconciling controller for Linux hosts.
//!
//! See ARCHITECTURE.md for the code map. `core` is pure; everything else is
//! the shell around it.

pub mod apply;
pub mod core;
pub mod probe;
pub mod shell;
pub mod transport;
