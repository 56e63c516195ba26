//! The operations of the graph IR and their typing rules.

use crate::expr::{Expr, ScalarType};
use crate::rope::Rope;
use crate::types::{DType, Dim, Shape, TensorType, broadcast_shapes, fmt_shape, same_volume};

/// Elementwise operations of one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    Recip,
}

/// Elementwise operations of two operands, broadcast numpy-style.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

/// Reductions along one axis; the axis is kept with size 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReduceOp {
    Sum,
    Max,
    Mean,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 8] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Recip,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Recip => "recip",
        }
    }

    pub fn apply(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Recip => 1.0 / x,
        }
    }
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 6] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
        }
    }

    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
        }
    }
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean];

    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Max => "reduce_max",
            ReduceOp::Mean => "reduce_mean",
        }
    }
}

/// Elementwise comparisons of two float operands, giving a bool tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CmpOp {
    pub const ALL: [CmpOp; 6] = [
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
        CmpOp::Eq,
        CmpOp::Ne,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CmpOp::Lt => "lt",
            CmpOp::Le => "le",
            CmpOp::Gt => "gt",
            CmpOp::Ge => "ge",
            CmpOp::Eq => "eq",
            CmpOp::Ne => "ne",
        }
    }

    pub fn apply(self, a: f64, b: f64) -> bool {
        match self {
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
        }
    }
}

/// A fused attention kernel: `softmax(mask(score(scale * Q K^T))) V` computed tile by tile
/// with an online softmax, never materializing the `[T, T]` scores. Query head `h` reads
/// key/value head `h / (heads / kv_heads)`. A query whose keys are all masked gets zeros.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionKernel {
    /// The kernel's name in the text form (the attention kind's label where known).
    pub name: String,
    pub mask: Expr,
    /// The score modifier, with `score` bound to the scaled score.
    pub score: Option<Expr>,
    /// The side inputs the mask and score read, in operand order.
    pub sides: Vec<String>,
    pub scale: f64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// The tile sizes along queries and keys.
    pub block_q: u64,
    pub block_k: u64,
    /// Write the output as `[B, T, heads * head_dim]` (heads merged, ready for the output
    /// projection) instead of `[B, heads, T, head_dim]`.
    pub merge_heads: bool,
    /// Where the attention's mask was written.
    pub loc: Option<crate::graph::Loc>,
}

impl AttentionKernel {
    /// The operand count: q, k, v, then per side input the values and their query-tile and
    /// key-tile ranges.
    pub fn arity(&self) -> usize {
        3 + 3 * self.sides.len()
    }

    /// Whether two kernels compute the same thing (names and source positions aside).
    pub fn same_computation(&self, other: &AttentionKernel) -> bool {
        AttentionKernel {
            name: String::new(),
            loc: None,
            ..self.clone()
        } == AttentionKernel {
            name: String::new(),
            loc: None,
            ..other.clone()
        }
    }
}

/// Which operand's gradient an `attention_grad` computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GradOf {
    Q,
    K,
    V,
}

impl GradOf {
    pub const ALL: [GradOf; 3] = [GradOf::Q, GradOf::K, GradOf::V];

    pub fn name(self) -> &'static str {
        match self {
            GradOf::Q => "q",
            GradOf::K => "k",
            GradOf::V => "v",
        }
    }
}

/// Which operand's gradient a `ce_grad` computes: the hidden states or the output weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CeGradOf {
    Hidden,
    Weight,
}

impl CeGradOf {
    pub const ALL: [CeGradOf; 2] = [CeGradOf::Hidden, CeGradOf::Weight];

    pub fn name(self) -> &'static str {
        match self {
            CeGradOf::Hidden => "hidden",
            CeGradOf::Weight => "weight",
        }
    }
}

