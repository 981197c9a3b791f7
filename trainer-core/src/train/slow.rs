//! A test knob that makes one rank a straggler: `RINGMASTER_TEST_SLOW_STEPS=
//! "rank=2,factor=1.5,from=20,to=70"` makes rank 2 spend `factor` times its own compute time
//! on steps `from..to` (it sleeps `(factor − 1) ×` its previous step's compute time, inside
//! the step's timed window and outside its collectives), so the slowdown is relative and
//! independent of the machine. For the coordinator's straggler tests; never set in production.

use std::time::Duration;

use anyhow::{Context, bail};

/// The variable.
pub const VAR: &str = "RINGMASTER_TEST_SLOW_STEPS";

/// Which steps of this rank to slow, and by how much.
#[derive(Debug, Clone, PartialEq)]
pub struct SlowSteps {
    factor: f64,
    from: u64,
    to: u64,
}

impl SlowSteps {
    /// The knob for `rank` from the environment (None: unset, another rank's, or
    /// malformed, which is logged and ignored: a test knob never stops a job).
    pub fn from_env(rank: u32) -> Option<SlowSteps> {
        let v = std::env::var(VAR).ok()?;
        match parse(&v, rank).with_context(|| format!("{VAR}={v:?}")) {
            Ok(Some(s)) => {
                eprintln!(
                    "trainer: warning: {VAR} is set: this rank is slowed on purpose ({}x on steps {}..{}); a test knob",
                    s.factor, s.from, s.to
                );
                Some(s)
            }
            Ok(None) => None,
            Err(e) => {
                eprintln!("trainer: warning: ignoring the test knob: {e:#}");
                None
            }
        }
    }

    /// How long step `step` (0-based) sleeps, given the previous step's compute time.
    pub fn delay(&self, step: u64, previous_compute: Duration) -> Option<Duration> {
        ((self.from..self.to).contains(&step) && self.factor > 1.0)
            .then(|| previous_compute.mul_f64(self.factor - 1.0))
    }
}

fn parse(text: &str, me: u32) -> anyhow::Result<Option<SlowSteps>> {
    let (mut rank, mut factor, mut from, mut to) = (None, None, 0, u64::MAX);
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            bail!("expected key=value, found {part:?}");
        };
        match k.trim() {
            "rank" => rank = Some(v.trim().parse::<u32>().context("rank")?),
            "factor" => factor = Some(v.trim().parse::<f64>().context("factor")?),
            "from" => from = v.trim().parse().context("from")?,
            "to" => to = v.trim().parse().context("to")?,
            other => bail!("unknown key {other:?} (rank, factor, from, to)"),
        }
    }
    let (Some(rank), Some(factor)) = (rank, factor) else {
        bail!("rank= and factor= are required");
    };
    if !(factor.is_finite() && (1.0..=100.0).contains(&factor)) {
        bail!("factor {factor} is not within 1..=100");
    }
    Ok((rank == me).then_some(SlowSteps { factor, from, to }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_applies_to_its_rank_and_steps_only() {
        let s = parse("rank=2,factor=1.5,from=20,to=70", 2)
            .unwrap()
            .unwrap();
        assert_eq!(s.delay(19, Duration::from_secs(2)), None);
        assert_eq!(
            s.delay(20, Duration::from_secs(2)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(s.delay(70, Duration::from_secs(2)), None);
        assert_eq!(parse("rank=2,factor=1.5", 1).unwrap(), None);
        for bad in [
            "rank=2",
            "factor=2",
            "rank=x,factor=2",
            "rank=1,factor=0.5",
            "speed=3",
        ] {
            assert!(parse(bad, 1).is_err(), "{bad}");
        }
    }
}
