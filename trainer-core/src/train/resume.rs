//! Where a run starts: the checkpoint candidates (the coordinator's, the config's, a restarted
//! generation's), tried newest first, loaded into the engine in any saved layout.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};

use super::checkpoint;
use super::engine::{Engine, Scaling, TrainBackend};
use super::setup::Setup;

/// Where the run resumed.
#[derive(Debug, Default)]
pub struct Resumed {
    /// The first step to run (0: from the start).
    pub step: u64,
    /// The checkpoint it resumed from.
    pub from: Option<PathBuf>,
    /// Candidates that could not be used, with why.
    pub skipped: Vec<String>,
}

/// Tells the coordinator where the run starts: rank 0 where it resumed from (and what it
/// skipped), every rank that it is ready to train (the status shows the resumed step at once;
/// the recovery benchmark times "every rank training again" from it).
pub fn tell(p: &crate::progress::ProgressReporter, rank: usize, resumed: &Resumed, total: u64) {
    if rank == 0 {
        let from = resumed.from.as_deref().map(|d| (resumed.step, d));
        p.resumed(from, resumed.skipped.clone());
    }
    p.report(crate::progress::StepReport {
        step: resumed.step,
        total_steps: total,
        memory_bytes: crate::progress::rss_bytes().0,
        ..Default::default()
    });
}

