//! Kernel specifications and their MLIR. A kernel is specialized for everything known at
//! compile time (its op, attributes and constant sizes); the batch and sequence length are
//! read at run time, so one kernel serves every length.

pub mod attention;
pub mod attention_grad;
pub mod attention_mma;
pub mod attention_mma_grad;
pub mod block;
pub mod decode;
pub mod decode_gpu;
pub mod elementwise;
pub mod gemm;
pub mod generic;
pub mod loss;
pub mod matmul;
pub mod matmul_mma;
pub mod optimizer;
pub mod projection_mma;
pub mod tensor_core;
pub mod warp;

use zebra_ir::op::{AttentionKernel, Op};
use zebra_ir::types::TensorType;

/// What one kernel computes.
#[derive(Clone, Debug)]
pub enum KernelSpec {
    /// Keys and values packed per tile for the attention kernel.
    PackKv {
        head_dim: usize,
        block_q: usize,
        block_k: usize,
    },
    Attention {
        kernel: AttentionKernel,
        /// Also write each query's log-sum-exp (for the backward).
        lse: bool,
    },
    /// A primitive operation on a vectorized path (see `elementwise`).
    Elementwise {
        op: Op,
        operands: Vec<TensorType>,
        out: TensorType,
    },
    /// A batched product of two activations.
    MatMul(matmul::MatMulShape),
    /// Cross-entropy over `h @ w^T` (`ce_lse`, `ce_loss`, `ce_grad`).
    CrossEntropy { op: Op, k: usize, vocab: usize },
    /// The gradient of an embedding table.
    EmbeddingGrad { vocab: usize, d: usize },
    /// One decode step of an attention against its KV cache.
    AttentionDecode {
        kernel: AttentionKernel,
        /// The cache it runs against: what it keeps, and of which KV heads.
        cache: zebra_ir::cache::HeadCache,
    },
    /// The attention's backward: `dQ`.
    AttentionDq { kernel: AttentionKernel },
    /// The attention's backward: `dK` and `dV`.
    AttentionDkv { kernel: AttentionKernel },
    Linear {
        k: usize,
        n: usize,
        norm_eps: Option<f64>,
        residual: bool,
        /// Only the last position of each batch row (a prefill's logits).
        last_rows: bool,
        /// Whether its packed weight is bf16 (`PackSpec::bf16`).
        bf16: bool,
    },
    SwiGlu {
        k: usize,
        n: usize,
        norm_eps: Option<f64>,
        bf16: bool,
    },
    HeadsProj {
        k: usize,
        heads: usize,
        head_dim: usize,
        norm_eps: Option<f64>,
        /// The bias, QK-norm and RoPE after the product.
        epilogue: gemm::HeadsEpilogue,
        bf16: bool,
    },
    /// A primitive operation, element by element.
    Generic {
        op: Op,
        operands: Vec<TensorType>,
        out: TensorType,
    },
    /// A kernel of a training plan's optimizer.
    Optimizer(optimizer::OptimizerKernel),
}

