//! The reference interpreter: plain, obviously correct, f64 throughout. It is the numerical
//! oracle that every optimized and compiled path is tested against.

use std::collections::{BTreeMap, HashMap};

use ndarray::{Array, Array2, ArrayD, ArrayView2, ArrayViewD, Axis, Dimension, IxDyn, Zip};

use crate::expr::{Env, Scalar, Var};
use crate::graph::{Graph, NodeId};
use crate::op::{CeGradOf, GradOf, Op, ReduceOp};
use crate::rope::Rope;
use crate::types::{Bindings, DType, Dim, Sym, fmt_shape, resolve_shape};
use crate::verify::{VerifyErrors, verify};
use crate::weights::Weights;

/// A tensor value during interpretation.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Float(ArrayD<f64>),
    Int(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

impl Value {
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::Float(a) => a.shape(),
            Value::Int(a) => a.shape(),
            Value::Bool(a) => a.shape(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Value::Float(_) => DType::F32,
            Value::Int(_) => DType::I64,
            Value::Bool(_) => DType::Bool,
        }
    }

    pub fn as_float(&self) -> Option<&ArrayD<f64>> {
        match self {
            Value::Float(a) => Some(a),
            _ => None,
        }
    }

    pub fn into_float(self) -> Option<ArrayD<f64>> {
        match self {
            Value::Float(a) => Some(a),
            _ => None,
        }
    }

    fn float(&self) -> &ArrayD<f64> {
        match self {
            Value::Float(a) => a,
            _ => unreachable!("the verifier checked that this operand is a float"),
        }
    }

    fn int(&self) -> &ArrayD<i64> {
        match self {
            Value::Int(a) => a,
            _ => unreachable!("the verifier checked that this operand is an integer"),
        }
    }

    fn boolean(&self) -> &ArrayD<bool> {
        match self {
            Value::Bool(a) => a,
            _ => unreachable!("the verifier checked that this operand is a bool"),
        }
    }
}

/// Why a graph could not be run on the given inputs and weights.
#[derive(Debug, thiserror::Error)]
pub enum InterpError {
    #[error(transparent)]
    Invalid(#[from] VerifyErrors),
    #[error("input `{0}` was not given")]
    MissingInput(String),
    #[error("input `{name}` must be {expected}, found {found}")]
    InputType {
        name: String,
        expected: String,
        found: String,
    },
    #[error("input `{name}` binds {sym} = {found}, but an earlier input bound {sym} = {bound}")]
    InconsistentDim {
        name: String,
        sym: &'static str,
        bound: usize,
        found: usize,
    },
    #[error("the graph reads the sequence length, but no input gives it")]
    Unbound,
    #[error("weight `{name}` is missing (expected shape {expected})")]
    MissingWeight { name: String, expected: String },
    #[error("weight `{name}` has shape {found:?}, expected {expected}")]
    WeightShape {
        name: String,
        expected: String,
        found: Vec<usize>,
    },
    #[error("token id {id} at {position:?} is out of range for a vocabulary of {vocab}")]
    TokenOutOfRange {
        id: i64,
        position: Vec<usize>,
        vocab: usize,
    },
    #[error("{0}")]
    Unsupported(String),
}

/// How the interpreter computes fused attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Follow the tile schedule with an online softmax (the compiled kernels' algorithm)
    /// instead of the dense definition.
    pub tiled_attention: bool,
}

/// Runs the graph on named inputs and weights; returns the named outputs.
pub fn interpret(
    graph: &Graph,
    inputs: &BTreeMap<String, Value>,
    weights: &Weights,
) -> Result<BTreeMap<String, Value>, InterpError> {
    interpret_with(graph, inputs, weights, Options::default())
}

