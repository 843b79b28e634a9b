//! concord-kv: see ARCHITECTURE.md.