/// Loads the first usable checkpoint candidate into `eng` (and the loss scaler's state into
/// `scaling`); a run with no candidate starts at step 0.
pub fn resume<B: TrainBackend>(
    setup: &mut Setup,
    eng: &mut Engine<'_, B>,
    scaling: &mut Scaling,
    rank: usize,
    global_batch: usize,
) -> Result<Resumed> {
    let (candidates, strict) = resume_candidates(setup)?;
    let trainable_kind = if setup.lora.is_some() { "lora" } else { "full" };
    let mut out = Resumed::default();
    let load_start = Instant::now();
    for (i, dir) in candidates.iter().enumerate() {
        let m = match checkpoint::load(
            dir,
            eng,
            setup.weights().trainable(),
            trainable_kind,
            global_batch,
        ) {
            Ok(m) => m,
            // A restarted generation falls back to the previous committed checkpoint when the
            // newest cannot be used (corrupt shard); an explicit path is an error.
            Err(e) if !strict && i + 1 < candidates.len() => {
                eprintln!(
                    "trainer: warning: rank {rank}: cannot resume from {}: {e:#}; trying the \
                     previous committed checkpoint",
                    dir.display()
                );
                out.skipped.push(format!("{}: {e:#}", dir.display()));
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(saved) = &m.scaler {
            scaling.restore(saved);
        }
        if rank == 0 {
            eprintln!(
                "trainer: resumed from {} at step {} (saved by {} ranks under {}; loaded in \
                 {:.3} s)",
                dir.display(),
                m.step,
                m.world,
                m.plan,
                load_start.elapsed().as_secs_f64()
            );
        }
        if m.weights_only && rank == 0 {
            eprintln!(
                "trainer: {} was saved with save_only_model: it resumes as weights only (AdamW \
                 moments and the loss scale start over at step {}; the schedule and the data \
                 order continue)",
                dir.display(),
                m.step
            );
        }
        out.step = m.step;
        out.from = Some(dir.clone());
        return Ok(out);
    }
    if !candidates.is_empty() {
        let names: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
        return Err(anyhow!("no usable checkpoint among {}", names.join(", ")));
    }
    // A first generation starts at step 0 whatever output_dir holds (overwrite_output_dir has
    // no effect); LLaMA-Factory, without overwrite_output_dir, would resume: say so.
    if rank == 0
        && let Some((step, dir)) = checkpoint::committed(&setup.output_dir).into_iter().next()
    {
        eprintln!("trainer: warning: {}", fresh_start_warning(step, &dir));
    }
    Ok(out)
}

/// The start-up warning of a run that starts at step 0 beside committed checkpoints of an
/// earlier run (`newest`, of `step`).
fn fresh_start_warning(step: u64, newest: &Path) -> String {
    format!(
        "starting at step 0, although output_dir holds committed checkpoints (newest: {}, step \
         {step}); LLaMA-Factory would resume from it unless overwrite_output_dir: true. Set \
         resume_from_checkpoint: true to resume, or use an empty output_dir: a restarted \
         generation of this run resumes from the newest committed checkpoint there, which may \
         be one of these",
        newest.display()
    )
}

/// Refuses a coordinator-given resume point outside `output_dir`: the next generation would
/// otherwise read (and, through `save_total_limit`, protect) whatever directory a report named.
fn check_resume_inside(ckpt: &Path, output_dir: &Path) -> Result<()> {
    use ringmaster_config::paths::resolve;
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let resolve =
        |p: &Path| resolve(p, &cwd).map_err(|(at, e)| anyhow!("resolving {}: {e}", at.display()));
    let (c, out) = (resolve(ckpt)?, resolve(output_dir)?);
    if c == out || !c.starts_with(&out) {
        return Err(anyhow!(
            "RINGMASTER_RESUME_FROM={} ({}) is not a checkpoint inside output_dir {} ({}): \
             refusing to resume from it",
            ckpt.display(),
            c.display(),
            output_dir.display(),
            out.display()
        ));
    }
    Ok(())
}

/// The checkpoints to resume from, in order of preference, and whether only the first may be
/// used. `RINGMASTER_RESUME_FROM` (set by the coordinator: the job's last committed checkpoint)
/// comes first, falling back to the older committed checkpoints of `output_dir`; else the
/// config's `resume_from_checkpoint` (a directory, strict; or `true` for the newest committed
/// one in `output_dir` as the HF Trainer reads it, with fallback); else — in a restarted
/// generation (`RINGMASTER_GENERATION` > 0) — the committed checkpoints of `output_dir`, newest
/// first. A corrupt candidate falls back to the next one.
fn resume_candidates(setup: &Setup) -> Result<(Vec<PathBuf>, bool)> {
    let all = || -> Vec<(u64, PathBuf)> { checkpoint::committed(&setup.output_dir) };
    if let Ok(p) = std::env::var("RINGMASTER_RESUME_FROM")
        && !p.is_empty()
    {
        let first = PathBuf::from(&p);
        check_resume_inside(&first, &setup.output_dir)?;
        let step = checkpoint::step_of(&first);
        let same = |q: &Path| std::fs::canonicalize(q).ok() == std::fs::canonicalize(&first).ok();
        // A committed checkpoint newer than the coordinator's record (rank 0 committed it
        // but died, or the coordinator was down, before the report landed) passed the same
        // barrier, so it comes first; then the named one; then older ones to fall back on.
        let found = all();
        let newer = found
            .iter()
            .filter(|(s, q)| step.is_some_and(|st| *s > st) && !same(q))
            .map(|(_, q)| q.clone());
        let older = found
            .iter()
            .filter(|(s, q)| step.is_none_or(|st| *s < st) && !same(q))
            .map(|(_, q)| q.clone());
        let out = newer.chain([first.clone()]).chain(older).collect();
        return Ok((out, false));
    }
    let paths = || all().into_iter().map(|(_, p)| p).collect::<Vec<_>>();
    match setup.cfg.resume_from_checkpoint.as_deref() {
        None | Some("") | Some("false") | Some("False") => {
            let generation: u64 = std::env::var("RINGMASTER_GENERATION")
                .ok()
                .and_then(|g| g.parse().ok())
                .unwrap_or(0);
            Ok((if generation > 0 { paths() } else { Vec::new() }, false))
        }
        Some("true") | Some("True") => {
            let found = paths();
            if found.is_empty() {
                return Err(anyhow!(
                    "resume_from_checkpoint: true, but {} holds no committed checkpoint",
                    setup.output_dir.display()
                ));
            }
            Ok((found, false))
        }
        Some(p) => Ok((vec![p.into()], true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_start_beside_old_checkpoints_says_how_to_resume() {
        let w = fresh_start_warning(40, Path::new("/o/checkpoint-40"));
        for says in [
            "step 0",
            "/o/checkpoint-40",
            "overwrite_output_dir",
            "resume_from_checkpoint: true",
        ] {
            assert!(w.contains(says), "{w}");
        }
    }
}
