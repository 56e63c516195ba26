//! The fused attention's backward, FlashAttention-2 style, in two kernels over the forward's
//! tile schedule. Neither materializes the `[T, T]` probabilities: each recomputes a tile's
//! `P = exp(z - lse)` from the forward's log-sum-exp, `dP = dO V^T`, and
//! `dS = P * (dP - rowsum(dO * O)) * score'(s) * scale`.
//!
//! - `attention_dq`, one program per (batch row, query tile, head), walks the tiles of its
//!   schedule row and accumulates `dQ += dS K`.
//! - `attention_dkv`, one program per (batch row, key tile, KV head), walks the query tiles
//!   that visit its key tile (the schedule's columns), for every head of the KV head's group,
//!   and accumulates `dV += P^T dO` and `dK += dS^T Q`.
//!
//! Keys and values come packed twice per key tile by `pack_kv`: keys in key panels and values
//! in value panels (for `S = Q K^T`), and values in key panels and keys in value panels (for
//! `dP = dO V^T` and `dQ += dS K`). Rows of a query tile past `T` are computed on clamped
//! rows and never written; keys past `T` are masked.

use zebra_ir::op::AttentionKernel;

use crate::kernels::attention::{
    Layout, ScheduleEntry, ScheduleRows, dot_panel, schedule_entry, schedule_range, weighted_sum,
};
use crate::mlir::{Builder, Entry, F32, I64, Val, entry, vf32};
use crate::vexpr::{self, VecEnv};

/// What both backward kernels share: sizes and constants.
struct Common {
    d: usize,
    bq: usize,
    bk: usize,
    layout: Layout,
    w: usize,
    narrow: bool,
}

impl Common {
    fn new(kernel: &AttentionKernel, max_vector: usize) -> Common {
        let d = kernel.head_dim as usize;
        let (bq, bk) = (kernel.block_q as usize, kernel.block_k as usize);
        let layout = Layout::new(d, bq, bk, max_vector);
        let heads = kernel.heads as i64;
        let narrow = vexpr::fits_in_32_bits(&kernel.mask, heads)
            && kernel
                .score
                .as_ref()
                .is_none_or(|s| vexpr::fits_in_32_bits(s, heads));
        Common {
            d,
            bq,
            bk,
            layout,
            w: layout.w,
            narrow,
        }
    }
}

/// How both kernels begin: their ten buffers, the side inputs, the dimensions and the
/// constants they share, built in this order.
#[derive(Clone)]
struct Prologue {
    e: Entry,
    bufs: [Val; 10],
    sides: Vec<(String, Val)>,
    t: Val,
    per_batch: Val,
    c0: Val,
    c1: Val,
    cw: Val,
    cbq: Val,
    cbk: Val,
    cd: Val,
    cnv: Val,
    ch: Val,
    group: Val,
    ckv: Val,
}

impl Prologue {
    fn new(b: &mut Builder, c: &Common, kernel: &AttentionKernel) -> Prologue {
        let e = entry();
        let bufs = std::array::from_fn(|i| b.ptr_at(&e.bufs, i));
        let sides = kernel
            .sides
            .iter()
            .enumerate()
            .map(|(i, name)| (name.clone(), b.ptr_at(&e.bufs, 10 + i)))
            .collect();
        let t = b.i64_at(&e.dims, 1);
        let per_batch = b.i64_at(&e.dims, 2);
        let (c0, c1) = (b.i64(0), b.i64(1));
        Prologue {
            bufs,
            sides,
            t,
            per_batch,
            c0,
            c1,
            cw: b.i64(c.w as i64),
            cbq: b.i64(c.bq as i64),
            cbk: b.i64(c.bk as i64),
            cd: b.i64(c.d as i64),
            cnv: b.i64(c.layout.nv as i64),
            ch: b.i64(kernel.heads as i64),
            group: b.i64((kernel.heads / kernel.kv_heads) as i64),
            ckv: b.i64(kernel.kv_heads as i64),
            e,
        }
    }

