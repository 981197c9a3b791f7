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
    /// On the CPU.
    Cpu {
        /// The burn backend.
        backend: CpuBackend,
        /// The start-up line (`device: cpu (...)`).
        line: String,
    },
    /// On CUDA device `ordinal`.
    Cuda {
        /// The device ordinal among the visible devices.
        ordinal: usize,
        /// The device's name (`NVIDIA H100 80GB HBM3`): its peak FLOP/s for MFU.
        name: String,
        /// The start-up line (`device: cuda:0 (NVIDIA H100 ...), LOCAL_RANK ...`).
        line: String,
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

    /// The short name the progress reports carry (`ringctl watch`'s DEVICE column): `cpu`,
    /// `cpu (ndarray)`, `cuda:0`.
    pub fn label(&self) -> String {
        match self {
            Placement::Cpu {
                backend: CpuBackend::Flex,
                ..
            } => "cpu".into(),
            Placement::Cpu {
                backend: CpuBackend::NdArray,
                ..
            } => "cpu (ndarray)".into(),
            Placement::Cuda { ordinal, .. } => format!("cuda:{ordinal}"),
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::Cpu { line, .. } | Placement::Cuda { line, .. } => f.write_str(line),
        }
    }
}

/// This rank's placement for `cfg`'s `device:` key (`auto` by default) and the environment
/// (`CUDA_VISIBLE_DEVICES`, `LOCAL_RANK`). On CUDA it first makes NVRTC (burn-cuda's kernel
/// compiler) and, with several ranks, NCCL loadable by the names cudarc opens: found where
/// they are (CUDA toolkit, system folders, Python's `nvidia-*` wheels, or
/// `RINGMASTER_NVRTC_LIB` / `RINGMASTER_NCCL_LIB`), linked into a private folder, and the
/// process re-executed once with that folder on `LD_LIBRARY_PATH` — so call this before
/// anything else opens a CUDA library, and before printing.
///
/// # Errors
/// `device: cuda` without the `cuda` feature, a driver or a visible GPU; `LOCAL_RANK` beyond
/// the visible GPUs; a library not found (the message says where it looked). Usage errors:
/// nothing ran.
pub fn place(cfg: &ringmaster_config::TrainConfig, world: usize) -> Result<Placement> {
    use ringmaster_device::{LibraryKind, Selected};
    let selected = ringmaster_device::select(cfg.device_request(), &ringmaster_device::process_env)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match selected {
        Selected::Cpu { why } => {
            let backend = CpuBackend::from_env()?;
            let line = match backend {
                CpuBackend::Flex => format!("device: cpu ({why})"),
                CpuBackend::NdArray => format!("device: cpu ({why}; ndarray backend)"),
            };
            Ok(Placement::Cpu { backend, line })
        }
        Selected::Cuda {
            ordinal, ref name, ..
        } => {
            let mut kinds = vec![LibraryKind::Nvrtc];
            if world > 1 {
                kinds.push(LibraryKind::Nccl);
            }
            ringmaster_device::ensure_cuda_libraries(&kinds)
                .map_err(|e| anyhow::anyhow!("device: cuda: {e}"))?;
            Ok(Placement::Cuda {
                ordinal,
                name: name.clone(),
                line: selected.to_string(),
            })
        }
    }
}

/// `trainer device-info [--request auto|cpu|cuda]`: what this binary and machine offer, as
/// JSON (the libraries made loadable first when CUDA is asked for and usable).
pub fn info(request: ringmaster_device::DeviceRequest) -> String {
    let env = ringmaster_device::process_env;
    if request != ringmaster_device::DeviceRequest::Cpu
        && ringmaster_device::select(request, &env)
            .is_ok_and(|s| matches!(s, ringmaster_device::Selected::Cuda { .. }))
    {
        use ringmaster_device::LibraryKind;
        // A failure shows in the report's libraries.
        let _ = ringmaster_device::ensure_cuda_libraries(&[LibraryKind::Nvrtc, LibraryKind::Nccl]);
    }
    let report = ringmaster_device::report(request, &env);
    serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
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
