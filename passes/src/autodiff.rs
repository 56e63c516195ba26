//! Reverse-mode automatic differentiation over the IR, and the training step built with it.
//!
//! [`training_graph`] turns a model's forward graph (optimized or not) into one graph that
//! computes the summed cross-entropy of next-token prediction and the gradient of every
//! weight. Fused projections are first written back as the primitive subgraphs they stand
//! for, so that each has a plain adjoint; the fused attention keeps its fused backward: the
//! forward's log-sum-exp per query (`attention_lse`) and three `attention_grad` ops that
//! recompute probabilities tile by tile over the same schedule. The LM head becomes a chunked
//! cross-entropy (`ce_lse`, `ce_loss`, `ce_grad`) that never holds the `[T, vocab]` logits.
//! The result goes through the optimizer again, which fuses the forward projections back.
//!
//! [`gradients`] is the general reverse sweep: given seeds for some values, it adds the
//! adjoint of every value they depend on, rule by rule ([`adjoint`]).

use std::collections::HashMap;

use zebra_ir::op::{AttentionKernel, BinaryOp, CeGradOf, CmpOp, GradOf, ReduceOp, UnaryOp};
use zebra_ir::types::{DType, Dim, Shape, TensorType};
use zebra_ir::{Graph, Node, NodeId, Op};

/// Why a graph cannot be differentiated.
#[derive(Debug, thiserror::Error)]
pub enum AutodiffError {
    #[error("the graph has no `logits` output to train on")]
    NoLogits,
    #[error(
        "the logits must come from a linear projection of the hidden states (`linear` or \
         `matmul` by a transposed weight), found `{0}`"
    )]
    LogitsNotLinear(String),
    #[error("the graph has an input named `targets` already")]
    TargetsTaken,
    #[error("cannot differentiate `{op}`: {why}")]
    Unsupported { op: String, why: String },
    #[error("building the gradient of `{op}`: {message}")]
    Build { op: String, message: String },
    #[error("the training graph is invalid: {0}")]
    Invalid(String),
}

/// The name of a weight's gradient among the training graph's outputs.
pub fn grad_name(weight: &str) -> String {
    format!("grad:{weight}")
}

/// Adds nodes for the adjoint rules, with the layer of the node being differentiated.
struct Builder<'g> {
    g: &'g mut Graph,
    layer: Option<u32>,
    op: String,
}

