//! Projection kernels: `linear` (with RMSNorm before and a residual after), `swiglu` and
//! `heads_proj` (with RMSNorm and RoPE), all on one register-blocked micro-kernel over
//! weights packed by the runtime into panels of `NR` output columns, `[N / NR][K][NR]`.
//!
//! RMSNorm folds in: `rmsnorm(x) @ w^T = r * (x @ (g * w)^T)` with `r = rsqrt(mean(x^2) + eps)`
//! per row, so the runtime packs `g * w` and the kernel scales each output row by `r`.
//!
//! The packed weights are f32, or bf16 (`Shape::bf16`: half the bytes, which is what a
//! single token's projection is bound by; widened to f32 as they are loaded, everything
//! else in f32).

use crate::mlir::{Builder, F32, I64, Val, entry, vf32};

/// Rows of the register block.
const ROWS: usize = 4;
/// Rows per program of `linear` and `swiglu`.
const BLOCK_ROWS: usize = 64;
/// Panels per program of `linear` and `swiglu`.
const BLOCK_PANELS: usize = 4;
/// Rows per program of `heads_proj`.
const HEAD_ROWS: usize = 32;

/// The packing the runtime must apply to a weight for these kernels: panels of `nr`
/// columns, each group of `group` output columns padded to a whole number of panels.
pub fn panel_width(max_vector: usize) -> usize {
    2 * max_vector
}

/// Shapes shared by the projection kernels.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// The reduction length (input features).
    pub k: usize,
    /// Output features.
    pub n: usize,
    pub vector: usize,
    /// Whether the packed weights are bf16.
    pub bf16: bool,
}

impl Shape {
    fn nr(&self) -> usize {
        2 * self.vector
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(self.nr())
    }
}

/// Loads of the rows a register block works on, clamped to the last row.
fn row_offsets(
    b: &mut Builder,
    first_row: &Val,
    rows_total: &Val,
    k: &Val,
    last_of: Option<&Val>,
) -> Vec<Val> {
    let one = b.i64(1);
    let last = b.subi(rows_total, &one);
    (0..ROWS)
        .map(|r| {
            let rr = b.i64(r as i64);
            let row = b.addi(first_row, &rr);
            let row = b.mini(&row, &last);
            let row = x_row(b, &row, last_of);
            b.muli(&row, k)
        })
        .collect()
}

/// The row of `x` that output row `row` reads: itself, or with `last_of = T` the last
/// position of batch row `row` (`x` is `[B, T, K]`, the output `[B, 1, N]`).
fn x_row(b: &mut Builder, row: &Val, last_of: Option<&Val>) -> Val {
    match last_of {
        None => row.clone(),
        Some(t) => {
            let one = b.i64(1);
            let start = b.muli(row, t);
            let end = b.addi(&start, t);
            b.subi(&end, &one)
        }
    }
}

/// `ROWS x NR` of `x @ panel`: returns `ROWS * 2` accumulators, row-major.
fn micro_kernel(
    b: &mut Builder,
    x: &Val,
    rows: &[Val],
    packed: &Val,
    panel: &Val,
    s: Shape,
) -> Vec<Val> {
    let w = s.vector;
    let vt = vf32(w);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let ck = b.i64(s.k as i64);
    let cnr = b.i64(s.nr() as i64);
    let panel_base = b.muli(panel, &ck);
    let panel_base = b.muli(&panel_base, &cnr);
    let zero = b.splat_f32(0.0, w);
    let init: Vec<(Val, String)> = (0..ROWS * 2).map(|_| (zero.clone(), vt.clone())).collect();
    b.for_range(&c0, &ck, &c1, &init, |b, kk, accs| {
        let wrow = b.muli(kk, &cnr);
        let wrow = b.addi(&panel_base, &wrow);
        let w0 = load_weights(b, packed, &wrow, s);
        let off = b.i64(w as i64);
        let at = b.addi(&wrow, &off);
        let w1 = load_weights(b, packed, &at, s);
        let mut next = Vec::new();
        for row in rows {
            let at = b.addi(row, kk);
            let xs = b.load(x, &at, F32, F32);
            let xv = b.splat(&xs, F32, w);
            next.push(b.fma(&xv, &w0, &accs[next.len()], &vt));
            next.push(b.fma(&xv, &w1, &accs[next.len()], &vt));
        }
        next
    })
}

