//! `trainer device-info`: what the device selection and the library search find, as JSON.

use std::path::PathBuf;

use serde::Serialize;

use crate::Env;
use crate::library::{
    FoundLibrary, Headers, LibraryKind, SearchRoots, find_cuda_headers, find_library_in,
};
use crate::prepare::READY_MARKER;
use crate::select::{BUILT_WITH_CUDA, DeviceRequest, Driver, Selected, select_with};

/// One library: where it was found (or why not) and whether cudarc opens it in this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LibraryReport {
    pub kind: LibraryKind,
    pub found: Option<FoundLibrary>,
    pub error: Option<String>,
    /// cudarc's own check (`is_culib_present`) with this process's `LD_LIBRARY_PATH`; `None`
    /// without the `cuda` feature.
    pub loads: Option<bool>,
}

/// Everything `trainer device-info` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceReport {
    pub request: DeviceRequest,
    pub built_with_cuda: bool,
    pub selected: Option<Selected>,
    /// The selection error, one line, when there is one.
    pub error: Option<String>,
    /// The log line (`device: ...`) or the error.
    pub line: String,
    pub libraries: Vec<LibraryReport>,
    pub headers: Headers,
    /// `RINGMASTER_CUDA_LIBS_READY` (set in a re-executed process).
    pub libs_ready: Option<String>,
    pub ld_library_path: Option<String>,
    pub cuda_path: Option<PathBuf>,
}

/// Builds the report on this machine (the real driver probe).
pub fn report(request: DeviceRequest, env: Env<'_>) -> DeviceReport {
    report_with(request, env, &SearchRoots::system(), || {
        crate::select::probe_driver(env)
    })
}

/// [`report`] with the search roots and the driver probe injected.
pub fn report_with(
    request: DeviceRequest,
    env: Env<'_>,
    roots: &SearchRoots,
    probe: impl FnOnce() -> Driver,
) -> DeviceReport {
    let sel = select_with(request, env, probe);
    let libraries = LibraryKind::ALL
        .iter()
        .map(|&kind| {
            let r = find_library_in(kind, env, roots);
            LibraryReport {
                kind,
                error: r.as_ref().err().map(ToString::to_string),
                found: r.ok(),
                loads: loads(kind),
            }
        })
        .collect();
    DeviceReport {
        request,
        built_with_cuda: BUILT_WITH_CUDA,
        line: match &sel {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        },
        error: sel.as_ref().err().map(ToString::to_string),
        selected: sel.ok(),
        libraries,
        headers: find_cuda_headers(env, roots),
        libs_ready: env(READY_MARKER),
        ld_library_path: env("LD_LIBRARY_PATH"),
        cuda_path: env("CUDA_PATH").map(PathBuf::from),
    }
}

fn loads(kind: LibraryKind) -> Option<bool> {
    #[cfg(feature = "cuda")]
    {
        Some(crate::probe::loads(kind))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = kind;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{FakeEnv, touch};

    #[test]
    fn the_report_holds_the_selection_and_each_library() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        touch(&t.join("ld/libnccl.so.2"));
        let roots = SearchRoots {
            cuda_roots: vec![],
            system_dirs: vec![],
            python_lib_dirs: vec![],
        };
        let ld = t.join("ld").display().to_string();
        let env = FakeEnv::new(&[("LD_LIBRARY_PATH", &ld)]);
        let r = report_with(DeviceRequest::Cuda, &env.f(), &roots, || Driver::NotBuilt);
        assert_eq!(r.selected, None);
        assert!(r.line.contains("built without the `cuda` feature"));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["request"], "cuda");
        assert_eq!(v["libraries"][0]["kind"], "driver");
        assert!(
            v["libraries"][0]["error"]
                .as_str()
                .unwrap()
                .contains("libcuda.so.1")
        );
        assert_eq!(
            v["libraries"][1]["found"]["path"],
            t.join("ld/libnccl.so.2").display().to_string()
        );
        assert_eq!(v["libraries"][1]["found"]["source"], "ld_library_path");
        assert_eq!(v["ld_library_path"], ld);
    }
}
