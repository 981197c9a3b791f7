//! How a [`Job`] is laid out in the state store: a small header and parts written only when
//! they change, so that a burst of events on a 10,000-rank job writes the header and the rank
//! chunks it touched, and a job of any size fits etcd's 1.5 MiB request limit.
//!
//! - `jobs/<id>`: the header, `{"format": 2, "job": <the job without its bulk>, "parts": …}`
//!   (state, generation, counters, failures, checkpoints: bounded);
//! - `jobparts/<id>/spec/<n>`: the spec and its files as JSON, cut in pieces of at most
//!   [`SPEC_PART_BYTES`]; written once, at submit;
//! - `jobparts/<id>/placement@<w>`: the current generation's nodes and slots;
//! - `jobparts/<id>/gen/<g>`: the node of every rank of generation `g` (for logs of older
//!   generations; the newest [`super::RANK_NODE_GENERATIONS`]);
//! - `jobparts/<id>/ranks/<k>@<w>`: ranks `k*RANK_CHUNK ..` of the current generation;
//! - `jobparts/<id>/events@<w>`: the event history ([`super::events`]), when it has events.
//!
//! The header names the parts it needs, and is committed after them, so a header never names
//! a part that is not there: [`Job::record_writes`] yields a write as parts put, header, parts
//! deleted (the loop sends these one by one and the persister may cut a batch between any two
//! of them), and the persister orders each batch the same way when it splits it over several
//! commits. Parts that change (placement, rank
//! chunks) are never rewritten in place: each write puts them under a new key carrying the
//! header's write number `w`, and deletes the old key after the header. So a header always
//! reads the parts it was written with: a crash between the commits of a split burst (etcd
//! takes at most 100 operations and 1 MiB per transaction: a burst on a job of more than
//! ~6,000 ranks is split) leaves the previous header with its previous parts, whole, plus new
//! parts that no header names, which the next load deletes. Keys without `@<w>` are parts of
//! an earlier format-2 record (read as version 0). A header written in the older one-record
//! layout (the whole job as JSON) still loads; the job is saved in this layout at its next
//! change. Parts without a header (a job removed halfway) are deleted at load.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Job, Ranks};
use crate::spec::JobSpec;

/// Prefix of job headers.
pub const HEADERS: &str = "jobs/";
/// Prefix of job parts.
pub const PARTS: &str = "jobparts/";
/// Largest piece of a job's spec and files.
pub const SPEC_PART_BYTES: usize = 512 << 10;
const FORMAT: u32 = 2;

/// What of a job the store holds already (not state: ignored by comparisons).
#[derive(Debug, Clone, Default)]
pub struct Saved {
    /// Pieces of the spec, once written.
    spec_parts: Option<usize>,
    /// The version of the placement part in the store, if one is.
    placement: Option<u64>,
    /// The placement changed since it was written.
    placement_stale: bool,
    /// Generations whose rank nodes are written.
    generations: BTreeSet<u64>,
    /// The version of each rank chunk in the store (of the current or an older generation).
    rank_chunks: Vec<u64>,
    /// The version of the event history in the store and its newest event then.
    events: Option<(u64, u64)>,
    /// The newest write number used (by a header or by any part in the store): the next
    /// write's parts carry a larger one.
    writes: u64,
}

impl PartialEq for Saved {
    fn eq(&self, _: &Saved) -> bool {
        true
    }
}

impl Saved {
    /// Generation `generation` starts (again): its placement and rank nodes must be written,
    /// even when a record of the same generation number was written before (a job that went
    /// back to PENDING at load keeps its generation).
    pub fn placement_changed(&mut self, generation: u64) {
        self.placement_stale = true;
        self.generations.remove(&generation);
    }
}

#[derive(Serialize, Deserialize)]
struct Parts {
    spec: usize,
    rank_chunks: usize,
    generations: Vec<u64>,
    /// The version of each rank chunk (empty in records written before versions: all 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rank_versions: Vec<u64>,
    /// The version of the placement part.
    #[serde(default)]
    placement: u64,
    /// This header's write number.
    #[serde(default)]
    writes: u64,
    /// The version of the event history part (absent: no events stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    events: Option<u64>,
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    format: u32,
    job: &'a Job,
    parts: Parts,
}

#[derive(Deserialize)]
struct HeaderIn {
    format: u32,
    job: Job,
    parts: Parts,
}

