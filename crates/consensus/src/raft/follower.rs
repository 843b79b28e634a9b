//! Follower side of log replication: accepting appends (with the back-tracking hint on
//! rejection) and assembling and installing snapshots.

use super::*;

impl Raft {
    pub(super) fn handle_append(
        &mut self,
        from: NodeId,
        mut prev_index: u64,
        mut prev_term: u64,
        mut entries: Vec<Entry>,
        leader_commit: u64,
    ) {
        // Reject malformed batches outright: indices must follow prev_index and terms may
        // not exceed the leader's term or go backwards.
        if prev_index.checked_add(entries.len() as u64 + 1).is_none() {
            self.drop_bad();
            return; // Indices this large cannot come from a real log.
        }
        let mut t = prev_term;
        for (e, expect) in entries.iter().zip(prev_index + 1..) {
            if e.index != expect || e.term < t || e.term > self.term {
                self.drop_bad();
                return;
            }
            t = e.term;
        }
        if prev_index < self.commit {
            // Everything up to our commit index already matches the leader (Leader
            // Completeness); skip that prefix.
            entries.retain(|e| e.index > self.commit);
            prev_index = self.commit;
            prev_term = self
                .log
                .term(self.commit)
                .expect("commit is in the log or snapshot");
            if let Some(first) = entries.first() {
                if first.index != prev_index + 1 || first.term < prev_term {
                    // Its terms were checked against the message's own prev_term, not
                    // against our committed entry; a real leader's never go below it.
                    self.drop_bad();
                    return;
                }
            }
        }
        match self.log.term(prev_index) {
            None => {
                let hint_index = self.log.last_index() + 1;
                self.send(from, Body::append_reject(prev_index, hint_index, 0));
                return;
            }
            Some(t) if t != prev_term => {
                let hint_index = self.log.first_index_of_term_at(prev_index);
                self.send(from, Body::append_reject(prev_index, hint_index, t));
                return;
            }
            Some(_) => {}
        }
        // Find the first entry we do not already hold.
        let mut start = entries.len();
        for (i, e) in entries.iter().enumerate() {
            match self.log.term(e.index) {
                Some(t) if t == e.term => continue,
                Some(_) => {
                    if e.index <= self.commit {
                        // A correct leader never contradicts a committed entry; ignore
                        // the message rather than lose committed data.
                        self.drop_bad();
                        return;
                    }
                    self.truncate_from(e.index);
                    start = i;
                    break;
                }
                None => {
                    start = i;
                    break;
                }
            }
        }
        let last_new = prev_index + entries.len() as u64;
        for e in entries.into_iter().skip(start) {
            self.on_appended(&e);
            self.log.append(e);
        }
        self.commit_to(leader_commit.min(last_new));
        self.send(from, Body::append_ok(last_new));
    }

    pub(super) fn handle_snapshot_chunk(
        &mut self,
        from: NodeId,
        meta: SnapshotMeta,
        offset: u64,
        data: Vec<u8>,
        done: bool,
    ) {
        if meta.index <= self.commit {
            // We already have all of it: tell the leader where we are.
            self.incoming = None;
            let index = self.commit;
            self.send(from, Body::append_ok(index));
            return;
        }
        let conf_ok = !meta.conf.voters.is_empty() && !meta.conf.all_nodes().contains(&NO_NODE);
        if meta.index == 0 || meta.term > self.term || !conf_ok {
            self.drop_bad();
            return; // Not a snapshot any leader could have produced.
        }
        let term = self.term;
        let matches = self
            .incoming
            .as_ref()
            .is_some_and(|s| s.term == term && s.meta == meta && s.data.len() as u64 == offset);
        // A chunk at offset 0 (re)starts the transfer; any other must continue it exactly.
        let in_order = matches || offset == 0;
        if offset == 0 {
            self.incoming = Some(IncomingSnapshot {
                term,
                meta: meta.clone(),
                data: Vec::new(),
            });
        }
        if in_order {
            let inc = self.incoming.as_mut().expect("set above");
            if inc.data.len() + data.len() > MAX_SNAPSHOT_BYTES {
                self.incoming = None;
                return;
            }
            inc.data.extend_from_slice(&data);
        }
        if !in_order || !done {
            // Out of order (tell the leader where we are) or more to come.
            let next_offset = self
                .incoming
                .as_ref()
                .filter(|s| s.term == term && s.meta == meta)
                .map_or(0, |s| s.data.len() as u64);
            self.send(
                from,
                Body::SnapshotResp {
                    index: meta.index,
                    next_offset,
                },
            );
            return;
        }
        let inc = self.incoming.take().expect("set above");
        self.restore(Snapshot {
            meta: inc.meta,
            data: inc.data,
        });
        let index = self.commit;
        self.send(from, Body::append_ok(index));
    }

    /// Installs a snapshot received from the leader (thesis §5.3).
    pub(super) fn restore(&mut self, snap: Snapshot) {
        let meta = &snap.meta;
        assert!(meta.index > self.commit);
        if self.log.term(meta.index) == Some(meta.term) {
            // Our log already holds the snapshot's last entry: keep the log, just commit.
            self.commit_to(meta.index);
            return;
        }
        self.log.restore(meta.index, meta.term);
        self.conf.reset(meta.conf.clone());
        self.commit = meta.index;
        self.applying = self.applying.max(meta.index);
        self.snapshot = Some(Arc::new(snap.clone()));
        self.pending_snapshot = Some(snap);
    }
}