/// Runs the graph with the given options.
pub fn interpret_with(
    graph: &Graph,
    inputs: &BTreeMap<String, Value>,
    weights: &Weights,
    options: Options,
) -> Result<BTreeMap<String, Value>, InterpError> {
    verify(graph)?;
    let bindings = bind(graph, inputs)?;
    let order = graph.topo_order().unwrap_or_default();
    let mut uses: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for operand in graph.operands(id) {
            *uses.entry(operand).or_default() += 1;
        }
    }
    for (_, id) in graph.outputs() {
        *uses.entry(*id).or_default() += 1;
    }
    let mut values: HashMap<NodeId, Value> = HashMap::new();
    for &id in &order {
        let operands = graph.operands(id);
        let args: Vec<&Value> = operands.iter().map(|o| &values[o]).collect();
        let value = eval_node(graph, id, &args, inputs, weights, &bindings, options)?;
        for operand in operands {
            let left = uses.get_mut(&operand).expect("counted above");
            *left -= 1;
            if *left == 0 {
                values.remove(&operand);
            }
        }
        if uses.get(&id).copied().unwrap_or(0) > 0 {
            values.insert(id, value);
        }
    }
    Ok(graph
        .outputs()
        .iter()
        .map(|(name, id)| (name.clone(), values[id].clone()))
        .collect())
}

/// Binds `B` and `T` from the shapes of the inputs, checking every input against its type.
pub fn bind(graph: &Graph, inputs: &BTreeMap<String, Value>) -> Result<Bindings, InterpError> {
    let mut bound: BTreeMap<Sym, usize> = BTreeMap::new();
    for (name, id) in graph.inputs() {
        let ty = &graph.node(id).ty;
        let value = inputs
            .get(&name)
            .ok_or_else(|| InterpError::MissingInput(name.clone()))?;
        let mismatch = || InterpError::InputType {
            name: name.clone(),
            expected: ty.to_string(),
            found: format!("{}{:?}", value.dtype().name(), value.shape()),
        };
        if value.dtype() != ty.dtype || value.shape().len() != ty.rank() {
            return Err(mismatch());
        }
        for (dim, &size) in ty.shape.iter().zip(value.shape()) {
            match *dim {
                Dim::Const(n) if n as usize != size => return Err(mismatch()),
                Dim::Const(_) => {}
                Dim::Blocks(..) => return Err(mismatch()),
                Dim::Sym(sym) => match bound.get(&sym) {
                    Some(&b) if b != size => {
                        return Err(InterpError::InconsistentDim {
                            name: name.clone(),
                            sym: sym.name(),
                            bound: b,
                            found: size,
                        });
                    }
                    _ => {
                        bound.insert(sym, size);
                    }
                },
            }
        }
    }
    let needs = |sym: Sym| {
        graph.node_ids().iter().any(|&id| {
            let node = graph.node(id);
            node.ty.shape.contains(&Dim::Sym(sym))
        })
    };
    let get = |sym: Sym| match bound.get(&sym) {
        Some(&n) => Ok(n),
        None if needs(sym) => Err(InterpError::Unbound),
        None => Ok(1),
    };
    Ok(Bindings {
        batch: get(Sym::Batch)?,
        seq: get(Sym::Seq)?,
    })
}