/// `vector` packed weights from element `at`, as f32: a bf16 is the high half of an f32.
fn load_weights(b: &mut Builder, packed: &Val, at: &Val, s: Shape) -> Val {
    let vt = vf32(s.vector);
    if !s.bf16 {
        return b.load(packed, at, F32, &vt);
    }
    let halves = format!("vector<{}xi16>", s.vector);
    let words = format!("vector<{}xi32>", s.vector);
    let h = b.load_aligned(packed, at, "i16", &halves, 2);
    let wide = b.op(format!("arith.extui {h} : {halves} to {words}"));
    let sixteen = b.op(format!("arith.constant dense<16> : {words}"));
    let high = b.op(format!("arith.shli {wide}, {sixteen} : {words}"));
    b.op(format!("arith.bitcast {high} : {words} to {vt}"))
}

/// `1 / sqrt(mean(x[row]^2) + eps)` for `rows` rows from `first_row`, into `out`.
#[allow(clippy::too_many_arguments)]
fn inverse_rms(
    b: &mut Builder,
    x: &Val,
    first_row: &Val,
    rows: &Val,
    s: Shape,
    eps: f64,
    out: &Val,
    last_of: Option<&Val>,
) {
    let (k, vector) = (s.k, s.vector);
    let w = if k.is_multiple_of(vector) { vector } else { 1 };
    let vt = vf32(w);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let ck = b.i64(k as i64);
    let cw = b.i64(w as i64);
    let zero = b.splat_f32(0.0, w);
    b.for_range(&c0, rows, &c1, &[], |b, i, _| {
        let row = b.addi(first_row, i);
        let row = x_row(b, &row, last_of);
        let base = b.muli(&row, &ck);
        let sum = b.for_range(
            &c0,
            &ck,
            &cw,
            &[(zero.clone(), vt.clone())],
            |b, kk, acc| {
                let at = b.addi(&base, kk);
                let v = b.load(x, &at, F32, &vt);
                vec![b.fma(&v, &v, &acc[0], &vt)]
            },
        );
        let total = b.reduce("add", &sum[0], &vt, F32);
        let n = b.f32(k as f32);
        let r = b.inverse_rms(&total, &n, eps);
        b.store(&r, out, i, F32, F32);
        vec![]
    });
}

/// Stores `value` (`w` lanes) at `base[index]`, only the first `valid` lanes when that is
/// fewer than `w`.
pub(crate) fn store_lanes(
    b: &mut Builder,
    value: &Val,
    base: &Val,
    index: &Val,
    valid: &Val,
    w: usize,
) {
    let cw = b.i64(w as i64);
    let full = b.cmpi("sge", valid, &cw, I64);
    let vt = vf32(w);
    b.if_else(
        &full,
        &[],
        |b| {
            b.store(value, base, index, F32, &vt);
            vec![]
        },
        |b| {
            for lane in 0..w {
                let l = b.i64(lane as i64);
                let inside = b.cmpi("slt", &l, valid, I64);
                b.if_then(&inside, |b| {
                    let x = b.op(format!("vector.extract {value}[{lane}] : f32 from {vt}"));
                    let at = b.addi(index, &l);
                    b.store(&x, base, &at, F32, F32);
                });
            }
            vec![]
        },
    );
}

/// `linear`: `out = r * (x @ packed) (+ residual)`, `x: [M, K]`. Buffers: x, packed weight,
/// (residual), out. Grid: `ceil(M / 64) * ceil(panels / 4)`. With `last_rows`, `x` is
/// `[B, T, K]` and only each batch row's last position is computed, into `[B, 1, N]` (a
/// prefill's logits: only the last one picks the next token).
pub fn linear(
    name: &str,
    s: Shape,
    norm_eps: Option<f64>,
    residual: bool,
    last_rows: bool,
) -> String {
    let mut b = Builder::new();
    let e = entry();
    let x = b.ptr_at(&e.bufs, 0);
    let packed = b.ptr_at(&e.bufs, 1);
    let res = residual.then(|| b.ptr_at(&e.bufs, 2));
    let out = b.ptr_at(&e.bufs, if residual { 3 } else { 2 });
    let vt = vf32(s.vector);
    row_panels(
        &mut b,
        s,
        norm_eps,
        last_rows,
        &x,
        &[packed],
        &out,
        |b, accs, at| {
            let value = accs[0].clone();
            match &res {
                Some(res) => {
                    let rv = b.load(res, at, F32, &vt);
                    b.bin("addf", &value, &rv, &vt)
                }
                None => value,
            }
        },
    );
    b.finish(name)
}

