//! Choosing the device: the `device` key's rules, apart from the driver probe so that every
//! rule is unit-tested with an injected environment and a fake driver.

use serde::Serialize;

pub use ringmaster_config::DeviceRequest;

use crate::Env;

/// Whether this binary was built with the `cuda` feature.
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// What the NVIDIA driver says, as [`probe_driver`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    /// Built without the `cuda` feature: nothing was probed.
    NotBuilt,
    /// `libcuda.so.1` did not load; `detail` says what was tried and where.
    Missing { detail: String },
    /// The library loaded but `cuInit` failed with something other than "no device".
    InitFailed { message: String },
    /// The driver answered: the names of the visible devices, by ordinal (possibly none).
    Ready { devices: Vec<String> },
}

/// Where the trainer computes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "device", rename_all = "lowercase")]
pub enum Selected {
    Cpu {
        /// Why: `requested`, or `auto: <the reason CUDA was not used>`.
        why: String,
    },
    Cuda {
        /// The CUDA ordinal among the visible devices.
        ordinal: usize,
        /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
        name: String,
        /// How many devices the driver shows this process.
        visible: usize,
        local_rank: Option<usize>,
        cuda_visible_devices: Option<String>,
    },
}

impl std::fmt::Display for Selected {
    /// The start-up log line: `device: cuda:0 (NVIDIA H100 80GB HBM3), LOCAL_RANK 0 of
    /// CUDA_VISIBLE_DEVICES=0,1` or `device: cpu (auto: ...)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selected::Cpu { why } => write!(f, "device: cpu ({why})"),
            Selected::Cuda {
                ordinal,
                name,
                visible,
                local_rank,
                cuda_visible_devices,
            } => {
                write!(f, "device: cuda:{ordinal} ({name}), ")?;
                match local_rank {
                    Some(r) => write!(f, "LOCAL_RANK {r}")?,
                    None => write!(f, "LOCAL_RANK unset")?,
                }
                match cuda_visible_devices {
                    Some(v) => write!(f, " of CUDA_VISIBLE_DEVICES={v}"),
                    None => write!(
                        f,
                        " of {visible} visible device{} (CUDA_VISIBLE_DEVICES unset)",
                        if *visible == 1 { "" } else { "s" }
                    ),
                }
            }
        }
    }
}

/// Why `device: cuda` (or a misconfigured rank) cannot be served. One line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "device: cuda was requested but this binary was built without the `cuda` feature; \
         rebuild it with `cargo build --release --features cuda`"
    )]
    NotBuilt,
    #[error("device: cuda was requested but there is no NVIDIA driver: {detail}")]
    NoDriver { detail: String },
    #[error("device: cuda was requested but the NVIDIA driver did not initialise: {message}")]
    DriverInit { message: String },
    #[error("device: cuda was requested but no CUDA device is visible ({})", visible_why(.cuda_visible_devices.as_deref()))]
    NoDevice {
        cuda_visible_devices: Option<String>,
    },
    #[error(
        "device: LOCAL_RANK {local_rank} is out of range: {visible} CUDA devices are visible \
         (CUDA_VISIBLE_DEVICES={}); each local rank needs its own",
        .cuda_visible_devices.as_deref().unwrap_or("unset")
    )]
    LocalRankOutOfRange {
        local_rank: usize,
        visible: usize,
        cuda_visible_devices: Option<String>,
    },
    #[error("device: LOCAL_RANK={value:?} is not a non-negative integer")]
    BadLocalRank { value: String },
}

fn visible_why(cvd: Option<&str>) -> String {
    match cvd {
        Some(v) => format!("CUDA_VISIBLE_DEVICES={v:?}; the driver shows 0 devices"),
        None => "the driver shows 0 devices; CUDA_VISIBLE_DEVICES unset".into(),
    }
}

/// Chooses the device for `request` on this machine: [`select_with`] and [`probe_driver`].
///
/// # Errors
/// As [`select_with`].
pub fn select(request: DeviceRequest, env: Env<'_>) -> Result<Selected, DeviceError> {
    select_with(request, env, || probe_driver(env))
}

