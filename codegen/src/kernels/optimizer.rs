//! The optimizer's kernels, which a training plan runs after its step (see
//! `zebra_runtime::plan::OptimizerPlan`) so that weights, gradients and AdamW's moments stay
//! where the kernels run (on a GPU, nothing crosses to the host but a few partial sums):
//!
//! - [`sum_squares`]: per program, the sum of the squares of a part of one gradient (the
//!   runtime adds the parts in f64 for the global norm that clipping needs);
//! - [`adamw`]: AdamW on one weight, in place, with its two moments;
//! - [`pack`]: a weight (with a norm weight folded in) packed again for the projection
//!   kernels, as `zebra_runtime::pack::pack` does on the host when weights are loaded.
//!
//! Sizes are constants of each kernel, so one kernel serves every weight of one shape.

use zebra_runtime::plan::{HYPER, Hyper, PackSpec};

use crate::mlir::{Builder, F32, I64, Val, entry, vf32};

/// Most programs (partial sums) per gradient.
pub const MAX_PARTS: usize = 256;

/// Vectors of elements per program of [`adamw`].
const UPDATE_VECTORS: usize = 64;

/// What one optimizer kernel does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptimizerKernel {
    /// Buffers `(gradient [n], partials [parts])`.
    SumSquares { n: usize, parts: usize },
    /// Buffers `(weight [n], gradient [n], m [n], v [n], hyperparameters [HYPER])`; `decay`
    /// says whether the weight decays.
    AdamW { n: usize, decay: bool },
    /// Buffers `(weight, [norm weight,] packed)`, as `spec` says (its `weight` and `norm`
    /// indices are not part of the kernel).
    Pack(PackSpec),
}

impl OptimizerKernel {
    /// Parts of a gradient of `n` elements: whole vectors each, at most [`MAX_PARTS`].
    pub fn parts(n: usize, vector: usize) -> usize {
        n.div_ceil(vector).clamp(1, MAX_PARTS)
    }

    /// Elements per program of [`adamw`].
    pub fn update_chunk(vector: usize) -> usize {
        UPDATE_VECTORS * vector
    }

    /// Programs of the kernel's grid.
    pub fn programs(&self, vector: usize) -> usize {
        match self {
            OptimizerKernel::SumSquares { parts, .. } => *parts,
            OptimizerKernel::AdamW { n, .. } => n.div_ceil(Self::update_chunk(vector)),
            OptimizerKernel::Pack(spec) => spec.packed_len() / (spec.nr * spec.k),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            OptimizerKernel::SumSquares { n, parts } => format!("sum_squares n={n} parts={parts}"),
            OptimizerKernel::AdamW { n, decay } => format!("adamw n={n} decay={decay}"),
            OptimizerKernel::Pack(p) => format!(
                "pack n={} k={} group={} nr={} norm={} transposed={}",
                p.n,
                p.k,
                p.group,
                p.nr,
                p.norm.is_some(),
                p.transposed
            ),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            OptimizerKernel::SumSquares { .. } => "sum_squares",
            OptimizerKernel::AdamW { .. } => "adamw",
            OptimizerKernel::Pack(_) => "pack",
        }
    }

    pub fn mlir(&self, name: &str, vector: usize) -> String {
        match self {
            OptimizerKernel::SumSquares { n, parts } => sum_squares(name, *n, *parts, vector),
            OptimizerKernel::AdamW { n, decay } => adamw(name, *n, *decay, vector),
            OptimizerKernel::Pack(spec) => pack(name, spec),
        }
    }
}

/// The body of a loop over elements: `(builder, index, lanes, carried) -> next carried`.
type ElementBody<'a> = &'a dyn Fn(&mut Builder, &Val, usize, &[Val]) -> Vec<Val>;