/// `swiglu`: `out = silu(r * x @ gate) * (r * x @ up)`. Buffers: x, packed gate, packed up,
/// out. Grid as `linear`.
pub fn swiglu(name: &str, s: Shape, norm_eps: Option<f64>) -> String {
    let mut b = Builder::new();
    let e = entry();
    let x = b.ptr_at(&e.bufs, 0);
    let gate = b.ptr_at(&e.bufs, 1);
    let up = b.ptr_at(&e.bufs, 2);
    let out = b.ptr_at(&e.bufs, 3);
    let w = s.vector;
    let vt = vf32(w);
    row_panels(
        &mut b,
        s,
        norm_eps,
        false,
        &x,
        &[gate, up],
        &out,
        |b, accs, _| {
            let (g, u) = (&accs[0], &accs[1]);
            // silu(g) = g / (1 + exp(-g))
            let neg = b.op(format!("arith.negf {g} : {vt}"));
            let e = crate::vexpr::exp(b, &neg, w);
            let one = b.splat_f32(1.0, w);
            let d = b.bin("addf", &e, &one, &vt);
            let silu = b.bin("divf", g, &d, &vt);
            b.bin("mulf", &silu, u, &vt)
        },
    );
    b.finish(name)
}

/// The grid of `linear` and `swiglu`: programs of 64 rows by 4 panels of `x @ weight` for
/// each packed weight, each output vector scaled by its row's inverse RMS where the norm is
/// fused; `epilogue(b, products, at)` makes the vector stored at flat index `at` of `out`
/// (`[M, N]`) from the weights' products there.
#[allow(clippy::too_many_arguments)]
fn row_panels(
    b: &mut Builder,
    s: Shape,
    norm_eps: Option<f64>,
    last_rows: bool,
    x: &Val,
    weights: &[Val],
    out: &Val,
    epilogue: impl Fn(&mut Builder, &[Val], &Val) -> Val,
) {
    let e = entry();
    let batch = b.i64_at(&e.dims, 0);
    let t = b.i64_at(&e.dims, 1);
    let m = if last_rows {
        batch.clone()
    } else {
        b.muli(&batch, &t)
    };
    let last_of = last_rows.then_some(&t);
    let (w, nr) = (s.vector, s.nr());
    let vt = vf32(w);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let mb = b.i64(BLOCK_ROWS as i64);
    let pb = b.i64(BLOCK_PANELS as i64);
    let panels = b.i64(s.panels() as i64);
    let n_cb = b.ceil_div(&panels, &pb);
    let ck = b.i64(s.k as i64);
    let cn = b.i64(s.n as i64);
    let inv = b.alloca(BLOCK_ROWS, F32);
    let rows_step = b.i64(ROWS as i64);
    let epilogue = &epilogue;
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        let rb = b.divi(pid, &n_cb);
        let cb = b.remi(pid, &n_cb);
        let r0 = b.muli(&rb, &mb);
        let left = b.subi(&m, &r0);
        let rows_valid = b.mini(&mb, &left);
        if let Some(eps) = norm_eps {
            inverse_rms(b, x, &r0, &rows_valid, s, eps, &inv, last_of);
        }
        let p0 = b.muli(&cb, &pb);
        let p1 = b.addi(&p0, &pb);
        let p1 = b.mini(&p1, &panels);
        b.for_range(&c0, &rows_valid, &rows_step, &[], |b, i, _| {
            let first = b.addi(&r0, i);
            let rows = row_offsets(b, &first, &m, &ck, last_of);
            b.for_range(&p0, &p1, &c1, &[], |b, p, _| {
                let accs: Vec<Vec<Val>> = weights
                    .iter()
                    .map(|weight| micro_kernel(b, x, &rows, weight, p, s))
                    .collect();
                let cnr = b.i64(nr as i64);
                let n0 = b.muli(p, &cnr);
                for r in 0..ROWS {
                    let rr = b.i64(r as i64);
                    let ri = b.addi(i, &rr);
                    let live = b.cmpi("slt", &ri, &rows_valid, I64);
                    b.if_then(&live, |b| {
                        let row = b.addi(&r0, &ri);
                        let row_base = b.muli(&row, &cn);
                        let scale = norm_eps.map(|_| {
                            let r = b.load(&inv, &ri, F32, F32);
                            b.splat(&r, F32, w)
                        });
                        for c in 0..2 {
                            let off = b.i64((c * w) as i64);
                            let n = b.addi(&n0, &off);
                            let valid = b.subi(&cn, &n);
                            let inside = b.cmpi("sgt", &valid, &c0, I64);
                            b.if_then(&inside, |b| {
                                let products: Vec<Val> = accs
                                    .iter()
                                    .map(|acc| {
                                        let v = acc[r * 2 + c].clone();
                                        match &scale {
                                            Some(sc) => b.bin("mulf", &v, sc, &vt),
                                            None => v,
                                        }
                                    })
                                    .collect();
                                let at = b.addi(&row_base, &n);
                                let value = epilogue(b, &products, &at);
                                store_lanes(b, &value, out, &at, &valid, w);
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
}

/// What `heads_proj` does to each head after its product (see [`heads_proj`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HeadsEpilogue {
    /// A bias `[H * D]` added to the product.
    pub bias: bool,
    /// RMSNorm over each head with scales `[D]` (QK-norm), with this epsilon.
    pub qk_norm: Option<f64>,
    /// RoPE from cos and sin tables.
    pub rope: bool,
}

/// `heads_proj`: `x [B*T, K] @ w^T` split into `[B, H, T, D]`, with RMSNorm before, and a
/// bias, QK-norm and RoPE after (in that order). The weight is packed per head (each head's
/// `D` columns padded to whole panels). Buffers: x, packed weight, (bias `[H * D]`),
/// (QK-norm scales `[D]`), (rope cos, rope sin: `[T, D/2]`), out. Grid: `ceil(B*T / 32) * H`.
pub fn heads_proj(
    name: &str,
    k: usize,
    heads: usize,
    head_dim: usize,
    norm_eps: Option<f64>,
    epilogue: HeadsEpilogue,
    (vector, bf16): (usize, bool),
) -> String {
    let HeadsEpilogue {
        bias,
        qk_norm,
        rope,
    } = epilogue;
    let s = Shape {
        k,
        n: head_dim,
        vector,
        bf16,
    };
    let (w, nr) = (vector, s.nr());
    let d_pad = head_dim.div_ceil(nr) * nr;
    let mut b = Builder::new();
    let e = entry();
    let x = b.ptr_at(&e.bufs, 0);
    let packed = b.ptr_at(&e.bufs, 1);
    let mut next = 2;
    let mut buffer = |b: &mut Builder, present: bool| {
        let ptr = present.then(|| b.ptr_at(&e.bufs, next));
        next += usize::from(present);
        ptr
    };
    let bias_ptr = buffer(&mut b, bias);
    let qk_scales = buffer(&mut b, qk_norm.is_some());
    let (cos, sin) = (buffer(&mut b, rope), buffer(&mut b, rope));
    let out = buffer(&mut b, true).expect("the output buffer");
    let batch = b.i64_at(&e.dims, 0);
    let t = b.i64_at(&e.dims, 1);
    let m = b.muli(&batch, &t);
    let vt = vf32(w);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let mb = b.i64(HEAD_ROWS as i64);
    let ch = b.i64(heads as i64);
    let ck = b.i64(k as i64);
    let cd = b.i64(head_dim as i64);
    let cdp = b.i64(d_pad as i64);
    let per_head = b.i64((d_pad / nr) as i64);
    let inv = b.alloca(HEAD_ROWS, F32);
    let tile = b.alloca(HEAD_ROWS * d_pad, F32);
    let rows_step = b.i64(ROWS as i64);
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        let rb = b.divi(pid, &ch);
        let h = b.remi(pid, &ch);
        let r0 = b.muli(&rb, &mb);
        let left = b.subi(&m, &r0);
        let rows_valid = b.mini(&mb, &left);
        if let Some(eps) = norm_eps {
            inverse_rms(b, &x, &r0, &rows_valid, s, eps, &inv, None);
        }
        let p0 = b.muli(&h, &per_head);
        let p1 = b.addi(&p0, &per_head);
        // The head's columns for all rows, into the tile.
        b.for_range(&c0, &rows_valid, &rows_step, &[], |b, i, _| {
            let first = b.addi(&r0, i);
            let rows = row_offsets(b, &first, &m, &ck, None);
            b.for_range(&p0, &p1, &c1, &[], |b, p, _| {
                let accs = micro_kernel(b, &x, &rows, &packed, p, s);
                let local = b.subi(p, &p0);
                let cnr = b.i64(nr as i64);
                let col0 = b.muli(&local, &cnr);
                for r in 0..ROWS {
                    let rr = b.i64(r as i64);
                    let ri = b.addi(i, &rr);
                    let row_base = b.muli(&ri, &cdp);
                    for c in 0..2 {
                        let off = b.i64((c * w) as i64);
                        let at = b.addi(&row_base, &col0);
                        let at = b.addi(&at, &off);
                        b.store(&accs[r * 2 + c], &tile, &at, F32, &vt);
                    }
                }
                vec![]
            });
            vec![]
        });
        // Norm scale, RoPE, and the store to [B, H, T, D].
        let half = head_dim / 2;
        let hw = crate::kernels::attention::vector_width(if rope { half } else { head_dim }, w);
        let hvt = vf32(hw);
        let chw = b.i64(hw as i64);
        b.for_range(&c0, &rows_valid, &c1, &[], |b, i, _| {
            let row = b.addi(&r0, i);
            let bi = b.divi(&row, &t);
            let ti = b.remi(&row, &t);
            let dst = b.muli(&bi, &ch);
            let dst = b.addi(&dst, &h);
            let dst = b.muli(&dst, &t);
            let dst = b.addi(&dst, &ti);
            let dst = b.muli(&dst, &cd);
            let src = b.muli(i, &cdp);
            let mut scale = norm_eps.map(|_| {
                let r = b.load(&inv, i, F32, F32);
                b.splat(&r, F32, hw)
            });
            // The bias and QK-norm: the row's head updated in the tile first (the input's
            // norm scale applied, the bias added), with its sum of squares.
            let mut qk_scale = None;
            if bias || qk_norm.is_some() {
                let zero = b.splat_f32(0.0, hw);
                let head_at = b.muli(&h, &cd);
                let squares = b.for_range(&c0, &cd, &chw, &[(zero, hvt.clone())], |b, j, acc| {
                    let at = b.addi(&src, j);
                    let mut v = b.load(&tile, &at, F32, &hvt);
                    if let Some(sc) = &scale {
                        v = b.bin("mulf", &v, sc, &hvt);
                    }
                    if let Some(bias) = &bias_ptr {
                        let bat = b.addi(&head_at, j);
                        let bv = b.load(bias, &bat, F32, &hvt);
                        v = b.bin("addf", &v, &bv, &hvt);
                    }
                    b.store(&v, &tile, &at, F32, &hvt);
                    vec![b.fma(&v, &v, &acc[0], &hvt)]
                });
                scale = None;
                if let Some(eps) = qk_norm {
                    let total = b.reduce("add", &squares[0], &hvt, F32);
                    let n = b.f32(head_dim as f32);
                    let r = b.inverse_rms(&total, &n, eps);
                    qk_scale = Some(b.splat(&r, F32, hw));
                }
            }
            // Element `at` of the tile (`j` within the head), fully scaled.
            let load_scaled = |b: &mut Builder, at: &Val, j: &Val| {
                let v = b.load(&tile, at, F32, &hvt);
                let v = match &scale {
                    Some(sc) => b.bin("mulf", &v, sc, &hvt),
                    None => v,
                };
                match (&qk_scale, &qk_scales) {
                    (Some(r), Some(g)) => {
                        let gv = b.load(g, j, F32, &hvt);
                        let v = b.bin("mulf", &v, r, &hvt);
                        b.bin("mulf", &v, &gv, &hvt)
                    }
                    _ => v,
                }
            };
            match (&cos, &sin) {
                (Some(cos), Some(sin)) => {
                    let ch2 = b.i64(half as i64);
                    let trow = b.muli(&ti, &ch2);
                    b.for_range(&c0, &ch2, &chw, &[], |b, j, _| {
                        let a_at = b.addi(&src, j);
                        let b_at = b.addi(&a_at, &ch2);
                        let j2 = b.addi(j, &ch2);
                        let x1 = load_scaled(b, &a_at, j);
                        let x2 = load_scaled(b, &b_at, &j2);
                        let tat = b.addi(&trow, j);
                        let cs = b.load(cos, &tat, F32, &hvt);
                        let sn = b.load(sin, &tat, F32, &hvt);
                        let a = b.bin("mulf", &x1, &cs, &hvt);
                        let bb = b.bin("mulf", &x2, &sn, &hvt);
                        let o1 = b.bin("subf", &a, &bb, &hvt);
                        let c = b.bin("mulf", &x2, &cs, &hvt);
                        let dd = b.bin("mulf", &x1, &sn, &hvt);
                        let o2 = b.bin("addf", &c, &dd, &hvt);
                        let d1 = b.addi(&dst, j);
                        let d2 = b.addi(&d1, &ch2);
                        b.store(&o1, &out, &d1, F32, &hvt);
                        b.store(&o2, &out, &d2, F32, &hvt);
                        vec![]
                    });
                }
                _ => {
                    b.for_range(&c0, &cd, &chw, &[], |b, j, _| {
                        let at = b.addi(&src, j);
                        let v = load_scaled(b, &at, j);
                        let d1 = b.addi(&dst, j);
                        b.store(&v, &out, &d1, F32, &hvt);
                        vec![]
                    });
                }
            }
            vec![]
        });
        vec![]
    });
    b.finish(name)
}
