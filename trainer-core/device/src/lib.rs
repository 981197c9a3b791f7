//! Which device the trainer computes on, and making the CUDA libraries it opens at run time
//! findable. Free of burn: the agent and `ringctl` may use it too (the agent to count GPUs, say).
//!
//! The trainer's start, in order:
//! 1. [`select()`] the device for the config's `device:` key ([`DeviceRequest`]) and log the
//!    [`Selected`] line (`device: cuda:0 (NVIDIA H100 80GB HBM3), LOCAL_RANK 0 of
//!    CUDA_VISIBLE_DEVICES=0,1`, or `device: cpu (auto: <why not CUDA>)`); a [`DeviceError`]
//!    under `device: cuda` names the cause in one line.
//! 2. On CUDA, [`ensure_cuda_libraries`] with NVRTC (burn-cuda compiles its kernels with it)
//!    and NCCL when the world has several ranks: it finds them ([`find_library`]), links them
//!    under the names cudarc opens into a private folder, and re-executes the binary once with
//!    that folder on `LD_LIBRARY_PATH` (and `CUDA_PATH` pointing at headers, when cubecl would
//!    miss them). Call it before anything opens a CUDA library.
//!
//! Every function that reads the environment takes it as an [`Env`] (`&dyn Fn(&str) ->
//! Option<String>`; [`process_env`] is the real one), so every rule is unit-tested with an
//! injected environment, temp folders and a fake driver; no GPU is needed.
//!
//! Layout:
//! - [`mod@select`] (`select.rs`) — the `device` rules: [`select()`], [`select_with`] (driver probe
//!   injected), [`Selected`] and its log line, [`DeviceError`], [`probe_driver`].
//! - `probe.rs` (feature `cuda`) — the real probe: cudarc's fallible `is_culib_present` before
//!   anything that would panic, `cuInit`, device count and names; `dlopen`'s own reason when
//!   `libcuda.so.1` does not load.
//! - [`library`] (`library.rs`) — [`find_library`] for the driver, NCCL and NVRTC (override
//!   variables, `LD_LIBRARY_PATH`, `CUDA_HOME`/`CUDA_PATH`, `/usr/local/cuda`, the system's
//!   folders, Python's `site-packages/nvidia/*/lib`), and [`find_cuda_headers`].
//! - [`prepare`] (`prepare.rs`) — the private links folder, the re-execution and its loop guard.
//! - [`mod@report`] (`report.rs`) — [`DeviceReport`], the JSON of `trainer device-info`.

pub mod library;
pub mod prepare;
#[cfg(feature = "cuda")]
mod probe;
pub mod report;
pub mod select;

pub use library::{
    FoundLibrary, Headers, LibraryError, LibraryKind, SearchRoots, Source, find_cuda_headers,
    find_library, find_library_in,
};
pub use prepare::{
    Link, Prepared, READY_MARKER, ensure_cuda_libraries, prepare_cuda_libraries,
    prepare_cuda_libraries_in, reexec_with_library_path,
};
pub use report::{DeviceReport, LibraryReport, report, report_with};
pub use select::{
    BUILT_WITH_CUDA, DeviceError, DeviceRequest, Driver, Selected, probe_driver, select,
    select_with,
};

/// How this crate reads environment variables: injected, so tests need not touch the process's.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process's environment, as an [`Env`] (a variable that is not UTF-8 reads as unset).
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    /// A fixed environment for tests.
    pub struct FakeEnv(HashMap<String, String>);

    impl FakeEnv {
        pub fn new(vars: &[(&str, &str)]) -> FakeEnv {
            FakeEnv(
                vars.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            )
        }

        pub fn f(&self) -> impl Fn(&str) -> Option<String> + '_ {
            |k| self.0.get(k).cloned()
        }
    }

    /// Creates an empty file and its folders.
    pub fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().expect("test paths have a parent"))
            .expect("create test folders");
        std::fs::write(path, b"").expect("create test file");
    }
}
