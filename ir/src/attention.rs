//! Reference semantics of the fused attention, in f64: a dense version that is obviously
//! right, and a tiled version with online softmax that follows the tile schedule exactly as
//! the compiled kernels do. Tests check that the two agree.

use ndarray::{ArrayD, ArrayView1, Axis, IxDyn};

use crate::expr::{Env, Scalar, Var};
use crate::op::AttentionKernel;
use crate::schedule::{ScheduleInput, SideValues, Support, TileKind, build_heads};

/// The operands of one attention: `q: [B, H, T, D]`, `k, v: [B, KV, T, D]`, and the side
/// inputs `[B, T]` named by the kernel, in its order.
pub struct Operands<'a> {
    pub q: &'a ArrayD<f64>,
    pub k: &'a ArrayD<f64>,
    pub v: &'a ArrayD<f64>,
    pub sides: Vec<&'a ArrayD<i64>>,
}

struct PointEnv<'a> {
    b: usize,
    h: usize,
    q: usize,
    k: usize,
    score: f64,
    names: &'a [String],
    sides: &'a [&'a ArrayD<i64>],
}

impl Env for PointEnv<'_> {
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
        self.names
            .iter()
            .position(|n| n == name)
            .and_then(|i| self.sides[i].get([self.b, position]))
            .copied()
            .unwrap_or(0)
    }
}

fn dot(a: ArrayView1<f64>, b: ArrayView1<f64>) -> f64 {
    a.iter().zip(b.iter()).map(|(x, y)| x * y).sum()
}

/// The modified score of one element, or `None` when the mask hides it.
fn score(
    kernel: &AttentionKernel,
    ops: &Operands,
    (b, h, i, j): (usize, usize, usize, usize),
    check_mask: bool,
) -> Option<f64> {
    let kv = h / (kernel.heads / kernel.kv_heads) as usize;
    let mut env = PointEnv {
        b,
        h,
        q: i,
        k: j,
        score: 0.0,
        names: &kernel.sides,
        sides: &ops.sides,
    };
    if check_mask && !kernel.mask.eval(&env).as_bool() {
        return None;
    }
    let raw = dot(
        ops.q
            .slice(ndarray::s![b, h, i, ..])
            .into_dimensionality()
            .expect("rank 1"),
        ops.k
            .slice(ndarray::s![b, kv, j, ..])
            .into_dimensionality()
            .expect("rank 1"),
    ) * kernel.scale;
    env.score = raw;
    Some(match &kernel.score {
        Some(expr) => expr.eval(&env).as_f64(),
        None => raw,
    })
}

/// The raw (scaled) and modified scores of one element, or `None` when the mask hides it.
fn scores(
    kernel: &AttentionKernel,
    ops: &Operands,
    (b, h, i, j): (usize, usize, usize, usize),
) -> Option<(f64, f64)> {
    let raw = score(
        &AttentionKernel {
            score: None,
            ..kernel.clone()
        },
        ops,
        (b, h, i, j),
        true,
    )?;
    let modified = match &kernel.score {
        Some(expr) => expr
            .eval(&PointEnv {
                b,
                h,
                q: i,
                k: j,
                score: raw,
                names: &kernel.sides,
                sides: &ops.sides,
            })
            .as_f64(),
        None => raw,
    };
    Some((raw, modified))
}

/// The natural log-sum-exp of each query's visible modified scores, `[B, H, T]`; `-inf` for
/// a query that sees no key.
pub fn lse(kernel: &AttentionKernel, ops: &Operands) -> ArrayD<f64> {
    let shape = ops.q.shape();
    let (batch, heads, t) = (shape[0], shape[1], shape[2]);
    let mut out = ArrayD::from_elem(IxDyn(&[batch, heads, t]), f64::NEG_INFINITY);
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..t {
                let z: Vec<f64> = (0..t)
                    .filter_map(|j| score(kernel, ops, (b, h, i, j), true))
                    .collect();
                let max = z.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                if max > f64::NEG_INFINITY {
                    out[[b, h, i]] = max + z.iter().map(|s| (s - max).exp()).sum::<f64>().ln();
                }
            }
        }
    }
    out
}

/// `(dq, dk, dv)`.
pub type Grads = (ArrayD<f64>, ArrayD<f64>, ArrayD<f64>);