/// One operation of the graph. Operands are the node's incoming edges, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input fed at run time: the token ids or a side input such as document ids.
    Input {
        name: String,
    },
    /// A named weight, read from the model's checkpoint (Hugging Face names and layouts).
    Weight {
        name: String,
    },
    /// A scalar constant.
    Constant {
        value: f64,
    },
    /// The position of each token along the sequence: `[0, 1, ..., T - 1]`.
    Positions,
    /// Row gather: `(table[V, D], ids[...]) -> [..., D]`.
    Embedding,
    /// Batched matrix product `[..., M, K] x [..., K, N] -> [..., M, N]`, batch dims broadcast.
    MatMul,
    Unary(UnaryOp),
    Binary(BinaryOp),
    Reduce {
        op: ReduceOp,
        axis: usize,
    },
    Reshape {
        shape: Shape,
    },
    Transpose {
        perm: Vec<usize>,
    },
    /// Broadcasts the operand to a larger shape (numpy `broadcast_to`).
    Expand {
        shape: Shape,
    },
    /// Rotary position embedding with Hugging Face's rotate-half convention:
    /// `(x[..., T, D], positions[T]) -> x * cos + rotate_half(x) * sin`, with the angle of
    /// pair `i` at position `p` being `p * base^(-2i / D)` (before scaling: see [`Rope`])
    /// and `rotate_half(x) = [-x2, x1]`.
    Rope {
        rope: Rope,
    },
    /// An attention mask: a boolean tensor over `[batch, head, query, key]` whose element is
    /// `expr` evaluated at its indices. Operands are the side inputs named in `sides`.
    Mask {
        expr: Expr,
        sides: Vec<String>,
    },
    /// A score modifier: `expr` evaluated at each element of the scores operand
    /// `[batch, head, query, key]`, with `score` bound to the element. Further operands are
    /// the side inputs named in `sides`.
    ScoreMod {
        expr: Expr,
        sides: Vec<String>,
    },
    /// `select(cond, a, b)`: `a` where `cond` holds, else `b`; all three broadcast.
    Select,
    /// Elementwise comparison of two floats, broadcast.
    Compare(CmpOp),

    // Fused operations, introduced by the optimizer.
    /// RMSNorm over the last axis: `x * rsqrt(mean(x^2) + eps) * g`; operands `(x, g)`.
    RmsNorm {
        eps: f64,
    },
    /// `x @ w^T` for a `[N, K]` weight. With `norm_eps`, RMSNorm(x, g) comes first (`g` is the
    /// operand after `w`); with `residual`, the last operand is added to the result.
    Linear {
        norm_eps: Option<f64>,
        residual: bool,
    },
    /// `silu(x @ wg^T) * (x @ wu^T)`, operands `(x, wg, wu)`, with RMSNorm(x, g) first when
    /// `norm_eps` is set (`g` last).
    SwiGlu {
        norm_eps: Option<f64>,
    },
    /// A projection to attention heads: `x @ w^T` for `x: [B, T, K]`, plus a bias `b` when
    /// `bias` is set, split into `[B, heads, T, head_dim]`, each head RMS-normalized with
    /// the scales `gh[head_dim]` when `qk_norm` is set, then RoPE at `positions` when `rope`
    /// is set. Operands `(x, w)`, then `g` if `norm_eps` is set, `b[heads * head_dim]` if
    /// `bias`, `gh` if `qk_norm`, `positions` if `rope`.
    HeadsProj {
        heads: u64,
        head_dim: u64,
        norm_eps: Option<f64>,
        bias: bool,
        qk_norm: Option<f64>,
        rope: Option<Rope>,
    },
    /// A fused attention (see [`AttentionKernel`]).
    Attention(Box<AttentionKernel>),
    /// The run-time block-classification step for masks over side inputs: the smallest and
    /// largest value of each block of `block` positions, `i64[B, T] -> i64[B, T/block, 2]`.
    TileRanges {
        block: u64,
    },

    // Training: the operations autodiff introduces.
    /// The natural log-sum-exp of each query's visible (modified) scores, `[B, H, T]`: what
    /// the attention's backward needs from its forward (`-inf` for a query that sees no key).
    /// Operands as the attention's; compiled together with the attention of the same
    /// operands, which writes it on the side.
    AttentionLse(Box<AttentionKernel>),
    /// A gradient of the fused attention, FlashAttention-2 style: operands the attention's
    /// (q, k, v, side inputs and their ranges), then its output `o`, the output's gradient
    /// `do` (both in the attention's output layout) and its `attention_lse`. The result has
    /// the shape of the operand `wrt` names; GQA heads sum into their KV head.
    AttentionGrad {
        kernel: Box<AttentionKernel>,
        wrt: GradOf,
    },
    /// The gradient of an embedding table: `(ids[...], dy[..., D]) -> [vocab, D]`, each row
    /// the sum of the gradients of the positions that read it.
    EmbeddingGrad {
        vocab: u64,
    },
    /// The adjoint of `rope`: the rotation by the opposite angle.
    RopeGrad {
        rope: Rope,
    },
    /// Cross-entropy over an output projection without materializing the logits: the
    /// log-sum-exp of `h @ w^T` per token, `(h[B, T, K], w[V, K]) -> [B, T]`.
    CeLse,
    /// Per-token cross-entropy, `lse - (h @ w^T)[target]`: operands `(h, w, targets i64[B, T],
    /// lse)`; a negative target marks a token without loss (0).
    CeLoss,
    /// A gradient of the per-token cross-entropy weighted by `dloss[B, T]`: operands `(h, w,
    /// targets, lse, dloss)`; the result is shaped like `h` or like `w`.
    CeGrad {
        wrt: CeGradOf,
    },
}

