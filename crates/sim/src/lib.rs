//! concord-sim: see ARCHITECTURE.md.