impl KernelSpec {
    /// A stable description: equal descriptions mean equal kernels.
    pub fn description(&self, vector: usize) -> String {
        let kernel_attrs = |k: &AttentionKernel| {
            zebra_ir::print::kernel_attributes(k)
                .into_iter()
                .map(|(a, v)| format!("{a}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let body = match self {
            KernelSpec::PackKv {
                head_dim,
                block_q,
                block_k,
            } => {
                format!("pack_kv d={head_dim} bq={block_q} bk={block_k}")
            }
            KernelSpec::Attention { kernel, lse } => {
                format!("attention {} lse={lse}", kernel_attrs(kernel))
            }
            KernelSpec::AttentionDq { kernel } => format!("attention_dq {}", kernel_attrs(kernel)),
            KernelSpec::AttentionDecode { kernel, cache } => {
                let held = if cache.kv_heads.len() as u64 == kernel.kv_heads {
                    String::new()
                } else {
                    format!(" kv_heads_held={:?}", cache.kv_heads)
                };
                format!(
                    "attention_decode {} sinks={} ring={:?}{held}",
                    kernel_attrs(kernel),
                    cache.policy.sinks,
                    cache.policy.ring
                )
            }
            KernelSpec::CrossEntropy { op, k, vocab } => {
                let attrs: Vec<String> = zebra_ir::print::attributes(op)
                    .into_iter()
                    .map(|(a, v)| format!("{a}={v}"))
                    .collect();
                format!("{} k={k} vocab={vocab} {}", op.name(), attrs.join(","))
            }
            KernelSpec::EmbeddingGrad { vocab, d } => format!("embedding_grad v={vocab} d={d}"),
            KernelSpec::MatMul(shape) => format!("matmul {}", shape.describe()),
            KernelSpec::Elementwise { op, operands, out } => {
                let attrs: Vec<String> = zebra_ir::print::attributes(op)
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let types: Vec<String> = operands.iter().map(|t| t.to_string()).collect();
                format!(
                    "vectorized {}{{{}}}({}) -> {out}",
                    op.name(),
                    attrs.join(","),
                    types.join(",")
                )
            }
            KernelSpec::AttentionDkv { kernel } => {
                format!("attention_dkv {}", kernel_attrs(kernel))
            }
            KernelSpec::Linear {
                k,
                n,
                norm_eps,
                residual,
                last_rows,
                bf16,
            } => {
                let last = if *last_rows { " last_rows" } else { "" };
                format!(
                    "linear k={k} n={n} norm={norm_eps:?} residual={residual}{last}{}",
                    bf16_weights(*bf16)
                )
            }
            KernelSpec::SwiGlu {
                k,
                n,
                norm_eps,
                bf16,
            } => {
                format!(
                    "swiglu k={k} n={n} norm={norm_eps:?}{}",
                    bf16_weights(*bf16)
                )
            }
            KernelSpec::HeadsProj {
                k,
                heads,
                head_dim,
                norm_eps,
                epilogue,
                bf16,
            } => {
                // Stable for the plain projections: their kernels keep their names.
                let mut extra = String::new();
                if epilogue.bias {
                    extra.push_str(" bias");
                }
                if let Some(eps) = epilogue.qk_norm {
                    extra.push_str(&format!(" qk_norm={eps:?}"));
                }
                format!(
                    "heads_proj k={k} h={heads} d={head_dim} norm={norm_eps:?}{extra} rope={}{}",
                    epilogue.rope,
                    bf16_weights(*bf16)
                )
            }
            KernelSpec::Generic { op, operands, out } => {
                let attrs: Vec<String> = zebra_ir::print::attributes(op)
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let types: Vec<String> = operands.iter().map(|t| t.to_string()).collect();
                format!(
                    "{}{{{}}}({}) -> {out}",
                    op.name(),
                    attrs.join(","),
                    types.join(",")
                )
            }
            KernelSpec::Optimizer(kernel) => kernel.describe(),
        };
        format!("vector={vector} {body}")
    }

    /// The symbol of the kernel: a hash of its description.
    pub fn symbol(&self, vector: usize) -> String {
        let kind = match self {
            KernelSpec::PackKv { .. } => "pack_kv",
            KernelSpec::Attention { .. } => "attention",
            KernelSpec::AttentionDq { .. } => "attention_dq",
            KernelSpec::AttentionDecode { .. } => "attention_decode",
            KernelSpec::CrossEntropy { op, .. } => op.name(),
            KernelSpec::EmbeddingGrad { .. } => "embedding_grad",
            KernelSpec::MatMul(_) => "gemm",
            KernelSpec::Elementwise { op, .. } => op.name(),
            KernelSpec::AttentionDkv { .. } => "attention_dkv",
            KernelSpec::Linear { .. } => "linear",
            KernelSpec::SwiGlu { .. } => "swiglu",
            KernelSpec::HeadsProj { .. } => "heads_proj",
            KernelSpec::Generic { op, .. } => op.name(),
            KernelSpec::Optimizer(kernel) => kernel.kind(),
        };
        format!(
            "zebra_{kind}_{:016x}",
            fnv1a(self.description(vector).as_bytes())
        )
    }

    /// The kernel's MLIR function.
    pub fn mlir(&self, vector: usize) -> String {
        let name = self.symbol(vector);
        match self {
            KernelSpec::PackKv {
                head_dim,
                block_q,
                block_k,
            } => {
                let layout = attention::Layout::new(*head_dim, *block_q, *block_k, vector);
                attention::pack_kv(&name, *head_dim, *block_k, layout)
            }
            KernelSpec::Attention { kernel, lse } => {
                attention::attention(&name, kernel, *lse, vector)
            }
            KernelSpec::AttentionDq { kernel } => {
                attention_grad::attention_dq(&name, kernel, vector)
            }
            KernelSpec::AttentionDecode { kernel, cache } => {
                decode::attention_decode(&name, kernel, cache, vector)
            }
            KernelSpec::CrossEntropy { op, k, vocab } => match op {
                Op::CeLse => loss::ce_lse(&name, *k, *vocab, vector),
                Op::CeLoss => loss::ce_loss(&name, *k, vector),
                Op::CeGrad {
                    wrt: zebra_ir::op::CeGradOf::Hidden,
                } => loss::ce_grad_hidden(&name, *k, *vocab, vector),
                _ => loss::ce_grad_weight(&name, *k, vector),
            },
            KernelSpec::EmbeddingGrad { vocab, d } => {
                loss::embedding_grad(&name, *vocab, *d, vector)
            }
            KernelSpec::MatMul(shape) => matmul::matmul(&name, shape, vector),
            KernelSpec::Elementwise { op, operands, out } => {
                if elementwise::is_row_kernel(op) {
                    elementwise::rows(&name, op, operands, out, vector)
                } else {
                    elementwise::flat(&name, op, operands, out, vector)
                }
            }
            KernelSpec::AttentionDkv { kernel } => {
                attention_grad::attention_dkv(&name, kernel, vector)
            }
            KernelSpec::Linear {
                k,
                n,
                norm_eps,
                residual,
                last_rows,
                bf16,
            } => gemm::linear(
                &name,
                gemm::Shape {
                    k: *k,
                    n: *n,
                    vector,
                    bf16: *bf16,
                },
                *norm_eps,
                *residual,
                *last_rows,
            ),
            KernelSpec::SwiGlu {
                k,
                n,
                norm_eps,
                bf16,
            } => gemm::swiglu(
                &name,
                gemm::Shape {
                    k: *k,
                    n: *n,
                    vector,
                    bf16: *bf16,
                },
                *norm_eps,
            ),
            KernelSpec::HeadsProj {
                k,
                heads,
                head_dim,
                norm_eps,
                epilogue,
                bf16,
            } => gemm::heads_proj(
                &name,
                *k,
                *heads,
                *head_dim,
                *norm_eps,
                *epilogue,
                (vector, *bf16),
            ),
            KernelSpec::Generic { op, operands, out } => generic::kernel(&name, op, operands, out),
            KernelSpec::Optimizer(kernel) => kernel.mlir(&name, vector),
        }
    }
}

pub use zebra_runtime::fnv1a;

/// The projection kernels' description of their weights' type (f32 says nothing).
fn bf16_weights(bf16: bool) -> &'static str {
    if bf16 { " weights=bf16" } else { "" }
}
