//! Serving a rank's log to the coordinator (`ringctl logs`, `--follow`).
//!
//! The log served is the retained rotated files, oldest first, then the current file; every
//! chunk carries its byte offset in that whole, so the reader can tell a gap from the end. A
//! data chunk is sent only against a credit from the coordinator (`LogCredit`): a slow
//! reader holds this task at its place in the file, never the agent's memory, and never the
//! heartbeats that share the stream. Files are opened without following links (see `open`).

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ringmaster_proto as pb;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::open::{self, FileId, LogFileError};
use super::rotate::rotated_name;

/// Bytes read per chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Most credits one fetch holds; grants beyond are ignored (the coordinator grants a window
/// of a few dozen chunks).
pub const MAX_CREDIT: usize = 1024;
/// Most rotated files looked for when the writer is not in this agent (no count known).
const MAX_ROTATED_PROBED: u32 = 10_000;
/// Attempts at opening a consistent set of files while the worker rotates its log.
const OPEN_ATTEMPTS: usize = 20;

/// One `FetchLog` from the coordinator.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub request_id: u64,
    pub job: String,
    pub generation: u64,
    pub rank: u32,
    /// Only the last `tail_bytes` of the whole log (0: all of it).
    pub tail_bytes: u64,
    pub follow: bool,
}

/// What this agent knows of a log that one of its workers is writing now.
#[derive(Debug, Clone)]
pub struct Live {
    /// Whether the worker runs (following ends after it exits).
    pub running: Arc<AtomicBool>,
    /// Its writer's rotation sequence (see `RankLog::rotations`).
    pub rotations: Arc<AtomicU64>,
    /// `--log-keep`: how many rotated files exist at most.
    pub keep: u32,
}

struct Segment {
    file: tokio::fs::File,
    id: FileId,
    len: u64,
    path: PathBuf,
}

/// Sends chunks of one fetch.
struct Out {
    request_id: u64,
    tx: mpsc::Sender<pb::AgentMessage>,
}

impl Out {
    async fn send(&self, offset: u64, data: Vec<u8>, eof: bool, error: String) -> bool {
        self.tx
            .send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::LogChunk(pb::LogChunk {
                    request_id: self.request_id,
                    data,
                    eof,
                    error,
                    offset,
                })),
            })
            .await
            .is_ok()
    }

    async fn error(&self, offset: u64, error: String) {
        self.send(offset, Vec::new(), true, error).await;
    }
}