impl Builder<'_> {
    fn add(&mut self, op: Op, operands: &[NodeId]) -> Result<NodeId, AutodiffError> {
        self.g
            .add_inferred(op, operands, self.layer)
            .map_err(|message| AutodiffError::Build {
                op: self.op.clone(),
                message,
            })
    }

    fn ty(&self, id: NodeId) -> TensorType {
        self.g.node(id).ty.clone()
    }

    fn constant(&mut self, value: f64) -> Result<NodeId, AutodiffError> {
        self.add(Op::Constant { value }, &[])
    }

    fn binary(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> Result<NodeId, AutodiffError> {
        self.add(Op::Binary(op), &[a, b])
    }

    fn mul(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, AutodiffError> {
        self.binary(BinaryOp::Mul, a, b)
    }

    fn scale(&mut self, a: NodeId, factor: f64) -> Result<NodeId, AutodiffError> {
        let c = self.constant(factor)?;
        self.mul(a, c)
    }

    fn unary(&mut self, op: UnaryOp, a: NodeId) -> Result<NodeId, AutodiffError> {
        self.add(Op::Unary(op), &[a])
    }

    fn transpose_last(&mut self, x: NodeId) -> Result<NodeId, AutodiffError> {
        let rank = self.ty(x).rank();
        let mut perm: Vec<usize> = (0..rank).collect();
        perm.swap(rank - 2, rank - 1);
        self.add(Op::Transpose { perm }, &[x])
    }

    fn reduce(&mut self, op: ReduceOp, x: NodeId, axis: usize) -> Result<NodeId, AutodiffError> {
        self.add(Op::Reduce { op, axis }, &[x])
    }

    fn reshape(&mut self, x: NodeId, shape: Shape) -> Result<NodeId, AutodiffError> {
        if self.ty(x).shape == shape {
            return Ok(x);
        }
        self.add(Op::Reshape { shape }, &[x])
    }

    fn expand(&mut self, x: NodeId, shape: Shape) -> Result<NodeId, AutodiffError> {
        if self.ty(x).shape == shape {
            return Ok(x);
        }
        self.add(Op::Expand { shape }, &[x])
    }

    /// Sums a gradient of broadcast shape down to `shape` (the operand's), numpy-style.
    fn unbroadcast(&mut self, grad: NodeId, shape: &Shape) -> Result<NodeId, AutodiffError> {
        let mut current = grad;
        let have = self.ty(grad).shape;
        if &have == shape {
            return Ok(grad);
        }
        let extra = have.len() - shape.len();
        for axis in 0..have.len() {
            let target = if axis < extra {
                Dim::ONE
            } else {
                shape[axis - extra]
            };
            if have[axis] != target && target == Dim::ONE {
                current = self.reduce(ReduceOp::Sum, current, axis)?;
            } else if have[axis] != target {
                return Err(AutodiffError::Build {
                    op: self.op.clone(),
                    message: format!("cannot sum {} down to {shape:?}", self.ty(grad)),
                });
            }
        }
        self.reshape(current, shape.clone())
    }

    /// `select(cond, x, 0)`.
    fn keep_where(&mut self, cond: NodeId, x: NodeId) -> Result<NodeId, AutodiffError> {
        let zero = self.constant(0.0)?;
        self.add(Op::Select, &[cond, x, zero])
    }

    /// RMSNorm in primitives, as the lowering writes it: `x * rsqrt(mean(x^2) + eps) * g`.
    fn rmsnorm(&mut self, x: NodeId, g: NodeId, eps: f64) -> Result<NodeId, AutodiffError> {
        self.add(Op::RmsNorm { eps }, &[x, g])
    }

    /// `x @ w^T` for a `[N, K]` weight.
    fn project(&mut self, x: NodeId, w: NodeId) -> Result<NodeId, AutodiffError> {
        let wt = self.add(Op::Transpose { perm: vec![1, 0] }, &[w])?;
        self.add(Op::MatMul, &[x, wt])
    }
}

/// Rewrites the fused projections (`linear`, `swiglu`, `heads_proj`) as the primitive
/// subgraphs they stand for. Attention stays fused.
pub fn decompose(graph: &mut Graph) -> Result<(), AutodiffError> {
    let order = graph
        .topo_order()
        .ok_or_else(|| AutodiffError::Invalid("the graph has a cycle".into()))?;
    for id in order {
        let node = graph.node(id).clone();
        let operands = graph.operands(id);
        let mut b = Builder {
            layer: node.layer,
            op: node.op.name().to_string(),
            g: graph,
        };
        let replacement = match &node.op {
            Op::Linear { norm_eps, residual } => {
                let mut next = 2;
                let mut x = operands[0];
                if let Some(eps) = norm_eps {
                    x = b.rmsnorm(x, operands[next], *eps)?;
                    next += 1;
                }
                let mut y = b.project(x, operands[1])?;
                if *residual {
                    y = b.binary(BinaryOp::Add, y, operands[next])?;
                }
                y
            }
            Op::SwiGlu { norm_eps } => {
                let mut x = operands[0];
                if let Some(eps) = norm_eps {
                    x = b.rmsnorm(x, operands[3], *eps)?;
                }
                let gate = b.project(x, operands[1])?;
                let up = b.project(x, operands[2])?;
                let sig = b.unary(UnaryOp::Sigmoid, gate)?;
                let silu = b.mul(gate, sig)?;
                b.mul(silu, up)?
            }
            Op::HeadsProj {
                heads,
                head_dim,
                norm_eps,
                bias,
                qk_norm,
                rope,
            } => {
                let mut next = 2;
                let mut x = operands[0];
                if let Some(eps) = norm_eps {
                    x = b.rmsnorm(x, operands[next], *eps)?;
                    next += 1;
                }
                let mut p = b.project(x, operands[1])?;
                if *bias {
                    p = b.binary(BinaryOp::Add, p, operands[next])?;
                    next += 1;
                }
                let batch = node.ty.shape[0];
                let split = b.reshape(
                    p,
                    vec![batch, Dim::T, Dim::Const(*heads), Dim::Const(*head_dim)],
                )?;
                let mut y = b.add(
                    Op::Transpose {
                        perm: vec![0, 2, 1, 3],
                    },
                    &[split],
                )?;
                if let Some(eps) = qk_norm {
                    y = b.rmsnorm(y, operands[next], *eps)?;
                    next += 1;
                }
                if let Some(rope) = rope {
                    y = b.add(Op::Rope { rope: *rope }, &[y, operands[next]])?;
                }
                y
            }
            _ => continue,
        };
        graph.replace_uses(id, replacement);
        graph.remove(id);
    }
    Ok(())
}

/// Adds `contribution` to the adjoint of `of`.
fn accumulate(
    g: &mut Graph,
    adjoints: &mut HashMap<NodeId, NodeId>,
    of: NodeId,
    contribution: NodeId,
) -> Result<(), AutodiffError> {
    let sum = match adjoints.get(&of) {
        Some(&old) => g
            .add_inferred(Op::Binary(BinaryOp::Add), &[old, contribution], None)
            .map_err(AutodiffError::Invalid)?,
        None => contribution,
    };
    adjoints.insert(of, sum);
    Ok(())
}

/// The reverse sweep: starting from the adjoints in `adjoints` (seeds), visits every node in
/// reverse order and adds its contribution to its operands' adjoints. Returns the adjoints
/// of every node reached (including the seeds).
pub fn gradients(
    g: &mut Graph,
    mut adjoints: HashMap<NodeId, NodeId>,
) -> Result<HashMap<NodeId, NodeId>, AutodiffError> {
    let order = g
        .topo_order()
        .ok_or_else(|| AutodiffError::Invalid("the graph has a cycle".into()))?;
    for &id in order.iter().rev() {
        let Some(&dy) = adjoints.get(&id) else {
            continue;
        };
        let operands = g.operands(id);
        for (index, contribution) in adjoint(g, id, dy)? {
            accumulate(g, &mut adjoints, operands[index], contribution)?;
        }
    }
    Ok(adjoints)
}

/// The adjoint rule of one node: given the gradient `dy` of its value, the contributions to
/// the gradients of its operands, by operand index. Integer and boolean operands get none.
pub fn adjoint(
    g: &mut Graph,
    id: NodeId,
    dy: NodeId,
) -> Result<Vec<(usize, NodeId)>, AutodiffError> {
    let node = g.node(id).clone();
    let operands = g.operands(id);
    let ty = |g: &Graph, i: usize| g.node(operands[i]).ty.clone();
    let shapes: Vec<Shape> = operands
        .iter()
        .map(|&o| g.node(o).ty.shape.clone())
        .collect();
    let floats: Vec<bool> = operands
        .iter()
        .map(|&o| g.node(o).ty.dtype == DType::F32)
        .collect();
    let unsupported = |why: &str| AutodiffError::Unsupported {
        op: node.op.name().to_string(),
        why: why.to_string(),
    };
    let mut b = Builder {
        layer: node.layer,
        op: node.op.name().to_string(),
        g,
    };
    let y = id;
    let mut out = Vec::new();
    match &node.op {
        Op::Input { .. } | Op::Weight { .. } | Op::Constant { .. } | Op::Positions => {}
        Op::Mask { .. } | Op::Compare(_) | Op::TileRanges { .. } => {}
        Op::Embedding => {
            let vocab = shapes[0][0]
                .as_const()
                .ok_or_else(|| unsupported("the table has no constant size"))?;
            out.push((0, b.add(Op::EmbeddingGrad { vocab }, &[operands[1], dy])?));
        }
        Op::MatMul => {
            let bt = b.transpose_last(operands[1])?;
            let da = b.add(Op::MatMul, &[dy, bt])?;
            out.push((0, b.unbroadcast(da, &shapes[0])?));
            let at = b.transpose_last(operands[0])?;
            let db = b.add(Op::MatMul, &[at, dy])?;
            out.push((1, b.unbroadcast(db, &shapes[1])?));
        }
        Op::Unary(u) => {
            let x = operands[0];
            let dx = match u {
                UnaryOp::Neg => b.scale(dy, -1.0)?,
                UnaryOp::Exp => b.mul(dy, y)?,
                UnaryOp::Log => b.binary(BinaryOp::Div, dy, x)?,
                UnaryOp::Sqrt => {
                    let half = b.binary(BinaryOp::Div, dy, y)?;
                    b.scale(half, 0.5)?
                }
                UnaryOp::Rsqrt => {
                    // d x^(-1/2) = -1/2 x^(-3/2) = -1/2 y^3.
                    let y2 = b.mul(y, y)?;
                    let y3 = b.mul(y2, y)?;
                    let d = b.mul(dy, y3)?;
                    b.scale(d, -0.5)?
                }
                UnaryOp::Tanh => {
                    let y2 = b.mul(y, y)?;
                    let one = b.constant(1.0)?;
                    let slope = b.binary(BinaryOp::Sub, one, y2)?;
                    b.mul(dy, slope)?
                }
                UnaryOp::Sigmoid => {
                    let one = b.constant(1.0)?;
                    let rest = b.binary(BinaryOp::Sub, one, y)?;
                    let slope = b.mul(y, rest)?;
                    b.mul(dy, slope)?
                }
                UnaryOp::Recip => {
                    let y2 = b.mul(y, y)?;
                    let d = b.mul(dy, y2)?;
                    b.scale(d, -1.0)?
                }
            };
            out.push((0, dx));
        }
        Op::Binary(op) => {
            let (x0, x1) = (operands[0], operands[1]);
            let (d0, d1) = match op {
                BinaryOp::Add => (Some(dy), Some(dy)),
                BinaryOp::Sub => (Some(dy), Some(b.scale(dy, -1.0)?)),
                BinaryOp::Mul => (Some(b.mul(dy, x1)?), Some(b.mul(dy, x0)?)),
                BinaryOp::Div => {
                    let d0 = b.binary(BinaryOp::Div, dy, x1)?;
                    let t = b.mul(d0, y)?;
                    (Some(d0), Some(b.scale(t, -1.0)?))
                }
                BinaryOp::Max | BinaryOp::Min => {
                    // Ties go to the first operand.
                    let cmp = if *op == BinaryOp::Max {
                        CmpOp::Ge
                    } else {
                        CmpOp::Le
                    };
                    let first = b.add(Op::Compare(cmp), &[x0, x1])?;
                    let d0 = b.keep_where(first, dy)?;
                    let d1 = b.binary(BinaryOp::Sub, dy, d0)?;
                    (Some(d0), Some(d1))
                }
            };
            if let Some(d0) = d0 {
                out.push((0, b.unbroadcast(d0, &shapes[0])?));
            }
            if let Some(d1) = d1 {
                out.push((1, b.unbroadcast(d1, &shapes[1])?));
            }
        }
        Op::Reduce { op, axis } => {
            let x_shape = shapes[0].clone();
            let dx = match op {
                ReduceOp::Sum => b.expand(dy, x_shape)?,
                ReduceOp::Mean => {
                    let n = x_shape[*axis]
                        .as_const()
                        .ok_or_else(|| unsupported("a mean over a symbolic axis"))?;
                    let scaled = b.scale(dy, 1.0 / n as f64)?;
                    b.expand(scaled, x_shape)?
                }
                ReduceOp::Max => {
                    let ys = b.expand(y, x_shape.clone())?;
                    let at_max = b.add(Op::Compare(CmpOp::Eq), &[operands[0], ys])?;
                    let spread = b.expand(dy, x_shape)?;
                    b.keep_where(at_max, spread)?
                }
            };
            out.push((0, dx));
        }
        Op::Reshape { .. } => {
            if floats[0] {
                out.push((0, b.reshape(dy, shapes[0].clone())?));
            }
        }
        Op::Transpose { perm } => {
            if floats[0] {
                let mut inverse = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inverse[p] = i;
                }
                out.push((0, b.add(Op::Transpose { perm: inverse }, &[dy])?));
            }
        }
        Op::Expand { .. } => {
            if floats[0] {
                out.push((0, b.unbroadcast(dy, &shapes[0])?));
            }
        }
        Op::Rope { rope } => {
            out.push((0, b.add(Op::RopeGrad { rope: *rope }, &[dy, operands[1]])?));
        }
        Op::ScoreMod { expr, sides } => {
            let slope_expr = expr.score_derivative().map_err(|why| unsupported(&why))?;
            let slope = b.add(
                Op::ScoreMod {
                    expr: slope_expr,
                    sides: sides.clone(),
                },
                &operands,
            )?;
            out.push((0, b.mul(dy, slope)?));
        }
        Op::Select => {
            if floats[1] {
                let d1 = b.keep_where(operands[0], dy)?;
                let d2 = b.binary(BinaryOp::Sub, dy, d1)?;
                out.push((1, b.unbroadcast(d1, &shapes[1])?));
                out.push((2, b.unbroadcast(d2, &shapes[2])?));
            }
        }
        Op::RmsNorm { eps } => {
            // y = xhat * g with xhat = x * r, r = rsqrt(mean(x^2) + eps):
            // dg = sum(dy * xhat), dx = r * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dy * g.
            let (x, gain) = (operands[0], operands[1]);
            let last = ty(b.g, 0).rank() - 1;
            let x2 = b.mul(x, x)?;
            let mean = b.reduce(ReduceOp::Mean, x2, last)?;
            let e = b.constant(*eps)?;
            let shifted = b.binary(BinaryOp::Add, mean, e)?;
            let r = b.unary(UnaryOp::Rsqrt, shifted)?;
            let xhat = b.mul(x, r)?;
            let dg = b.mul(dy, xhat)?;
            out.push((1, b.unbroadcast(dg, &shapes[1])?));
            let dxhat = b.mul(dy, gain)?;
            let prod = b.mul(dxhat, xhat)?;
            let m = b.reduce(ReduceOp::Mean, prod, last)?;
            let proj = b.mul(xhat, m)?;
            let diff = b.binary(BinaryOp::Sub, dxhat, proj)?;
            out.push((0, b.mul(r, diff)?));
        }
        Op::Linear { .. } | Op::SwiGlu { .. } | Op::HeadsProj { .. } => {
            return Err(unsupported(
                "fused projections are differentiated after `decompose`",
            ));
        }
        Op::Attention(kernel) => {
            let n = kernel.arity();
            let inputs = &operands[..n];
            let lse = b.add(Op::AttentionLse(kernel.clone()), inputs)?;
            let mut args = inputs.to_vec();
            args.extend([y, dy, lse]);
            for (index, wrt) in GradOf::ALL.into_iter().enumerate() {
                let grad = b.add(
                    Op::AttentionGrad {
                        kernel: kernel.clone(),
                        wrt,
                    },
                    &args,
                )?;
                out.push((index, grad));
            }
        }
        Op::AttentionLse(_)
        | Op::AttentionGrad { .. }
        | Op::EmbeddingGrad { .. }
        | Op::RopeGrad { .. }
        | Op::CeLse
        | Op::CeLoss
        | Op::CeGrad { .. } => {
            return Err(unsupported("second derivatives are not supported"));
        }
    }
    Ok(out)
}

