//! Optimizer logic for Ringmaster's trainer, in plain Rust on flat `f32` slices, so that every
//! rule can be checked against its reference implementation in unit tests. Walls: no burn and
//! no crate of ours; no ranks either (the engine sums norms across ranks and calls in here).
//!
//! Layout:
//! - [`adamw`] — one `torch.optim.AdamW` step (decoupled weight decay, bias correction).
//! - [`schedule`] — the learning-rate schedules of Hugging Face transformers' `get_scheduler`
//!   (`linear`, `cosine`, `cosine_with_restarts`, `polynomial`, `constant`,
//!   `constant_with_warmup`, `inverse_sqrt`, `cosine_with_min_lr`) and its warmup resolution.
//! - [`scaler`] — DeepSpeed's dynamic fp16 loss scaler (hysteresis, window, floor).
//! - [`clip`] — `torch.nn.utils.clip_grad_norm_`'s coefficient and the helpers around it.
//! - [`plot`] — LLaMA-Factory's `training_loss.png` (raw and smoothed loss curve).
//!
//! ```
//! use ringmaster_optim::{AdamWConfig, AdamWState, Scheduler, SchedulerKind, adamw_step};
//!
//! let sched = Scheduler::new(SchedulerKind::Linear, 1e-3, 2, 10);
//! let cfg = AdamWConfig { weight_decay: 0.01, ..Default::default() };
//! let mut params = vec![1.0_f32, -2.0];
//! let mut state = AdamWState::new(params.len());
//! for step in 0..10 {
//!     let grads: Vec<f32> = params.iter().map(|p| 2.0 * p).collect();
//!     adamw_step(&cfg, &mut state, &mut params, &grads, sched.lr(step), cfg.weight_decay);
//! }
//! assert_eq!(state.step, 10);
//! assert!(params[0] < 1.0 && params[1] > -2.0);
//! ```

pub mod adamw;
pub mod clip;
pub mod plot;
pub mod scaler;
pub mod schedule;

pub use adamw::{AdamWConfig, AdamWState, adamw_step};
pub use clip::{clip_coef, scale_in_place, sum_squares};
pub use plot::write_loss_png;
pub use scaler::{DynamicLossScaler, LossScalerConfig, has_overflow};
pub use schedule::{ScheduleOptions, Scheduler, SchedulerKind, resolve_warmup};