    /// Batch row `batch`'s rows of the side inputs.
    fn side_rows(&self, b: &mut Builder, batch: &Val) -> Vec<(String, Val)> {
        self.sides
            .iter()
            .map(|(name, ptr)| {
                let offset = b.muli(batch, &self.t);
                (name.clone(), b.gep(ptr, &offset, I64))
            })
            .collect()
    }

    /// Zeros `rows` rows of the `[.][D]` accumulator `acc` (`zero`: a vector of zeros).
    fn zero_rows(&self, b: &mut Builder, c: &Common, acc: &Val, rows: &Val, zero: &Val) {
        let vt = vf32(c.w);
        b.for_range(&self.c0, rows, &self.c1, &[], |b, i, _| {
            let row = b.muli(i, &self.cd);
            b.for_range(&self.c0, &self.cd, &self.cw, &[], |b, col, _| {
                let at = b.addi(&row, col);
                b.store(zero, acc, &at, F32, &vt);
                vec![]
            });
            vec![]
        });
    }

    /// Copies rows `0..valid` of the accumulator `acc` to `out`, row `i` at offset `dst(i)`.
    fn write_rows(
        &self,
        b: &mut Builder,
        c: &Common,
        (acc, out): (&Val, &Val),
        valid: &Val,
        dst: &dyn Fn(&mut Builder, &Val) -> Val,
    ) {
        let vt = vf32(c.w);
        b.for_range(&self.c0, valid, &self.c1, &[], |b, i, _| {
            let dst = dst(b, i);
            let src = b.muli(i, &self.cd);
            b.for_range(&self.c0, &self.cd, &self.cw, &[], |b, col, _| {
                let at = b.addi(&src, col);
                let v = b.load(acc, &at, F32, &vt);
                let to = b.addi(&dst, col);
                b.store(&v, out, &to, F32, &vt);
                vec![]
            });
            vec![]
        });
    }
}

/// Per query row of a tile: `rowsum(dO * O)` and the log-sum-exp in base 2 (`+inf` for a row
/// that sees no key, so that its probabilities come out 0), into `deltas` and `lses`.
#[allow(clippy::too_many_arguments)]
fn row_statistics(
    b: &mut Builder,
    c: &Common,
    o: &Val,
    d_o: &Val,
    lse: &Val,
    o_row: &dyn Fn(&mut Builder, &Val) -> Val,
    lse_row: &dyn Fn(&mut Builder, &Val) -> Val,
    deltas: &Val,
    lses: &Val,
) {
    let w = c.w;
    let vt = vf32(w);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let cbq = b.i64(c.bq as i64);
    let cd = b.i64(c.d as i64);
    let cw = b.i64(w as i64);
    let zero = b.splat_f32(0.0, w);
    b.for_range(&c0, &cbq, &c1, &[], |b, i, _| {
        let row = o_row(b, i);
        let sum = b.for_range(
            &c0,
            &cd,
            &cw,
            &[(zero.clone(), vt.clone())],
            |b, col, acc| {
                let at = b.addi(&row, col);
                let x = b.load(o, &at, F32, &vt);
                let y = b.load(d_o, &at, F32, &vt);
                vec![b.fma(&x, &y, &acc[0], &vt)]
            },
        );
        let delta = b.reduce("add", &sum[0], &vt, F32);
        b.store(&delta, deltas, i, F32, F32);
        let at = lse_row(b, i);
        let l = b.load(lse, &at, F32, F32);
        let l2 = lse_base2(b, &l);
        b.store(&l2, lses, i, F32, F32);
        vec![]
    });
}

/// A row's log-sum-exp (natural log, f32) in base 2, `+inf` for a row that sees no key
/// (`-inf`), so that its probabilities `exp2(s - lse)` come out 0.
pub(super) fn lse_base2(b: &mut Builder, l: &Val) -> Val {
    let log2e = b.f32(std::f32::consts::LOG2_E);
    let l2 = b.bin("mulf", l, &log2e, F32);
    let neg_inf = b.f32(f32::NEG_INFINITY);
    let inf = b.f32(f32::INFINITY);
    let hidden = b.cmpf("oeq", l, &neg_inf, F32);
    b.select(&hidden, &inf, &l2, F32)
}

