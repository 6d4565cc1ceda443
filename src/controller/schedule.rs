//! Placeholder: the per-host work queue, debouncer and backoff live here.
