//! The daemon (`tend run`): triggers into one event enum, a per-host work
//! queue, and level-triggered passes.

pub mod schedule;