/// Everything `probabilities_and_gradients` needs about the tile pair.
struct Tile<'a> {
    kernel: &'a AttentionKernel,
    q: Val,
    d_o: Val,
    kp: Val,
    vt: Val,
    /// Offset of the key tile in the packed buffers.
    tile: Val,
    q0: Val,
    k0: Val,
    t: Val,
    h: Val,
    batch: Val,
    needs_mask: Val,
    sides: &'a [(String, Val)],
    q_row: &'a dyn Fn(&mut Builder, &Val) -> Val,
    do_row: &'a dyn Fn(&mut Builder, &Val) -> Val,
    deltas: Val,
    lses: Val,
    /// Where to store `P` (when wanted) and `dS`, `[bq][bk]`.
    p_out: Option<Val>,
    ds_out: Val,
}

/// For one (query tile, key tile) pair: `P` and `dS`, `[bq][bk]` each, from `S = Q K^T` and
/// `dP = dO V^T` computed by the forward's micro-kernel.
fn probabilities_and_gradients(b: &mut Builder, c: &Common, x: &Tile) {
    let (w, l) = (c.w, c.layout);
    let kc = l.nk / w;
    let vt = vf32(w);
    let rows = l.rows;
    let c0 = b.i64(0);
    let cbq = b.i64(c.bq as i64);
    let cbk = b.i64(c.bk as i64);
    let cd = b.i64(c.d as i64);
    let cnk = b.i64(l.nk as i64);
    let step = b.i64(rows as i64);
    let scale = b.splat_f32(x.kernel.scale as f32, w);
    let log2e = b.splat_f32(std::f32::consts::LOG2_E, w);
    let zero = b.splat_f32(0.0, w);
    let slope_expr = x.kernel.score.as_ref().map(|s| {
        s.score_derivative()
            .expect("checked when the graph was built")
    });
    b.for_range(&c0, &cbk, &cnk, &[], |b, j, _| {
        let panel = b.muli(j, &cd);
        let panel = b.addi(&x.tile, &panel);
        b.for_range(&c0, &cbq, &step, &[], |b, i, _| {
            let q_rows: Vec<Val> = (0..rows)
                .map(|r| {
                    let rr = b.i64(r as i64);
                    let qi = b.addi(i, &rr);
                    (x.q_row)(b, &qi)
                })
                .collect();
            let do_rows: Vec<Val> = (0..rows)
                .map(|r| {
                    let rr = b.i64(r as i64);
                    let qi = b.addi(i, &rr);
                    (x.do_row)(b, &qi)
                })
                .collect();
            let s = dot_panel(b, &x.q, &q_rows, &x.kp, &panel, c.d, l);
            let dp = dot_panel(b, &x.d_o, &do_rows, &x.vt, &panel, c.d, l);
            for r in 0..rows {
                let rr = b.i64(r as i64);
                let qi = b.addi(i, &rr);
                let qpos = b.addi(&x.q0, &qi);
                let lse = b.load(&x.lses, &qi, F32, F32);
                let lse = b.splat(&lse, F32, w);
                let delta = b.load(&x.deltas, &qi, F32, F32);
                let delta = b.splat(&delta, F32, w);
                for cc in 0..kc {
                    let off = b.i64((cc * w) as i64);
                    let kpos = b.addi(&x.k0, j);
                    let kpos = b.addi(&kpos, &off);
                    let raw = b.bin("mulf", &s[r * kc + cc], &scale, &vt);
                    let env = VecEnv {
                        n: w,
                        q: qpos.clone(),
                        k0: kpos.clone(),
                        h: x.h.clone(),
                        b: x.batch.clone(),
                        score: Some(raw.clone()),
                        sides: x.sides,
                        narrow: c.narrow,
                        keys: None,
                    };
                    let z = match &x.kernel.score {
                        Some(expr) => vexpr::score(b, expr, &env),
                        None => raw.clone(),
                    };
                    let z2 = b.bin("mulf", &z, &log2e, &vt);
                    let shifted = b.bin("subf", &z2, &lse, &vt);
                    let p = vexpr::exp2_nonpositive(b, &shifted, w);
                    let p = b.if_else(
                        &x.needs_mask,
                        std::slice::from_ref(&vt),
                        |b| {
                            let visible = vexpr::mask(b, &x.kernel.mask, &env);
                            let inside = env.keys_below(b, &x.t);
                            let both = b.bin("andi", &visible, &inside, &crate::mlir::vi1(w));
                            vec![b.select(&both, &p, &zero, &vt)]
                        },
                        |_| vec![p.clone()],
                    )[0]
                    .clone();
                    let centered = b.bin("subf", &dp[r * kc + cc], &delta, &vt);
                    let dz = b.bin("mulf", &p, &centered, &vt);
                    let dz = match &slope_expr {
                        Some(expr) => {
                            let slope = vexpr::score(b, expr, &env);
                            b.bin("mulf", &dz, &slope, &vt)
                        }
                        None => dz,
                    };
                    let ds = b.bin("mulf", &dz, &scale, &vt);
                    let at = b.muli(&qi, &cbk);
                    let at = b.addi(&at, j);
                    let at = b.addi(&at, &off);
                    b.store(&ds, &x.ds_out, &at, F32, &vt);
                    if let Some(p_out) = &x.p_out {
                        b.store(&p, p_out, &at, F32, &vt);
                    }
                }
            }
            vec![]
        });
        vec![]
    });
}

