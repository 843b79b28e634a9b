//! concord-node: see ARCHITECTURE.md.
