//! The operations of the graph IR and their typing rules.

use crate::expr::{Expr, ScalarType};
use crate::types::{DType, Dim, Shape, TensorType, broadcast_shapes, fmt_shape, same_volume};

/// Elementwise operations of one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

/// Reductions along one axis; the axis is kept with size 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// pair `i` at position `p` being `p * base^(-2i / D)` and `rotate_half(x) = [-x2, x1]`.
    Rope {
        base: f64,
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
            Op::Embedding | Op::MatMul | Op::Binary(_) | Op::Rope { .. } => 2,
            Op::Select => 3,
            Op::Mask { sides, .. } => sides.len(),
            Op::ScoreMod { sides, .. } => 1 + sides.len(),
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
            Op::Rope { base } => {
                let x = float(0)?;
                let pos = operands[1];
                if base.partial_cmp(&1.0) != Some(std::cmp::Ordering::Greater) {
                    return Err(format!("the rope base must be above 1, found {base}"));
                }
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