/// The offsets of the rows of `o` and `do` for query row `qi` of a tile (clamped to the last
/// valid row), in the attention's output layout.
fn output_row(
    b: &mut Builder,
    kernel: &AttentionKernel,
    (batch, h, q0, q_valid, t): (&Val, &Val, &Val, &Val, &Val),
    qi: &Val,
) -> Val {
    let c1 = b.i64(1);
    let last = b.subi(q_valid, &c1);
    let qi = b.mini(qi, &last);
    let qpos = b.addi(q0, &qi);
    let cd = b.i64(kernel.head_dim as i64);
    let ch = b.i64(kernel.heads as i64);
    if kernel.merge_heads {
        let bt = b.muli(batch, t);
        let bt = b.addi(&bt, &qpos);
        let bth = b.muli(&bt, &ch);
        let bth = b.addi(&bth, h);
        b.muli(&bth, &cd)
    } else {
        let bh = b.muli(batch, &ch);
        let bh = b.addi(&bh, h);
        let row = b.muli(&bh, t);
        let row = b.addi(&row, &qpos);
        b.muli(&row, &cd)
    }
}

/// The offset of query row `qi` of head `h` in `q` or `lse` (times `width`), clamped.
#[allow(clippy::too_many_arguments)]
fn head_row(
    b: &mut Builder,
    heads: &Val,
    (batch, h, q0, q_valid, t): (&Val, &Val, &Val, &Val, &Val),
    qi: &Val,
    width: usize,
) -> Val {
    let c1 = b.i64(1);
    let last = b.subi(q_valid, &c1);
    let qi = b.mini(qi, &last);
    let qpos = b.addi(q0, &qi);
    let bh = b.muli(batch, heads);
    let bh = b.addi(&bh, h);
    let row = b.muli(&bh, t);
    let row = b.addi(&row, &qpos);
    let cw = b.i64(width as i64);
    b.muli(&row, &cw)
}