/// Opens `names` (newest first) in `dir`; absent files are skipped (with `stop_at_missing`,
/// the first absent one ends the list), anything else that fails (a link, a FIFO...) is an
/// error. Returns them oldest first, and whether the first name was there.
fn open_newest_first(
    dir: &File,
    dir_path: &Path,
    names: impl Iterator<Item = String>,
    stop_at_missing: bool,
) -> Result<(VecDeque<Segment>, bool), LogFileError> {
    let mut out: VecDeque<Segment> = VecDeque::new();
    let mut first_found = false;
    for (i, name) in names.enumerate() {
        let path = dir_path.join(&name);
        match open::open_read(dir, &name, &path) {
            Ok((file, st)) => {
                first_found |= i == 0;
                let id = open::file_id(&st);
                // Without a rotation count, a rotation between two opens can show one file
                // under two names.
                if out.iter().any(|s| s.id == id) {
                    continue;
                }
                out.push_front(Segment {
                    file: tokio::fs::File::from_std(file),
                    id,
                    len: st.st_size.max(0) as u64,
                    path,
                });
            }
            Err(e) if e.errno() == Some(nix::errno::Errno::ENOENT) => {
                if stop_at_missing && i > 0 {
                    break;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok((out, first_found))
}

/// Completed rotations, or None while one is under way.
fn settled(live: &Live) -> Option<u64> {
    let v = live.rotations.load(Ordering::Acquire);
    v.is_multiple_of(2).then_some(v / 2)
}

/// Runs `open` between two equal, settled readings of the rotation count, so that what it
/// opened matches that count.
fn consistently<T>(
    live: &Live,
    what: &Path,
    mut open: impl FnMut(u64) -> Result<T, LogFileError>,
) -> Result<(T, u64), LogFileError> {
    for _ in 0..OPEN_ATTEMPTS {
        if let Some(before) = settled(live) {
            let v = open(before)?;
            if settled(live) == Some(before) {
                return Ok((v, before));
            }
        }
        std::thread::yield_now();
    }
    Err(LogFileError::Io {
        path: what.to_owned(),
        source: std::io::Error::other("the log rotates faster than it can be opened"),
    })
}

/// The whole log as it stands: rotated files oldest first, then the current file; with the
/// rotation count the current file was opened at, when the writer is in this agent and the
/// current file exists.
fn snapshot(
    dir: &File,
    dir_path: &Path,
    current: &str,
    live: Option<&Live>,
) -> Result<(VecDeque<Segment>, Option<u64>), LogFileError> {
    let names = |n: u32| {
        std::iter::once(current.to_owned()).chain((1..=n).map(|k| rotated_name(current, k)))
    };
    let Some(live) = live else {
        // Nobody rotates this log now: one pass is consistent.
        let (segs, _) = open_newest_first(dir, dir_path, names(MAX_ROTATED_PROBED), true)?;
        return Ok((segs, None));
    };
    let ((segs, has_current), epoch) = consistently(live, &dir_path.join(current), |_| {
        open_newest_first(dir, dir_path, names(live.keep), false)
    })?;
    Ok((segs, has_current.then_some(epoch)))
}

/// The files written since the current file of rotation `epoch` was rotated, oldest first,
/// with the rotation count they match; None when some of them were already rotated away.
fn successors(
    dir: &File,
    dir_path: &Path,
    current: &str,
    live: &Live,
    epoch: u64,
) -> Result<Option<(VecDeque<Segment>, u64)>, LogFileError> {
    let keep = u64::from(live.keep);
    let (segs, now) = consistently(live, &dir_path.join(current), |now| {
        // The file read is now `.behind`; the ones after it are `.behind-1` .. `.1`, current.
        let behind = now - epoch;
        if behind > keep + 1 {
            return Ok(None);
        }
        let names = std::iter::once(current.to_owned())
            .chain((1..behind as u32).map(|k| rotated_name(current, k)));
        Ok(Some(open_newest_first(dir, dir_path, names, false)?.0))
    })?;
    Ok(segs.map(|s| (s, now)))
}

/// Streams a rank's log to the coordinator as `LogChunk`s, one data chunk per credit.
///
/// With `follow`, keeps reading while the worker runs (across rotations), then drains and
/// ends. Ends at once on `cancel` or when the stream to the coordinator closes.
pub async fn serve(
    fetch: Fetch,
    work_dir: PathBuf,
    live: Option<Live>,
    credit: Arc<Semaphore>,
    tx: mpsc::Sender<pb::AgentMessage>,
    cancel: CancellationToken,
) {
    let out = Out {
        request_id: fetch.request_id,
        tx,
    };
    let current = format!("rank-{}.log", fetch.rank);
    let dir_path = work_dir
        .join(&fetch.job)
        .join(format!("gen-{}", fetch.generation));
    let opened =
        open::generation_dir(&work_dir, &fetch.job, fetch.generation, false).and_then(|dir| {
            let (segs, epoch) = snapshot(&dir, &dir_path, &current, live.as_ref())?;
            Ok((dir, segs, epoch))
        });
    let (dir, mut queue, epoch) = match opened {
        Ok((_, segs, _)) if segs.is_empty() => {
            let path = dir_path.join(&current);
            out.error(0, format!("{}: no such log", path.display()))
                .await;
            return;
        }
        Ok(v) => v,
        Err(e) => {
            out.error(0, e.to_string()).await;
            return;
        }
    };
    let mut epoch = match (&live, epoch) {
        (Some(_), None) if fetch.follow => {
            // The writer failed to start a new file after a rotation (it says so in the
            // agent's log); what it writes next could not be followed.
            let path = dir_path.join(&current);
            out.error(0, format!("{}: missing; cannot follow it", path.display()))
                .await;
            return;
        }
        (_, e) => e,
    };

    let total: u64 = queue.iter().map(|s| s.len).sum();
    let start = if fetch.tail_bytes > 0 {
        total.saturating_sub(fetch.tail_bytes)
    } else {
        0
    };
    let mut skip = start;
    while queue.len() > 1 && queue[0].len <= skip {
        skip -= queue[0].len;
        queue.pop_front();
    }
    let mut cur = queue.pop_front().expect("at least one file");
    if skip > 0
        && let Err(e) = cur.file.seek(std::io::SeekFrom::Start(skip)).await
    {
        out.error(start, format!("{}: {e}", cur.path.display()))
            .await;
        return;
    }

    let mut offset = start;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut last_pass = false;
    let mut lost = false;
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = out.tx.closed() => return,
            p = credit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let n = tokio::select! {
            _ = cancel.cancelled() => return,
            r = cur.file.read(&mut buf) => match r {
                Ok(n) => n,
                Err(e) => {
                    out.error(offset, format!("{}: {e}", cur.path.display())).await;
                    return;
                }
            },
        };
        if n > 0 {
            if !out
                .send(offset, buf[..n].to_vec(), false, String::new())
                .await
            {
                return;
            }
            permit.forget();
            offset += n as u64;
            continue;
        }
        drop(permit);
        if let Some(next) = queue.pop_front() {
            cur = next;
            continue;
        }
        if lost {
            out.error(
                offset,
                format!(
                    "{}: rotated away before it was read (the worker writes faster than the log is read; agent --log-keep keeps more)",
                    dir_path.join(&current).display()
                ),
            )
            .await;
            return;
        }
        if !fetch.follow {
            out.send(offset, Vec::new(), true, String::new()).await;
            return;
        }
        let alive = live
            .as_ref()
            .is_some_and(|l| l.running.load(Ordering::Acquire));
        if let (Some(l), Some(e)) = (live.as_ref(), epoch)
            && settled(l) != Some(e)
        {
            // The file read was rotated: once it is read to its end (nothing more is
            // written to it now), go on with the files written since.
            match successors(&dir, &dir_path, &current, l, e) {
                Ok(Some((segs, now))) => {
                    queue = segs;
                    epoch = Some(now);
                }
                Ok(None) => lost = true,
                Err(err) => {
                    out.error(offset, err.to_string()).await;
                    return;
                }
            }
            continue;
        }
        if !alive {
            // One more pass catches what was written just before the worker ended.
            if last_pass {
                out.send(offset, Vec::new(), true, String::new()).await;
                return;
            }
            last_pass = true;
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = out.tx.closed() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::rotate::{RankLog, Rotation};
    use super::*;

    struct Setup {
        _t: tempfile::TempDir,
        work: PathBuf,
        gen_dir: PathBuf,
    }

    fn setup() -> Setup {
        let t = tempfile::tempdir().unwrap();
        let work = t.path().to_owned();
        let gen_dir = work.join("job-1/gen-0");
        std::fs::create_dir_all(&gen_dir).unwrap();
        Setup {
            _t: t,
            work,
            gen_dir,
        }
    }

    fn fetch(tail_bytes: u64, follow: bool) -> Fetch {
        Fetch {
            request_id: 7,
            job: "job-1".into(),
            generation: 0,
            rank: 0,
            tail_bytes,
            follow,
        }
    }

    struct Running {
        rx: mpsc::Receiver<pb::AgentMessage>,
        credit: Arc<Semaphore>,
    }

    fn start(s: &Setup, f: Fetch, live: Option<Live>, credits: usize) -> Running {
        let (tx, rx) = mpsc::channel(4096);
        let credit = Arc::new(Semaphore::new(credits));
        tokio::spawn(serve(
            f,
            s.work.clone(),
            live,
            credit.clone(),
            tx,
            CancellationToken::new(),
        ));
        Running { rx, credit }
    }

    async fn next(r: &mut Running) -> Option<pb::LogChunk> {
        let m = tokio::time::timeout(Duration::from_secs(10), r.rx.recv())
            .await
            .expect("a chunk within 10 s")?;
        match m.msg {
            Some(pb::agent_message::Msg::LogChunk(c)) => Some(c),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Collects until the eof chunk; checks the offsets run on without a gap.
    async fn collect(r: &mut Running) -> (Vec<u8>, u64, pb::LogChunk) {
        let mut data = Vec::new();
        let mut start = None;
        loop {
            let c = next(r).await.expect("the stream ends with eof");
            let at = *start.get_or_insert(c.offset);
            assert_eq!(c.offset, at + data.len() as u64, "gap before a chunk");
            assert_eq!(c.request_id, 7);
            if c.eof {
                return (data, at, c);
            }
            data.extend_from_slice(&c.data);
        }
    }

    fn write(s: &Setup, name: &str, bytes: &[u8]) {
        std::fs::write(s.gen_dir.join(name), bytes).unwrap();
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[tokio::test]
    async fn rotated_files_are_served_oldest_first_with_offsets() {
        let s = setup();
        let (a, b, c) = (pattern(100_000, 1), pattern(70_000, 2), pattern(5, 3));
        write(&s, "rank-0.log.2", &a);
        write(&s, "rank-0.log.1", &b);
        write(&s, "rank-0.log", &c);
        let mut r = start(&s, fetch(0, false), None, MAX_CREDIT);
        let (data, at, end) = collect(&mut r).await;
        assert_eq!(at, 0);
        assert_eq!(data, [a.clone(), b.clone(), c.clone()].concat());
        assert!(end.error.is_empty(), "{}", end.error);
        assert_eq!(end.offset, 170_005);

        // A tail that starts inside the oldest file counts from the end of the whole.
        let mut r = start(&s, fetch(80_000, false), None, MAX_CREDIT);
        let (data, at, _) = collect(&mut r).await;
        assert_eq!(at, 170_005 - 80_000);
        assert_eq!(data, [&a[90_005..], &b[..], &c[..]].concat());
    }

    #[tokio::test]
    async fn a_link_among_the_files_refuses_the_whole_log() {
        let s = setup();
        let secret = s.work.join("secret");
        std::fs::write(&secret, "token").unwrap();
        write(&s, "rank-0.log", b"now\n");
        std::os::unix::fs::symlink(&secret, s.gen_dir.join("rank-0.log.1")).unwrap();
        let mut r = start(&s, fetch(0, false), None, MAX_CREDIT);
        let c = next(&mut r).await.unwrap();
        assert!(c.eof && c.data.is_empty());
        assert!(
            c.error.contains("rank-0.log.1") && c.error.contains("symbolic link"),
            "{}",
            c.error
        );
        let mut r = start(&s, fetch(0, true), None, MAX_CREDIT);
        assert!(next(&mut r).await.unwrap().error.contains("symbolic link"));
    }

    #[tokio::test]
    async fn no_data_is_sent_without_credit() {
        let s = setup();
        let body = pattern(5 * CHUNK_BYTES, 9);
        write(&s, "rank-0.log", &body);
        let mut r = start(&s, fetch(0, false), None, 2);
        assert_eq!(next(&mut r).await.unwrap().data.len(), CHUNK_BYTES);
        assert_eq!(next(&mut r).await.unwrap().data.len(), CHUNK_BYTES);
        let waited = tokio::time::timeout(Duration::from_millis(300), r.rx.recv()).await;
        assert!(waited.is_err(), "a chunk was sent without credit");
        r.credit.add_permits(10);
        let (rest, at, _) = collect(&mut r).await;
        assert_eq!(at, 2 * CHUNK_BYTES as u64);
        assert_eq!(rest, body[2 * CHUNK_BYTES..]);
    }

    fn live_log(s: &Setup, max_bytes: u64, keep: u32) -> (RankLog, Live) {
        let log = RankLog::open(
            File::open(&s.gen_dir).unwrap(),
            &s.gen_dir,
            "rank-0.log",
            Rotation { max_bytes, keep },
        )
        .unwrap();
        let live = Live {
            running: Arc::new(AtomicBool::new(true)),
            rotations: log.rotations(),
            keep,
        };
        (log, live)
    }

    #[tokio::test]
    async fn following_goes_on_across_rotations() {
        let s = setup();
        let (mut log, live) = live_log(&s, 1000, 2);
        let mut written = Vec::new();
        let put = |log: &mut RankLog, written: &mut Vec<u8>, i: usize| {
            let line = format!("line {i:04} {}\n", "x".repeat(i % 50));
            log.try_write(line.as_bytes()).unwrap();
            written.extend_from_slice(line.as_bytes());
        };
        for i in 0..20 {
            put(&mut log, &mut written, i);
        }
        let running = live.running.clone();
        let mut r = start(&s, fetch(0, true), Some(live), MAX_CREDIT);
        // Written while the reader follows: several rotations, each batch read (every byte so
        // far received, in order) before the next is written.
        let mut data = Vec::new();
        for i in 20..400 {
            put(&mut log, &mut written, i);
            if i % 10 == 0 {
                while data.len() < written.len() {
                    let c = next(&mut r).await.expect("the reader follows");
                    assert!(!c.eof, "ended early: {}", c.error);
                    assert_eq!(c.offset, data.len() as u64, "gap before a chunk");
                    data.extend_from_slice(&c.data);
                }
            }
        }
        running.store(false, Ordering::Release);
        let (rest, at, end) = collect(&mut r).await;
        assert!(end.error.is_empty(), "{}", end.error);
        assert_eq!(at, data.len() as u64);
        data.extend_from_slice(&rest);
        assert_eq!(
            String::from_utf8(data).unwrap(),
            String::from_utf8(written).unwrap()
        );
    }

    #[tokio::test]
    async fn a_reader_overtaken_by_rotation_is_told_where_the_log_broke() {
        let s = setup();
        let (mut log, live) = live_log(&s, 100, 1);
        log.try_write(&[b'a'; 100]).unwrap();
        // One credit: once its chunk arrives the reader holds the current file, and without
        // more credit it waits there while the writer rotates the file away.
        let mut r = start(&s, fetch(0, true), Some(live), 1);
        let first = next(&mut r).await.unwrap();
        assert_eq!(first.data, [b'a'; 100]);
        for b in [b'b', b'c', b'd'] {
            log.try_write(&[b; 100]).unwrap();
        }
        r.credit.add_permits(MAX_CREDIT);
        let end = next(&mut r).await.unwrap();
        assert!(end.eof);
        assert_eq!(end.offset, 100);
        assert!(end.error.contains("rotated away"), "{}", end.error);
    }
}