/// The attention kernels of a graph, for checking that their score modifiers differentiate.
fn attention_kernels(graph: &Graph) -> Vec<AttentionKernel> {
    graph
        .node_ids()
        .into_iter()
        .filter_map(|id| graph.node(id).op.attention_kernel().cloned())
        .collect()
}

/// The training step of a model: inputs as the forward's plus `targets` (`i64[B, T]`, the
/// next token at each position, negative where there is none); outputs `loss`, the sum of the
/// per-token cross-entropies (`f32[]`), and `grad:{weight}` for every weight, the gradient of
/// that sum.
pub fn training_graph(forward: &Graph) -> Result<Graph, AutodiffError> {
    let mut g = forward.clone();
    if g.inputs().iter().any(|(name, _)| name == "targets") {
        return Err(AutodiffError::TargetsTaken);
    }
    for kernel in attention_kernels(&g) {
        if let Some(score) = &kernel.score {
            score
                .score_derivative()
                .map_err(|why| AutodiffError::Unsupported {
                    op: "attention".into(),
                    why,
                })?;
        }
    }
    let logits = g
        .outputs()
        .iter()
        .find(|(name, _)| name == "logits")
        .map(|(_, id)| *id)
        .ok_or(AutodiffError::NoLogits)?;
    // The LM head: hidden states (normalized) and the output weight.
    let head = g.node(logits).clone();
    let head_operands = g.operands(logits);
    let (hidden, weight) = match &head.op {
        Op::Linear {
            norm_eps,
            residual: false,
        } => {
            let mut b = Builder {
                layer: None,
                op: "linear".into(),
                g: &mut g,
            };
            let h = match norm_eps {
                Some(eps) => b.rmsnorm(head_operands[0], head_operands[2], *eps)?,
                None => head_operands[0],
            };
            (h, head_operands[1])
        }
        Op::MatMul => {
            let wt = head_operands[1];
            match &g.node(wt).op {
                Op::Transpose { perm } if perm == &[1, 0] => (head_operands[0], g.operands(wt)[0]),
                other => return Err(AutodiffError::LogitsNotLinear(other.name().into())),
            }
        }
        other => return Err(AutodiffError::LogitsNotLinear(other.name().into())),
    };
    let hidden_ty = g.node(hidden).ty.clone();
    if hidden_ty.rank() != 3 {
        return Err(AutodiffError::LogitsNotLinear(format!(
            "a projection of {hidden_ty}"
        )));
    }
    let batch = hidden_ty.shape[0];
    let targets = g.add(
        Node {
            op: Op::Input {
                name: "targets".into(),
            },
            ty: TensorType::new(DType::I64, vec![batch, Dim::T]),
            layer: None,
            loc: None,
        },
        &[],
    );
    let mut b = Builder {
        layer: None,
        op: "cross-entropy".into(),
        g: &mut g,
    };
    let lse = b.add(Op::CeLse, &[hidden, weight])?;
    let losses = b.add(Op::CeLoss, &[hidden, weight, targets, lse])?;
    let rows = b.reduce(ReduceOp::Sum, losses, 1)?;
    let total = b.reduce(ReduceOp::Sum, rows, 0)?;
    let loss = b.reshape(total, vec![])?;

    // Outputs: the loss; the logits go (their head is now the cross-entropy).
    let outputs: Vec<(String, NodeId)> = g
        .outputs()
        .iter()
        .filter(|(name, _)| name != "logits")
        .cloned()
        .collect();
    g.clear_outputs();
    g.add_output("loss", loss);
    for (name, id) in outputs {
        g.add_output(name, id);
    }
    // Node ids of removed nodes are reused: no id of a dead node may be kept past here.
    g.remove_dead();
    decompose(&mut g)?;

    let mut b = Builder {
        layer: None,
        op: "cross-entropy".into(),
        g: &mut g,
    };
    let one = b.constant(1.0)?;
    let ones = b.expand(one, vec![batch, Dim::T])?;
    let args = [hidden, weight, targets, lse, ones];
    let dh = b.add(
        Op::CeGrad {
            wrt: CeGradOf::Hidden,
        },
        &args,
    )?;
    let dw = b.add(
        Op::CeGrad {
            wrt: CeGradOf::Weight,
        },
        &args,
    )?;
    let mut seeds = HashMap::new();
    accumulate(&mut g, &mut seeds, hidden, dh)?;
    accumulate(&mut g, &mut seeds, weight, dw)?;
    let adjoints = gradients(&mut g, seeds)?;

    // One gradient per weight name (a tied embedding is one weight read twice).
    let mut by_name: Vec<(String, Vec<NodeId>)> = Vec::new();
    for (name, id) in g.weights() {
        match by_name.iter_mut().find(|(n, _)| *n == name) {
            Some((_, ids)) => ids.push(id),
            None => by_name.push((name, vec![id])),
        }
    }
    by_name.sort();
    for (name, ids) in by_name {
        let shape = g.node(ids[0]).ty.shape.clone();
        let mut total: Option<NodeId> = None;
        for id in ids {
            if let Some(&grad) = adjoints.get(&id) {
                total = Some(match total {
                    Some(t) => g
                        .add_inferred(Op::Binary(BinaryOp::Add), &[t, grad], None)
                        .map_err(AutodiffError::Invalid)?,
                    None => grad,
                });
            }
        }
        let grad = match total {
            Some(t) => t,
            None => {
                let zero = g
                    .add_inferred(Op::Constant { value: 0.0 }, &[], None)
                    .map_err(AutodiffError::Invalid)?;
                g.add_inferred(Op::Expand { shape }, &[zero], None)
                    .map_err(AutodiffError::Invalid)?
            }
        };
        g.add_output(grad_name(&name), grad);
    }
    g.remove_dead();
    zebra_ir::verify(&g).map_err(|e| AutodiffError::Invalid(e.to_string()))?;
    Ok(g)
}
