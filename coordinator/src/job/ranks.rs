//! [`Ranks`]: a generation's rank records, with what the coordinator needs to keep the cost of
//! one event independent of the job's size: the count of ranks in each [`RankState`] (so that
//! "are all ranks done" is O(1), not a scan of 10,000 records per event), and the chunks of
//! [`RANK_CHUNK`] ranks changed since they were last saved (so that a burst of WorkerStarted
//! rewrites the chunks it touched, not the whole job).
//!
//! Every change to a rank goes through [`Ranks::get_mut`] (a guard that fixes the counts when
//! it is dropped), [`Ranks::for_each_mut`] or [`Ranks::replace`]; reads go through `Deref` to
//! the slice. The progress fields a trainer reports every second ([`Ranks::report`]) are
//! saved with the chunk's next change, not on their own.

use std::collections::{BTreeSet, HashMap};
use std::ops::{Deref, DerefMut};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{RankRecord, RankState};

/// Ranks per saved chunk (`jobparts/<id>/ranks/<k>` holds ranks `k*RANK_CHUNK ..`).
pub const RANK_CHUNK: usize = 256;

const STATES: usize = 7;

fn index(s: RankState) -> usize {
    match s {
        RankState::Starting => 0,
        RankState::Running => 1,
        RankState::Exited => 2,
        RankState::Failed => 3,
        RankState::Stopped => 4,
        RankState::Lost => 5,
        RankState::Unknown => 6,
    }
}

/// The ranks of a job's current generation, in rank order.
#[derive(Debug, Clone, Default)]
pub struct Ranks {
    list: Vec<RankRecord>,
    counts: [u32; STATES],
    /// Node → its ranks, in rank order (a rank's node is fixed for the generation).
    by_node: HashMap<String, Vec<u32>>,
    /// Chunks changed since [`Ranks::take_dirty`].
    dirty: BTreeSet<u32>,
    /// Changes made through the mutators, ever (a cheap "did this event change a rank").
    writes: u64,
}

impl PartialEq for Ranks {
    /// The records only: counts follow from them, and what was saved is not state.
    fn eq(&self, other: &Ranks) -> bool {
        self.list == other.list
    }
}

impl Serialize for Ranks {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.list.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Ranks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ranks, D::Error> {
        Vec::<RankRecord>::deserialize(d).map(Ranks::from)
    }
}

impl From<Vec<RankRecord>> for Ranks {
    /// Every chunk counts as changed (never saved in this layout).
    fn from(list: Vec<RankRecord>) -> Ranks {
        let mut r = Ranks::default();
        r.replace(list);
        r
    }
}

impl Deref for Ranks {
    type Target = [RankRecord];
    fn deref(&self) -> &[RankRecord] {
        &self.list
    }
}

/// A rank being changed; fixes the state counts when dropped.
pub struct RankMut<'a> {
    rank: &'a mut RankRecord,
    counts: &'a mut [u32; STATES],
    was: RankState,
}

impl Deref for RankMut<'_> {
    type Target = RankRecord;
    fn deref(&self) -> &RankRecord {
        self.rank
    }
}

impl DerefMut for RankMut<'_> {
    fn deref_mut(&mut self) -> &mut RankRecord {
        self.rank
    }
}

impl Drop for RankMut<'_> {
    fn drop(&mut self) {
        if self.rank.state != self.was {
            self.counts[index(self.was)] -= 1;
            self.counts[index(self.rank.state)] += 1;
        }
    }
}