/// `dQ`. Buffers: q, keys in key panels, values in key panels, keys in value panels, o, do,
/// lse, dq (`[B, H, T, D]`), the schedule's rows and tiles, then the side inputs.
pub fn attention_dq(name: &str, kernel: &AttentionKernel, max_vector: usize) -> String {
    let c = Common::new(kernel, max_vector);
    let (w, l, d) = (c.w, c.layout, c.d);
    let vt = vf32(w);
    let mut b = Builder::new();
    let pro = Prologue::new(&mut b, &c, kernel);
    let [q, kp, vtp, kvp, o, d_o, lse, out, sched_rows, sched_tiles] = pro.bufs.clone();
    let Prologue {
        e,
        t,
        per_batch,
        c0,
        c1,
        cbq,
        cbk,
        cd,
        cnv,
        ch,
        group,
        ckv,
        ..
    } = pro.clone();
    let n_qt = b.ceil_div(&t, &cbq);
    let n_kt = b.ceil_div(&t, &cbk);
    let zero = b.splat_f32(0.0, w);
    let deltas = b.alloca(c.bq, F32);
    let lses = b.alloca(c.bq, F32);
    let ds = b.alloca(c.bq * c.bk, F32);
    let acc = b.alloca(c.bq * d, F32);
    let rows = l.rows;
    let step = b.i64(rows as i64);
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        let h = b.remi(pid, &ch);
        let rest = b.divi(pid, &ch);
        let qt = b.remi(&rest, &n_qt);
        let batch = b.divi(&rest, &n_qt);
        let kv = b.divi(&h, &group);
        let q0 = b.muli(&qt, &cbq);
        let left = b.subi(&t, &q0);
        let q_valid = b.mini(&cbq, &left);
        let bkv = b.muli(&batch, &ckv);
        let bkv = b.addi(&bkv, &kv);
        let kv_tiles = b.muli(&bkv, &n_kt);
        let at = (&batch, &h, &q0, &q_valid, &t);
        let o_row = |b: &mut Builder, qi: &Val| output_row(b, kernel, at, qi);
        let q_row = |b: &mut Builder, qi: &Val| head_row(b, &ch, at, qi, d);
        let lse_row = |b: &mut Builder, qi: &Val| head_row(b, &ch, at, qi, 1);
        let side_rows = pro.side_rows(b, &batch);
        row_statistics(b, &c, &o, &d_o, &lse, &o_row, &lse_row, &deltas, &lses);
        pro.zero_rows(b, &c, &acc, &cbq, &zero);
        let row_offsets = ScheduleRows {
            kernel,
            rows: &sched_rows,
            batch: &batch,
            per_batch: &per_batch,
            tiles: &n_qt,
            head: (&h, &ch),
        };
        let (start, end) = schedule_range(b, &row_offsets, &qt, &c1);
        b.for_range(&start, &end, &c1, &[], |b, entry_index, _| {
            let ScheduleEntry {
                index: kt,
                first: k0,
                valid: k_valid,
                partial: is_partial,
            } = schedule_entry(b, &sched_tiles, entry_index, (&cbk, &t), (&c0, &c1));
            let is_tail = b.cmpi("slt", &k_valid, &cbk, I64);
            let needs_mask = b.bin("ori", &is_partial, &is_tail, "i1");
            let tile = b.addi(&kv_tiles, &kt);
            let tile = b.muli(&tile, &cd);
            let tile = b.muli(&tile, &cbk);
            let x = Tile {
                kernel,
                q: q.clone(),
                d_o: d_o.clone(),
                kp: kp.clone(),
                vt: vtp.clone(),
                tile: tile.clone(),
                q0: q0.clone(),
                k0,
                t: t.clone(),
                h: h.clone(),
                batch: batch.clone(),
                needs_mask,
                sides: &side_rows,
                q_row: &q_row,
                do_row: &o_row,
                deltas: deltas.clone(),
                lses: lses.clone(),
                p_out: None,
                ds_out: ds.clone(),
            };
            probabilities_and_gradients(b, &c, &x);
            // dQ += dS K, with keys in value panels `[D / nv][bk][nv]`.
            b.for_range(&c0, &cbq, &step, &[], |b, i, _| {
                b.for_range(&c0, &cd, &cnv, &[], |b, col, _| {
                    let panel = b.muli(col, &cbk);
                    let panel = b.addi(&tile, &panel);
                    let mut init = Vec::new();
                    let mut spots = Vec::new();
                    let mut ds_rows = Vec::new();
                    for r in 0..rows {
                        let rr = b.i64(r as i64);
                        let qi = b.addi(i, &rr);
                        ds_rows.push(b.muli(&qi, &cbk));
                        let arow = b.muli(&qi, &cd);
                        for cc in 0..l.nv / w {
                            let off = b.i64((cc * w) as i64);
                            let at = b.addi(&arow, col);
                            let at = b.addi(&at, &off);
                            init.push(b.load(&acc, &at, F32, &vt));
                            spots.push(at);
                        }
                    }
                    let result =
                        weighted_sum(b, &ds, &ds_rows, &c1, &kvp, &panel, &cnv, &cbk, w, &init);
                    for (value, at) in result.iter().zip(&spots) {
                        b.store(value, &acc, at, F32, &vt);
                    }
                    vec![]
                });
                vec![]
            });
            vec![]
        });
        // Write the valid rows.
        pro.write_rows(b, &c, (&acc, &out), &q_valid, &q_row);
        vec![]
    });
    b.finish(name)
}

