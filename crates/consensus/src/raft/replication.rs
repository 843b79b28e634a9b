//! Leader side of log replication: building appends and snapshot chunks within each
//! follower's window, handling their answers, and advancing the commit index.

use super::*;

impl Raft {
    /// Leader: advances commit to what a (joint) majority holds durably, counting only
    /// entries of the current term (thesis §3.6.2, Figure 3.7).
    pub(super) fn maybe_commit(&mut self) -> bool {
        if self.role != StateRole::Leader {
            return false;
        }
        let own = self.log.stable();
        let mci = {
            let progress = &self.progress;
            let id = self.id;
            quorum::joint_value(self.conf_state(), |v| {
                if v == id {
                    own
                } else {
                    progress.get(&v).map_or(0, |p| p.matched)
                }
            })
        };
        if mci == u64::MAX || mci <= self.commit {
            return false;
        }
        if self.log.term(mci) != Some(self.term) && !self.bug(Bug::CommitOldTerm) {
            return false;
        }
        let old = self.commit;
        self.commit_to(mci);
        // Release the uncommitted-bytes budget of this term's newly committed entries.
        for i in (old + 1).max(self.term_start_index + 1)..=self.commit {
            if let Some(e) = self.log.entry(i) {
                self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(e.data.len());
            }
        }
        self.replicate_dirty = true;
        self.after_commit_leader();
        true
    }

    pub(super) fn after_commit_leader(&mut self) {
        // Thesis §4.3: once C_old,new commits the leader moves on to C_new by itself.
        if self.conf_state().is_joint() && self.commit >= self.pending_conf_index {
            self.append_entry(
                EntryKind::ConfChange,
                ConfChange { changes: vec![] }.encode(),
            );
        }
        self.resolve_reads();
        // Thesis §4.2.2: a leader that is not part of the new configuration steps down
        // once the entry that removed it has committed.
        if !self.promotable() && self.commit >= self.pending_conf_index {
            let term = self.term;
            self.become_follower(term, NO_NODE);
        }
    }