impl Ranks {
    /// Rank `rank` to change (its chunk counts as changed), if the generation has it.
    pub fn get_mut(&mut self, rank: u32) -> Option<RankMut<'_>> {
        let r = self
            .list
            .get_mut(rank as usize)
            .filter(|r| r.rank == rank)?;
        self.dirty.insert(rank / RANK_CHUNK as u32);
        self.writes += 1;
        Some(RankMut {
            was: r.state,
            rank: r,
            counts: &mut self.counts,
        })
    }

    /// Changes every rank (all chunks count as changed).
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut RankRecord)) {
        self.list.iter_mut().for_each(&mut f);
        self.recount();
    }

    /// A new generation's ranks (all chunks count as changed).
    pub fn replace(&mut self, list: Vec<RankRecord>) {
        self.list = list;
        self.recount();
    }

    /// Records a trainer's progress report: not a change that is saved on its own.
    pub fn report(&mut self, rank: u32, step: u64, collective_seq: u64, now_ms: u64) {
        if let Some(r) = self.list.get_mut(rank as usize).filter(|r| r.rank == rank) {
            r.step = Some(step);
            r.collective_seq = Some(collective_seq);
            r.last_report_ms = Some(now_ms);
        }
    }

    fn recount(&mut self) {
        self.counts = [0; STATES];
        self.by_node.clear();
        for r in &self.list {
            self.counts[index(r.state)] += 1;
            self.by_node.entry(r.node.clone()).or_default().push(r.rank);
        }
        self.dirty = (0..self.chunks() as u32).collect();
        self.writes += 1;
    }

    /// The ranks placed on `node` (O(its ranks), not a scan of the job).
    pub fn on_node(&self, node: &str) -> impl Iterator<Item = &RankRecord> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .map(|&r| &self.list[r as usize])
    }

    /// Ranks in `state`.
    pub fn count(&self, state: RankState) -> usize {
        self.counts[index(state)] as usize
    }

    /// Every rank's process is gone (true for no ranks).
    pub fn all_done(&self) -> bool {
        self.count(RankState::Exited)
            + self.count(RankState::Failed)
            + self.count(RankState::Stopped)
            + self.count(RankState::Lost)
            == self.list.len()
    }

    /// Every rank is in one of `states` (true for no ranks).
    pub fn all_in(&self, states: &[RankState]) -> bool {
        states.iter().map(|&s| self.count(s)).sum::<usize>() == self.list.len()
    }

    /// How many chunks of [`RANK_CHUNK`] the ranks take.
    pub fn chunks(&self) -> usize {
        self.list.len().div_ceil(RANK_CHUNK)
    }

    /// The ranks of chunk `k`.
    pub fn chunk(&self, k: usize) -> &[RankRecord] {
        let start = (k * RANK_CHUNK).min(self.list.len());
        &self.list[start..(start + RANK_CHUNK).min(self.list.len())]
    }

    /// The chunks changed since the last call (to save them), oldest first.
    pub fn take_dirty(&mut self) -> BTreeSet<u32> {
        std::mem::take(&mut self.dirty)
    }

    /// Marks every chunk changed (after a load from the old one-record layout).
    pub fn mark_all_dirty(&mut self) {
        self.dirty = (0..self.chunks() as u32).collect();
    }

    /// Changes made so far (to tell whether an event changed a rank without comparing them).
    pub fn writes(&self) -> u64 {
        self.writes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(rank: u32, state: RankState) -> RankRecord {
        RankRecord {
            rank,
            local_rank: 0,
            node_rank: rank,
            node: format!("n{rank}"),
            slot: 0,
            state,
            pid: None,
            exit_code: None,
            signal: None,
            step: None,
            collective_seq: None,
            last_report_ms: None,
        }
    }

    /// The counts kept by the mutators equal a recount, over random changes.
    #[test]
    fn counts_follow_every_change() {
        const ALL: [RankState; 7] = [
            RankState::Starting,
            RankState::Running,
            RankState::Exited,
            RankState::Failed,
            RankState::Stopped,
            RankState::Lost,
            RankState::Unknown,
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut r = Ranks::from(
            (0..700)
                .map(|i| rec(i, RankState::Starting))
                .collect::<Vec<_>>(),
        );
        for i in 0..5_000 {
            match rnd(20) {
                0 => r.for_each_mut(|x| x.state = RankState::Unknown),
                1 => r.replace(
                    (0..rnd(600) as u32)
                        .map(|k| rec(k, ALL[k as usize % 7]))
                        .collect(),
                ),
                _ if r.is_empty() => {}
                _ => {
                    let k = rnd(r.len()) as u32;
                    r.get_mut(k).unwrap().state = ALL[rnd(7)];
                }
            }
            for s in ALL {
                let n = r.iter().filter(|x| x.state == s).count();
                assert_eq!(r.count(s), n, "after change {i}: {s:?}");
            }
            assert_eq!(
                r.all_done(),
                r.iter().all(|x| x.state.is_done()),
                "after change {i}"
            );
            let node = format!("n{}", rnd(700));
            let on: Vec<u32> = r.on_node(&node).map(|x| x.rank).collect();
            let scan: Vec<u32> = r
                .iter()
                .filter(|x| x.node == node)
                .map(|x| x.rank)
                .collect();
            assert_eq!(on, scan, "after change {i}: ranks on {node}");
        }
    }

    #[test]
    fn changed_chunks_are_the_ones_touched() {
        let mut r = Ranks::from(
            (0..1000)
                .map(|i| rec(i, RankState::Starting))
                .collect::<Vec<_>>(),
        );
        assert_eq!(r.chunks(), 4);
        assert_eq!(r.take_dirty().len(), 4, "a new generation is saved whole");
        let w = r.writes();
        r.get_mut(3).unwrap().state = RankState::Running;
        r.get_mut(600).unwrap().state = RankState::Running;
        r.report(900, 5, 5, 1);
        assert!(r.get_mut(5000).is_none());
        assert_eq!(r.take_dirty().into_iter().collect::<Vec<_>>(), [0, 2]);
        assert_eq!(r.writes(), w + 2, "a progress report is not a change");
        assert_eq!(r.chunk(3).len(), 1000 - 3 * RANK_CHUNK);
        assert_eq!(r.chunk(3)[0].rank, 768);
        assert!(r.take_dirty().is_empty());
    }

    #[test]
    fn serializes_as_the_plain_list() {
        let r = Ranks::from(vec![rec(0, RankState::Running)]);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.starts_with("[{\"rank\":0"), "{json}");
        let back: Ranks = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.count(RankState::Running), 1);
    }
}
