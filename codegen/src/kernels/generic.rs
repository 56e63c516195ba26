//! Kernels for the primitive operations the optimizer can leave behind (graphs it could not
//! fuse, written in IR text): one program per chunk of output elements, each element
//! computed from its multi-index with broadcasting. Plain scalar code: correct for every
//! shape, not tuned. The fused models of `examples/` never use these.

use zebra_ir::op::{BinaryOp, CmpOp, Op, ReduceOp, UnaryOp};
use zebra_ir::types::{DType, Dim, Sym, TensorType};

use crate::mlir::{Builder, F32, I64, Val, entry};

/// Output elements per program.
pub const CHUNK: u64 = 512;

pub fn elem(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => F32,
        DType::I64 => I64,
        DType::Bool => "i8",
    }
}

/// The runtime size of each dimension.
fn sizes(b: &mut Builder, shape: &[Dim], batch: &Val, seq: &Val) -> Vec<Val> {
    shape
        .iter()
        .map(|d| match d {
            Dim::Const(n) => b.i64(*n as i64),
            Dim::Sym(Sym::Batch) => batch.clone(),
            Dim::Sym(Sym::Seq) => seq.clone(),
            Dim::Blocks(sym, block) => {
                let base = if *sym == Sym::Batch {
                    batch.clone()
                } else {
                    seq.clone()
                };
                let n = b.i64(i64::from(*block));
                b.ceil_div(&base, &n)
            }
        })
        .collect()
}

/// The number of elements of a shape.
fn volume(b: &mut Builder, sizes: &[Val]) -> Val {
    let mut total = b.i64(1);
    for s in sizes {
        total = b.muli(&total, s);
    }
    total
}

/// The row-major flat index of `index` (right-aligned, broadcast where the operand's size
/// is 1) into an operand of the given sizes.
fn flat(b: &mut Builder, index: &[Val], shape: &[Dim], sizes: &[Val]) -> Val {
    let offset = index.len() - shape.len();
    let mut at = b.i64(0);
    for (axis, (dim, size)) in shape.iter().zip(sizes).enumerate() {
        at = b.muli(&at, size);
        if *dim != Dim::ONE {
            at = b.addi(&at, &index[offset + axis]);
        }
    }
    at
}

/// Splits a flat index into a multi-index over `sizes`.
fn unflatten(b: &mut Builder, flat: &Val, sizes: &[Val]) -> Vec<Val> {
    let mut rest = flat.clone();
    let mut index = vec![rest.clone(); sizes.len()];
    for axis in (0..sizes.len()).rev() {
        index[axis] = b.remi(&rest, &sizes[axis]);
        rest = b.divi(&rest, &sizes[axis]);
    }
    index
}

fn unary(b: &mut Builder, op: UnaryOp, x: &Val) -> Val {
    match op {
        UnaryOp::Neg => b.op(format!("arith.negf {x} : f32")),
        UnaryOp::Exp => b.op(format!("math.exp {x} : f32")),
        UnaryOp::Log => b.op(format!("math.log {x} : f32")),
        UnaryOp::Sqrt => b.op(format!("math.sqrt {x} : f32")),
        UnaryOp::Rsqrt => b.op(format!("math.rsqrt {x} : f32")),
        UnaryOp::Tanh => b.op(format!("math.tanh {x} : f32")),
        UnaryOp::Sigmoid => {
            let n = b.op(format!("arith.negf {x} : f32"));
            let e = b.op(format!("math.exp {n} : f32"));
            let one = b.f32(1.0);
            let d = b.bin("addf", &one, &e, F32);
            b.bin("divf", &one, &d, F32)
        }
        UnaryOp::Recip => {
            let one = b.f32(1.0);
            b.bin("divf", &one, x, F32)
        }
    }
}

fn binary(b: &mut Builder, op: BinaryOp, x: &Val, y: &Val) -> Val {
    let name = match op {
        BinaryOp::Add => "addf",
        BinaryOp::Sub => "subf",
        BinaryOp::Mul => "mulf",
        BinaryOp::Div => "divf",
        BinaryOp::Max => "maxnumf",
        BinaryOp::Min => "minnumf",
    };
    b.bin(name, x, y, F32)
}