fn eval_node(
    graph: &Graph,
    id: NodeId,
    args: &[&Value],
    inputs: &BTreeMap<String, Value>,
    weights: &Weights,
    bindings: &Bindings,
    options: Options,
) -> Result<Value, InterpError> {
    let node = graph.node(id);
    let out_shape = resolve_shape(&node.ty.shape, bindings);
    let value = match &node.op {
        Op::Input { name } => inputs[name].clone(),
        Op::Weight { name } => {
            let tensor = weights
                .get(name)
                .ok_or_else(|| InterpError::MissingWeight {
                    name: name.clone(),
                    expected: fmt_shape(&node.ty.shape),
                })?;
            if tensor.shape() != out_shape.as_slice() {
                return Err(InterpError::WeightShape {
                    name: name.clone(),
                    expected: fmt_shape(&node.ty.shape),
                    found: tensor.shape().to_vec(),
                });
            }
            Value::Float(tensor.mapv(f64::from))
        }
        Op::Constant { value } => Value::Float(ArrayD::from_elem(IxDyn(&[]), *value)),
        Op::Positions => Value::Int(Array::from_iter(0..bindings.seq as i64).into_dyn()),
        Op::Embedding => Value::Float(embedding(args[0].float(), args[1].int())?),
        Op::MatMul => Value::Float(matmul(args[0].float(), args[1].float())),
        Op::Unary(u) => Value::Float(args[0].float().mapv(|x| u.apply(x))),
        Op::Binary(b) => {
            let (x, y) = (
                broadcast(args[0].float(), &out_shape),
                broadcast(args[1].float(), &out_shape),
            );
            Value::Float(Zip::from(&x).and(&y).map_collect(|&a, &c| b.apply(a, c)))
        }
        Op::Reduce { op, axis } => {
            let x = args[0].float();
            let n = x.shape()[*axis] as f64;
            let reduced = x.map_axis(Axis(*axis), |lane| match op {
                ReduceOp::Sum => lane.sum(),
                ReduceOp::Mean => lane.sum() / n,
                ReduceOp::Max => lane.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            });
            Value::Float(reduced.insert_axis(Axis(*axis)))
        }
        Op::Reshape { .. } => match args[0] {
            Value::Float(a) => Value::Float(reshape(a.view(), &out_shape)),
            Value::Int(a) => Value::Int(reshape(a.view(), &out_shape)),
            Value::Bool(a) => Value::Bool(reshape(a.view(), &out_shape)),
        },
        Op::Transpose { perm } => match args[0] {
            Value::Float(a) => {
                Value::Float(reshape(a.view().permuted_axes(perm.clone()), &out_shape))
            }
            Value::Int(a) => Value::Int(reshape(a.view().permuted_axes(perm.clone()), &out_shape)),
            Value::Bool(a) => {
                Value::Bool(reshape(a.view().permuted_axes(perm.clone()), &out_shape))
            }
        },
        Op::Expand { .. } => match args[0] {
            Value::Float(a) => Value::Float(broadcast(a, &out_shape)),
            Value::Int(a) => Value::Int(broadcast(a, &out_shape)),
            Value::Bool(a) => Value::Bool(broadcast(a, &out_shape)),
        },
        Op::Rope { rope: r } => Value::Float(rope(args[0].float(), args[1].int(), r)),
        Op::Mask { expr, sides } => {
            let sides = side_views(sides, args);
            let out = ArrayD::from_shape_fn(IxDyn(&out_shape), |index| {
                let env = IndexEnv::new(&index, 0.0, &sides);
                expr.eval(&env).as_bool()
            });
            Value::Bool(out)
        }
        Op::ScoreMod { expr, sides } => {
            let scores = args[0].float();
            let sides = side_views(sides, &args[1..]);
            let mut out = scores.clone();
            for (index, x) in out.indexed_iter_mut() {
                let env = IndexEnv::new(&index, *x, &sides);
                *x = expr.eval(&env).as_f64();
            }
            Value::Float(out)
        }
        Op::Compare(c) => {
            let (x, y) = (
                broadcast(args[0].float(), &out_shape),
                broadcast(args[1].float(), &out_shape),
            );
            Value::Bool(Zip::from(&x).and(&y).map_collect(|&a, &b| c.apply(a, b)))
        }
        Op::RmsNorm { eps } => Value::Float(rmsnorm(args[0].float(), args[1].float(), *eps)),
        Op::Linear { norm_eps, residual } => {
            let x = normed(args, *norm_eps, 2);
            let mut out = linear(&x, args[1].float());
            if *residual {
                out += args[args.len() - 1].float();
            }
            Value::Float(out)
        }
        Op::SwiGlu { norm_eps } => {
            let x = normed(args, *norm_eps, 3);
            let gate = linear(&x, args[1].float());
            let up = linear(&x, args[2].float());
            Value::Float(
                Zip::from(&gate)
                    .and(&up)
                    .map_collect(|&g, &u| g / (1.0 + (-g).exp()) * u),
            )
        }
        Op::HeadsProj {
            heads,
            head_dim,
            norm_eps,
            bias,
            qk_norm,
            rope: r,
        } => {
            let x = normed(args, *norm_eps, 2);
            let mut y = linear(&x, args[1].float());
            let mut next = 2 + usize::from(norm_eps.is_some());
            if *bias {
                y += args[next].float();
                next += 1;
            }
            let (b, t) = (y.shape()[0], y.shape()[1]);
            let split = reshape(y.view(), &[b, t, *heads as usize, *head_dim as usize]);
            let mut heads_first = reshape(split.view().permuted_axes(vec![0, 2, 1, 3]), &out_shape);
            if let Some(eps) = qk_norm {
                heads_first = rmsnorm(&heads_first, args[next].float(), *eps);
            }
            Value::Float(match r {
                Some(r) => rope(&heads_first, args[args.len() - 1].int(), r),
                None => heads_first,
            })
        }
        Op::Attention(kernel) => {
            let ops = crate::attention::Operands {
                q: args[0].float(),
                k: args[1].float(),
                v: args[2].float(),
                sides: (0..kernel.sides.len())
                    .map(|i| args[3 + 3 * i].int())
                    .collect(),
            };
            let out = if options.tiled_attention {
                crate::attention::tiled(kernel, &ops)
            } else {
                crate::attention::dense(kernel, &ops)
            };
            Value::Float(if kernel.merge_heads {
                reshape(out.view().permuted_axes(vec![0, 2, 1, 3]), &out_shape)
            } else {
                out
            })
        }
        Op::AttentionLse(kernel) => {
            let ops = crate::attention::Operands {
                q: args[0].float(),
                k: args[1].float(),
                v: args[2].float(),
                sides: (0..kernel.sides.len())
                    .map(|i| args[3 + 3 * i].int())
                    .collect(),
            };
            Value::Float(crate::attention::lse(kernel, &ops))
        }
        Op::AttentionGrad { kernel, wrt } => {
            let n = kernel.arity();
            let ops = crate::attention::Operands {
                q: args[0].float(),
                k: args[1].float(),
                v: args[2].float(),
                sides: (0..kernel.sides.len())
                    .map(|i| args[3 + 3 * i].int())
                    .collect(),
            };
            let heads_first = |x: &ArrayD<f64>| -> ArrayD<f64> {
                if kernel.merge_heads {
                    let s = x.shape();
                    let (h, d) = (kernel.heads as usize, kernel.head_dim as usize);
                    let split = reshape(x.view(), &[s[0], s[1], h, d]);
                    reshape(
                        split.view().permuted_axes(vec![0, 2, 1, 3]),
                        &[s[0], h, s[1], d],
                    )
                } else {
                    x.clone()
                }
            };
            let (o, d_o) = (
                heads_first(args[n].float()),
                heads_first(args[n + 1].float()),
            );
            let (dq, dk, dv) = crate::attention::grads(kernel, &ops, &o, &d_o, args[n + 2].float())
                .map_err(InterpError::Unsupported)?;
            Value::Float(match wrt {
                GradOf::Q => dq,
                GradOf::K => dk,
                GradOf::V => dv,
            })
        }
        Op::EmbeddingGrad { vocab } => {
            let (ids, dy) = (args[0].int(), args[1].float());
            let d = dy.shape()[dy.ndim() - 1];
            let mut out = ArrayD::zeros(IxDyn(&[*vocab as usize, d]));
            for (index, &id) in ids.indexed_iter() {
                if id < 0 || id as u64 >= *vocab {
                    return Err(InterpError::TokenOutOfRange {
                        id,
                        position: index.slice().to_vec(),
                        vocab: *vocab as usize,
                    });
                }
                let mut at: Vec<usize> = index.slice().to_vec();
                at.push(0);
                for c in 0..d {
                    at[ids.ndim()] = c;
                    out[[id as usize, c]] += dy[at.as_slice()];
                }
            }
            Value::Float(out)
        }
        Op::RopeGrad { rope } => {
            Value::Float(rope_signed(args[0].float(), args[1].int(), rope, -1.0))
        }
        Op::CeLse | Op::CeLoss | Op::CeGrad { .. } => Value::Float(cross_entropy(&node.op, args)?),
        Op::TileRanges { block } => {
            let x = args[0].int();
            let block = *block as usize;
            let out = ArrayD::from_shape_fn(IxDyn(&out_shape), |index| {
                let (b, tile, which) = (index[0], index[1], index[2]);
                let row = x.index_axis(Axis(0), b);
                let end = ((tile + 1) * block).min(row.len());
                let values = row.slice(ndarray::s![tile * block..end]);
                let (lo, hi) = values
                    .iter()
                    .fold((i64::MAX, i64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                if which == 0 { lo } else { hi }
            });
            Value::Int(out)
        }
        Op::Select => {
            let cond = broadcast(args[0].boolean(), &out_shape);
            match (args[1], args[2]) {
                (Value::Float(a), Value::Float(b)) => {
                    let (a, b) = (broadcast(a, &out_shape), broadcast(b, &out_shape));
                    Value::Float(
                        Zip::from(&cond)
                            .and(&a)
                            .and(&b)
                            .map_collect(|&c, &x, &y| if c { x } else { y }),
                    )
                }
                (Value::Int(a), Value::Int(b)) => {
                    let (a, b) = (broadcast(a, &out_shape), broadcast(b, &out_shape));
                    Value::Int(
                        Zip::from(&cond)
                            .and(&a)
                            .and(&b)
                            .map_collect(|&c, &x, &y| if c { x } else { y }),
                    )
                }
                (a, b) => {
                    let (a, b) = (
                        broadcast(a.boolean(), &out_shape),
                        broadcast(b.boolean(), &out_shape),
                    );
                    Value::Bool(
                        Zip::from(&cond)
                            .and(&a)
                            .and(&b)
                            .map_collect(|&c, &x, &y| if c { x } else { y }),
                    )
                }
            }
        }
    };
    debug_assert_eq!(
        value.shape(),
        out_shape.as_slice(),
        "{} at {:?}",
        node.op.name(),
        id
    );
    Ok(value)
}

/// Copies a view into a fresh array of the given shape, in logical (row-major) order.
fn reshape<T: Clone>(view: ArrayViewD<'_, T>, shape: &[usize]) -> ArrayD<T> {
    Array::from_shape_vec(IxDyn(shape), view.iter().cloned().collect())
        .expect("the verifier checked the element count")
}

/// Broadcasts an array to a shape and copies it.
fn broadcast<T: Clone>(array: &ArrayD<T>, shape: &[usize]) -> ArrayD<T> {
    let view = array
        .broadcast(IxDyn(shape))
        .expect("the verifier checked that the shapes broadcast");
    reshape(view, shape)
}

/// RMSNorm over the last axis.
fn rmsnorm(x: &ArrayD<f64>, g: &ArrayD<f64>, eps: f64) -> ArrayD<f64> {
    let last = Axis(x.ndim() - 1);
    let mut out = x.clone();
    for mut row in out.lanes_mut(last) {
        let mean = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
        let scale = 1.0 / (mean + eps).sqrt();
        row.iter_mut()
            .zip(g.iter())
            .for_each(|(v, w)| *v *= scale * w);
    }
    out
}

/// The first operand, RMS-normalized with the weight at `norm_operand` when `eps` is set.
fn normed(args: &[&Value], eps: Option<f64>, norm_operand: usize) -> ArrayD<f64> {
    match eps {
        Some(eps) => rmsnorm(args[0].float(), args[norm_operand].float(), eps),
        None => args[0].float().clone(),
    }
}

/// `x @ w^T` for a `[N, K]` weight.
fn linear(x: &ArrayD<f64>, w: &ArrayD<f64>) -> ArrayD<f64> {
    let wt = reshape(w.view().reversed_axes(), &[w.shape()[1], w.shape()[0]]);
    matmul(x, &wt)
}

fn embedding(table: &ArrayD<f64>, ids: &ArrayD<i64>) -> Result<ArrayD<f64>, InterpError> {
    let (vocab, dim) = (table.shape()[0], table.shape()[1]);
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    let mut out = Vec::with_capacity(ids.len() * dim);
    for (position, &id) in ids.indexed_iter() {
        if id < 0 || id as usize >= vocab {
            return Err(InterpError::TokenOutOfRange {
                id,
                position: position.slice().to_vec(),
                vocab,
            });
        }
        out.extend(table.index_axis(Axis(0), id as usize).iter().copied());
    }
    Ok(Array::from_shape_vec(IxDyn(&shape), out).expect("shape matches the gathered rows"))
}

fn matmul(a: &ArrayD<f64>, b: &ArrayD<f64>) -> ArrayD<f64> {
    let (ra, rb) = (a.ndim(), b.ndim());
    let (m, k, n) = (a.shape()[ra - 2], a.shape()[ra - 1], b.shape()[rb - 1]);
    let batch_rank = (ra - 2).max(rb - 2);
    let pad = |shape: &[usize], rank: usize| {
        let mut s = vec![1; batch_rank + 2 - rank];
        s.extend_from_slice(shape);
        s
    };
    let (sa, sb) = (pad(a.shape(), ra), pad(b.shape(), rb));
    let batch: Vec<usize> = (0..batch_rank).map(|i| sa[i].max(sb[i])).collect();
    let count: usize = batch.iter().product();
    let full = |last: [usize; 2]| {
        let mut s = batch.clone();
        s.extend(last);
        s
    };
    let a3 = reshape(
        a.view()
            .into_shape_with_order(IxDyn(&sa))
            .expect("padding keeps the size")
            .broadcast(IxDyn(&full([m, k])))
            .expect("batch dims broadcast"),
        &[count, m, k],
    );
    let b3 = reshape(
        b.view()
            .into_shape_with_order(IxDyn(&sb))
            .expect("padding keeps the size")
            .broadcast(IxDyn(&full([k, n])))
            .expect("batch dims broadcast"),
        &[count, k, n],
    );
    let mut out = Vec::with_capacity(count * m * n);
    for i in 0..count {
        let x: ArrayView2<f64> = a3
            .index_axis(Axis(0), i)
            .into_dimensionality()
            .expect("rank 2");
        let y: ArrayView2<f64> = b3
            .index_axis(Axis(0), i)
            .into_dimensionality()
            .expect("rank 2");
        let product: Array2<f64> = x.dot(&y);
        out.extend(product.iter().copied());
    }
    Array::from_shape_vec(IxDyn(&full([m, n])), out).expect("shape matches the products")
}

fn rope(x: &ArrayD<f64>, positions: &ArrayD<i64>, rope: &Rope) -> ArrayD<f64> {
    rope_signed(x, positions, rope, 1.0)
}

/// Cross-entropy over `h @ w^T` for `ce_lse`, `ce_loss` and `ce_grad`, row by row.
fn cross_entropy(op: &Op, args: &[&Value]) -> Result<ArrayD<f64>, InterpError> {
    let (h, w) = (args[0].float(), args[1].float());
    let (batch, t, k) = (h.shape()[0], h.shape()[1], h.shape()[2]);
    let vocab = w.shape()[0];
    let w2 = w
        .view()
        .into_dimensionality::<ndarray::Ix2>()
        .expect("rank 2");
    let logits_of = |b: usize, i: usize| -> Vec<f64> {
        let row = h.slice(ndarray::s![b, i, ..]);
        (0..vocab).map(|v| row.dot(&w2.row(v))).collect()
    };
    let target = |b: usize, i: usize| -> Result<Option<usize>, InterpError> {
        let id = args[2].int()[[b, i]];
        if id < 0 {
            Ok(None)
        } else if id as usize >= vocab {
            Err(InterpError::TokenOutOfRange {
                id,
                position: vec![b, i],
                vocab,
            })
        } else {
            Ok(Some(id as usize))
        }
    };
    let mut out = match op {
        Op::CeGrad {
            wrt: CeGradOf::Weight,
        } => ArrayD::zeros(IxDyn(&[vocab, k])),
        Op::CeGrad { .. } => ArrayD::zeros(IxDyn(&[batch, t, k])),
        _ => ArrayD::zeros(IxDyn(&[batch, t])),
    };
    for b in 0..batch {
        for i in 0..t {
            let logits = logits_of(b, i);
            match op {
                Op::CeLse => {
                    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
                    out[[b, i]] = max + logits.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                }
                Op::CeLoss => {
                    if let Some(id) = target(b, i)? {
                        out[[b, i]] = args[3].float()[[b, i]] - logits[id];
                    }
                }
                Op::CeGrad { wrt } => {
                    let Some(id) = target(b, i)? else {
                        continue;
                    };
                    let (lse, scale) = (args[3].float()[[b, i]], args[4].float()[[b, i]]);
                    for (v, logit) in logits.iter().enumerate() {
                        let g = scale * ((logit - lse).exp() - f64::from(u8::from(v == id)));
                        for c in 0..k {
                            match wrt {
                                CeGradOf::Hidden => out[[b, i, c]] += g * w[[v, c]],
                                CeGradOf::Weight => out[[v, c]] += g * h[[b, i, c]],
                            }
                        }
                    }
                }
                _ => unreachable!("only cross-entropy ops come here"),
            }
        }
    }
    Ok(out)
}

/// `rope` with the angle multiplied by `sign` (-1 for its adjoint).
fn rope_signed(x: &ArrayD<f64>, positions: &ArrayD<i64>, rope: &Rope, sign: f64) -> ArrayD<f64> {
    let rank = x.ndim();
    let dim = x.shape()[rank - 1];
    let half = dim / 2;
    let freqs = rope.inv_freqs(dim);
    let scale = rope.attention_factor();
    let mut out = x.clone();
    for (index, value) in out.indexed_iter_mut() {
        let (t, d) = (index[rank - 2], index[rank - 1]);
        let pair = d % half;
        let angle = positions[[t]] as f64 * freqs[pair];
        let mut partner = index.clone();
        let rotated = if d < half {
            partner[rank - 1] = d + half;
            -x[&partner]
        } else {
            partner[rank - 1] = d - half;
            x[&partner]
        };
        *value = scale * (x[&index] * angle.cos() + rotated * (sign * angle).sin());
    }
    out
}

fn side_views<'a>(names: &'a [String], args: &[&'a Value]) -> Vec<(&'a str, &'a ArrayD<i64>)> {
    names
        .iter()
        .zip(args)
        .map(|(name, value)| (name.as_str(), value.int()))
        .collect()
}

/// The index environment of one element of a `[batch, head, query, key]` tensor.
struct IndexEnv<'a> {
    b: usize,
    h: usize,
    q: usize,
    k: usize,
    score: f64,
    sides: &'a [(&'a str, &'a ArrayD<i64>)],
}

impl<'a> IndexEnv<'a> {
    fn new(index: &IxDyn, score: f64, sides: &'a [(&'a str, &'a ArrayD<i64>)]) -> IndexEnv<'a> {
        IndexEnv {
            b: index[0],
            h: index[1],
            q: index[2],
            k: index[3],
            score,
            sides,
        }
    }
}

impl Env for IndexEnv<'_> {
    fn var(&self, var: Var) -> Scalar {
        match var {
            Var::Q => Scalar::Int(self.q as i64),
            Var::K => Scalar::Int(self.k as i64),
            Var::H => Scalar::Int(self.h as i64),
            Var::B => Scalar::Int(self.b as i64),
            Var::Score => Scalar::Float(self.score),
        }
    }

    fn side(&self, name: &str, index: Var) -> i64 {
        let position = if index == Var::Q { self.q } else { self.k };
        self.sides
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, values)| values.get([self.b, position]))
            .copied()
            .unwrap_or(0)
    }
}
