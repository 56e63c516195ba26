//! The batched matrix product of two activations, `C[b] = A[b] B[b]`: what the training
//! step's backward is made of (`dx = dy w`, `dw = x^T dy`). Either operand may be read
//! through a transpose of its last two axes (no copy), and either may be shared by the whole
//! batch. A program computes a block of 64 rows by 4 panels of output columns: it packs a
//! slice of `B` into panels on its stack, then runs the register-blocked micro-kernel of the
//! projections over it, slice by slice along `K`.
//!
//! Buffers: a, b, c. Sizes are given as [`Dim`]s (constants, `B`, `T` or `T / n`), resolved
//! from the dims at run time.

use zebra_ir::types::{Dim, Sym};

use crate::mlir::{Builder, F32, I64, Val, entry, vf32};

/// Rows of the register block.
const ROWS: usize = 4;
/// Output rows per program.
pub const BLOCK_ROWS: usize = 64;
/// Panels (of `2 * vector` columns) per program.
pub const BLOCK_PANELS: usize = 4;
/// The slice of `K` packed at a time.
const SLICE: usize = 128;

/// The shape of a product.
#[derive(Clone, Debug, PartialEq)]
pub struct MatMulShape {
    /// The output's batch dims (their product is the batch).
    pub batch: Vec<Dim>,
    pub m: Dim,
    pub k: Dim,
    pub n: Dim,
    /// `A` is stored `[K, M]` (read through a transpose).
    pub a_t: bool,
    /// `B` is stored `[N, K]`.
    pub b_t: bool,
    /// Whether each operand has the batch dims (else it is shared by every batch entry).
    pub a_batched: bool,
    pub b_batched: bool,
}

impl MatMulShape {
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self.batch.iter().map(|d| d.to_string()).collect();
        format!(
            "batch=[{}] m={} k={} n={} a_t={} b_t={} a_batched={} b_batched={}",
            dims.join(","),
            self.m,
            self.k,
            self.n,
            self.a_t,
            self.b_t,
            self.a_batched,
            self.b_batched
        )
    }
}

pub(crate) fn resolve(b: &mut Builder, dim: Dim, batch: &Val, seq: &Val) -> Val {
    match dim {
        Dim::Const(n) => b.i64(n as i64),
        Dim::Sym(Sym::Batch) => batch.clone(),
        Dim::Sym(Sym::Seq) => seq.clone(),
        Dim::Blocks(sym, n) => {
            let s = if sym == Sym::Batch { batch } else { seq };
            let n = b.i64(i64::from(n));
            b.ceil_div(s, &n)
        }
    }
}

/// The first elements of batch entry `bi` in `A`, `B` and `C`, given `M K`, `K N` and `M N`
/// (an operand shared by the batch starts at 0).
pub(crate) fn batch_bases(
    b: &mut Builder,
    shape: &MatMulShape,
    bi: &Val,
    [mk, kn, mn]: [&Val; 3],
) -> (Val, Val, Val) {
    let c0 = b.i64(0);
    let a_base = if shape.a_batched {
        b.muli(bi, mk)
    } else {
        c0.clone()
    };
    let b_base = if shape.b_batched { b.muli(bi, kn) } else { c0 };
    (a_base, b_base, b.muli(bi, mn))
}

