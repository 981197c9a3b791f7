//! Process settings for running the model on the CPU backend, and the CPU's measured f32
//! matrix-multiply rate ([`measure_f32_gemm_flops`], the peak MFU divides by).
//!
//! A training step allocates and frees the same large buffers every step (activations,
//! gradients, logits of `tokens × vocab`). glibc's malloc serves any block over its mmap
//! threshold (128 KiB, adapted up to 32 MiB) with a fresh `mmap` and returns it with `munmap`
//! on free, so every step the kernel faults in and zeroes those pages again: `perf` put 17–22%
//! of a 124.7M-parameter step in `clear_page_erms` + `exc_page_fault` (docs/benchmarks.md).
//! [`tune_allocator`] makes malloc keep freed memory for reuse instead: blocks come from the
//! heap (`M_MMAP_MAX = 0`) and free memory at its top is kept up to 2 GiB (`M_TRIM_THRESHOLD`).
//! One arena serves every thread (`M_ARENA_MAX = 1`): the training loop runs on a compute-pool
//! thread ([`on_compute_pool`]), and a per-thread arena is built from 64 MiB mmapped heaps that
//! cannot hold a large activation, which would then fall back to the main heap anyway while the
//! small blocks stayed behind in the other arena (measured: a 3.4M DDP rank's peak RSS
//! 0.23 → 0.26 GiB without this). The process's peak RSS is unchanged in kind (it was the high-water mark already); memory
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
            && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

/// Stack of the compute pool's threads: the training loop runs on one of them.
const COMPUTE_STACK: usize = 64 << 20;

/// Runs `f` on a thread of a rayon pool sized as rayon's global pool would be
/// (`RAYON_NUM_THREADS`, else one thread per CPU), so that the kernels' parallel loops and
/// burn-flex's `gemm` calls start on the thread that issues them.
///
/// Called from a thread outside any pool (`main`), every parallel loop is handed to a pool
/// worker and the caller sleeps until it is done: with one thread per rank (the engines'
/// setting) each of the ~150 kernel and matmul calls of a small model's step then crossed
/// threads twice (futex wake-ups), and `perf` showed part of the step's work on the worker
/// and the rest on `main`. Inside the pool a one-thread pool runs everything inline, and a
/// larger pool splits work from its own thread. If the pool cannot be built, `f` runs here.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("compute-{i}"))
        .stack_size(COMPUTE_STACK)
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// This thread pool's f32 matrix-multiply rate in FLOP/s: square `gemm` products (the kernel
/// under burn-flex's matmul), split over the current rayon pool as the model's are, repeated
/// for about `budget` after one warm-up; the best product's rate. The CPU's "peak" for MFU:
/// what this process can reach on its cores now, not a datasheet figure (ranks sharing a host
/// measure at about the same time and so each see their share).
pub fn measure_f32_gemm_flops(budget: std::time::Duration) -> f64 {
    const N: usize = 384;
    let a = vec![1.0f32; N * N];
    let b = vec![0.5f32; N * N];
    let mut c = vec![0.0f32; N * N];
    let threads = rayon::current_num_threads().max(1);
    let mut product = || {
        let start = std::time::Instant::now();
        // SAFETY: a, b and c are N × N row-major buffers that outlive the call; c is written
        // only here.
        unsafe {
            gemm::gemm(
                N,
                N,
                N,
                c.as_mut_ptr(),
                1,
                N as isize,
                false,
                a.as_ptr(),
                1,
                N as isize,
                b.as_ptr(),
                1,
                N as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                },
            );
        }
        start.elapsed()
    };
    product();
    let flops = 2.0 * (N * N * N) as f64;
    let started = std::time::Instant::now();
    let mut best = f64::INFINITY;
    while started.elapsed() < budget || best.is_infinite() {
        best = best.min(product().as_secs_f64());
    }
    flops / best.max(1e-9)
}

#[cfg(test)]
mod tests {
    #[test]
    fn gemm_rate_is_measured() {
        let f = super::measure_f32_gemm_flops(std::time::Duration::from_millis(10));
        // Any CPU this runs on does between a GFLOP/s and a PFLOP/s of f32.
        assert!((1e9..1e15).contains(&f), "{f}");
    }

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
