//! concord-storage: see ARCHITECTURE.md.
