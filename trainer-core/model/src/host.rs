//! Process settings for running the model on the CPU backend.
//!
//! A training step allocates and frees the same large buffers every step (activations,
//! gradients, logits of `tokens × vocab`). glibc's malloc serves any block over its mmap
//! threshold (128 KiB, adapted up to 32 MiB) with a fresh `mmap` and returns it with `munmap`
//! on free, so every step the kernel faults in and zeroes those pages again: `perf` put 17–22%
//! of a 124.7M-parameter step in `clear_page_erms` + `exc_page_fault` (docs/benchmarks.md).
//! [`tune_allocator`] makes malloc keep freed memory for reuse instead: blocks come from the
//! heap (`M_MMAP_MAX = 0`) and free memory at its top is kept up to 2 GiB (`M_TRIM_THRESHOLD`).
//! The process's peak RSS is unchanged in kind (it was the high-water mark already); memory
//! freed after the peak is kept by the process instead of being returned.

/// Tunes glibc's malloc for a training process (see the module docs). Call first thing in
/// `main`, before other threads exist. A user's `MALLOC_MMAP_MAX_` / `MALLOC_TRIM_THRESHOLD_`
/// (or `GLIBC_TUNABLES`) in the environment wins; `RINGMASTER_MALLOC=default` skips the
/// tuning. Returns whether it was applied.
pub fn tune_allocator() -> bool {
    if std::env::var("RINGMASTER_MALLOC").is_ok_and(|v| v == "default")
        || std::env::var_os("MALLOC_MMAP_MAX_").is_some()
        || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only changes malloc's parameters; it is called before other threads run.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn large_blocks_are_reused_after_tuning() {
        // In-process: the test harness has threads already, but mallopt is thread-safe in
        // glibc (it takes the arena lock); the module's "first thing" rule is about not
        // changing the policy under allocations in flight, which only costs speed.
        if !super::tune_allocator() {
            return;
        }
        let a = vec![1u8; 64 << 20];
        let p = a.as_ptr() as usize;
        drop(a);
        let b = vec![2u8; 64 << 20];
        // Served from the heap, not a fresh mapping: the same address comes back.
        assert_eq!(b.as_ptr() as usize, p, "a freed 64 MiB block is reused");
    }
}
