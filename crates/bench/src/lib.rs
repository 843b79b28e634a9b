//! concord-bench: see ARCHITECTURE.md.
