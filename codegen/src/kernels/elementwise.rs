//! Vectorized kernels for the primitive operations whose operands are read in simple patterns:
//! elementwise operations (and `reshape`, `expand`) where each operand is the output's shape,
//! a scalar, a trailing slice of it (`g[K]` over `x[B, T, K]`) or one value per row
//! (`r[B, T, 1]` over `x[B, T, K]`); reductions along the last axis; RMSNorm by rows. These
//! are what a training step's backward is mostly made of. Other patterns go to `generic`.
//!
//! Flat kernels: one program per `CHUNK` output elements, `w` at a time, then one at a time
//! for the tail. Row kernels: one program per `ROWS` rows.

use zebra_ir::op::{BinaryOp, CmpOp, Op, ReduceOp, UnaryOp};
use zebra_ir::types::{DType, Dim, Sym, TensorType};

use crate::mlir::{Builder, F32, Val, entry, vf32};
use crate::vexpr;

/// Output elements per program of the flat kernels (as `generic::CHUNK`).
pub const CHUNK: u64 = super::generic::CHUNK;
/// Rows per program of the row kernels.
pub const ROWS: u64 = 16;

/// How an operand is read at flat output index `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// `x[i]`: the output's shape (or any shape of the same volume, for `reshape`).
    Same,
    /// `x[0]`.
    Scalar,
    /// `x[i % n]`: the output's trailing dims, of `n` elements in all.
    Suffix,
    /// `x[i / inner]`: the output's leading dims with trailing 1s (`inner` elements share one).
    Prefix,
}

fn strip_ones(shape: &[Dim]) -> &[Dim] {
    let first = shape
        .iter()
        .position(|d| *d != Dim::ONE)
        .unwrap_or(shape.len());
    &shape[first..]
}

/// How `operand` broadcasts to `out`, if in one of the simple patterns.
fn access(operand: &[Dim], out: &[Dim]) -> Option<Access> {
    let op = strip_ones(operand);
    if operand == out {
        return Some(Access::Same);
    }
    if op.is_empty() {
        return Some(Access::Scalar);
    }
    if op.len() <= out.len() && out[out.len() - op.len()..] == *op {
        return Some(Access::Suffix);
    }
    // Same rank as the output, equal leading dims, 1s after.
    if operand.len() == out.len() {
        let lead = operand
            .iter()
            .rposition(|d| *d != Dim::ONE)
            .map_or(0, |p| p + 1);
        if operand[..lead] == out[..lead] && operand[lead..].iter().all(|d| *d == Dim::ONE) {
            return Some(Access::Prefix);
        }
    }
    None
}

/// The product of a shape's runtime sizes.
fn volume(b: &mut Builder, shape: &[Dim], batch: &Val, seq: &Val) -> Val {
    let mut total = b.i64(1);
    for d in shape {
        let size = match d {
            Dim::Const(n) => b.i64(*n as i64),
            Dim::Sym(Sym::Batch) => batch.clone(),
            Dim::Sym(Sym::Seq) => seq.clone(),
            Dim::Blocks(sym, block) => {
                let base = if *sym == Sym::Batch { batch } else { seq };
                let n = b.i64(i64::from(*block));
                b.ceil_div(base, &n)
            }
        };
        total = b.muli(&total, &size);
    }
    total
}

/// Whether all of `shape`'s dims are constants, and their product.
fn const_volume(shape: &[Dim]) -> Option<u64> {
    shape.iter().map(|d| d.as_const()).product()
}

fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_)
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::Select
            | Op::Reshape { .. }
            | Op::Expand { .. }
    )
}

/// The vector width a flat kernel can use: the widest (at most `max`) such that every suffix
/// and prefix operand keeps whole vectors within one of its runs.
fn flat_width(op: &Op, operands: &[TensorType], out: &TensorType, max: usize) -> Option<usize> {
    if !is_elementwise(op) {
        return None;
    }
    let accesses: Vec<Access> = operands
        .iter()
        .map(|o| {
            if matches!(op, Op::Reshape { .. }) {
                Some(Access::Same)
            } else {
                access(&o.shape, &out.shape)
            }
        })
        .collect::<Option<_>>()?;
    let data_ok = operands
        .iter()
        .chain([out])
        .all(|t| matches!(t.dtype, DType::F32 | DType::Bool));
    if !data_ok {
        return None;
    }
    let mut w = max;
    for (operand, access) in operands.iter().zip(&accesses) {
        let run = match access {
            Access::Suffix => const_volume(strip_ones(&operand.shape))?,
            Access::Prefix => {
                let lead = operand
                    .shape
                    .iter()
                    .rposition(|d| *d != Dim::ONE)
                    .map_or(0, |p| p + 1);
                const_volume(&out.shape[lead..])?
            }
            _ => continue,
        };
        while w > 1 && !run.is_multiple_of(w as u64) {
            w /= 2;
        }
    }
    Some(w)
}