impl Op {
    /// The operation's name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Weight { .. } => "weight",
            Op::Constant { .. } => "constant",
            Op::Positions => "positions",
            Op::Embedding => "embedding",
            Op::MatMul => "matmul",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Reduce { op, .. } => op.name(),
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Expand { .. } => "expand",
            Op::Rope { .. } => "rope",
            Op::Mask { .. } => "mask",
            Op::ScoreMod { .. } => "score_mod",
            Op::Select => "select",
            Op::Compare(c) => c.name(),
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Linear { .. } => "linear",
            Op::SwiGlu { .. } => "swiglu",
            Op::HeadsProj { .. } => "heads_proj",
            Op::Attention(_) => "attention",
            Op::TileRanges { .. } => "tile_ranges",
            Op::AttentionLse(_) => "attention_lse",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::EmbeddingGrad { .. } => "embedding_grad",
            Op::RopeGrad { .. } => "rope_grad",
            Op::CeLse => "ce_lse",
            Op::CeLoss => "ce_loss",
            Op::CeGrad { .. } => "ce_grad",
        }
    }

    /// The attention kernel of `attention`, `attention_lse` and `attention_grad`.
    pub fn attention_kernel(&self) -> Option<&AttentionKernel> {
        match self {
            Op::Attention(kernel) | Op::AttentionLse(kernel) | Op::AttentionGrad { kernel, .. } => {
                Some(kernel)
            }
            _ => None,
        }
    }

    /// The same operation with its attention kernel replaced.
    pub fn with_attention_kernel(&self, new: AttentionKernel) -> Op {
        match self {
            Op::Attention(_) => Op::Attention(Box::new(new)),
            Op::AttentionLse(_) => Op::AttentionLse(Box::new(new)),
            Op::AttentionGrad { wrt, .. } => Op::AttentionGrad {
                kernel: Box::new(new),
                wrt: *wrt,
            },
            other => other.clone(),
        }
    }

    /// How many operands the operation takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Positions => 0,
            Op::Unary(_)
            | Op::Reduce { .. }
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Expand { .. } => 1,
            Op::Embedding | Op::MatMul | Op::Binary(_) | Op::Rope { .. } | Op::Compare(_) => 2,
            Op::Select => 3,
            Op::Mask { sides, .. } => sides.len(),
            Op::ScoreMod { sides, .. } => 1 + sides.len(),
            Op::RmsNorm { .. } => 2,
            Op::TileRanges { .. } => 1,
            Op::Linear { norm_eps, residual } => {
                2 + usize::from(norm_eps.is_some()) + usize::from(*residual)
            }
            Op::SwiGlu { norm_eps } => 3 + usize::from(norm_eps.is_some()),
            Op::HeadsProj {
                norm_eps,
                bias,
                qk_norm,
                rope,
                ..
            } => {
                2 + usize::from(norm_eps.is_some())
                    + usize::from(*bias)
                    + usize::from(qk_norm.is_some())
                    + usize::from(rope.is_some())
            }
            Op::Attention(kernel) | Op::AttentionLse(kernel) => kernel.arity(),
            Op::AttentionGrad { kernel, .. } => kernel.arity() + 3,
            Op::EmbeddingGrad { .. } | Op::RopeGrad { .. } | Op::CeLse => 2,
            Op::CeLoss => 4,
            Op::CeGrad { .. } => 5,
        }
    }

    /// Whether the node's type is given rather than inferred from operands.
    pub fn is_source(&self) -> bool {
        self.arity() == 0
    }

    /// Infers the result type from the operand types. Source ops and masks (whose batch and
    /// head extents are a choice) check `declared` instead of inventing a type.
    pub fn infer(
        &self,
        operands: &[&TensorType],
        declared: &TensorType,
    ) -> Result<TensorType, String> {
        if operands.len() != self.arity() {
            return Err(format!(
                "`{}` takes {} operand(s), found {}",
                self.name(),
                self.arity(),
                operands.len()
            ));
        }
        let float = |i: usize| -> Result<&TensorType, String> {
            let t = operands[i];
            if t.dtype.is_float() {
                Ok(t)
            } else {
                Err(format!(
                    "operand {i} of `{}` must be f32, found {t}",
                    self.name()
                ))
            }
        };
        match self {
            Op::Input { .. } => {
                if declared.dtype == DType::Bool {
                    return Err("inputs are numbers, not bool".into());
                }
                Ok(declared.clone())
            }
            Op::Weight { .. } => {
                if declared.dtype != DType::F32
                    || declared.shape.iter().any(|d| d.as_const().is_none())
                {
                    return Err(format!(
                        "a weight has a constant f32 shape, found {declared}"
                    ));
                }
                Ok(declared.clone())
            }
            Op::Constant { .. } => Ok(TensorType::f32(vec![])),
            Op::Positions => Ok(TensorType::new(DType::I64, vec![Dim::T])),
            Op::Embedding => {
                let table = float(0)?;
                let ids = operands[1];
                if table.rank() != 2 {
                    return Err(format!("the embedding table must be [V, D], found {table}"));
                }
                if ids.dtype != DType::I64 {
                    return Err(format!("embedding ids must be i64, found {ids}"));
                }
                let mut shape = ids.shape.clone();
                shape.push(table.shape[1]);
                Ok(TensorType::f32(shape))
            }
            Op::MatMul => {
                let (a, b) = (float(0)?, float(1)?);
                if a.rank() < 2 || b.rank() < 2 {
                    return Err(format!(
                        "matmul needs rank >= 2 operands, found {a} and {b}"
                    ));
                }
                let (m, ka) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1]);
                let (kb, n) = (b.shape[b.rank() - 2], b.shape[b.rank() - 1]);
                if ka != kb {
                    return Err(format!(
                        "matmul contraction mismatch: {a} x {b} ({ka} vs {kb})"
                    ));
                }
                let batch = broadcast_shapes(&a.shape[..a.rank() - 2], &b.shape[..b.rank() - 2])
                    .ok_or_else(|| format!("matmul batch dims do not broadcast: {a} x {b}"))?;
                let mut shape = batch;
                shape.extend([m, n]);
                Ok(TensorType::f32(shape))
            }
            Op::Unary(_) => Ok(float(0)?.clone()),
            Op::Binary(_) => {
                let (a, b) = (float(0)?, float(1)?);
                broadcast_shapes(&a.shape, &b.shape)
                    .map(TensorType::f32)
                    .ok_or_else(|| format!("shapes do not broadcast: {a} and {b}"))
            }
            Op::Reduce { axis, .. } => {
                let x = float(0)?;
                if *axis >= x.rank() {
                    return Err(format!("axis {axis} is out of range for {x}"));
                }
                let mut shape = x.shape.clone();
                shape[*axis] = Dim::ONE;
                Ok(TensorType::f32(shape))
            }
            Op::Reshape { shape } => {
                let x = operands[0];
                if !same_volume(&x.shape, shape) {
                    return Err(format!(
                        "cannot reshape {x} to {}: the element counts differ",
                        fmt_shape(shape)
                    ));
                }
                Ok(TensorType::new(x.dtype, shape.clone()))
            }
            Op::Transpose { perm } => {
                let x = operands[0];
                let mut seen = vec![false; x.rank()];
                if perm.len() != x.rank()
                    || perm
                        .iter()
                        .any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
                {
                    return Err(format!("{perm:?} is not a permutation of the axes of {x}"));
                }
                Ok(TensorType::new(
                    x.dtype,
                    perm.iter().map(|&p| x.shape[p]).collect::<Shape>(),
                ))
            }
            Op::Expand { shape } => {
                let x = operands[0];
                match broadcast_shapes(&x.shape, shape) {
                    Some(b) if &b == shape => Ok(TensorType::new(x.dtype, shape.clone())),
                    _ => Err(format!("cannot expand {x} to {}", fmt_shape(shape))),
                }
            }
            Op::Rope { rope } => {
                let x = float(0)?;
                let pos = operands[1];
                rope.check()?;
                if x.rank() < 2 || x.shape[x.rank() - 2] != Dim::T {
                    return Err(format!("rope needs [..., T, D], found {x}"));
                }
                match x.shape[x.rank() - 1].as_const() {
                    Some(d) if d % 2 == 0 => {}
                    _ => return Err(format!("rope needs an even head dim, found {x}")),
                }
                if pos.dtype != DType::I64 || pos.shape != [Dim::T] {
                    return Err(format!("rope positions must be i64[T], found {pos}"));
                }
                Ok(x.clone())
            }
            Op::Mask { expr, sides } => {
                check_expr(expr, sides, operands, 0, ScalarType::Bool, "mask")?;
                let shape = &declared.shape;
                let ok_rank = shape.len() == 4 && shape[2] == Dim::T && shape[3] == Dim::T;
                if declared.dtype != DType::Bool || !ok_rank {
                    return Err(format!("a mask is bool[B|1, H|1, T, T], found {declared}"));
                }
                if expr.depends_on_batch() && shape[0] != Dim::B {
                    return Err(
                        "the mask reads `b` or a side input, so its first dim must be B".into(),
                    );
                }
                if expr.depends_on_head() && shape[1] == Dim::ONE {
                    return Err("the mask reads `h`, so its head dim cannot be 1".into());
                }
                if !matches!(shape[0], Dim::B | Dim::ONE) || shape[1].as_const().is_none() {
                    return Err(format!("a mask is bool[B|1, H|1, T, T], found {declared}"));
                }
                Ok(declared.clone())
            }
            Op::ScoreMod { expr, sides } => {
                let scores = float(0)?;
                check_expr(
                    expr,
                    sides,
                    operands,
                    1,
                    ScalarType::Float,
                    "score modifier",
                )?;
                if scores.rank() != 4 {
                    return Err(format!("scores are [B, H, T, T], found {scores}"));
                }
                Ok(scores.clone())
            }
            Op::Compare(_) => {
                let (a, b) = (float(0)?, float(1)?);
                broadcast_shapes(&a.shape, &b.shape)
                    .map(|s| TensorType::new(DType::Bool, s))
                    .ok_or_else(|| format!("shapes do not broadcast: {a} and {b}"))
            }
            Op::RmsNorm { eps } => {
                let (x, g) = (float(0)?, float(1)?);
                check_eps(*eps)?;
                check_norm_weight(x, g)?;
                Ok(x.clone())
            }
            Op::Linear { norm_eps, residual } => {
                let (x, w) = (float(0)?, float(1)?);
                let out = linear_type(x, w)?;
                let mut next = 2;
                if let Some(eps) = norm_eps {
                    check_eps(*eps)?;
                    check_norm_weight(x, float(next)?)?;
                    next += 1;
                }
                if *residual {
                    let r = float(next)?;
                    if r.shape != out.shape {
                        return Err(format!("the residual {r} does not match the product {out}"));
                    }
                }
                Ok(out)
            }
            Op::SwiGlu { norm_eps } => {
                let (x, wg, wu) = (float(0)?, float(1)?, float(2)?);
                let gate = linear_type(x, wg)?;
                if linear_type(x, wu)? != gate {
                    return Err(format!("gate {wg} and up {wu} projections differ"));
                }
                if let Some(eps) = norm_eps {
                    check_eps(*eps)?;
                    check_norm_weight(x, float(3)?)?;
                }
                Ok(gate)
            }
            Op::HeadsProj {
                heads,
                head_dim,
                norm_eps,
                bias,
                qk_norm,
                rope,
            } => {
                let (x, w) = (float(0)?, float(1)?);
                let out = linear_type(x, w)?;
                if x.rank() != 3 || x.shape[1] != Dim::T {
                    return Err(format!("heads_proj needs x: [B, T, K], found {x}"));
                }
                if out.shape[2] != Dim::Const(heads * head_dim) {
                    return Err(format!(
                        "{w} does not project to {heads} heads of {head_dim}"
                    ));
                }
                let mut next = 2;
                if let Some(eps) = norm_eps {
                    check_eps(*eps)?;
                    check_norm_weight(x, float(next)?)?;
                    next += 1;
                }
                if *bias {
                    let b = float(next)?;
                    if b.shape != [Dim::Const(heads * head_dim)] {
                        return Err(format!(
                            "the bias must be one value per output column, f32[{}], found {b}",
                            heads * head_dim
                        ));
                    }
                    next += 1;
                }
                if let Some(eps) = qk_norm {
                    check_eps(*eps)?;
                    let g = float(next)?;
                    if g.shape != [Dim::Const(*head_dim)] {
                        return Err(format!(
                            "the QK-norm weight {g} does not match a head dim of {head_dim}"
                        ));
                    }
                    next += 1;
                }
                if let Some(rope) = rope {
                    rope.check()?;
                    if head_dim % 2 == 1 {
                        return Err(format!("rope needs an even head dim, found {head_dim}"));
                    }
                    let pos = operands[next];
                    if pos.dtype != DType::I64 || pos.shape != [Dim::T] {
                        return Err(format!("rope positions must be i64[T], found {pos}"));
                    }
                }
                Ok(TensorType::f32(vec![
                    x.shape[0],
                    Dim::Const(*heads),
                    Dim::T,
                    Dim::Const(*head_dim),
                ]))
            }
            Op::Attention(kernel) => attention_type(kernel, operands),
            Op::AttentionLse(kernel) => {
                let out = attention_type(kernel, operands)?;
                Ok(TensorType::f32(vec![
                    out.shape[0],
                    Dim::Const(kernel.heads),
                    Dim::T,
                ]))
            }
            Op::AttentionGrad { kernel, wrt } => {
                let n = kernel.arity();
                let out = attention_type(kernel, &operands[..n])?;
                let (o, d_o, lse) = (operands[n], operands[n + 1], operands[n + 2]);
                if o.shape != out.shape || d_o.shape != out.shape {
                    return Err(format!(
                        "the output and its gradient must be {out}, found {o} and {d_o}"
                    ));
                }
                let want = [out.shape[0], Dim::Const(kernel.heads), Dim::T];
                if lse.dtype != DType::F32 || lse.shape != want {
                    return Err(format!(
                        "the log-sum-exp must be f32{}, found {lse}",
                        fmt_shape(&want)
                    ));
                }
                Ok(match wrt {
                    GradOf::Q => operands[0].clone(),
                    GradOf::K => operands[1].clone(),
                    GradOf::V => operands[2].clone(),
                })
            }
            Op::EmbeddingGrad { vocab } => {
                let (ids, dy) = (operands[0], float(1)?);
                if ids.dtype != DType::I64
                    || dy.rank() != ids.rank() + 1
                    || dy.shape[..ids.rank()] != ids.shape[..]
                {
                    return Err(format!(
                        "embedding_grad needs ids[...] and dy[..., D], found {ids} and {dy}"
                    ));
                }
                if *vocab == 0 {
                    return Err("the vocabulary cannot be empty".into());
                }
                Ok(TensorType::f32(vec![
                    Dim::Const(*vocab),
                    dy.shape[dy.rank() - 1],
                ]))
            }
            Op::RopeGrad { rope } => Op::Rope { rope: *rope }.infer(operands, declared),
            Op::CeLse | Op::CeLoss | Op::CeGrad { .. } => {
                let (h, w) = (float(0)?, float(1)?);
                let logits = linear_type(h, w)?;
                if h.rank() != 3 || h.shape[1] != Dim::T {
                    return Err(format!("cross-entropy needs h: [B, T, K], found {h}"));
                }
                let rows = vec![h.shape[0], Dim::T];
                if !matches!(self, Op::CeLse) {
                    let (targets, lse) = (operands[2], operands[3]);
                    if targets.dtype != DType::I64 || targets.shape != rows {
                        return Err(format!("targets must be i64[B, T], found {targets}"));
                    }
                    if lse.dtype != DType::F32 || lse.shape != rows {
                        return Err(format!("the log-sum-exp must be f32[B, T], found {lse}"));
                    }
                }
                match self {
                    Op::CeGrad { wrt } => {
                        let dloss = operands[4];
                        if dloss.dtype != DType::F32 || dloss.shape != rows {
                            return Err(format!("dloss must be f32[B, T], found {dloss}"));
                        }
                        Ok(match wrt {
                            CeGradOf::Hidden => h.clone(),
                            CeGradOf::Weight => w.clone(),
                        })
                    }
                    _ => {
                        let _ = logits;
                        Ok(TensorType::f32(rows))
                    }
                }
            }
            Op::TileRanges { block } => {
                let x = operands[0];
                if x.dtype != DType::I64 || x.shape != [Dim::B, Dim::T] {
                    return Err(format!("tile_ranges needs i64[B, T], found {x}"));
                }
                if *block == 0 || *block > u64::from(u32::MAX) {
                    return Err(format!("a block of {block} positions is out of range"));
                }
                Ok(TensorType::new(
                    DType::I64,
                    vec![
                        Dim::B,
                        Dim::Blocks(crate::types::Sym::Seq, *block as u32),
                        Dim::Const(2),
                    ],
                ))
            }
            Op::Select => {
                let (cond, a, b) = (operands[0], operands[1], operands[2]);
                if cond.dtype != DType::Bool {
                    return Err(format!("the select condition must be bool, found {cond}"));
                }
                if a.dtype != b.dtype {
                    return Err(format!("select branches differ in type: {a} and {b}"));
                }
                broadcast_shapes(&cond.shape, &a.shape)
                    .and_then(|s| broadcast_shapes(&s, &b.shape))
                    .map(|s| TensorType::new(a.dtype, s))
                    .ok_or_else(|| format!("select shapes do not broadcast: {cond}, {a}, {b}"))
            }
        }
    }
}