fn compare(b: &mut Builder, op: CmpOp, x: &Val, y: &Val) -> Val {
    let pred = match op {
        CmpOp::Lt => "olt",
        CmpOp::Le => "ole",
        CmpOp::Gt => "ogt",
        CmpOp::Ge => "oge",
        CmpOp::Eq => "oeq",
        CmpOp::Ne => "une",
    };
    b.cmpf(pred, x, y, F32)
}

/// An i1 as the i8 a bool buffer holds.
fn to_byte(b: &mut Builder, x: &Val) -> Val {
    b.op(format!("arith.extui {x} : i1 to i8"))
}

fn from_byte(b: &mut Builder, x: &Val) -> Val {
    let zero = b.op("arith.constant 0 : i8");
    b.cmpi("ne", x, &zero, "i8")
}

/// Whether this module can generate a kernel for the operation.
pub fn supports(op: &Op) -> bool {
    !matches!(
        op,
        Op::Input { .. }
            | Op::Weight { .. }
            | Op::Constant { .. }
            | Op::Linear { .. }
            | Op::SwiGlu { .. }
            | Op::HeadsProj { .. }
            | Op::Attention(_)
            | Op::AttentionLse(_)
            | Op::AttentionGrad { .. }
            | Op::EmbeddingGrad { .. }
            | Op::CeLse
            | Op::CeLoss
            | Op::CeGrad { .. }
    )
}

