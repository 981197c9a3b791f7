//! The re-execution end to end, without CUDA: a pip-like tree whose `libnccl.so.2` is a real
//! shared library (libm, under another name), linked and re-executed by this very test binary;
//! after the exec, `dlopen("libnccl.so")` — the bare name cudarc opens — must load, and a
//! second `ensure_cuda_libraries` must not exec again. With the `cuda` feature, cudarc's own
//! check (`is_culib_present`, its candidate names) must find it too.

use std::path::{Path, PathBuf};
use std::process::Command;

use ringmaster_device::{
    BUILT_WITH_CUDA, LibraryKind, READY_MARKER, ensure_cuda_libraries, process_env,
};

const CHILD: &str = "RINGMASTER_DEVICE_TEST_CHILD";

fn real_shared_library() -> Option<PathBuf> {
    [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib64/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

fn dlopen_ok(name: &str) -> bool {
    let c = std::ffi::CString::new(name).expect("no NUL in a library name");
    // SAFETY: a NUL-terminated name; the handle is closed at once.
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if h.is_null() {
            return false;
        }
        libc::dlclose(h);
        true
    }
}

/// The child's two lives: before the exec `ensure_cuda_libraries` does not return; after it,
/// it returns and the bare name loads.
#[test]
fn reexec_child() {
    if std::env::var_os(CHILD).is_none() {
        return; // only meaningful when started by the test below
    }
    let before = std::env::var_os(READY_MARKER).is_some();
    let prepared = ensure_cuda_libraries(&[LibraryKind::Nccl]).expect("prepare and re-exec");
    assert!(
        before,
        "ensure_cuda_libraries returned without re-executing"
    );
    println!(
        "LD_LIBRARY_PATH={}",
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    );
    println!("dir={}", prepared.dir.display());
    println!("libnccl.so loads: {}", dlopen_ok("libnccl.so"));
    // cudarc's own check over its candidate names (feature `cuda`; None without it).
    let report = ringmaster_device::report(ringmaster_device::DeviceRequest::Cpu, &process_env);
    let nccl = report
        .libraries
        .iter()
        .find(|l| l.kind == LibraryKind::Nccl)
        .expect("the report lists NCCL");
    println!("cudarc opens nccl: {:?}", nccl.loads);
}

#[test]
fn reexec_puts_the_links_first_and_the_bare_name_loads() {
    let Some(lib) = real_shared_library() else {
        eprintln!("no libm.so.6 found: skipped");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let nccl_dir = t.join("venv/lib/python3.12/site-packages/nvidia/nccl/lib");
    std::fs::create_dir_all(&nccl_dir).unwrap();
    std::os::unix::fs::symlink(&lib, nccl_dir.join("libnccl.so.2")).unwrap();
    let private_tmp = t.join("tmp");
    std::fs::create_dir_all(&private_tmp).unwrap();

    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "reexec_child", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("VIRTUAL_ENV", t.join("venv"))
        .env("TMPDIR", &private_tmp)
        .env("LD_LIBRARY_PATH", "/old-entry")
        .env_remove(READY_MARKER)
        .env_remove("RINGMASTER_NCCL_LIB")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("dir="))
        .unwrap_or_else(|| panic!("no dir line:\n{stdout}\n{stderr}"));
    assert!(Path::new(dir).starts_with(&private_tmp), "{dir}");
    let ld = stdout
        .lines()
        .find_map(|l| l.split_once("LD_LIBRARY_PATH=").map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no LD_LIBRARY_PATH line:\n{stdout}\n{stderr}"));
    let parts: Vec<&str> = ld.split(':').collect();
    assert_eq!(parts.first(), Some(&dir), "{ld}");
    assert_eq!(parts.last(), Some(&"/old-entry"), "{ld}");
    let want = if BUILT_WITH_CUDA {
        "Some(true)"
    } else {
        "None"
    };
    assert!(
        stdout.contains(&format!("cudarc opens nccl: {want}")),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("libnccl.so loads: true"),
        "{stdout}\n{stderr}"
    );
}