#[derive(Serialize, Deserialize)]
struct SpecAndFiles {
    spec: JobSpec,
    files: BTreeMap<String, Vec<u8>>,
}

/// The key of job `id`'s header.
pub fn header_key(id: &str) -> String {
    format!("{HEADERS}{id}")
}

fn part_key(id: &str, part: &str) -> String {
    format!("{PARTS}{id}/{part}")
}

/// The name of version `v` of a part that is rewritten (`name@v`; version 0 is the plain name
/// of records written before versions).
fn versioned(name: &str, v: u64) -> String {
    if v == 0 {
        name.to_owned()
    } else {
        format!("{name}@{v}")
    }
}

/// The version a part's name carries (0 without one).
fn version_of(part: &str) -> u64 {
    part.rsplit_once('@')
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// A write to the store: a value, or `None` to delete.
pub type Write = (String, Option<Vec<u8>>);

impl Job {
    /// The writes that bring the store up to date with this job: the parts that changed since
    /// the last call, then the header. Costs the size of what changed, not of the job.
    pub fn record_writes(&mut self) -> Vec<Write> {
        let id = self.id.clone();
        let mut out = Vec::new();
        if self.saved.spec_parts.is_none() {
            // Never saved in this layout (new, or loaded from the one-record layout).
            self.ranks.mark_all_dirty();
        }
        let spec_parts = match self.saved.spec_parts {
            Some(n) => n,
            None => {
                let both = SpecAndFiles {
                    spec: std::mem::take(&mut self.spec),
                    files: std::mem::take(&mut self.files),
                };
                let bytes = serde_json::to_vec(&both).expect("spec serializes");
                self.spec = both.spec;
                self.files = both.files;
                let pieces: Vec<&[u8]> = bytes.chunks(SPEC_PART_BYTES).collect();
                for (n, p) in pieces.iter().enumerate() {
                    out.push((part_key(&id, &format!("spec/{n}")), Some(p.to_vec())));
                }
                self.saved.spec_parts = Some(pieces.len());
                pieces.len()
            }
        };
        // This write's number: the parts it replaces go under new keys, the old keys are
        // deleted after the header (ordered at the end), so that the previous header and its
        // parts stay whole until this header lands.
        self.saved.writes += 1;
        let w = self.saved.writes;
        if self.saved.placement_stale || self.saved.placement.is_none() {
            let v = serde_json::to_vec(&self.placement).expect("placement serializes");
            out.push((part_key(&id, &versioned("placement", w)), Some(v)));
            if let Some(old) = self.saved.placement.replace(w) {
                out.push((part_key(&id, &versioned("placement", old)), None));
            }
            self.saved.placement_stale = false;
        }
        let gens: BTreeSet<u64> = self.rank_nodes.keys().copied().collect();
        for g in gens.difference(&self.saved.generations) {
            let v = serde_json::to_vec(&self.rank_nodes[g]).expect("nodes serialize");
            out.push((part_key(&id, &format!("gen/{g}")), Some(v)));
        }
        for g in self.saved.generations.difference(&gens) {
            out.push((part_key(&id, &format!("gen/{g}")), None));
        }
        self.saved.generations = gens;
        let chunks = self.ranks.chunks();
        let mut versions = std::mem::take(&mut self.saved.rank_chunks);
        let mut dirty: BTreeSet<usize> = self
            .ranks
            .take_dirty()
            .into_iter()
            .map(|k| k as usize)
            .filter(|&k| k < chunks)
            .collect();
        // Chunks the store does not have yet are written whether marked or not.
        dirty.extend(versions.len().min(chunks)..chunks);
        for (k, &old) in versions.iter().enumerate().skip(chunks) {
            out.push((part_key(&id, &versioned(&format!("ranks/{k}"), old)), None));
        }
        versions.truncate(chunks);
        for k in dirty {
            let v = serde_json::to_vec(self.ranks.chunk(k)).expect("ranks serialize");
            let name = format!("ranks/{k}");
            out.push((part_key(&id, &versioned(&name, w)), Some(v)));
            match versions.get_mut(k) {
                Some(old) => {
                    out.push((part_key(&id, &versioned(&name, *old)), None));
                    *old = w;
                }
                None => versions.push(w),
            }
        }
        self.saved.rank_chunks = versions;
        let newest = self.events.newest_seq();
        if newest > 0 && self.saved.events.map(|(_, n)| n) != Some(newest) {
            let v = serde_json::to_vec(&self.events).expect("events serialize");
            out.push((part_key(&id, &versioned("events", w)), Some(v)));
            if let Some((old, _)) = self.saved.events.replace((w, newest)) {
                out.push((part_key(&id, &versioned("events", old)), None));
            }
        }
        let header = self.without_bulk(|job| {
            serde_json::to_vec(&HeaderOut {
                format: FORMAT,
                job,
                parts: Parts {
                    spec: spec_parts,
                    rank_chunks: chunks,
                    generations: job.saved.generations.iter().copied().collect(),
                    rank_versions: job.saved.rank_chunks.clone(),
                    placement: job.saved.placement.unwrap_or(0),
                    writes: w,
                    events: job.saved.events.map(|(v, _)| v),
                },
            })
            .expect("job header serializes")
        });
        // Puts of parts, the header, then deletes: the persister may cut a batch anywhere in
        // this sequence (the loop sends it one write at a time while the writer drains), and
        // every prefix of it must leave a header whose parts are all in the store.
        let (mut puts, deletes): (Vec<Write>, Vec<Write>) =
            out.into_iter().partition(|(_, v)| v.is_some());
        puts.push((header_key(&id), Some(header)));
        puts.extend(deletes);
        puts
    }

    /// Every key this job has in the store (to remove it), header first.
    pub fn record_keys(&self) -> Vec<String> {
        let id = &self.id;
        let mut keys = vec![header_key(id)];
        keys.extend(
            self.saved
                .placement
                .map(|v| part_key(id, &versioned("placement", v))),
        );
        keys.extend(
            (0..self.saved.spec_parts.unwrap_or(0)).map(|n| part_key(id, &format!("spec/{n}"))),
        );
        keys.extend(
            self.saved
                .generations
                .iter()
                .map(|g| part_key(id, &format!("gen/{g}"))),
        );
        keys.extend(
            self.saved
                .events
                .map(|(v, _)| part_key(id, &versioned("events", v))),
        );
        keys.extend(
            self.saved
                .rank_chunks
                .iter()
                .enumerate()
                .map(|(k, &v)| part_key(id, &versioned(&format!("ranks/{k}"), v))),
        );
        keys
    }

    /// Runs `f` on the job with its bulk (spec, files, placement, ranks, rank nodes, events)
    /// taken out: what a header holds, and what an event's change detection compares (events
    /// are added only by transitions that change the header too).
    pub fn without_bulk<R>(&mut self, f: impl FnOnce(&mut Job) -> R) -> R {
        let spec = std::mem::take(&mut self.spec);
        let files = std::mem::take(&mut self.files);
        let placement = std::mem::take(&mut self.placement);
        let ranks = std::mem::take(&mut self.ranks);
        let rank_nodes = std::mem::take(&mut self.rank_nodes);
        let events = std::mem::take(&mut self.events);
        let r = f(self);
        self.events = events;
        self.spec = spec;
        self.files = files;
        self.placement = placement;
        self.ranks = ranks;
        self.rank_nodes = rank_nodes;
        r
    }
}

/// The jobs in `records` (headers and parts, as listed from the store).
#[derive(Debug, Default)]
pub struct Decoded {
    pub jobs: Vec<Job>,
    /// Job records that could not be read: (key, why).
    pub unreadable: Vec<(String, String)>,
    /// Parts of no job (to delete).
    pub orphans: Vec<String>,
}

/// Reassembles the jobs from their headers and parts.
pub fn decode(records: impl IntoIterator<Item = (String, Vec<u8>)>) -> Decoded {
    let mut headers = BTreeMap::new();
    let mut parts: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for (k, v) in records {
        if let Some(id) = k.strip_prefix(HEADERS) {
            headers.insert(id.to_owned(), v);
        } else if let Some(rest) = k.strip_prefix(PARTS)
            && let Some((id, part)) = rest.split_once('/')
        {
            parts
                .entry(id.to_owned())
                .or_default()
                .insert(part.to_owned(), v);
        }
    }
    let mut out = Decoded::default();
    for (id, header) in headers {
        let mine = parts.remove(&id).unwrap_or_default();
        match decode_one(&header, &mine) {
            Ok(job) if job.id == id => {
                // Parts its header does not name: written for a header that never landed,
                // or replaced by one whose deletes did not.
                let named: BTreeSet<String> = job.record_keys().into_iter().collect();
                out.orphans.extend(
                    mine.into_keys()
                        .map(|p| part_key(&id, &p))
                        .filter(|k| !named.contains(k)),
                );
                out.jobs.push(job);
            }
            Ok(job) => out.unreadable.push((
                header_key(&id),
                format!("the record names job '{}'", job.id),
            )),
            Err(e) => out.unreadable.push((header_key(&id), e)),
        }
    }
    for (id, rest) in parts {
        out.orphans
            .extend(rest.into_keys().map(|p| part_key(&id, &p)));
    }
    out
}

/// One job from its header and its parts (keys relative to `jobparts/<id>/`).
pub fn decode_one(header: &[u8], parts: &BTreeMap<String, Vec<u8>>) -> Result<Job, String> {
    let value: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("not JSON: {e}"))?;
    if value.get("format").is_none() {
        // The one-record layout: everything counts as unsaved, so its next change writes the
        // parts and a header.
        return serde_json::from_value(value).map_err(|e| e.to_string());
    }
    let h: HeaderIn = serde_json::from_value(value).map_err(|e| e.to_string())?;
    if h.format != FORMAT {
        return Err(format!(
            "record format {} (this coordinator reads {FORMAT})",
            h.format
        ));
    }
    let part = |name: String| {
        parts
            .get(&name)
            .ok_or_else(|| format!("part '{name}' is missing"))
    };
    let read = |name: String, what: &str| -> Result<&[u8], String> {
        part(name)
            .map(Vec::as_slice)
            .map_err(|e| format!("{what}: {e}"))
    };
    let mut job = h.job;
    let mut spec = Vec::new();
    for n in 0..h.parts.spec {
        spec.extend_from_slice(read(format!("spec/{n}"), "spec")?);
    }
    let both: SpecAndFiles = serde_json::from_slice(&spec).map_err(|e| format!("spec: {e}"))?;
    job.spec = both.spec;
    job.files = both.files;
    job.placement = serde_json::from_slice(read(
        versioned("placement", h.parts.placement),
        "placement",
    )?)
    .map_err(|e| format!("placement: {e}"))?;
    for g in &h.parts.generations {
        let nodes: Vec<String> = serde_json::from_slice(read(format!("gen/{g}"), "rank nodes")?)
            .map_err(|e| format!("rank nodes of generation {g}: {e}"))?;
        job.rank_nodes.insert(*g, nodes);
    }
    let versions = if h.parts.rank_versions.is_empty() {
        vec![0; h.parts.rank_chunks]
    } else if h.parts.rank_versions.len() == h.parts.rank_chunks {
        h.parts.rank_versions
    } else {
        return Err(format!(
            "the header names {} rank chunks and {} versions",
            h.parts.rank_chunks,
            h.parts.rank_versions.len()
        ));
    };
    let mut ranks = Vec::new();
    for (k, &v) in versions.iter().enumerate() {
        let chunk: Vec<super::RankRecord> =
            serde_json::from_slice(read(versioned(&format!("ranks/{k}"), v), "ranks")?)
                .map_err(|e| format!("rank chunk {k}: {e}"))?;
        ranks.extend(chunk);
    }
    if ranks.iter().enumerate().any(|(i, r)| r.rank as usize != i) {
        return Err("rank chunks out of order".into());
    }
    job.ranks = Ranks::from(ranks);
    job.ranks.take_dirty();
    if let Some(v) = h.parts.events {
        job.events = serde_json::from_slice(read(versioned("events", v), "events")?)
            .map_err(|e| format!("events: {e}"))?;
    }
    // Write numbers go on past every part in the store, named or not: a new write never
    // reuses the key of a part that a load is about to delete.
    let writes = parts
        .keys()
        .map(|p| version_of(p))
        .chain([h.parts.writes])
        .max()
        .unwrap_or(0);
    job.saved = Saved {
        spec_parts: Some(h.parts.spec),
        placement: Some(h.parts.placement),
        placement_stale: false,
        generations: h.parts.generations.into_iter().collect(),
        rank_chunks: versions,
        events: h.parts.events.map(|v| (v, job.events.newest_seq())),
        writes,
    };
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::testkit::{placement, start};
    use crate::job::{Event, EventLog, RankState, next};

    /// A job running `nodes × slots` ranks, after `generations` generations, with files of
    /// `file_bytes`.
    fn job(nodes: usize, slots: u32, generations: u64, file_bytes: usize) -> Job {
        let files = BTreeMap::from([("big.bin".to_owned(), vec![7u8; file_bytes])]);
        let spec = JobSpec {
            command: Some(vec!["true".into()]),
            max_restarts: 1000,
            ..JobSpec::default()
        };
        let mut j = Job::new("big-1".into(), spec, files, 0);
        for g in 0..generations {
            j = start(j, placement(nodes, slots), 0, 0);
            if g + 1 < generations {
                j = next(
                    j,
                    Event::WorkerExited {
                        generation: g,
                        rank: 0,
                        exit_code: Some(1),
                        signal: None,
                        log_tail: vec!["boom".into()],
                    },
                    0,
                )
                .0;
                for r in 1..nodes as u32 * slots {
                    j = next(
                        j,
                        Event::WorkerExited {
                            generation: g,
                            rank: r,
                            exit_code: None,
                            signal: Some(15),
                            log_tail: vec![],
                        },
                        0,
                    )
                    .0;
                }
                j.restart_not_before_ms = None;
            }
        }
        j
    }

    /// Applies `writes` to `store` and returns it as a listing.
    fn apply(store: &mut BTreeMap<String, Vec<u8>>, writes: Vec<Write>) {
        for (k, v) in writes {
            match v {
                Some(v) => store.insert(k, v),
                None => store.remove(&k),
            };
        }
    }

    #[test]
    fn a_job_round_trips_through_header_and_parts() {
        let mut j = job(40, 8, 3, SPEC_PART_BYTES + 1000);
        assert_eq!(j.state, crate::job::JobState::Running);
        let mut store = BTreeMap::new();
        let writes = j.record_writes();
        let keys: Vec<&str> = writes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys.last(), Some(&"jobs/big-1"), "the header comes last");
        assert!(keys.contains(&"jobparts/big-1/spec/1"), "{keys:?}");
        assert!(keys.contains(&"jobparts/big-1/ranks/1@1"), "{keys:?}");
        assert!(keys.contains(&"jobparts/big-1/gen/2"), "{keys:?}");
        for (k, v) in &writes {
            assert!(v.as_ref().unwrap().len() <= SPEC_PART_BYTES, "{k}");
        }
        apply(&mut store, writes);
        let d = decode(store.clone());
        assert!(d.unreadable.is_empty() && d.orphans.is_empty(), "{d:?}");
        assert_eq!(d.jobs.len(), 1);
        assert_eq!(d.jobs[0], j);
        assert_eq!(d.jobs[0].ranks.count(RankState::Running), 320);
        assert_eq!(d.jobs[0].record_keys().len(), store.len());
    }

    #[test]
    fn an_event_writes_the_header_and_the_chunk_it_touched() {
        let mut j = job(40, 8, 1, 100);
        let mut store = BTreeMap::new();
        apply(&mut store, j.record_writes());
        let whole: usize = store.values().map(Vec::len).sum();
        j = next(
            j,
            Event::WorkerExited {
                generation: 0,
                rank: 300,
                exit_code: Some(0),
                signal: None,
                log_tail: vec![],
            },
            0,
        )
        .0;
        let writes = j.record_writes();
        let keys: Vec<&str> = writes.iter().map(|(k, _)| k.as_str()).collect();
        // The chunk under a new key, the header, then its old key deleted: every prefix of
        // the sequence (the persister may cut a batch anywhere) leaves a whole record.
        assert_eq!(
            keys,
            [
                "jobparts/big-1/ranks/1@2",
                "jobs/big-1",
                "jobparts/big-1/ranks/1@1",
            ]
        );
        for cut in 0..=writes.len() {
            let mut partial = store.clone();
            apply(&mut partial, writes[..cut].to_vec());
            let d = decode(partial);
            assert!(d.unreadable.is_empty(), "cut after {cut}: {d:?}");
        }
        let bytes: usize = writes
            .iter()
            .map(|(_, v)| v.as_ref().map_or(0, Vec::len))
            .sum();
        assert!(bytes * 2 < whole, "{bytes} of {whole}");
        apply(&mut store, writes);
        assert_eq!(decode(store).jobs[0], j);
        // Nothing changed, nothing but the header.
        assert_eq!(j.record_writes().len(), 1);
    }

    #[test]
    fn a_smaller_generation_deletes_the_chunks_and_generations_it_no_longer_has() {
        let mut j = job(40, 8, 1, 10);
        let mut store = BTreeMap::new();
        apply(&mut store, j.record_writes());
        j = next(
            j,
            Event::WorkerExited {
                generation: 0,
                rank: 0,
                exit_code: Some(1),
                signal: None,
                log_tail: vec![],
            },
            0,
        )
        .0;
        for r in 1..320 {
            j = next(
                j,
                Event::WorkerExited {
                    generation: 0,
                    rank: r,
                    exit_code: None,
                    signal: Some(15),
                    log_tail: vec![],
                },
                0,
            )
            .0;
        }
        j.restart_not_before_ms = None;
        j = next(j, Event::Placement(Ok(placement(1, 2))), 0).0;
        for _ in 0..crate::job::RANK_NODE_GENERATIONS {
            j.rank_nodes
                .insert(j.rank_nodes.keys().last().unwrap() + 1, vec!["x".into()]);
        }
        while j.rank_nodes.len() > crate::job::RANK_NODE_GENERATIONS {
            j.rank_nodes.pop_first();
        }
        let writes = j.record_writes();
        let mut deleted: Vec<&str> = writes
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.as_str())
            .collect();
        deleted.sort_unstable();
        assert_eq!(
            deleted,
            [
                "jobparts/big-1/events@1",
                "jobparts/big-1/gen/0",
                "jobparts/big-1/placement@1",
                "jobparts/big-1/ranks/0@1",
                "jobparts/big-1/ranks/1@1"
            ]
        );
        apply(&mut store, writes);
        let back = decode(store.clone());
        assert_eq!(back.jobs[0], j);
        assert_eq!(back.jobs[0].ranks.len(), 2);
        assert_eq!(j.record_keys().len(), store.len());
    }

    #[test]
    fn a_generation_started_again_under_its_number_rewrites_its_rank_nodes() {
        let mut j = next(job(2, 2, 0, 10), Event::Placement(Ok(placement(2, 2))), 0).0;
        let mut store = BTreeMap::new();
        apply(&mut store, j.record_writes());
        // What the loader does with a STARTING job that has no port yet: back to PENDING in
        // the same generation; the next placement differs.
        j.state = crate::job::JobState::Pending;
        j.ranks.replace(Vec::new());
        j.placement.clear();
        j.saved.placement_changed(j.generation);
        let mut other = placement(1, 4);
        other[0].name = "elsewhere".into();
        j = next(j, Event::Placement(Ok(other)), 0).0;
        let writes = j.record_writes();
        assert!(
            writes.iter().any(|(k, _)| k == "jobparts/big-1/gen/0"),
            "{writes:?}"
        );
        apply(&mut store, writes);
        let back = decode(store).jobs.remove(0);
        assert_eq!(back.rank_nodes[&0], vec!["elsewhere".to_owned(); 4]);
        assert_eq!(back, j);
    }

    #[test]
    fn the_one_record_layout_loads_and_is_rewritten_whole() {
        let j = job(2, 2, 2, 10);
        // What a coordinator before this layout wrote: the whole job as one record.
        let old = serde_json::to_vec(&j).unwrap();
        let d = decode([("jobs/big-1".to_owned(), old)]);
        assert_eq!(d.jobs.len(), 1, "{d:?}");
        let mut back = d.jobs.into_iter().next().unwrap();
        assert_eq!(back, j);
        let mut store = BTreeMap::new();
        apply(&mut store, back.record_writes());
        assert!(
            store.contains_key("jobparts/big-1/ranks/0@1")
                && store.contains_key("jobparts/big-1/spec/0")
        );
        assert_eq!(decode(store).jobs[0], j);
    }

    #[test]
    fn missing_parts_and_orphans_are_named() {
        let mut j = job(2, 2, 1, 10);
        let mut store = BTreeMap::new();
        apply(&mut store, j.record_writes());
        store.insert("jobparts/gone-7/ranks/0".into(), b"[]".to_vec());
        store.remove("jobparts/big-1/ranks/0@1");
        let d = decode(store);
        assert!(d.jobs.is_empty());
        assert_eq!(d.unreadable.len(), 1);
        assert!(
            d.unreadable[0].1.contains("'ranks/0@1' is missing"),
            "{:?}",
            d.unreadable
        );
        assert_eq!(d.orphans, ["jobparts/gone-7/ranks/0"]);
    }

    /// A burst split over several commits and cut after its part puts (a crash between etcd
    /// transactions): the previous header still reads exactly its own parts, the new parts are
    /// orphans, and the next write never reuses their keys.
    #[test]
    fn a_burst_cut_after_its_parts_leaves_the_previous_header_whole() {
        let mut j = job(40, 8, 1, 100);
        let mut store = BTreeMap::new();
        apply(&mut store, j.record_writes());
        let before = decode(store.clone()).jobs.remove(0);
        for r in 0..320 {
            j = next(
                j,
                Event::WorkerExited {
                    generation: 0,
                    rank: r,
                    exit_code: Some(0),
                    signal: None,
                    log_tail: vec![],
                },
                0,
            )
            .0;
        }
        let puts: Vec<Write> = j
            .record_writes()
            .into_iter()
            .filter(|(k, v)| k.starts_with(PARTS) && v.is_some())
            .collect();
        assert_eq!(puts.len(), 3, "both rank chunks and the events changed");
        apply(&mut store, puts);
        let mut d = decode(store.clone());
        assert!(d.unreadable.is_empty(), "{d:?}");
        assert_eq!(d.jobs.len(), 1);
        assert_eq!(d.jobs[0], before);
        assert_eq!(d.jobs[0].ranks.count(RankState::Running), 320);
        d.orphans.sort_unstable();
        assert_eq!(
            d.orphans,
            [
                "jobparts/big-1/events@2",
                "jobparts/big-1/ranks/0@2",
                "jobparts/big-1/ranks/1@2"
            ]
        );
        // The next leader deletes them and writes on under newer numbers.
        let mut back = d.jobs.remove(0);
        back.ranks.mark_all_dirty();
        let writes = back.record_writes();
        assert!(
            writes.iter().all(|(k, _)| !d.orphans.contains(k)),
            "{writes:?}"
        );
        for o in &d.orphans {
            store.remove(o);
        }
        apply(&mut store, writes);
        let again = decode(store.clone());
        assert!(
            again.orphans.is_empty() && again.unreadable.is_empty(),
            "{again:?}"
        );
        assert_eq!(again.jobs[0], before);
        assert_eq!(again.jobs[0].record_keys().len(), store.len());
    }

    /// A format-2 record written before part versions (plain `placement`, `ranks/<k>`) loads,
    /// and its next write moves the parts it changes to versioned keys.
    #[test]
    fn parts_without_versions_load_and_move_on_to_versioned_keys() {
        let mut j = job(40, 8, 1, 100);
        let mut store = BTreeMap::new();
        apply(&mut store, j.record_writes());
        // Rewrite the store as the earlier format 2 had it (no versions, no events).
        j.events = EventLog::default();
        let mut old = BTreeMap::new();
        for (k, v) in store {
            let k = k.replace("@1", "");
            if k.ends_with("/events") {
                continue;
            }
            let v = if k == "jobs/big-1" {
                let mut h: serde_json::Value = serde_json::from_slice(&v).unwrap();
                let parts = h["parts"].as_object_mut().unwrap();
                for f in ["rank_versions", "placement", "writes", "events"] {
                    parts.remove(f);
                }
                serde_json::to_vec(&h).unwrap()
            } else {
                v
            };
            old.insert(k, v);
        }
        let d = decode(old.clone());
        assert!(d.unreadable.is_empty() && d.orphans.is_empty(), "{d:?}");
        let mut back = d.jobs.into_iter().next().unwrap();
        assert_eq!(back, j);
        j = next(
            back.clone(),
            Event::WorkerExited {
                generation: 0,
                rank: 3,
                exit_code: Some(0),
                signal: None,
                log_tail: vec![],
            },
            0,
        )
        .0;
        back = j;
        let writes = back.record_writes();
        let keys: Vec<&str> = writes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "jobparts/big-1/ranks/0@1",
                "jobs/big-1",
                "jobparts/big-1/ranks/0",
            ]
        );
        apply(&mut old, writes);
        let d = decode(old.clone());
        assert!(d.orphans.is_empty(), "{d:?}");
        assert_eq!(d.jobs[0], back);
    }
}