/// Runs `body(b, at, lanes)` over elements `lo..hi`: `vector` lanes at a time, then one at
/// a time for what is left; `body` returns the next carried values (types `carried`).
fn over_elements(
    b: &mut Builder,
    (lo, hi): (&Val, &Val),
    vector: usize,
    carried: &[(Val, String)],
    body: ElementBody,
) -> Vec<Val> {
    let width = b.i64(vector as i64);
    let one = b.i64(1);
    let count = b.subi(hi, lo);
    let whole = b.divi(&count, &width);
    let whole = b.muli(&whole, &width);
    let split = b.addi(lo, &whole);
    let after = b.for_range(lo, &split, &width, carried, |b, at, acc| {
        body(b, at, vector, acc)
    });
    let carried: Vec<(Val, String)> = after
        .iter()
        .zip(carried)
        .map(|(v, (_, ty))| (v.clone(), ty.clone()))
        .collect();
    b.for_range(&split, hi, &one, &carried, |b, at, acc| body(b, at, 1, acc))
}

/// The type of `lanes` f32 values.
fn ty(lanes: usize) -> String {
    if lanes == 1 { F32.into() } else { vf32(lanes) }
}

/// Program `p` of `parts` writes `partials[p]`: the sum of the squares of its whole vectors
/// of the gradient (the last program also takes the rest).
pub fn sum_squares(name: &str, n: usize, parts: usize, vector: usize) -> String {
    let mut b = Builder::new();
    let e = entry();
    let grad = b.ptr_at(&e.bufs, 0);
    let partials = b.ptr_at(&e.bufs, 1);
    let per = n.div_ceil(vector).div_ceil(parts) * vector;
    let per_v = b.i64(per as i64);
    let n_v = b.i64(n as i64);
    let one = b.i64(1);
    b.for_range(&e.first, &e.last, &one, &[], |b, program, _| {
        let lo = b.muli(program, &per_v);
        let lo = b.mini(&lo, &n_v);
        let hi = b.addi(&lo, &per_v);
        let hi = b.mini(&hi, &n_v);
        let zero = b.f32(0.0);
        let zeros = b.splat(&zero, F32, vector);
        let init = [(zero.clone(), F32.to_string()), (zeros, vf32(vector))];
        let sums = over_elements(b, (&lo, &hi), vector, &init, &|b, at, lanes, acc| {
            let t = ty(lanes);
            let x = b.load(&grad, at, F32, &t);
            if lanes == 1 {
                vec![b.fma(&x, &x, &acc[0], F32), acc[1].clone()]
            } else {
                vec![acc[0].clone(), b.fma(&x, &x, &acc[1], &t)]
            }
        });
        let lanes = b.reduce("add", &sums[1], &vf32(vector), F32);
        let total = b.bin("addf", &lanes, &sums[0], F32);
        b.store(&total, &partials, program, F32, F32);
        vec![]
    });
    b.finish(name)
}