/// The rules. `cpu`: CPU, nothing probed. `auto`: CUDA when built with it, the driver loads and
/// a device is visible, else CPU with the reason. `cuda`: CUDA or the error naming the cause.
/// The ordinal (torchrun's convention; the agent sets `CUDA_VISIBLE_DEVICES` to the node's
/// slots): `LOCAL_RANK` when several devices are visible, 0 when one is.
///
/// # Errors
/// Under `cuda`, every reason CUDA cannot be used; under `auto` and `cuda`, a `LOCAL_RANK`
/// that is not a number or is at least the number of visible devices (a misconfigured rank
/// should not quietly train on the CPU beside GPUs).
pub fn select_with(
    request: DeviceRequest,
    env: Env<'_>,
    probe: impl FnOnce() -> Driver,
) -> Result<Selected, DeviceError> {
    if request == DeviceRequest::Cpu {
        return Ok(Selected::Cpu {
            why: "requested".into(),
        });
    }
    let cvd = env("CUDA_VISIBLE_DEVICES");
    let unusable = match probe() {
        Driver::NotBuilt => DeviceError::NotBuilt,
        Driver::Missing { detail } => DeviceError::NoDriver { detail },
        Driver::InitFailed { message } => DeviceError::DriverInit { message },
        Driver::Ready { devices } if devices.is_empty() => DeviceError::NoDevice {
            cuda_visible_devices: cvd,
        },
        Driver::Ready { mut devices } => {
            let local_rank = match env("LOCAL_RANK") {
                None => None,
                Some(v) => Some(
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| DeviceError::BadLocalRank { value: v.clone() })?,
                ),
            };
            let visible = devices.len();
            let ordinal = match local_rank {
                _ if visible == 1 => 0,
                None => 0,
                Some(r) if r < visible => r,
                Some(r) => {
                    return Err(DeviceError::LocalRankOutOfRange {
                        local_rank: r,
                        visible,
                        cuda_visible_devices: cvd,
                    });
                }
            };
            return Ok(Selected::Cuda {
                ordinal,
                name: devices.swap_remove(ordinal),
                visible,
                local_rank,
                cuda_visible_devices: cvd,
            });
        }
    };
    if request == DeviceRequest::Cuda {
        return Err(unusable);
    }
    let why = match unusable {
        DeviceError::NotBuilt => "this binary was built without the `cuda` feature".into(),
        DeviceError::NoDriver { detail } => format!("no NVIDIA driver: {detail}"),
        DeviceError::DriverInit { message } => {
            format!("the NVIDIA driver did not initialise: {message}")
        }
        DeviceError::NoDevice {
            cuda_visible_devices,
        } => format!(
            "no visible CUDA device: {}",
            visible_why(cuda_visible_devices.as_deref())
        ),
        other => other.to_string(),
    };
    Ok(Selected::Cpu {
        why: format!("auto: {why}"),
    })
}