/// Whether this module has a kernel for the node.
pub fn supports(op: &Op, operands: &[TensorType], out: &TensorType, vector: usize) -> bool {
    if flat_width(op, operands, out, vector).is_some() {
        return true;
    }
    match op {
        Op::Reduce { axis, .. } => {
            *axis == out.rank() - 1
                && operands[0].dtype == DType::F32
                && operands[0].shape[*axis].as_const().is_some()
        }
        Op::RmsNorm { .. } => operands[0]
            .shape
            .last()
            .and_then(|d| d.as_const())
            .is_some(),
        _ => false,
    }
}

fn unary(b: &mut Builder, op: UnaryOp, x: &Val, n: usize) -> Val {
    let ty = vf32(n);
    let one = b.splat_f32(1.0, n);
    match op {
        UnaryOp::Neg => b.op(format!("arith.negf {x} : {ty}")),
        UnaryOp::Exp => vexpr::exp(b, x, n),
        UnaryOp::Log => b.op(format!("math.log {x} : {ty}")),
        UnaryOp::Sqrt => b.op(format!("math.sqrt {x} : {ty}")),
        UnaryOp::Rsqrt => {
            let s = b.op(format!("math.sqrt {x} : {ty}"));
            b.bin("divf", &one, &s, &ty)
        }
        UnaryOp::Tanh => {
            // 1 - 2 / (exp(2x) + 1): exact at both saturations.
            let two = b.splat_f32(2.0, n);
            let x2 = b.bin("mulf", x, &two, &ty);
            let e = vexpr::exp(b, &x2, n);
            let d = b.bin("addf", &e, &one, &ty);
            let f = b.bin("divf", &two, &d, &ty);
            b.bin("subf", &one, &f, &ty)
        }
        UnaryOp::Sigmoid => {
            let neg = b.op(format!("arith.negf {x} : {ty}"));
            let e = vexpr::exp(b, &neg, n);
            let d = b.bin("addf", &one, &e, &ty);
            b.bin("divf", &one, &d, &ty)
        }
        UnaryOp::Recip => b.bin("divf", &one, x, &ty),
    }
}

fn binary(b: &mut Builder, op: BinaryOp, x: &Val, y: &Val, n: usize) -> Val {
    let name = match op {
        BinaryOp::Add => "addf",
        BinaryOp::Sub => "subf",
        BinaryOp::Mul => "mulf",
        BinaryOp::Div => "divf",
        BinaryOp::Max => "maxnumf",
        BinaryOp::Min => "minnumf",
    };
    b.bin(name, x, y, &vf32(n))
}

fn compare(b: &mut Builder, op: CmpOp, x: &Val, y: &Val, n: usize) -> Val {
    let pred = match op {
        CmpOp::Lt => "olt",
        CmpOp::Le => "ole",
        CmpOp::Gt => "ogt",
        CmpOp::Ge => "oge",
        CmpOp::Eq => "oeq",
        CmpOp::Ne => "une",
    };
    b.cmpf(pred, x, y, &vf32(n))
}

