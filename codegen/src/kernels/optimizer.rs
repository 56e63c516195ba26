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
//! Sizes are constants of each kernel, so one kernel serves every weight of one shape. The
//! programs of `sum_squares` and `adamw` take the weight's vectors in turn (program `p` of
//! `P` the vectors `p`, `p + P`, ...), so that on a GPU, where a program is a thread, the
//! threads of a warp read neighbouring memory; the few elements after the last whole vector
//! go to the last program.

use zebra_runtime::plan::{HYPER, Hyper, PackSpec};

use crate::mlir::{Builder, F32, I64, Val, entry, vf32};

/// Most programs (partial sums) per gradient.
pub const MAX_PARTS: usize = 1024;

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

    /// Programs of the kernel's grid.
    pub fn programs(&self, vector: usize) -> usize {
        match self {
            OptimizerKernel::SumSquares { parts, .. } => *parts,
            OptimizerKernel::AdamW { n, .. } => (n / vector).div_ceil(UPDATE_VECTORS).max(1),
            // One per row `k` of each panel.
            OptimizerKernel::Pack(spec) => spec.packed_len() / spec.nr,
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

/// The type of `lanes` f32 values.
fn ty(lanes: usize) -> String {
    if lanes == 1 { F32.into() } else { vf32(lanes) }
}

/// Loads `lanes` f32s at `base[at]`: a whole vector is aligned to its size, as every buffer
/// is aligned to far more (so a GPU loads it in one instruction).
fn load(b: &mut Builder, base: &Val, at: &Val, lanes: usize) -> Val {
    b.load_aligned(base, at, F32, &ty(lanes), 4 * lanes)
}

/// Stores `lanes` f32s at `base[at]`, aligned as [`load`] says.
fn store(b: &mut Builder, value: &Val, base: &Val, at: &Val, lanes: usize) {
    b.store_aligned(value, base, at, (F32, &ty(lanes)), 4 * lanes);
}

/// Runs `body(b, at, lanes, carried)` for program `program` of `programs` over `n`
/// elements: on the whole vectors `program`, `program + programs`, ... (`vector` lanes
/// at `at`), then, in the last program, on the elements after them one at a time. Returns
/// the carried values (types `carried`) at the end.
fn over_turns(
    b: &mut Builder,
    (program, programs): (&Val, usize),
    n: usize,
    vector: usize,
    carried: &[(Val, String)],
    body: ElementBody,
) -> Vec<Val> {
    let groups = n / vector;
    let [groups_v, programs_v, width, last, tail, end, one] = [
        groups,
        programs,
        vector,
        programs - 1,
        groups * vector,
        n,
        1,
    ]
    .map(|c| b.i64(c as i64));
    let after = b.for_range(program, &groups_v, &programs_v, carried, |b, g, acc| {
        let at = b.muli(g, &width);
        body(b, &at, vector, acc)
    });
    let carried: Vec<(Val, String)> = after
        .iter()
        .zip(carried)
        .map(|(v, (_, ty))| (v.clone(), ty.clone()))
        .collect();
    let is_last = b.cmpi("eq", program, &last, I64);
    let from = b.select(&is_last, &tail, &end, I64);
    b.for_range(&from, &end, &one, &carried, |b, at, acc| {
        body(b, at, 1, acc)
    })
}

/// Program `p` of `parts` writes `partials[p]`: the sum of the squares of its turns of the
/// gradient's vectors.
pub fn sum_squares(name: &str, n: usize, parts: usize, vector: usize) -> String {
    let mut b = Builder::new();
    let e = entry();
    let grad = b.ptr_at(&e.bufs, 0);
    let partials = b.ptr_at(&e.bufs, 1);
    let one = b.i64(1);
    b.for_range(&e.first, &e.last, &one, &[], |b, program, _| {
        let zero = b.f32(0.0);
        let zeros = b.splat(&zero, F32, vector);
        let init = [(zero.clone(), F32.to_string()), (zeros, vf32(vector))];
        let sums = over_turns(
            b,
            (program, parts),
            n,
            vector,
            &init,
            &|b, at, lanes, acc| {
                let t = ty(lanes);
                let x = load(b, &grad, at, lanes);
                if lanes == 1 {
                    vec![b.fma(&x, &x, &acc[0], F32), acc[1].clone()]
                } else {
                    vec![acc[0].clone(), b.fma(&x, &x, &acc[1], &t)]
                }
            },
        );
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
    let programs = OptimizerKernel::AdamW { n, decay }.programs(vector);
    let one = b.i64(1);
    b.for_range(&e.first, &e.last, &one, &[], |b, program, _| {
        over_turns(
            b,
            (program, programs),
            n,
            vector,
            &[],
            &|b, at, lanes, _| {
                let t = ty(lanes);
                let s = |h: Hyper| both[h as usize][usize::from(lanes > 1)].clone();
                let w = load(b, &weight, at, lanes);
                let g = load(b, &grad, at, lanes);
                let m = load(b, &m_ptr, at, lanes);
                let v = load(b, &v_ptr, at, lanes);
                let g = b.bin("mulf", &g, &s(Hyper::GradScale), &t);
                let mg = b.bin("mulf", &g, &s(Hyper::OneMinusBeta1), &t);
                let m = b.fma(&m, &s(Hyper::Beta1), &mg, &t);
                let gg = b.bin("mulf", &g, &g, &t);
                let vg = b.bin("mulf", &gg, &s(Hyper::OneMinusBeta2), &t);
                let v = b.fma(&v, &s(Hyper::Beta2), &vg, &t);
                store(b, &m, &m_ptr, at, lanes);
                store(b, &v, &v_ptr, at, lanes);
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
                store(b, &w, &weight, at, lanes);
                vec![]
            },
        );
        vec![]
    });
    b.finish(name)
}

/// Program `row` writes row `kk = row % K` of panel `row / K` of the packed weight,
/// `[K][nr]`: column `c` is the weight's row (or, transposed, column)
/// `n = group g * group + panel column`, at `kk`, times the norm weight's `kk`; columns past
/// the group are zeros. (Neighbouring programs read neighbouring elements of an untransposed
/// weight.)
pub fn pack(name: &str, spec: &PackSpec) -> String {
    let mut b = Builder::new();
    let e = entry();
    let weight = b.ptr_at(&e.bufs, 0);
    let norm = spec.norm.map(|_| b.ptr_at(&e.bufs, 1));
    let out = b.ptr_at(&e.bufs, if spec.norm.is_some() { 2 } else { 1 });
    let panels_per_group = spec.group.div_ceil(spec.nr);
    let [ppg, nr, group, k, n, zero, one] =
        [panels_per_group, spec.nr, spec.group, spec.k, spec.n, 0, 1].map(|c| b.i64(c as i64));
    b.for_range(&e.first, &e.last, &one, &[], |b, row, _| {
        let panel = b.divi(row, &k);
        let kk = b.remi(row, &k);
        let g = b.divi(&panel, &ppg);
        let p = b.remi(&panel, &ppg);
        let first_col = b.muli(&p, &nr);
        let row0 = b.muli(&g, &group);
        let scale = norm.as_ref().map(|norm| b.load(norm, &kk, F32, F32));
        let out_row = b.muli(row, &nr);
        b.for_range(&zero, &nr, &one, &[], |b, c, _| {
            let col = b.addi(&first_col, c);
            let inside = b.cmpi("slt", &col, &group, I64);
            let x = b.if_else(
                &inside,
                &[F32.to_string()],
                |b| {
                    let source = b.addi(&row0, &col);
                    let at = if spec.transposed {
                        let at = b.muli(&kk, &n);
                        b.addi(&at, &source)
                    } else {
                        let at = b.muli(&source, &k);
                        b.addi(&at, &kk)
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
    b.finish(name)
}
