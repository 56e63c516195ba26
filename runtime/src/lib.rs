//! Zebra's runtime: runs compiled artifacts (an execution plan and its kernels) without MLIR
//! or LLVM. On the CPU, kernels come from a shared library and run their grids of programs
//! on a thread pool.

pub mod artifact;
pub mod attention_check;
pub mod buffer;
pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod cuda_attention;
pub mod data;
pub mod generate;
pub mod kv;
pub mod optim;
pub mod pack;
pub mod plan;
pub mod plot;
pub mod sample;
pub mod train;
pub mod tuning;

pub use artifact::{Artifact, ArtifactError};
pub use zebra_ir::memory;

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
pub use cpu::{CpuModel, MAX_THREADS, RuntimeError, Tensor};

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
    /// Whether the plan is a decode step (with KV caches).
    fn is_decode(&self) -> bool;
    /// Fills the KV caches from a prefill plan's outputs.
    fn start_decode(
        &mut self,
        prefill: &std::collections::BTreeMap<String, ndarray::ArrayD<f32>>,
    ) -> Result<(), RuntimeError>;
    /// One decode step for `tokens [B, 1]`.
    fn decode(
        &mut self,
        tokens: &ndarray::ArrayD<i64>,
    ) -> Result<std::collections::BTreeMap<String, ndarray::ArrayD<f32>>, RuntimeError>;
    /// Tokens the caches hold.
    fn cached_tokens(&self) -> usize;
    /// KV-cache bytes held, and what full attention would hold.
    fn cache_bytes(&self) -> (usize, usize);
    /// As `run`, returning only the outputs `keep` accepts by name.
    fn run_keeping(
        &mut self,
        inputs: &std::collections::BTreeMap<String, Tensor>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<std::collections::BTreeMap<String, ndarray::ArrayD<f32>>, RuntimeError>;
    /// A training plan's optimizer: the partial sums of squares of the last step's
    /// gradients.
    fn grad_partials(&mut self) -> Result<Vec<f32>, RuntimeError>;
    /// A training plan's optimizer: AdamW with these scalars ([`plan::Hyper`]), in place.
    fn apply_update(&mut self, hyper: &[f32; plan::HYPER]) -> Result<(), RuntimeError>;
    /// The weights as they are now, in the order of the plan's.
    fn read_weights(&mut self) -> Result<Vec<Vec<f32>>, RuntimeError>;
    /// AdamW's moments of each trained weight.
    fn moments(&mut self) -> Result<Vec<crate::optim::MomentPair>, RuntimeError>;
    fn set_moments(&mut self, moments: &[crate::optim::MomentPair]) -> Result<(), RuntimeError>;
}

/// Implements [`Executor`] by the type's own methods of the same names.
macro_rules! executor {
    ($ty:ty) => {
        impl Executor for $ty {
            fn plan(&self) -> &plan::Plan {
                <$ty>::plan(self)
            }
            fn run(
                &mut self,
                inputs: &std::collections::BTreeMap<String, Tensor>,
            ) -> Result<std::collections::BTreeMap<String, ndarray::ArrayD<f32>>, RuntimeError>
            {
                <$ty>::run(self, inputs)
            }
            fn set_weights(&mut self, weights: &zebra_ir::Weights) -> Result<(), RuntimeError> {
                <$ty>::set_weights(self, weights)
            }
            fn is_decode(&self) -> bool {
                <$ty>::is_decode(self)
            }
            fn start_decode(
                &mut self,
                prefill: &std::collections::BTreeMap<String, ndarray::ArrayD<f32>>,
            ) -> Result<(), RuntimeError> {
                <$ty>::start_decode(self, prefill)
            }
            fn decode(
                &mut self,
                tokens: &ndarray::ArrayD<i64>,
            ) -> Result<std::collections::BTreeMap<String, ndarray::ArrayD<f32>>, RuntimeError>
            {
                <$ty>::decode(self, tokens)
            }
            fn cached_tokens(&self) -> usize {
                <$ty>::cached_tokens(self)
            }
            fn cache_bytes(&self) -> (usize, usize) {
                <$ty>::cache_bytes(self)
            }
            fn run_keeping(
                &mut self,
                inputs: &std::collections::BTreeMap<String, Tensor>,
                keep: &dyn Fn(&str) -> bool,
            ) -> Result<std::collections::BTreeMap<String, ndarray::ArrayD<f32>>, RuntimeError>
            {
                <$ty>::run_keeping(self, inputs, keep)
            }
            fn grad_partials(&mut self) -> Result<Vec<f32>, RuntimeError> {
                <$ty>::grad_partials(self)
            }
            fn apply_update(&mut self, hyper: &[f32; plan::HYPER]) -> Result<(), RuntimeError> {
                <$ty>::apply_update(self, hyper)
            }
            fn read_weights(&mut self) -> Result<Vec<Vec<f32>>, RuntimeError> {
                <$ty>::read_weights(self)
            }
            fn moments(&mut self) -> Result<Vec<crate::optim::MomentPair>, RuntimeError> {
                <$ty>::moments(self)
            }
            fn set_moments(
                &mut self,
                moments: &[crate::optim::MomentPair],
            ) -> Result<(), RuntimeError> {
                <$ty>::set_moments(self, moments)
            }
        }
    };
}

executor!(CpuModel);
executor!(cuda::CudaModel);

// Flag parsers shared by `zebra` and `zebra-run`.

/// Parses a count flag that must be at least 1 (`--seq-len`, `--repeats`, ...).
pub fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a whole number")),
    }
}

/// Parses a `--threads` flag: 0 (one per core) up to [`MAX_THREADS`].
pub fn parse_threads(text: &str) -> Result<usize, String> {
    let n: usize = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of threads"))?;
    if n > MAX_THREADS {
        return Err(format!("at most {MAX_THREADS} threads (0: one per core)"));
    }
    Ok(n)
}