/// A flat kernel: `out[i] = op(operands read by their access)`.
pub fn flat(
    name: &str,
    op: &Op,
    operands: &[TensorType],
    out: &TensorType,
    max_vector: usize,
) -> String {
    let w = flat_width(op, operands, out, max_vector).expect("checked by `supports`");
    let mut b = Builder::new();
    let e = entry();
    let ptrs: Vec<Val> = (0..operands.len()).map(|i| b.ptr_at(&e.bufs, i)).collect();
    let out_ptr = b.ptr_at(&e.bufs, operands.len());
    let batch = b.i64_at(&e.dims, 0);
    let seq = b.i64_at(&e.dims, 1);
    let total = volume(&mut b, &out.shape, &batch, &seq);
    // Per operand: its access, and the run length (suffix volume, or prefix's inner size).
    let plans: Vec<(Access, Val)> = operands
        .iter()
        .map(|o| {
            let a = if matches!(op, Op::Reshape { .. }) {
                Access::Same
            } else {
                access(&o.shape, &out.shape).expect("checked by `supports`")
            };
            let n = match a {
                Access::Suffix => volume(&mut b, strip_ones(&o.shape), &batch, &seq),
                Access::Prefix => {
                    let lead = o
                        .shape
                        .iter()
                        .rposition(|d| *d != Dim::ONE)
                        .map_or(0, |p| p + 1);
                    volume(&mut b, &out.shape[lead..], &batch, &seq)
                }
                _ => b.i64(1),
            };
            (a, n)
        })
        .collect();
    let chunk = b.i64(CHUNK as i64);
    let lo = b.muli(&e.first, &chunk);
    let hi = b.muli(&e.last, &chunk);
    let hi = b.mini(&hi, &total);
    let cw = b.i64(w as i64);
    let span = b.subi(&hi, &lo);
    let c0 = b.i64(0);
    let span = b.maxi(&span, &c0);
    let whole = b.divi(&span, &cw);
    let whole = b.muli(&whole, &cw);
    let mid = b.addi(&lo, &whole);
    let body = |b: &mut Builder, i: &Val, n: usize| {
        let load = |b: &mut Builder, which: usize| -> Val {
            let (a, run) = &plans[which];
            let dtype = operands[which].dtype;
            let ty = if dtype == DType::Bool {
                format!("vector<{n}xi8>")
            } else {
                vf32(n)
            };
            let elem = if dtype == DType::Bool { "i8" } else { F32 };
            let value = match a {
                Access::Same => b.load(&ptrs[which], i, elem, &ty),
                Access::Suffix => {
                    let at = b.remi(i, run);
                    b.load(&ptrs[which], &at, elem, &ty)
                }
                Access::Scalar | Access::Prefix => {
                    let at = if *a == Access::Scalar {
                        b.i64(0)
                    } else {
                        b.divi(i, run)
                    };
                    let x = b.load(&ptrs[which], &at, elem, elem);
                    b.splat(&x, elem, n)
                }
            };
            if dtype == DType::Bool {
                let zero = b.op(format!("arith.constant dense<0> : vector<{n}xi8>"));
                b.cmpi("ne", &value, &zero, &format!("vector<{n}xi8>"))
            } else {
                value
            }
        };
        let value = match op {
            Op::Unary(u) => {
                let x = load(b, 0);
                unary(b, *u, &x, n)
            }
            Op::Binary(o) => {
                let (x, y) = (load(b, 0), load(b, 1));
                binary(b, *o, &x, &y, n)
            }
            Op::Compare(c) => {
                let (x, y) = (load(b, 0), load(b, 1));
                compare(b, *c, &x, &y, n)
            }
            Op::Select => {
                let c = load(b, 0);
                let (x, y) = (load(b, 1), load(b, 2));
                b.select(&c, &x, &y, &vf32(n))
            }
            Op::Reshape { .. } | Op::Expand { .. } => load(b, 0),
            other => unreachable!("`{}` is not elementwise", other.name()),
        };
        if out.dtype == DType::Bool {
            let bytes = if matches!(op, Op::Compare(_)) {
                b.op(format!(
                    "arith.extui {value} : vector<{n}xi1> to vector<{n}xi8>"
                ))
            } else {
                // A reshape or expand of bools: the bytes were compared to 0; store 0 or 1.
                b.op(format!(
                    "arith.extui {value} : vector<{n}xi1> to vector<{n}xi8>"
                ))
            };
            b.store(&bytes, &out_ptr, i, "i8", &format!("vector<{n}xi8>"));
        } else {
            b.store(&value, &out_ptr, i, F32, &vf32(n));
        }
    };
    let c1 = b.i64(1);
    b.for_range(&lo, &mid, &cw, &[], |b, i, _| {
        body(b, i, w);
        vec![]
    });
    b.for_range(&mid, &hi, &c1, &[], |b, i, _| {
        body(b, i, 1);
        vec![]
    });
    b.finish(name)
}