    /// Sends one append (or starts a snapshot) to `to` if its progress allows.
    /// Returns true if something was sent.
    pub(super) fn send_append(&mut self, to: NodeId, allow_empty: bool) -> bool {
        let Some(pr) = self.progress.get(&to) else {
            return false;
        };
        if !pr.can_send() {
            return false;
        }
        let prev_index = pr.next - 1;
        let Some(prev_term) = self.log.term(prev_index) else {
            return self.start_snapshot(to);
        };
        let entries = self.log.slice(
            pr.next,
            self.log.last_index(),
            self.cfg.max_batch_entries,
            self.cfg.max_batch_bytes,
        );
        if entries.is_empty() && !allow_empty {
            return false;
        }
        let last = entries.last().map(|e| e.index);
        let commit = self.commit;
        let pr = self.progress.get_mut(&to).expect("checked above");
        pr.commit_sent = commit;
        match pr.state {
            ProgressState::Replicate => {
                if let Some(last) = last {
                    pr.next = last + 1;
                    pr.inflights.add(last, self.ticks);
                }
            }
            ProgressState::Probe => {
                pr.paused = true;
                pr.sent_tick = self.ticks;
            }
            ProgressState::Snapshot => unreachable!("can_send is false while snapshotting"),
        }
        self.send(
            to,
            Body::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            },
        );
        true
    }

    pub(super) fn start_snapshot(&mut self, to: NodeId) -> bool {
        let Some(snap) = self.snapshot.clone() else {
            return false; // Nothing to send yet; cannot happen once compaction ran.
        };
        if let Some(pr) = self.progress.get_mut(&to) {
            pr.become_snapshot(snap);
        }
        self.send_snapshot_chunk(to);
        true
    }

    pub(super) fn send_snapshot_chunk(&mut self, to: NodeId) {
        let Some(pr) = self.progress.get_mut(&to) else {
            return;
        };
        let Some(snap) = pr.snapshot.clone() else {
            return;
        };
        pr.sent_tick = self.ticks;
        let len = snap.data.len() as u64;
        let offset = pr.snapshot_offset.min(len);
        let end = (offset + self.cfg.snapshot_chunk_bytes as u64).min(len);
        let body = Body::Snapshot {
            meta: snap.meta.clone(),
            offset,
            data: snap.data[offset as usize..end as usize].to_vec(),
            done: end == len,
        };
        self.send(to, body);
    }

    /// Sends whatever each follower's window allows. Called when a `Ready` is built, so
    /// proposals made since the last one are batched into as few messages as possible.
    pub(super) fn flush_replication(&mut self) {
        if !self.replicate_dirty {
            return;
        }
        self.replicate_dirty = false;
        let commit = self.commit;
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for to in peers {
            let mut sent = false;
            // Bounded: each send either fills one inflight slot or pauses a probe.
            for _ in 0..=self.cfg.max_inflight_msgs {
                if !self.send_append(to, false) {
                    break;
                }
                sent = true;
            }
            let replicate = self
                .progress
                .get(&to)
                .is_some_and(|p| p.state == ProgressState::Replicate);
            let (idle, told) = self
                .progress
                .get(&to)
                .map_or((false, commit), |p| (p.inflights.is_empty(), p.commit_sent));
            // Only when nothing is in flight: an empty append racing ahead of in-flight
            // entries would be rejected and knock the follower back to probing. A follower
            // that was busy when the commit index moved is told once its answer arrives
            // (every answer sets `replicate_dirty`), as etcd's raft does.
            if !sent && replicate && idle && told < commit {
                // Nothing new to send, but the follower should learn the commit index.
                self.send_append(to, true);
            }
        }
    }

    pub(super) fn broadcast_heartbeat(&mut self, read_seq: u64) {
        let peers: Vec<(NodeId, u64)> = self
            .progress
            .iter()
            .map(|(&id, p)| (id, p.matched))
            .collect();
        for (to, matched) in peers {
            let commit = self.commit.min(matched);
            let sent_tick = self.ticks;
            self.send(
                to,
                Body::Heartbeat {
                    commit,
                    read_seq,
                    sent_tick,
                },
            );
        }
    }

    pub(super) fn handle_append_resp(
        &mut self,
        from: NodeId,
        index: u64,
        reject: bool,
        hint_index: u64,
        hint_term: u64,
    ) {
        let last = self.log.last_index();
        let Some(pr) = self.progress.get(&from) else {
            return;
        };
        let (state, matched, next) = (pr.state, pr.matched, pr.next);
        if index > last {
            self.drop_bad(); // Acknowledges something we never sent: invalid.
            return;
        }
        self.progress.get_mut(&from).expect("present").recent_active = true;
        if reject {
            // A rejection of something at or below the match point is a stale or
            // duplicated answer (the follower already acknowledged that prefix).
            let stale = index <= matched
                || match state {
                    ProgressState::Probe => index + 1 != next,
                    ProgressState::Replicate => false,
                    ProgressState::Snapshot => true,
                };
            if stale || index == 0 {
                return;
            }
            // Fast back-tracking (thesis §5.3 note): skip the follower's whole
            // conflicting term, or jump to its end if its log is short.
            let mut new_next = hint_index;
            if hint_term != 0 {
                let mut j = index.min(last);
                while j > self.log.snapshot_index()
                    && self.log.term(j).is_some_and(|t| t > hint_term)
                {
                    j -= 1;
                }
                if self.log.term(j) == Some(hint_term) {
                    new_next = j + 1;
                }
            }
            let new_next = new_next.clamp(matched + 1, index);
            self.progress
                .get_mut(&from)
                .expect("present")
                .become_probe(new_next);
            self.replicate_dirty = true;
            return;
        }
        let pr = self.progress.get_mut(&from).expect("present");
        if pr.maybe_update(index) {
            match pr.state {
                ProgressState::Probe => pr.become_replicate(),
                ProgressState::Replicate => pr.inflights.free_to(index),
                ProgressState::Snapshot => {
                    let next = pr.matched + 1;
                    pr.become_probe(next);
                }
            }
            self.maybe_commit();
            let caught_up = self
                .progress
                .get(&from)
                .is_some_and(|p| p.matched == self.log.last_index());
            if self.lead_transferee == from && caught_up {
                self.send(from, Body::TimeoutNow);
            }
        } else {
            match pr.state {
                ProgressState::Probe => pr.paused = false,
                ProgressState::Snapshot => {
                    let next = pr.matched + 1;
                    pr.become_probe(next);
                }
                ProgressState::Replicate => {}
            }
        }
        self.replicate_dirty = true;
    }

    pub(super) fn handle_heartbeat_resp(&mut self, from: NodeId, read_seq: u64, sent_tick: u64) {
        let last = self.log.last_index();
        let ticks = self.ticks;
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        if sent_tick <= ticks {
            pr.hb_acked_tick = pr.hb_acked_tick.max(sent_tick);
        }
        pr.read_seq_acked = pr.read_seq_acked.max(read_seq);
        let behind = pr.matched < last;
        match pr.state {
            // Probe and Snapshot retransmit only when this heartbeat was sent after our last
            // probe or chunk: on an ordered link its answer would have arrived first, so it
            // was lost. Retransmitting on every answer (reads add heartbeat rounds) would
            // multiply duplicate probes and chunk streams.
            ProgressState::Probe => {
                if pr.sent_tick < sent_tick {
                    pr.paused = false;
                    if behind {
                        self.send_append(from, true);
                    }
                }
            }
            ProgressState::Replicate => {
                // The follower answered a heartbeat sent after our oldest unacknowledged
                // append; on an ordered link that append's answer would have come first, so
                // it was probably lost. Free a slot and send an append from `next`: if the
                // follower misses entries it rejects it and we fall back to probing.
                let stalled = !matches!(pr.inflights.oldest_tick(), Some(t) if t >= sent_tick);
                if behind && stalled {
                    if pr.inflights.full() {
                        pr.inflights.free_first();
                    }
                    self.send_append(from, true);
                }
                self.replicate_dirty = true;
            }
            ProgressState::Snapshot => {
                if pr.sent_tick < sent_tick {
                    self.send_snapshot_chunk(from);
                }
            }
        }
        self.resolve_reads();
    }
}
