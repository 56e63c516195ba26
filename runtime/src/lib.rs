//! Zebra's runtime: runs compiled artifacts (an execution plan and its kernels) without MLIR
//! or LLVM. On the CPU, kernels come from a shared library and run their grids of programs
//! on a thread pool.

pub mod artifact;
pub mod buffer;
pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod generate;
pub mod kv;
pub mod optim;
pub mod pack;
pub mod plan;
pub mod plot;
pub mod sample;
pub mod train;

pub use artifact::{Artifact, ArtifactError};

/// The 64-bit FNV-1a hash: content keys of the kernel cache and the check that a kernel
/// library is the one its plan was built with. Not cryptographic; it guards against
/// corruption and mix-ups, not malice.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
pub use cpu::{CpuModel, RuntimeError, Tensor};

/// What runs a plan: the CPU executor or the CUDA one.
pub trait Executor {
    fn plan(&self) -> &plan::Plan;
    /// Runs the plan on `[B, T]` inputs; returns its outputs.
    fn run(
        &mut self,
        inputs: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<std::collections::BTreeMap<String, ndarray::ArrayD<f32>>, RuntimeError>;
    /// Replaces the weights.
    fn set_weights(&mut self, weights: &zebra_ir::Weights) -> Result<(), RuntimeError>;
}

impl Executor for CpuModel {
    fn plan(&self) -> &plan::Plan {
        CpuModel::plan(self)
    }
    fn run(
        &mut self,
        inputs: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<std::collections::BTreeMap<String, ndarray::ArrayD<f32>>, RuntimeError> {
        CpuModel::run(self, inputs)
    }
    fn set_weights(&mut self, weights: &zebra_ir::Weights) -> Result<(), RuntimeError> {
        CpuModel::set_weights(self, weights)
    }
}

impl Executor for cuda::CudaModel {
    fn plan(&self) -> &plan::Plan {
        cuda::CudaModel::plan(self)
    }
    fn run(
        &mut self,
        inputs: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<std::collections::BTreeMap<String, ndarray::ArrayD<f32>>, RuntimeError> {
        cuda::CudaModel::run(self, inputs)
    }
    fn set_weights(&mut self, weights: &zebra_ir::Weights) -> Result<(), RuntimeError> {
        cuda::CudaModel::set_weights(self, weights)
    }
}