/// Checks an index expression against its declared side inputs and expected type.
fn check_expr(
    expr: &Expr,
    sides: &[String],
    operands: &[&TensorType],
    first_side: usize,
    want: ScalarType,
    what: &str,
) -> Result<(), String> {
    let ty = expr.ty()?;
    let type_ok = match want {
        ScalarType::Float => ty.is_numeric(),
        other => ty == other,
    };
    if !type_ok {
        return Err(format!(
            "a {what} must be {}, found {}",
            want.name(),
            ty.name()
        ));
    }
    if what == "mask" && expr.vars().contains(&crate::expr::Var::Score) {
        return Err("a mask cannot read `score`".into());
    }
    for name in expr.sides() {
        if !sides.contains(&name) {
            return Err(format!("side input `{name}` is read but not an operand"));
        }
    }
    for (i, name) in sides.iter().enumerate() {
        let t = operands[first_side + i];
        if t.dtype != DType::I64 || t.shape != [Dim::B, Dim::T] {
            return Err(format!("side input `{name}` must be i64[B, T], found {t}"));
        }
    }
    Ok(())
}

fn check_eps(eps: f64) -> Result<(), String> {
    if eps > 0.0 && eps.is_finite() {
        Ok(())
    } else {
        Err(format!("the norm epsilon must be positive, found {eps}"))
    }
}

