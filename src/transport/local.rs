//! The `transport: local` host: runs scripts with the local `sh`.
