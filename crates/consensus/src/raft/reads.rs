//! Linearizable reads on the leader: ReadIndex confirmation rounds and lease reads
//! (thesis §6.4, §6.4.1).

use super::*;

impl Raft {
    pub(super) fn committed_in_term(&self) -> bool {
        self.log.term(self.commit) == Some(self.term)
    }

    /// The lease (thesis §6.4.1): followers that acknowledged a heartbeat sent at leader
    /// tick `t` will not vote for anyone else before their election timeout elapses, so no
    /// other leader can exist before `t + election_ticks`. We stop one tick short to
    /// absorb the phase difference between the leader's and the followers' ticks.
    pub(super) fn lease_valid(&self) -> bool {
        if self.bug(Bug::LeaseWithoutCheckQuorum) {
            return true;
        }
        if self.cfg.read_mode != ReadMode::Lease || !self.cfg.check_quorum {
            return false;
        }
        let (id, ticks, progress) = (self.id, self.ticks, &self.progress);
        let start = quorum::joint_value(self.conf_state(), |v| {
            if v == id {
                ticks
            } else {
                progress.get(&v).map_or(0, |p| p.hb_acked_tick)
            }
        });
        start > 0 && ticks.saturating_sub(start) < u64::from(self.e() - 1)
    }

    pub(super) fn lease_read_ok(&self) -> bool {
        (self.cfg.read_mode == ReadMode::Lease || self.bug(Bug::LeaseWithoutCheckQuorum))
            && self.committed_in_term()
            && self.lease_valid()
    }

    pub(super) fn answer_read(&mut self, from: NodeId, ctx: Vec<u8>) {
        let index = self.commit;
        if from == self.id {
            self.read_states.push(ReadState { index, ctx });
        } else {
            self.send(from, Body::ReadIndexResp { index, ctx });
        }
    }

    /// Answers every read a quorum has confirmed, once we have committed in our term.
    pub(super) fn resolve_reads(&mut self) {
        if self.role != StateRole::Leader || !self.committed_in_term() {
            return;
        }
        let (id, progress) = (self.id, &self.progress);
        let acked = quorum::joint_value(self.conf_state(), |v| {
            if v == id {
                u64::MAX
            } else {
                progress.get(&v).map_or(0, |p| p.read_seq_acked)
            }
        });
        for r in self.reads.confirm(acked) {
            self.answer_read(r.from, r.ctx);
        }
    }

    pub(super) fn leader_read(&mut self, from: NodeId, ctx: Vec<u8>) -> Result<(), ProposeError> {
        if self.lease_read_ok() {
            self.answer_read(from, ctx);
            return Ok(());
        }
        if self.reads.push(ctx, from).is_none() {
            return Err(ProposeError::Busy);
        }
        self.resolve_reads(); // A single-voter group confirms immediately.
        Ok(())
    }
}
