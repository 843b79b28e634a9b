//! Multi-Paxos with a distinguished leader. Under construction.
