//! The real driver probe (feature `cuda`): cudarc's fallible loader check first, since
//! cudarc's `culib()` panics when no candidate name loads.

use std::ffi::CStr;

use cudarc::driver::{result, sys};

use crate::Env;
use crate::library::{LibraryError, LibraryKind, find_library};
use crate::select::Driver;

/// See [`crate::select::probe_driver`].
pub(crate) fn probe(env: Env<'_>) -> Driver {
    // SAFETY: loading a shared library runs its initialisers; the driver's are what every CUDA
    // program runs. The library is closed again; cudarc opens it for good below.
    if !unsafe { sys::is_culib_present() } {
        return Driver::Missing {
            detail: missing_detail(env),
        };
    }
    // cudarc panics on a symbol the library lacks; every driver has these (CUDA 2.0 on), but a
    // panic here must still not take the trainer down with a backtrace instead of a reason.
    std::panic::catch_unwind(|| {
        match result::init() {
            Ok(()) => {}
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => {
                return Driver::Ready { devices: vec![] };
            }
            Err(e) => {
                return Driver::InitFailed {
                    message: e.to_string(),
                };
            }
        }
        let count = match result::device::get_count() {
            Ok(n) => usize::try_from(n).unwrap_or(0),
            Err(e) => {
                return Driver::InitFailed {
                    message: format!("cuDeviceGetCount: {e}"),
                };
            }
        };
        let mut devices = Vec::with_capacity(count);
        for i in 0..count {
            let name = i32::try_from(i)
                .ok()
                .and_then(|i| result::device::get(i).ok())
                .and_then(|d| result::device::get_name(d).ok())
                .unwrap_or_else(|| format!("CUDA device {i}"));
            devices.push(name);
        }
        Driver::Ready { devices }
    })
    .unwrap_or_else(|_| Driver::InitFailed {
        message: "the CUDA driver library lacks a function cudarc needs".into(),
    })
}

/// `libcuda.so.1 did not load (<the loader's reason>); looked in ... and the loader's cache`.
fn missing_detail(env: Env<'_>) -> String {
    let reason = dlopen_error("libcuda.so.1").unwrap_or_else(|| "no reason given".into());
    let place = match find_library(LibraryKind::Driver, env) {
        Ok(f) => format!("found {} but it does not load", f.path.display()),
        Err(LibraryError::NotFound { looked, .. }) => format!(
            "looked in {} and the dynamic loader's cache",
            crate::library::join(&looked)
        ),
        Err(e) => e.to_string(),
    };
    format!("libcuda.so.1 did not load ({reason}); {place}")
}

/// The dynamic loader's own reason for refusing `name`, or `None` if it loads.
fn dlopen_error(name: &str) -> Option<String> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; a handle that comes back is closed at once; dlerror's
    // string is copied before any other dl call.
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if !h.is_null() {
            libc::dlclose(h);
            return None;
        }
        let e = libc::dlerror();
        if e.is_null() {
            return Some("unknown error".into());
        }
        Some(CStr::from_ptr(e).to_string_lossy().into_owned())
    }
}

/// Whether cudarc can open `kind` now, with this process's loader path: its own check.
pub(crate) fn loads(kind: LibraryKind) -> bool {
    // SAFETY: as in `probe`: loading runs the library's initialisers, then it is closed.
    unsafe {
        match kind {
            LibraryKind::Driver => sys::is_culib_present(),
            LibraryKind::Nccl => cudarc::nccl::sys::is_culib_present(),
            LibraryKind::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
        }
    }
}