/// AdamW on one weight, in place: with `g = gradient * grad_scale`,
/// `m = beta1 m + (1 - beta1) g`, `v = beta2 v + (1 - beta2) g^2`, and
/// `w -= lr ((m / c1) / (sqrt(v / c2) + eps) + wd w)` (no `wd w` term without `decay`),
/// the scalars read from the hyperparameter buffer ([`Hyper`]).
pub fn adamw(name: &str, n: usize, decay: bool, vector: usize) -> String {
    let mut b = Builder::new();
    let e = entry();
    let [weight, grad, m_ptr, v_ptr, hyper] = [0, 1, 2, 3, 4].map(|i| b.ptr_at(&e.bufs, i));
    let scalars: Vec<Val> = (0..HYPER)
        .map(|i| {
            let at = b.i64(i as i64);
            b.load(&hyper, &at, F32, F32)
        })
        .collect();
    // Each scalar, and its splat across a vector.
    let both: Vec<[Val; 2]> = scalars
        .iter()
        .map(|s| [s.clone(), b.splat(s, F32, vector)])
        .collect();
    let chunk = b.i64(OptimizerKernel::update_chunk(vector) as i64);
    let n_v = b.i64(n as i64);
    let one = b.i64(1);
    b.for_range(&e.first, &e.last, &one, &[], |b, program, _| {
        let lo = b.muli(program, &chunk);
        let hi = b.addi(&lo, &chunk);
        let hi = b.mini(&hi, &n_v);
        over_elements(b, (&lo, &hi), vector, &[], &|b, at, lanes, _| {
            let t = ty(lanes);
            let s = |h: Hyper| both[h as usize][usize::from(lanes > 1)].clone();
            let w = b.load(&weight, at, F32, &t);
            let g = b.load(&grad, at, F32, &t);
            let m = b.load(&m_ptr, at, F32, &t);
            let v = b.load(&v_ptr, at, F32, &t);
            let g = b.bin("mulf", &g, &s(Hyper::GradScale), &t);
            let mg = b.bin("mulf", &g, &s(Hyper::OneMinusBeta1), &t);
            let m = b.fma(&m, &s(Hyper::Beta1), &mg, &t);
            let gg = b.bin("mulf", &g, &g, &t);
            let vg = b.bin("mulf", &gg, &s(Hyper::OneMinusBeta2), &t);
            let v = b.fma(&v, &s(Hyper::Beta2), &vg, &t);
            b.store(&m, &m_ptr, at, F32, &t);
            b.store(&v, &v_ptr, at, F32, &t);
            let m_hat = b.bin("mulf", &m, &s(Hyper::InvCorrection1), &t);
            let v_hat = b.bin("mulf", &v, &s(Hyper::InvCorrection2), &t);
            let root = b.op(format!("math.sqrt {v_hat} : {t}"));
            let denominator = b.bin("addf", &root, &s(Hyper::Eps), &t);
            let mut step = b.bin("divf", &m_hat, &denominator, &t);
            if decay {
                step = b.fma(&s(Hyper::WeightDecay), &w, &step, &t);
            }
            let delta = b.bin("mulf", &step, &s(Hyper::Lr), &t);
            let w = b.bin("subf", &w, &delta, &t);
            b.store(&w, &weight, at, F32, &t);
            vec![]
        });
        vec![]
    });
    b.finish(name)
}

/// Program `panel` writes panel `panel` of the packed weight, `[K][nr]`: column `c` is the
/// weight's row (or, transposed, column) `n = group g * group + panel column`, each element
/// times the norm weight's `k`; columns past the group are zeros.
pub fn pack(name: &str, spec: &PackSpec) -> String {
    let mut b = Builder::new();
    let e = entry();
    let weight = b.ptr_at(&e.bufs, 0);
    let norm = spec.norm.map(|_| b.ptr_at(&e.bufs, 1));
    let out = b.ptr_at(&e.bufs, if spec.norm.is_some() { 2 } else { 1 });
    let panels_per_group = spec.group.div_ceil(spec.nr);
    let [ppg, nr, group, k, n, zero_i, one] =
        [panels_per_group, spec.nr, spec.group, spec.k, spec.n, 0, 1].map(|c| b.i64(c as i64));
    b.for_range(&e.first, &e.last, &one, &[], |b, panel, _| {
        let g = b.divi(panel, &ppg);
        let p = b.remi(panel, &ppg);
        let first_col = b.muli(&p, &nr);
        let row0 = b.muli(&g, &group);
        let base = b.muli(panel, &k);
        b.for_range(&zero_i, &k, &one, &[], |b, kk, _| {
            let scale = norm.as_ref().map(|norm| b.load(norm, kk, F32, F32));
            let out_row = b.addi(&base, kk);
            let out_row = b.muli(&out_row, &nr);
            b.for_range(&zero_i, &nr, &one, &[], |b, c, _| {
                let col = b.addi(&first_col, c);
                let inside = b.cmpi("slt", &col, &group, I64);
                let x = b.if_else(
                    &inside,
                    &[F32.to_string()],
                    |b| {
                        let row = b.addi(&row0, &col);
                        let at = if spec.transposed {
                            let at = b.muli(kk, &n);
                            b.addi(&at, &row)
                        } else {
                            let at = b.muli(&row, &k);
                            b.addi(&at, kk)
                        };
                        let x = b.load(&weight, &at, F32, F32);
                        vec![match &scale {
                            Some(s) => b.bin("mulf", &x, s, F32),
                            None => x,
                        }]
                    },
                    |b| vec![b.f32(0.0)],
                );
                let at = b.addi(&out_row, c);
                b.store(&x[0], &out, &at, F32, F32);
                vec![]
            });
            vec![]
        });
        vec![]
    });
    b.finish(name)
}