/// A kernel computing `op` element by element. Buffers: the operands in order, then the
/// output. Grid: `ceil(elements / CHUNK)`.
pub fn kernel(name: &str, op: &Op, operands: &[TensorType], out: &TensorType) -> String {
    let mut b = Builder::new();
    let e = entry();
    let ptrs: Vec<Val> = (0..operands.len()).map(|i| b.ptr_at(&e.bufs, i)).collect();
    let out_ptr = b.ptr_at(&e.bufs, operands.len());
    let batch = b.i64_at(&e.dims, 0);
    let seq = b.i64_at(&e.dims, 1);
    let out_sizes = sizes(&mut b, &out.shape, &batch, &seq);
    let operand_sizes: Vec<Vec<Val>> = operands
        .iter()
        .map(|o| sizes(&mut b, &o.shape, &batch, &seq))
        .collect();
    let total = volume(&mut b, &out_sizes);
    let chunk = b.i64(CHUNK as i64);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let lo = b.muli(&e.first, &chunk);
    let hi = b.muli(&e.last, &chunk);
    let hi = b.mini(&hi, &total);
    b.for_range(&lo, &hi, &c1, &[], |b, i, _| {
        let index = unflatten(b, i, &out_sizes);
        let load = |b: &mut Builder, which: usize, index: &[Val]| -> Val {
            let at = flat(b, index, &operands[which].shape, &operand_sizes[which]);
            let ty = elem(operands[which].dtype);
            b.load(&ptrs[which], &at, ty, ty)
        };
        let value = match op {
            Op::Unary(u) => {
                let x = load(b, 0, &index);
                unary(b, *u, &x)
            }
            Op::Binary(o) => {
                let (x, y) = (load(b, 0, &index), load(b, 1, &index));
                binary(b, *o, &x, &y)
            }
            Op::Compare(c) => {
                let (x, y) = (load(b, 0, &index), load(b, 1, &index));
                let r = compare(b, *c, &x, &y);
                to_byte(b, &r)
            }
            Op::Select => {
                let c = load(b, 0, &index);
                let c = from_byte(b, &c);
                let (x, y) = (load(b, 1, &index), load(b, 2, &index));
                b.select(&c, &x, &y, elem(out.dtype))
            }
            Op::Reshape { .. } => {
                let ty = elem(operands[0].dtype);
                b.load(&ptrs[0], i, ty, ty)
            }
            Op::Expand { .. } => load(b, 0, &index),
            Op::Transpose { perm } => {
                let mut source = index.clone();
                for (axis, &p) in perm.iter().enumerate() {
                    source[p] = index[axis].clone();
                }
                let at = flat(b, &source, &operands[0].shape, &operand_sizes[0]);
                let ty = elem(operands[0].dtype);
                b.load(&ptrs[0], &at, ty, ty)
            }
            Op::Positions => index[0].clone(),
            Op::Embedding => {
                let rank = index.len();
                let id = load(b, 1, &index[..rank - 1]);
                let dim = b.i64(operands[0].shape[1].as_const().unwrap_or(1) as i64);
                let row = b.muli(&id, &dim);
                let at = b.addi(&row, &index[rank - 1]);
                b.load(&ptrs[0], &at, F32, F32)
            }
            Op::Mask { expr, sides } | Op::ScoreMod { expr, sides } => {
                let first_side = usize::from(matches!(op, Op::ScoreMod { .. }));
                let side_rows: Vec<(String, Val)> = sides
                    .iter()
                    .enumerate()
                    .map(|(s, name)| {
                        let offset = b.muli(&index[0], &seq);
                        (name.clone(), b.gep(&ptrs[first_side + s], &offset, I64))
                    })
                    .collect();
                let score = if first_side == 1 {
                    let x = load(b, 0, &index);
                    Some(b.splat(&x, F32, 1))
                } else {
                    None
                };
                let env = crate::vexpr::VecEnv {
                    n: 1,
                    q: index[2].clone(),
                    k0: index[3].clone(),
                    h: index[1].clone(),
                    b: index[0].clone(),
                    score,
                    sides: &side_rows,
                    narrow: false,
                    keys: None,
                };
                if first_side == 1 {
                    let v = crate::vexpr::score(b, expr, &env);
                    b.op(format!("vector.extract {v}[0] : f32 from vector<1xf32>"))
                } else {
                    let v = crate::vexpr::mask(b, expr, &env);
                    let bit = b.op(format!("vector.extract {v}[0] : i1 from vector<1xi1>"));
                    to_byte(b, &bit)
                }
            }
            Op::Rope { rope } | Op::RopeGrad { rope } => {
                let sign = if matches!(op, Op::RopeGrad { .. }) {
                    -1.0
                } else {
                    1.0
                };
                let rank = index.len();
                let dim = operands[0].shape[rank - 1].as_const().unwrap_or(2) as i64;
                let half = b.i64(dim / 2);
                let d = index[rank - 1].clone();
                let pair = b.remi(&d, &half);
                let first_half = b.cmpi("slt", &d, &half, I64);
                let partner_lo = b.addi(&d, &half);
                let partner_hi = b.subi(&d, &half);
                let partner = b.select(&first_half, &partner_lo, &partner_hi, I64);
                let mut partner_index = index.clone();
                partner_index[rank - 1] = partner;
                let x = load(b, 0, &index);
                let other = load(b, 0, &partner_index);
                let neg = b.op(format!("arith.negf {other} : f32"));
                let rotated = b.select(&first_half, &neg, &other, F32);
                let position = b.load(&ptrs[1], &index[rank - 2], I64, I64);
                let position = b.sitofp(&position, I64, F32);
                let freq = if rope.scaling.is_none() {
                    // angle = p * base^(-2 i / D)
                    let pf = b.sitofp(&pair, I64, F32);
                    let exponent = b.f32(-2.0 / dim as f32);
                    let ex = b.bin("mulf", &pf, &exponent, F32);
                    let ln_base = b.f32(rope.base.ln() as f32);
                    let lx = b.bin("mulf", &ex, &ln_base, F32);
                    b.op(format!("math.exp {lx} : f32"))
                } else {
                    // A scaled RoPE's frequencies, compiled in as constants.
                    let freqs = rope.inv_freqs(dim as usize);
                    let mut freq = b.f32(freqs[0] as f32);
                    for (i, f) in freqs.iter().enumerate().skip(1) {
                        let at = b.i64(i as i64);
                        let here = b.cmpi("eq", &pair, &at, I64);
                        let f = b.f32(*f as f32);
                        freq = b.select(&here, &f, &freq, F32);
                    }
                    freq
                };
                let angle = b.bin("mulf", &position, &freq, F32);
                let cos = b.op(format!("math.cos {angle} : f32"));
                let sin = b.op(format!("math.sin {angle} : f32"));
                let sign = b.f32(sign);
                let sin = b.bin("mulf", &sin, &sign, F32);
                let a = b.bin("mulf", &x, &cos, F32);
                let y = b.fma(&rotated, &sin, &a, F32);
                if rope.attention_factor() == 1.0 {
                    y
                } else {
                    let factor = b.f32(rope.attention_factor() as f32);
                    b.bin("mulf", &y, &factor, F32)
                }
            }
            Op::Reduce { op: r, axis } => {
                let length = operand_sizes[0][*axis].clone();
                let init = match r {
                    ReduceOp::Max => f32::NEG_INFINITY,
                    _ => 0.0,
                };
                let init = b.f32(init);
                let acc = b.for_range(
                    &c0,
                    &length,
                    &c1,
                    &[(init, F32.to_string())],
                    |b, j, acc| {
                        let mut source = index.clone();
                        source[*axis] = j.clone();
                        let x = load(b, 0, &source);
                        vec![match r {
                            ReduceOp::Max => b.bin("maxnumf", &acc[0], &x, F32),
                            _ => b.bin("addf", &acc[0], &x, F32),
                        }]
                    },
                );
                if *r == ReduceOp::Mean {
                    let n = b.sitofp(&length, I64, F32);
                    b.bin("divf", &acc[0], &n, F32)
                } else {
                    acc[0].clone()
                }
            }
            Op::RmsNorm { eps } => {
                let rank = index.len();
                let length = operand_sizes[0][rank - 1].clone();
                let zero = b.f32(0.0);
                let acc = b.for_range(
                    &c0,
                    &length,
                    &c1,
                    &[(zero, F32.to_string())],
                    |b, j, acc| {
                        let mut source = index.clone();
                        source[rank - 1] = j.clone();
                        let x = load(b, 0, &source);
                        vec![b.fma(&x, &x, &acc[0], F32)]
                    },
                );
                let n = b.sitofp(&length, I64, F32);
                let r = b.inverse_rms(&acc[0], &n, *eps);
                let x = load(b, 0, &index);
                let g = load(b, 1, &index[rank - 1..]);
                let xr = b.bin("mulf", &x, &r, F32);
                b.bin("mulf", &xr, &g, F32)
            }
            Op::MatMul => {
                let rank = index.len();
                let length = operand_sizes[0][operands[0].shape.len() - 1].clone();
                let zero = b.f32(0.0);
                let acc = b.for_range(
                    &c0,
                    &length,
                    &c1,
                    &[(zero, F32.to_string())],
                    |b, kk, acc| {
                        let mut ai = index[..rank - 1].to_vec();
                        ai.push(kk.clone());
                        let mut bi = index[..rank - 2].to_vec();
                        bi.push(kk.clone());
                        bi.push(index[rank - 1].clone());
                        let x = load(b, 0, &ai);
                        let y = load(b, 1, &bi);
                        vec![b.fma(&x, &y, &acc[0], F32)]
                    },
                );
                acc[0].clone()
            }
            Op::TileRanges { block } => {
                let block_v = b.i64(*block as i64);
                let start = b.muli(&index[1], &block_v);
                let end = b.addi(&start, &block_v);
                let end = b.mini(&end, &seq);
                let row = b.muli(&index[0], &seq);
                let is_min = b.cmpi("eq", &index[2], &c0, I64);
                let init_min = b.i64(i64::MAX);
                let init_max = b.i64(i64::MIN);
                let init = b.select(&is_min, &init_min, &init_max, I64);
                let acc = b.for_range(
                    &start,
                    &end,
                    &c1,
                    &[(init, I64.to_string())],
                    |b, p, acc| {
                        let at = b.addi(&row, p);
                        let x = b.load(&ptrs[0], &at, I64, I64);
                        let lo = b.mini(&acc[0], &x);
                        let hi = b.maxi(&acc[0], &x);
                        vec![b.select(&is_min, &lo, &hi, I64)]
                    },
                );
                acc[0].clone()
            }
            other => unreachable!("no generic kernel for `{}`", other.name()),
        };
        b.store(&value, &out_ptr, i, elem(out.dtype), elem(out.dtype));
        vec![]
    });
    b.finish(name)
}