/// `dK` and `dV`. Buffers: q, keys in key panels, values in key panels, o, do, lse, dk, dv
/// (`[B, KV, T, D]` each), the schedule's column rows and column tiles (per key tile, the
/// query tiles that visit it), then the side inputs.
pub fn attention_dkv(name: &str, kernel: &AttentionKernel, max_vector: usize) -> String {
    let c = Common::new(kernel, max_vector);
    let (w, l, d) = (c.w, c.layout, c.d);
    let vt = vf32(w);
    let mut b = Builder::new();
    let pro = Prologue::new(&mut b, &c, kernel);
    let [q, kp, vtp, o, d_o, lse, dk_out, dv_out, col_rows, col_tiles] = pro.bufs.clone();
    let Prologue {
        e,
        t,
        per_batch,
        c0,
        c1,
        cbq,
        cbk,
        cd,
        cnv,
        ch,
        group,
        ckv,
        ..
    } = pro.clone();
    let n_kt = b.ceil_div(&t, &cbk);
    let zero = b.splat_f32(0.0, w);
    let deltas = b.alloca(c.bq, F32);
    let lses = b.alloca(c.bq, F32);
    let p = b.alloca(c.bq * c.bk, F32);
    let ds = b.alloca(c.bq * c.bk, F32);
    let dk = b.alloca(c.bk * d, F32);
    let dv = b.alloca(c.bk * d, F32);
    let key_rows = [4usize, 2, 1]
        .into_iter()
        .find(|r| c.bk.is_multiple_of(*r))
        .unwrap_or(1);
    let key_step = b.i64(key_rows as i64);
    // Rows of `do` and `q` are this far apart.
    let do_stride = if kernel.merge_heads {
        b.i64((kernel.heads * kernel.head_dim) as i64)
    } else {
        cd.clone()
    };
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        let kvh = b.remi(pid, &ckv);
        let rest = b.divi(pid, &ckv);
        let kt = b.remi(&rest, &n_kt);
        let batch = b.divi(&rest, &n_kt);
        let k0 = b.muli(&kt, &cbk);
        let k_left = b.subi(&t, &k0);
        let k_valid = b.mini(&cbk, &k_left);
        let is_tail = b.cmpi("slt", &k_valid, &cbk, I64);
        let bkv = b.muli(&batch, &ckv);
        let bkv = b.addi(&bkv, &kvh);
        let tile = b.muli(&bkv, &n_kt);
        let tile = b.addi(&tile, &kt);
        let tile = b.muli(&tile, &cd);
        let tile = b.muli(&tile, &cbk);
        let side_rows = pro.side_rows(b, &batch);
        for acc in [&dk, &dv] {
            pro.zero_rows(b, &c, acc, &cbk, &zero);
        }
        let h0 = b.muli(&kvh, &group);
        let h1 = b.addi(&h0, &group);
        b.for_range(&h0, &h1, &c1, &[], |b, h, _| {
            let columns = ScheduleRows {
                kernel,
                rows: &col_rows,
                batch: &batch,
                per_batch: &per_batch,
                tiles: &n_kt,
                head: (h, &ch),
            };
            let (start, end) = schedule_range(b, &columns, &kt, &c1);
            b.for_range(&start, &end, &c1, &[], |b, entry_index, _| {
                let ScheduleEntry {
                    first: q0,
                    valid: q_valid,
                    partial: is_partial,
                    ..
                } = schedule_entry(b, &col_tiles, entry_index, (&cbq, &t), (&c0, &c1));
                let needs_mask = b.bin("ori", &is_partial, &is_tail, "i1");
                let at = (&batch, h, &q0, &q_valid, &t);
                let o_row = |b: &mut Builder, qi: &Val| output_row(b, kernel, at, qi);
                let q_row = |b: &mut Builder, qi: &Val| head_row(b, &ch, at, qi, d);
                let lse_row = |b: &mut Builder, qi: &Val| head_row(b, &ch, at, qi, 1);
                row_statistics(b, &c, &o, &d_o, &lse, &o_row, &lse_row, &deltas, &lses);
                let x = Tile {
                    kernel,
                    q: q.clone(),
                    d_o: d_o.clone(),
                    kp: kp.clone(),
                    vt: vtp.clone(),
                    tile: tile.clone(),
                    q0: q0.clone(),
                    k0: k0.clone(),
                    t: t.clone(),
                    h: h.clone(),
                    batch: batch.clone(),
                    needs_mask,
                    sides: &side_rows,
                    q_row: &q_row,
                    do_row: &o_row,
                    deltas: deltas.clone(),
                    lses: lses.clone(),
                    p_out: Some(p.clone()),
                    ds_out: ds.clone(),
                };
                probabilities_and_gradients(b, &c, &x);
                // dV += P^T dO and dK += dS^T Q over the tile's valid query rows.
                let c_zero = b.i64(0);
                let do_base = o_row(b, &c_zero);
                let q_base = q_row(b, &c_zero);
                for (weights, acc, rows_of, base, stride) in [
                    (&p, &dv, &d_o, &do_base, &do_stride),
                    (&ds, &dk, &q, &q_base, &cd),
                ] {
                    b.for_range(&c0, &cbk, &key_step, &[], |b, j, _| {
                        b.for_range(&c0, &cd, &cnv, &[], |b, col, _| {
                            let mut init = Vec::new();
                            let mut spots = Vec::new();
                            let mut columns = Vec::new();
                            for r in 0..key_rows {
                                let rr = b.i64(r as i64);
                                let kj = b.addi(j, &rr);
                                columns.push(kj.clone());
                                let arow = b.muli(&kj, &cd);
                                for cc in 0..l.nv / w {
                                    let off = b.i64((cc * w) as i64);
                                    let at = b.addi(&arow, col);
                                    let at = b.addi(&at, &off);
                                    init.push(b.load(acc, &at, F32, &vt));
                                    spots.push(at);
                                }
                            }
                            let v_base = b.addi(base, col);
                            let result = weighted_sum(
                                b, weights, &columns, &cbk, rows_of, &v_base, stride, &q_valid, w,
                                &init,
                            );
                            for (value, at) in result.iter().zip(&spots) {
                                b.store(value, acc, at, F32, &vt);
                            }
                            vec![]
                        });
                        vec![]
                    });
                }
                vec![]
            });
            vec![]
        });
        // Write the valid keys.
        let key_row = b.muli(&bkv, &t);
        let key_row = b.addi(&key_row, &k0);
        let dst = |b: &mut Builder, j: &Val| {
            let dst = b.addi(&key_row, j);
            b.muli(&dst, &cd)
        };
        for (acc, out) in [(&dk, &dk_out), (&dv, &dv_out)] {
            pro.write_rows(b, &c, (acc, out), &k_valid, &dst);
        }
        vec![]
    });
    b.finish(name)
}