fn check_norm_weight(x: &TensorType, g: &TensorType) -> Result<(), String> {
    match x.shape.last() {
        Some(d) if g.shape == [*d] => Ok(()),
        _ => Err(format!("the norm weight {g} does not match {x}")),
    }
}

/// The type of `x @ w^T` for a constant `[N, K]` weight.
fn linear_type(x: &TensorType, w: &TensorType) -> Result<TensorType, String> {
    if w.rank() != 2 || x.rank() < 1 || x.shape[x.rank() - 1] != w.shape[1] {
        return Err(format!("cannot multiply {x} by the transpose of {w}"));
    }
    let mut shape = x.shape.clone();
    let last = shape.len() - 1;
    shape[last] = w.shape[0];
    Ok(TensorType::f32(shape))
}

fn attention_type(
    kernel: &AttentionKernel,
    operands: &[&TensorType],
) -> Result<TensorType, String> {
    let AttentionKernel {
        heads,
        kv_heads,
        head_dim,
        ..
    } = *kernel;
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!("kv_heads = {kv_heads} must divide heads = {heads}"));
    }
    if kernel.block_q == 0
        || kernel.block_k == 0
        || kernel.block_q > u64::from(u32::MAX)
        || kernel.block_k > u64::from(u32::MAX)
    {
        return Err("tile sizes must be positive".into());
    }
    let (q, k, v) = (operands[0], operands[1], operands[2]);
    let expect = |t: &TensorType, h: u64, what: &str| -> Result<(), String> {
        let ok = t.dtype == DType::F32
            && t.rank() == 4
            && t.shape[1] == Dim::Const(h)
            && t.shape[2] == Dim::T
            && t.shape[3] == Dim::Const(head_dim)
            && t.shape[0] == q.shape[0];
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{what} must be f32[B, {h}, T, {head_dim}], found {t}"
            ))
        }
    };
    expect(q, heads, "q")?;
    expect(k, kv_heads, "k")?;
    expect(v, kv_heads, "v")?;
    let mask_ty = kernel.mask.ty()?;
    if mask_ty != ScalarType::Bool {
        return Err(format!(
            "the attention mask must be bool, found {}",
            mask_ty.name()
        ));
    }
    if let Some(score) = &kernel.score
        && !score.ty()?.is_numeric()
    {
        return Err("the score modifier must be a number".into());
    }
    for name in kernel.mask.sides().iter().chain(
        kernel
            .score
            .iter()
            .flat_map(|s| s.sides())
            .collect::<Vec<_>>()
            .iter(),
    ) {
        if !kernel.sides.contains(name) {
            return Err(format!("side input `{name}` is read but not an operand"));
        }
    }
    for (i, name) in kernel.sides.iter().enumerate() {
        let side = operands[3 + 3 * i];
        if side.dtype != DType::I64 || side.shape != [Dim::B, Dim::T] {
            return Err(format!(
                "side input `{name}` must be i64[B, T], found {side}"
            ));
        }
        for (offset, block) in [(1, kernel.block_q), (2, kernel.block_k)] {
            let ranges = operands[3 + 3 * i + offset];
            let want = [
                Dim::B,
                Dim::Blocks(crate::types::Sym::Seq, block as u32),
                Dim::Const(2),
            ];
            if ranges.dtype != DType::I64 || ranges.shape != want {
                return Err(format!(
                    "the tile ranges of `{name}` must be i64{}, found {ranges}",
                    fmt_shape(&want)
                ));
            }
        }
    }
    Ok(if kernel.merge_heads {
        TensorType::f32(vec![q.shape[0], Dim::T, Dim::Const(heads * head_dim)])
    } else {
        q.clone()
    })
}