/// The product of `shape`. Grid: `batch * ceil(M / 64) * ceil(ceil(N / nr) / 4)`.
pub fn matmul(name: &str, shape: &MatMulShape, vector: usize) -> String {
    let w = vector;
    let nr = 2 * w;
    let vt = vf32(w);
    let mut b = Builder::new();
    let e = entry();
    let [a, bm, c] = std::array::from_fn(|i| b.ptr_at(&e.bufs, i));
    let batch_dim = b.i64_at(&e.dims, 0);
    let seq = b.i64_at(&e.dims, 1);
    let m = resolve(&mut b, shape.m, &batch_dim, &seq);
    let k = resolve(&mut b, shape.k, &batch_dim, &seq);
    let n = resolve(&mut b, shape.n, &batch_dim, &seq);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let cnr = b.i64(nr as i64);
    let mb = b.i64(BLOCK_ROWS as i64);
    let pb = b.i64(BLOCK_PANELS as i64);
    let slice = b.i64(SLICE as i64);
    let panels = b.ceil_div(&n, &cnr);
    let n_cb = b.ceil_div(&panels, &pb);
    let n_rb = b.ceil_div(&m, &mb);
    let mk = b.muli(&m, &k);
    let kn = b.muli(&k, &n);
    let mn = b.muli(&m, &n);
    let packed = b.alloca(SLICE * nr * BLOCK_PANELS, F32);
    let zero = b.splat_f32(0.0, w);
    let fzero = b.f32(0.0);
    let rows_step = b.i64(ROWS as i64);
    // A[m, k] is at a_row(m) + k * a_k; B[k, n] at b_base + k * b_k + n * b_n.
    let (a_row_stride, a_k) = if shape.a_t {
        (c1.clone(), m.clone())
    } else {
        (k.clone(), c1.clone())
    };
    let (b_k, b_n) = if shape.b_t {
        (c1.clone(), k.clone())
    } else {
        (n.clone(), c1.clone())
    };
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        let cb = b.remi(pid, &n_cb);
        let rest = b.divi(pid, &n_cb);
        let rb = b.remi(&rest, &n_rb);
        let bi = b.divi(&rest, &n_rb);
        let (a_base, b_base, c_base) = batch_bases(b, shape, &bi, [&mk, &kn, &mn]);
        let r0 = b.muli(&rb, &mb);
        let left = b.subi(&m, &r0);
        let rows_valid = b.mini(&mb, &left);
        let p0 = b.muli(&cb, &pb);
        let p1 = b.addi(&p0, &pb);
        let p1 = b.mini(&p1, &panels);
        let group = b.subi(&p1, &p0);
        b.for_range(&c0, &k, &slice, &[], |b, k0, _| {
            let k_left = b.subi(&k, k0);
            let kc = b.mini(&slice, &k_left);
            // Pack B[k0 .. k0 + kc, panels p0 .. p1] as [panel][kk][nr], zero past N.
            b.for_range(&c0, &group, &c1, &[], |b, p, _| {
                let gp = b.addi(&p0, p);
                let n_start = b.muli(&gp, &cnr);
                let pbase = b.muli(p, &slice);
                b.for_range(&c0, &kc, &c1, &[], |b, kk, _| {
                    let kabs = b.addi(k0, kk);
                    let krow = b.muli(&kabs, &b_k);
                    let krow = b.addi(&krow, &b_base);
                    let dst = b.addi(&pbase, kk);
                    let dst = b.muli(&dst, &cnr);
                    for lane in 0..nr {
                        let l = b.i64(lane as i64);
                        let col = b.addi(&n_start, &l);
                        let inside = b.cmpi("slt", &col, &n, I64);
                        let safe = b.mini(&col, &n);
                        let last = b.subi(&n, &c1);
                        let safe = b.mini(&safe, &last);
                        let at = b.muli(&safe, &b_n);
                        let at = b.addi(&krow, &at);
                        let x = b.load(&bm, &at, F32, F32);
                        let x = b.select(&inside, &x, &fzero, F32);
                        let to = b.addi(&dst, &l);
                        b.store(&x, &packed, &to, F32, F32);
                    }
                    vec![]
                });
                vec![]
            });
            let first_slice = b.cmpi("eq", k0, &c0, I64);
            b.for_range(&c0, &rows_valid, &rows_step, &[], |b, i, _| {
                // Rows of this register block, clamped to the last valid one.
                let last_row = b.subi(&rows_valid, &c1);
                let rows: Vec<Val> = (0..ROWS)
                    .map(|r| {
                        let rr = b.i64(r as i64);
                        let ri = b.addi(i, &rr);
                        let ri = b.mini(&ri, &last_row);
                        let row = b.addi(&r0, &ri);
                        let at = b.muli(&row, &a_row_stride);
                        let at = b.addi(&a_base, &at);
                        let k_off = b.muli(k0, &a_k);
                        b.addi(&at, &k_off)
                    })
                    .collect();
                b.for_range(&c0, &group, &c1, &[], |b, p, _| {
                    let pbase = b.muli(p, &slice);
                    let pbase = b.muli(&pbase, &cnr);
                    let init: Vec<(Val, String)> =
                        (0..ROWS * 2).map(|_| (zero.clone(), vt.clone())).collect();
                    let accs = b.for_range(&c0, &kc, &c1, &init, |b, kk, accs| {
                        let at = b.muli(kk, &cnr);
                        let at = b.addi(&pbase, &at);
                        let w0 = b.load(&packed, &at, F32, &vt);
                        let off = b.i64(w as i64);
                        let at = b.addi(&at, &off);
                        let w1 = b.load(&packed, &at, F32, &vt);
                        let step = b.muli(kk, &a_k);
                        let mut next = Vec::new();
                        for row in &rows {
                            let at = b.addi(row, &step);
                            let xs = b.load(&a, &at, F32, F32);
                            let xv = b.splat(&xs, F32, w);
                            next.push(b.fma(&xv, &w0, &accs[next.len()], &vt));
                            next.push(b.fma(&xv, &w1, &accs[next.len()], &vt));
                        }
                        next
                    });
                    let gp = b.addi(&p0, p);
                    let n0 = b.muli(&gp, &cnr);
                    for r in 0..ROWS {
                        let rr = b.i64(r as i64);
                        let ri = b.addi(i, &rr);
                        let live = b.cmpi("slt", &ri, &rows_valid, I64);
                        let accs = accs.clone();
                        let first_slice = first_slice.clone();
                        b.if_then(&live, |b| {
                            let row = b.addi(&r0, &ri);
                            let row_base = b.muli(&row, &n);
                            let row_base = b.addi(&c_base, &row_base);
                            for half in 0..2 {
                                let off = b.i64((half * w) as i64);
                                let col = b.addi(&n0, &off);
                                let valid = b.subi(&n, &col);
                                let inside = b.cmpi("sgt", &valid, &c0, I64);
                                let acc = accs[r * 2 + half].clone();
                                let first_slice = first_slice.clone();
                                b.if_then(&inside, |b| {
                                    let at = b.addi(&row_base, &col);
                                    let cw = b.i64(w as i64);
                                    let full = b.cmpi("sge", &valid, &cw, I64);
                                    // Past the first slice, add to what earlier slices left
                                    // (reading only the valid lanes).
                                    let value = b.if_else(
                                        &first_slice,
                                        std::slice::from_ref(&vt),
                                        |_| vec![acc.clone()],
                                        |b| {
                                            let old = b.if_else(
                                                &full,
                                                std::slice::from_ref(&vt),
                                                |b| vec![b.load(&c, &at, F32, &vt)],
                                                |b| {
                                                    let mut v = zero.clone();
                                                    for lane in 0..w {
                                                        let l = b.i64(lane as i64);
                                                        let ok = b.cmpi("slt", &l, &valid, I64);
                                                        let idx = b.addi(&at, &l);
                                                        let x = b.if_else(
                                                            &ok,
                                                            &[F32.to_string()],
                                                            |b| vec![b.load(&c, &idx, F32, F32)],
                                                            |_| vec![fzero.clone()],
                                                        );
                                                        v = b.op(format!(
                                                            "vector.insert {}, {v} [{lane}] : f32 into {vt}",
                                                            x[0]
                                                        ));
                                                    }
                                                    vec![v]
                                                },
                                            );
                                            vec![b.bin("addf", &old[0], &acc, &vt)]
                                        },
                                    );
                                    crate::kernels::gemm::store_lanes(
                                        b, &value[0], &c, &at, &valid, w,
                                    );
                                });
                            }
                        });
                    }
                    vec![]
                });
                vec![]
            });
            vec![]
        });
        vec![]
    });
    b.finish(name)
}
