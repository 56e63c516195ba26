//! Zebra's runtime: runs compiled artifacts (an execution plan and its kernels) without MLIR
//! or LLVM. On the CPU, kernels come from a shared library and run their grids of programs
//! on a thread pool.

pub mod artifact;
pub mod cpu;
pub mod pack;
pub mod plan;

pub use artifact::{Artifact, ArtifactError};
pub use cpu::{CpuModel, RuntimeError, Tensor};