/// The gradients `(dq, dk, dv)` of the attention, given its output `o` and the output's
/// gradient `d_o` (both `[B, H, T, D]`) and its log-sum-exp: the dense formulas of the
/// FlashAttention-2 backward (`p = exp(z - lse)`, `dv = p^T do`, `dz = p (do v^T - rowsum(do
/// o))`, `ds = dz * score'(s)`, `dq = scale ds k`, `dk = scale ds^T q`). GQA heads sum into
/// their KV head.
pub fn grads(
    kernel: &AttentionKernel,
    ops: &Operands,
    o: &ArrayD<f64>,
    d_o: &ArrayD<f64>,
    lse: &ArrayD<f64>,
) -> Result<Grads, String> {
    let shape = ops.q.shape().to_vec();
    let (batch, heads, t, d) = (shape[0], shape[1], shape[2], shape[3]);
    let group = (kernel.heads / kernel.kv_heads) as usize;
    let derivative = match &kernel.score {
        Some(expr) => Some(expr.score_derivative()?),
        None => None,
    };
    let mut dq = ArrayD::zeros(IxDyn(&shape));
    let mut dk = ArrayD::zeros(IxDyn(ops.k.shape()));
    let mut dv = ArrayD::zeros(IxDyn(ops.v.shape()));
    for b in 0..batch {
        for h in 0..heads {
            let kv = h / group;
            for i in 0..t {
                let l = lse[[b, h, i]];
                if l == f64::NEG_INFINITY {
                    continue;
                }
                let delta: f64 = (0..d).map(|c| d_o[[b, h, i, c]] * o[[b, h, i, c]]).sum();
                for j in 0..t {
                    let Some((raw, z)) = scores(kernel, ops, (b, h, i, j)) else {
                        continue;
                    };
                    let p = (z - l).exp();
                    let mut dp = 0.0;
                    for c in 0..d {
                        dv[[b, kv, j, c]] += p * d_o[[b, h, i, c]];
                        dp += d_o[[b, h, i, c]] * ops.v[[b, kv, j, c]];
                    }
                    let dz = p * (dp - delta);
                    let slope = match &derivative {
                        Some(expr) => expr
                            .eval(&PointEnv {
                                b,
                                h,
                                q: i,
                                k: j,
                                score: raw,
                                names: &kernel.sides,
                                sides: &ops.sides,
                            })
                            .as_f64(),
                        None => 1.0,
                    };
                    let ds = dz * slope * kernel.scale;
                    for c in 0..d {
                        dq[[b, h, i, c]] += ds * ops.k[[b, kv, j, c]];
                        dk[[b, kv, j, c]] += ds * ops.q[[b, h, i, c]];
                    }
                }
            }
        }
    }
    Ok((dq, dk, dv))
}

/// Dense attention: every score computed, masked, and a softmax per row. A row whose keys
/// are all hidden gets zeros. Returns `[B, H, T, D]`.
pub fn dense(kernel: &AttentionKernel, ops: &Operands) -> ArrayD<f64> {
    let shape = ops.q.shape().to_vec();
    let (batch, heads, t, d) = (shape[0], shape[1], shape[2], shape[3]);
    let group = (kernel.heads / kernel.kv_heads) as usize;
    let mut out = ArrayD::zeros(IxDyn(&shape));
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..t {
                let scores: Vec<Option<f64>> = (0..t)
                    .map(|j| score(kernel, ops, (b, h, i, j), true))
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let total: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    if let Some(s) = s {
                        let p = (s - max).exp() / total;
                        for c in 0..d {
                            out[[b, h, i, c]] += p * ops.v[[b, h / group, j, c]];
                        }
                    }
                }
            }
        }
    }
    out
}

/// Tiled attention with an online softmax (running max and sum per query), visiting only
/// the tiles of the schedule and evaluating the mask only on partial tiles: the algorithm
/// of the compiled kernels, in f64. Returns `[B, H, T, D]`.
pub fn tiled(kernel: &AttentionKernel, ops: &Operands) -> ArrayD<f64> {
    let shape = ops.q.shape().to_vec();
    let (batch, heads, t, d) = (shape[0], shape[1], shape[2], shape[3]);
    let group = (kernel.heads / kernel.kv_heads) as usize;
    let support = Support::of(&kernel.mask);
    let mut out = ArrayD::zeros(IxDyn(&shape));
    for b in 0..batch {
        let rows: Vec<Vec<i64>> = ops
            .sides
            .iter()
            .map(|s| s.index_axis(Axis(0), b).iter().copied().collect())
            .collect();
        let values = SideValues {
            names: &kernel.sides,
            values: rows.iter().map(Vec::as_slice).collect(),
        };
        let schedules = build_heads(&ScheduleInput {
            mask: &kernel.mask,
            support: &support,
            heads: kernel.heads as usize,
            block_q: kernel.block_q as usize,
            block_k: kernel.block_k as usize,
            seq_len: t,
            sides: if kernel.sides.is_empty() {
                None
            } else {
                Some(&values)
            },
            batch_row: b,
            refine: false,
        });
        for h in 0..heads {
            let schedule = schedules.of(h);
            for (qt, row) in schedule.rows.iter().enumerate() {
                for i in qt * schedule.block_q..((qt + 1) * schedule.block_q).min(t) {
                    let (mut max, mut sum) = (f64::NEG_INFINITY, 0.0);
                    let mut acc = vec![0.0; d];
                    for &(kt, kind) in &row.tiles {
                        let keys = kt as usize * schedule.block_k
                            ..((kt as usize + 1) * schedule.block_k).min(t);
                        for j in keys {
                            let Some(s) =
                                score(kernel, ops, (b, h, i, j), kind == TileKind::Partial)
                            else {
                                continue;
                            };
                            if s == f64::NEG_INFINITY {
                                // A score modifier may hide an element too: weight 0.
                                continue;
                            }
                            if s > max {
                                let rescale = (max - s).exp();
                                sum *= rescale;
                                acc.iter_mut().for_each(|a| *a *= rescale);
                                max = s;
                            }
                            let p = (s - max).exp();
                            sum += p;
                            for (c, a) in acc.iter_mut().enumerate() {
                                *a += p * ops.v[[b, h / group, j, c]];
                            }
                        }
                    }
                    if sum > 0.0 {
                        for (c, a) in acc.iter().enumerate() {
                            out[[b, h, i, c]] = a / sum;
                        }
                    }
                }
            }
        }
    }
    out
}
