//! Generation with a compiled model: the prompt through the prefill plan (the fused
//! attention over the whole prompt, which also yields every layer's keys and values), then one
//! decode step per token against the KV caches. Used by `zebra generate` and `zebra-run`.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use ndarray::{ArrayD, IxDyn};
use zebra_ir::Weights;

use crate::Executor;
use crate::cpu::{CpuModel, RuntimeError, Tensor};
use crate::sample::Sampler;

/// A model loaded for generation: its prefill and decode plans.
pub struct Generator {
    pub prefill: Box<dyn Executor>,
    pub decode: Box<dyn Executor>,
}

/// What a generation did.
#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated: usize,
    /// Whether the emitter ended the generation (an end-of-sequence token).
    pub ended: bool,
    pub prefill: Duration,
    pub decode: Duration,
    /// KV-cache bytes held at the end, and what full attention in every layer would hold.
    pub cache_bytes: usize,
    pub full_cache_bytes: usize,
}

impl Generator {
    /// Loads `dir/prefill` and `dir/decode` (as `zebra compile --emit artifact --for generate`
    /// writes them); both plans read one copy of the weights.
    pub fn load(dir: &Path, weights: &Weights, threads: usize) -> Result<Generator, RuntimeError> {
        let (prefill, decode) =
            CpuModel::load_pair(&dir.join("prefill"), &dir.join("decode"), weights, threads)?;
        Generator::from_parts(Box::new(prefill), Box::new(decode))
    }

    /// Loads `dir/prefill` and `dir/decode` compiled for a GPU, on GPU 0 (one copy of the
    /// weights there).
    pub fn load_cuda(dir: &Path, weights: &Weights) -> Result<Generator, RuntimeError> {
        let (prefill, decode) =
            crate::cuda::CudaModel::load_pair(&dir.join("prefill"), &dir.join("decode"), weights)?;
        Generator::from_parts(Box::new(prefill), Box::new(decode))
    }

    pub fn from_parts(
        prefill: Box<dyn Executor>,
        decode: Box<dyn Executor>,
    ) -> Result<Generator, RuntimeError> {
        if !decode.is_decode() || prefill.plan().caches.len() != decode.plan().caches.len() {
            return Err(RuntimeError::Decode(
                "these are not the prefill and decode plans of one model".into(),
            ));
        }
        Ok(Generator { prefill, decode })
    }

    /// The longest context (prompt and generated tokens) the plans serve.
    pub fn context(&self) -> usize {
        self.prefill
            .plan()
            .max_seq_len
            .min(self.decode.plan().max_seq_len)
    }

    /// The shortest prompt the masks allow (a prefix-LM's prefix).
    pub fn min_prompt(&self) -> usize {
        self.decode
            .plan()
            .caches
            .iter()
            .map(|c| c.min_prompt)
            .max()
            .unwrap_or(0)
    }

    /// Generates up to `max_tokens` tokens after `prompt` (stopping when the context is full),
    /// handing each to `emit` as it comes; `emit` ends the generation with
    /// `ControlFlow::Break` (after an end-of-sequence token).
    pub fn generate(
        &mut self,
        prompt: &[i64],
        max_tokens: usize,
        sampler: &mut Sampler,
        mut emit: impl FnMut(i64) -> std::io::Result<ControlFlow<()>>,
    ) -> Result<GenerationStats, RuntimeError> {
        if prompt.is_empty() {
            return Err(RuntimeError::Empty);
        }
        let context = self.context();
        if prompt.len() > context {
            return Err(RuntimeError::TooLong {
                found: prompt.len(),
                max: context,
            });
        }
        let start = Instant::now();
        let tokens =
            ArrayD::from_shape_vec(IxDyn(&[1, prompt.len()]), prompt.to_vec()).expect("[1, T]");
        let inputs = BTreeMap::from([("tokens".to_string(), Tensor::I64(tokens))]);
        let outputs = self.prefill.run(&inputs)?;
        self.decode.start_decode(&outputs)?;
        let mut next = sampler.next(&last_row(&outputs["logits"]));
        let prefill = start.elapsed();
        let start = Instant::now();
        let budget = max_tokens.min(context - prompt.len());
        let (mut generated, mut ended) = (0, false);
        while generated < budget {
            let flow =
                emit(next as i64).map_err(|e| RuntimeError::Decode(format!("writing: {e}")))?;
            generated += 1;
            ended = flow.is_break();
            if ended || generated == budget {
                break;
            }
            let step = self
                .decode
                .decode(&ArrayD::from_elem(IxDyn(&[1, 1]), next as i64))?;
            next = sampler.next(&last_row(&step["logits"]));
        }
        let (cache_bytes, full_cache_bytes) = self.decode.cache_bytes();
        Ok(GenerationStats {
            prompt_tokens: prompt.len(),
            generated,
            ended,
            prefill,
            decode: start.elapsed(),
            cache_bytes,
            full_cache_bytes,
        })
    }
}

/// The logits of the last position of row 0 of `[B, T, V]` logits.
fn last_row(logits: &ArrayD<f32>) -> Vec<f32> {
    let (t, v) = (logits.shape()[1], logits.shape()[2]);
    let flat = logits.as_slice().expect("contiguous logits");
    flat[(t - 1) * v..t * v].to_vec()
}
