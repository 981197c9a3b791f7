//! NCCL through cudarc (feature `cuda`).