/// The width to walk a row of `n` constant elements with.
fn row_width(n: u64, max: usize) -> usize {
    let mut w = max;
    while w > 1 && !n.is_multiple_of(w as u64) {
        w /= 2;
    }
    w
}

/// A reduction along the last axis (of `n` constant elements) or RMSNorm over it; one
/// program per `ROWS` rows.
pub fn rows(
    name: &str,
    op: &Op,
    operands: &[TensorType],
    out: &TensorType,
    max_vector: usize,
) -> String {
    let x_ty = &operands[0];
    let n = x_ty
        .shape
        .last()
        .and_then(|d| d.as_const())
        .expect("checked by `supports`");
    let w = row_width(n, max_vector);
    let vt = vf32(w);
    let mut b = Builder::new();
    let e = entry();
    let x = b.ptr_at(&e.bufs, 0);
    let g = matches!(op, Op::RmsNorm { .. }).then(|| b.ptr_at(&e.bufs, 1));
    let out_ptr = b.ptr_at(&e.bufs, operands.len());
    let batch = b.i64_at(&e.dims, 0);
    let seq = b.i64_at(&e.dims, 1);
    let rank = x_ty.rank();
    let total_rows = volume(&mut b, &x_ty.shape[..rank - 1], &batch, &seq);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let cn = b.i64(n as i64);
    let cw = b.i64(w as i64);
    let per = b.i64(ROWS as i64);
    let _ = out;
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        let r0 = b.muli(pid, &per);
        let r1 = b.addi(&r0, &per);
        let r1 = b.mini(&r1, &total_rows);
        b.for_range(&r0, &r1, &c1, &[], |b, row, _| {
            let base = b.muli(row, &cn);
            let (init, combine): (f32, &str) = match op {
                Op::Reduce {
                    op: ReduceOp::Max, ..
                } => (f32::NEG_INFINITY, "maxnumf"),
                _ => (0.0, "addf"),
            };
            let start = b.splat_f32(init, w);
            let square = matches!(op, Op::RmsNorm { .. });
            let acc = b.for_range(&c0, &cn, &cw, &[(start, vt.clone())], |b, j, acc| {
                let at = b.addi(&base, j);
                let v = b.load(&x, &at, F32, &vt);
                vec![if square {
                    b.fma(&v, &v, &acc[0], &vt)
                } else {
                    b.bin(combine, &acc[0], &v, &vt)
                }]
            });
            let kind = if combine == "addf" { "add" } else { "maxnumf" };
            let total = b.reduce(kind, &acc[0], &vt, F32);
            match op {
                Op::Reduce { op: r, .. } => {
                    let value = if *r == ReduceOp::Mean {
                        let count = b.f32(n as f32);
                        b.bin("divf", &total, &count, F32)
                    } else {
                        total
                    };
                    b.store(&value, &out_ptr, row, F32, F32);
                }
                Op::RmsNorm { eps } => {
                    let count = b.f32(n as f32);
                    let mean = b.bin("divf", &total, &count, F32);
                    let eps = b.f32(*eps as f32);
                    let shifted = b.bin("addf", &mean, &eps, F32);
                    let root = b.op(format!("math.sqrt {shifted} : f32"));
                    let one = b.f32(1.0);
                    let r = b.bin("divf", &one, &root, F32);
                    let rv = b.splat(&r, F32, w);
                    let gain = g.clone().expect("rmsnorm has a gain");
                    b.for_range(&c0, &cn, &cw, &[], |b, j, _| {
                        let at = b.addi(&base, j);
                        let v = b.load(&x, &at, F32, &vt);
                        let gv = b.load(&gain, j, F32, &vt);
                        let y = b.bin("mulf", &v, &rv, &vt);
                        let y = b.bin("mulf", &y, &gv, &vt);
                        b.store(&y, &out_ptr, &at, F32, &vt);
                        vec![]
                    });
                }
                other => unreachable!("`{}` is not a row operation", other.name()),
            }
            vec![]
        });
        vec![]
    });
    b.finish(name)
}

/// Whether `op` runs as a row kernel (else flat).
pub fn is_row_kernel(op: &Op) -> bool {
    matches!(op, Op::Reduce { .. } | Op::RmsNorm { .. })
}