/// Asks the NVIDIA driver, without panicking: whether `libcuda` loads (cudarc's own check, over
/// the names it would open), then `cuInit` and each visible device's name. Without the `cuda`
/// feature: [`Driver::NotBuilt`].
pub fn probe_driver(env: Env<'_>) -> Driver {
    #[cfg(feature = "cuda")]
    {
        crate::probe::probe(env)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = env;
        Driver::NotBuilt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::FakeEnv;

    fn gpus(n: usize) -> Driver {
        Driver::Ready {
            devices: (0..n)
                .map(|i| format!("NVIDIA H100 80GB HBM3 #{i}"))
                .collect(),
        }
    }

    fn run(req: DeviceRequest, vars: &[(&str, &str)], d: Driver) -> Result<Selected, DeviceError> {
        let env = FakeEnv::new(vars);
        select_with(req, &env.f(), || d)
    }

    #[test]
    fn cpu_is_cpu_without_probing() {
        let env = FakeEnv::new(&[]);
        let s = select_with(DeviceRequest::Cpu, &env.f(), || {
            panic!("cpu must not probe the driver")
        })
        .unwrap();
        assert_eq!(s.to_string(), "device: cpu (requested)");
    }

    #[test]
    fn auto_falls_back_to_cpu_with_the_reason() {
        let cases = [
            (
                Driver::NotBuilt,
                "device: cpu (auto: this binary was built without the `cuda` feature)",
            ),
            (
                Driver::Missing {
                    detail: "libcuda.so.1 did not load; looked in /usr/lib64".into(),
                },
                "device: cpu (auto: no NVIDIA driver: libcuda.so.1 did not load; looked in /usr/lib64)",
            ),
            (
                Driver::InitFailed {
                    message: "CUDA_ERROR_OPERATING_SYSTEM".into(),
                },
                "device: cpu (auto: the NVIDIA driver did not initialise: CUDA_ERROR_OPERATING_SYSTEM)",
            ),
            (
                gpus(0),
                "device: cpu (auto: no visible CUDA device: the driver shows 0 devices; CUDA_VISIBLE_DEVICES unset)",
            ),
        ];
        for (d, line) in cases {
            assert_eq!(run(DeviceRequest::Auto, &[], d).unwrap().to_string(), line);
        }
        let s = run(
            DeviceRequest::Auto,
            &[("CUDA_VISIBLE_DEVICES", "")],
            gpus(0),
        )
        .unwrap();
        assert_eq!(
            s.to_string(),
            "device: cpu (auto: no visible CUDA device: CUDA_VISIBLE_DEVICES=\"\"; the driver shows 0 devices)"
        );
    }

    #[test]
    fn cuda_names_the_cause_exactly() {
        let e = run(DeviceRequest::Cuda, &[], Driver::NotBuilt).unwrap_err();
        assert_eq!(e, DeviceError::NotBuilt);
        assert!(
            e.to_string()
                .contains("rebuild it with `cargo build --release --features cuda`")
        );
        let e = run(
            DeviceRequest::Cuda,
            &[],
            Driver::Missing { detail: "x".into() },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "device: cuda was requested but there is no NVIDIA driver: x"
        );
        let e = run(
            DeviceRequest::Cuda,
            &[("CUDA_VISIBLE_DEVICES", "-1")],
            gpus(0),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "device: cuda was requested but no CUDA device is visible \
             (CUDA_VISIBLE_DEVICES=\"-1\"; the driver shows 0 devices)"
        );
        let e = run(
            DeviceRequest::Cuda,
            &[],
            Driver::InitFailed {
                message: "m".into(),
            },
        )
        .unwrap_err();
        assert!(matches!(e, DeviceError::DriverInit { .. }));
    }

    #[test]
    fn the_ordinal_is_local_rank_among_several_and_zero_for_one() {
        let vars = [("CUDA_VISIBLE_DEVICES", "2,3"), ("LOCAL_RANK", "1")];
        for req in [DeviceRequest::Auto, DeviceRequest::Cuda] {
            let s = run(req, &vars, gpus(2)).unwrap();
            assert_eq!(
                s.to_string(),
                "device: cuda:1 (NVIDIA H100 80GB HBM3 #1), LOCAL_RANK 1 of CUDA_VISIBLE_DEVICES=2,3"
            );
        }
        // One visible device (a per-process CUDA_VISIBLE_DEVICES): always ordinal 0.
        let s = run(
            DeviceRequest::Cuda,
            &[("CUDA_VISIBLE_DEVICES", "5"), ("LOCAL_RANK", "3")],
            gpus(1),
        )
        .unwrap();
        assert!(matches!(s, Selected::Cuda { ordinal: 0, .. }), "{s}");
        // Alone, without LOCAL_RANK.
        let s = run(DeviceRequest::Auto, &[], gpus(8)).unwrap();
        assert_eq!(
            s.to_string(),
            "device: cuda:0 (NVIDIA H100 80GB HBM3 #0), LOCAL_RANK unset of 8 visible devices \
             (CUDA_VISIBLE_DEVICES unset)"
        );
    }

    #[test]
    fn local_rank_out_of_range_or_garbage_is_an_error_even_under_auto() {
        for req in [DeviceRequest::Auto, DeviceRequest::Cuda] {
            let e = run(
                req,
                &[("CUDA_VISIBLE_DEVICES", "0,1"), ("LOCAL_RANK", "2")],
                gpus(2),
            )
            .unwrap_err();
            assert_eq!(
                e.to_string(),
                "device: LOCAL_RANK 2 is out of range: 2 CUDA devices are visible \
                 (CUDA_VISIBLE_DEVICES=0,1); each local rank needs its own"
            );
            let e = run(req, &[("LOCAL_RANK", "one")], gpus(2)).unwrap_err();
            assert_eq!(
                e,
                DeviceError::BadLocalRank {
                    value: "one".into()
                }
            );
        }
    }

    #[test]
    fn selected_serializes_for_device_info() {
        let s = run(DeviceRequest::Auto, &[("LOCAL_RANK", "0")], gpus(1)).unwrap();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["device"], "cuda");
        assert_eq!(v["ordinal"], 0);
        assert_eq!(v["local_rank"], 0);
    }

    /// The real probe on this build: without `cuda`, NotBuilt; with it, on a machine without
    /// a driver (CI, this machine), a clean NoDriver error, never a panic. On a GPU machine it
    /// selects a device.
    #[test]
    fn the_real_probe_never_panics() {
        let env = crate::process_env;
        let r = select(DeviceRequest::Cuda, &env);
        if !BUILT_WITH_CUDA {
            assert_eq!(r, Err(DeviceError::NotBuilt));
            return;
        }
        match r {
            Ok(s) => assert!(matches!(s, Selected::Cuda { .. }), "{s}"),
            Err(e) => {
                let text = e.to_string();
                assert!(!text.contains('\n'), "{text}");
                if !std::path::Path::new("/dev/nvidiactl").exists() {
                    assert!(matches!(e, DeviceError::NoDriver { .. }), "{text}");
                    assert!(text.contains("libcuda.so.1"), "{text}");
                }
            }
        }
        let auto = select(DeviceRequest::Auto, &env).unwrap();
        eprintln!("{auto}");
    }
}
