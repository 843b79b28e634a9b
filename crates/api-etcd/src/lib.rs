//! concord-api-etcd: see ARCHITECTURE.md.
