//! What the front-ends may ask about this machine: CUDA devices, CPUs, the host name.

use crate::plan::Probe;

/// This machine, as the launcher sees it: CUDA devices are the `/dev/nvidia<N>` device files
/// (no driver library is loaded), narrowed by `CUDA_VISIBLE_DEVICES` when it is set.
pub fn detect() -> Probe {
    let present = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.strip_prefix("nvidia")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0);
    let cuda_devices = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if v.trim().is_empty() => 0,
        Ok(v) => v
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .count()
            .min(present),
        Err(_) => present,
    };
    Probe {
        cuda_devices,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into()),
    }
}
