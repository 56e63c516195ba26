//! The fused attention kernel, FlashAttention-2 style: one program per (batch row, query
//! tile, head); for each key tile the schedule lists, `S = Q K^T` by a register-blocked
//! micro-kernel, the score modifier and (on partial tiles only) the mask compiled in, an
//! online softmax (running max and sum per query), and `O += P V`. Query head `h` reads
//! key/value head `h / (heads / kv_heads)`; a query with no visible key gets zeros.
//!
//! Buffers: `q [B, H, T, D]`, `kt` (keys packed by `pack_keys`: per key tile a `[D, bk]`
//! block), `v [B, KV, T, D]`, `out`, the schedule's row offsets and tiles, then the side
//! inputs `[B, T]`. Dims: `B`, `T`, and whether the schedule has one set of rows per batch
//! row (masks over side inputs) or one shared set.

use zebra_ir::op::AttentionKernel;

use crate::mlir::{Builder, F32, I64, Val, entry, vf32};
use crate::vexpr::{self, VecEnv};

/// Rows of the register block of both micro-kernels: 6 rows of two vectors (12 accumulators,
/// enough to hide FMA latency) when the query tile allows, else 4.
fn block_rows(block_q: usize) -> usize {
    [6, 4, 2, 1]
        .into_iter()
        .find(|r| block_q.is_multiple_of(*r))
        .unwrap_or(1)
}

/// Where a kernel reads its schedule's row offsets: the offsets `rows`, sections of `tiles +
/// 1` of them, one shared or one per batch row when `per_batch` is 1; when `kernel`'s mask
/// has a schedule per head ([`zebra_ir::schedule::per_head`]), each of those one per head,
/// found from `head` (the head and the head count).
pub(crate) struct ScheduleRows<'a> {
    pub kernel: &'a AttentionKernel,
    pub rows: &'a Val,
    pub batch: &'a Val,
    pub per_batch: &'a Val,
    pub tiles: &'a Val,
    pub head: (&'a Val, &'a Val),
}

/// The entries `start..end` of tile `tile` in a schedule ([`ScheduleRows`]). `one` is the
/// constant 1.
pub(crate) fn schedule_range(
    b: &mut Builder,
    at: &ScheduleRows,
    tile: &Val,
    one: &Val,
) -> (Val, Val) {
    let mut section = b.muli(at.batch, at.per_batch);
    if zebra_ir::schedule::per_head(&at.kernel.mask, at.kernel.heads as usize) {
        let (h, heads) = at.head;
        let first = b.muli(&section, heads);
        section = b.addi(&first, h);
    }
    let stride = b.addi(at.tiles, one);
    let shared = b.muli(&section, &stride);
    let row = b.addi(&shared, tile);
    let start = b.load(at.rows, &row, I64, I64);
    let next = b.addi(&row, one);
    let end = b.load(at.rows, &next, I64, I64);
    (start, end)
}

/// One entry of a schedule row, as [`schedule_entry`] reads it.
pub(crate) struct ScheduleEntry {
    /// The tile's index along the row (`entry >> 1`).
    pub index: Val,
    /// Its first position, and how many of its positions are below `T`.
    pub first: Val,
    pub valid: Val,
    /// Whether its mask must be evaluated (`entry & 1`), an `i1`.
    pub partial: Val,
}

/// Reads entry `at` of a schedule's `tiles`, whose tiles are `block` positions long, in a
/// sequence of `t`. `zero` and `one` are the constants.
pub(crate) fn schedule_entry(
    b: &mut Builder,
    tiles: &Val,
    at: &Val,
    (block, t): (&Val, &Val),
    (zero, one): (&Val, &Val),
) -> ScheduleEntry {
    let entry = b.load(tiles, at, I64, I64);
    let index = b.op(format!("arith.shrsi {entry}, {one} : i64"));
    let partial_bit = b.bin("andi", &entry, one, I64);
    let first = b.muli(&index, block);
    let left = b.subi(t, &first);
    let valid = b.mini(block, &left);
    let partial = b.cmpi("ne", &partial_bit, zero, I64);
    ScheduleEntry {
        index,
        first,
        valid,
        partial,
    }
}

/// The largest vector width (at most `max`) that divides `d`.
pub fn vector_width(d: usize, max: usize) -> usize {
    [16, 8, 4, 2, 1]
        .into_iter()
        .find(|&w| w <= max && d.is_multiple_of(w))
        .unwrap_or(1)
}

/// The dot products of `rows.len()` rows of `a` (row `r` read from offset `rows[r]`, `d`
/// consecutive floats) with one panel of `nk` keys laid out `[d][nk]` at `kp[panel..]`:
/// `rows * nk / w` vector accumulators, row-major. The micro-kernel of `S = Q K^T` (and of
/// `dP = dO V^T` in the backward).
pub(crate) fn dot_panel(
    b: &mut Builder,
    a: &Val,
    rows: &[Val],
    kp: &Val,
    panel: &Val,
    d: usize,
    l: Layout,
) -> Vec<Val> {
    let (w, kc) = (l.w, l.nk / l.w);
    let vt = vf32(w);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let cd = b.i64(d as i64);
    let cnk = b.i64(l.nk as i64);
    let zero = b.splat_f32(0.0, w);
    let zeros: Vec<(Val, String)> = (0..rows.len() * kc)
        .map(|_| (zero.clone(), vt.clone()))
        .collect();
    b.for_range(&c0, &cd, &c1, &zeros, |b, dd, accs| {
        let at = b.muli(dd, &cnk);
        let at = b.addi(panel, &at);
        let kvecs: Vec<Val> = (0..kc)
            .map(|c| {
                let off = b.i64((c * w) as i64);
                let at = b.addi(&at, &off);
                b.load(kp, &at, F32, &vt)
            })
            .collect();
        let mut next = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            let at = b.addi(row, dd);
            let x = b.load(a, &at, F32, F32);
            let xv = b.splat(&x, F32, w);
            for (c, kvec) in kvecs.iter().enumerate() {
                next.push(b.fma(&xv, kvec, &accs[r * kc + c], &vt));
            }
        }
        next
    })
}

/// Weighted sums of vectors: for `t` in `0..n`, `acc[r][c] += s[rows[r] + t * s_step] *
/// v[v_base + t * v_step + c * w]`, starting from `init` (`rows * vectors` accumulators,
/// row-major). The micro-kernel of `O += P V` (and of `dQ += dS K`, `dV += P^T dO`,
/// `dK += dS^T Q` in the backward).
#[allow(clippy::too_many_arguments)]
pub(crate) fn weighted_sum(
    b: &mut Builder,
    s: &Val,
    rows: &[Val],
    s_step: &Val,
    v: &Val,
    v_base: &Val,
    v_step: &Val,
    n: &Val,
    w: usize,
    init: &[Val],
) -> Vec<Val> {
    let vt = vf32(w);
    let vectors = init.len() / rows.len();
    let (c0, c1) = (b.i64(0), b.i64(1));
    let carried: Vec<(Val, String)> = init.iter().map(|v| (v.clone(), vt.clone())).collect();
    b.for_range(&c0, n, &c1, &carried, |b, t, accs| {
        let at = b.muli(t, v_step);
        let at = b.addi(v_base, &at);
        let vvecs: Vec<Val> = (0..vectors)
            .map(|c| {
                let off = b.i64((c * w) as i64);
                let at = b.addi(&at, &off);
                b.load(v, &at, F32, &vt)
            })
            .collect();
        let mut next = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            let at = b.muli(t, s_step);
            let at = b.addi(row, &at);
            let x = b.load(s, &at, F32, F32);
            let xv = b.splat(&x, F32, w);
            for (c, vvec) in vvecs.iter().enumerate() {
                next.push(b.fma(&xv, vvec, &accs[r * vectors + c], &vt));
            }
        }
        next
    })
}

/// `1 / l` for a softmax denominator `l`, or 0 when `l` is 0 (a query that saw no key), in
/// `n` lanes; also whether `l > 0` (`zero`, `one`: the f32 constants).
pub(crate) fn reciprocal_or_zero(
    b: &mut Builder,
    l: &Val,
    (zero, one): (&Val, &Val),
    n: usize,
) -> (Val, Val) {
    let seen = b.cmpf("ogt", l, zero, F32);
    let inverse = b.bin("divf", one, l, F32);
    let inverse = b.select(&seen, &inverse, zero, F32);
    (seen, b.splat(&inverse, F32, n))
}

/// `out[out_row + c] = acc[acc_row + c] * scale` for `c` in `0..d`, `w` lanes at a time (`c0`,
/// `cd`, `cw`: the constants 0, `d` and `w`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_scaled(
    b: &mut Builder,
    acc: &Val,
    acc_row: &Val,
    out: &Val,
    out_row: &Val,
    scale: &Val,
    (c0, cd, cw): (&Val, &Val, &Val),
    w: usize,
) {
    let vt = vf32(w);
    b.for_range(c0, cd, cw, &[], |b, c, _| {
        let at = b.addi(acc_row, c);
        let o = b.load(acc, &at, F32, &vt);
        let o = b.bin("mulf", &o, scale, &vt);
        let dst = b.addi(out_row, c);
        b.store(&o, out, &dst, F32, &vt);
        vec![]
    });
}

/// How the attention kernel's tiles are laid out: the vector width `w`, and the panel widths
/// of packed keys (`nk` keys) and packed values (`nv` head-dim columns), each one or two
/// vectors.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub w: usize,
    pub nk: usize,
    pub nv: usize,
    pub rows: usize,
}

impl Layout {
    pub fn new(head_dim: usize, block_q: usize, block_k: usize, max_vector: usize) -> Layout {
        let w = [16, 8, 4, 2, 1]
            .into_iter()
            .find(|&w| w <= max_vector && head_dim.is_multiple_of(w) && block_k.is_multiple_of(w))
            .unwrap_or(1);
        let panel = |n: usize| if n.is_multiple_of(2 * w) { 2 * w } else { w };
        Layout {
            w,
            nk: panel(block_k),
            nv: panel(head_dim),
            rows: block_rows(block_q),
        }
    }
}

/// The kernel that packs keys and values for the attention kernel. Per key tile of `bk` keys
/// (zero beyond `T`): keys transposed into panels of `nk` keys, `[bk / nk][D][nk]`, and values
/// into panels of `nv` columns, `[D / nv][bk][nv]`, so that both micro-kernels read their
/// panels front to back. Buffers: k, v `[B, KV, T, D]`, packed keys, packed values. Grid:
/// `B * KV * ceil(T / bk)`.
pub fn pack_kv(name: &str, head_dim: usize, block_k: usize, layout: Layout) -> String {
    let mut b = Builder::new();
    let e = entry();
    let k = b.ptr_at(&e.bufs, 0);
    let v = b.ptr_at(&e.bufs, 1);
    let kp = b.ptr_at(&e.bufs, 2);
    let vp = b.ptr_at(&e.bufs, 3);
    let t = b.i64_at(&e.dims, 1);
    let bk = b.i64(block_k as i64);
    let d = b.i64(head_dim as i64);
    let nk = b.i64(layout.nk as i64);
    let nv = b.i64(layout.nv as i64);
    let n_kt = b.ceil_div(&t, &bk);
    let zero = b.i64(0);
    let one = b.i64(1);
    let fzero = b.f32(0.0);
    let w = layout.w;
    let vt = vf32(w);
    let zeros = b.splat_f32(0.0, w);
    b.for_range(&e.first, &e.last, &one, &[], |b, pid, _| {
        let tile = b.remi(pid, &n_kt);
        let head = b.divi(pid, &n_kt); // b * KV + kv
        let k0 = b.muli(&tile, &bk);
        let row_base = b.muli(&head, &t); // (b * KV + kv) * T
        let block = b.muli(pid, &d);
        let block = b.muli(&block, &bk); // ((b * KV + kv) * n_kt + tile) * D * bk
        b.for_range(&zero, &bk, &one, &[], |b, j, _| {
            let key = b.addi(&k0, j);
            let inside = b.cmpi("slt", &key, &t, I64);
            let last = b.subi(&t, &one);
            let clamped = b.mini(&key, &last);
            let row = b.addi(&row_base, &clamped);
            let src = b.muli(&row, &d);
            // Key j, dim c goes to panel j / nk: ((j / nk) * D + c) * nk + j % nk.
            let k_panel = b.divi(j, &nk);
            let k_lane = b.remi(j, &nk);
            let k_dst = b.muli(&k_panel, &d);
            let k_dst = b.muli(&k_dst, &nk);
            let k_dst = b.addi(&k_dst, &k_lane);
            let k_dst = b.addi(&block, &k_dst);
            b.for_range(&zero, &d, &one, &[], |b, c, _| {
                let at = b.addi(&src, c);
                let x = b.load(&k, &at, F32, F32);
                let x = b.select(&inside, &x, &fzero, F32);
                let dst = b.muli(c, &nk);
                let dst = b.addi(&k_dst, &dst);
                b.store(&x, &kp, &dst, F32, F32);
                vec![]
            });
            // Values j, dims c..c + w go to panel c / nv: ((c / nv) * bk + j) * nv + c % nv,
            // a vector at a time.
            let inside_v = b.splat(&inside, "i1", w);
            b.for_range(&zero, &d, &nv, &[], |b, c, _| {
                // c is a multiple of nv: ((c / nv) * bk + j) * nv = c * bk + j * nv.
                let panel = b.muli(c, &bk);
                let row = b.muli(j, &nv);
                let panel = b.addi(&panel, &row);
                let panel = b.addi(&block, &panel);
                for lane in (0..layout.nv).step_by(w) {
                    let offset = b.i64(lane as i64);
                    let at = b.addi(&src, c);
                    let at = b.addi(&at, &offset);
                    let y = b.load(&v, &at, F32, &vt);
                    let y = b.select(&inside_v, &y, &zeros, &vt);
                    let dst = b.addi(&panel, &offset);
                    b.store(&y, &vp, &dst, F32, &vt);
                }
                vec![]
            });
            vec![]
        });
        vec![]
    });
    b.finish(name)
}

/// The attention kernel. `max_vector` is the target's widest f32 vector.
/// With `lse`, the kernel also writes each query's log-sum-exp (natural log, `-inf` for a
/// query that sees no key) to a `[B, H, T]` buffer after the side inputs, for the backward.
pub fn attention(name: &str, kernel: &AttentionKernel, lse: bool, max_vector: usize) -> String {
    let (h_count, kv_count) = (kernel.heads as i64, kernel.kv_heads as i64);
    let d = kernel.head_dim as usize;
    let (bq, bk) = (kernel.block_q as usize, kernel.block_k as usize);
    let layout = Layout::new(d, bq, bk, max_vector);
    let (w, rows) = (layout.w, layout.rows);
    let (kc, vc) = (layout.nk / w, layout.nv / w);
    let vt = vf32(w);

    let mut b = Builder::new();
    let e = entry();
    let q = b.ptr_at(&e.bufs, 0);
    let kp = b.ptr_at(&e.bufs, 1);
    let vp = b.ptr_at(&e.bufs, 2);
    let out = b.ptr_at(&e.bufs, 3);
    let sched_rows = b.ptr_at(&e.bufs, 4);
    let sched_tiles = b.ptr_at(&e.bufs, 5);
    let sides: Vec<(String, Val)> = kernel
        .sides
        .iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), b.ptr_at(&e.bufs, 6 + i)))
        .collect();
    let t = b.i64_at(&e.dims, 1);
    let per_batch = b.i64_at(&e.dims, 2);

    let c0 = b.i64(0);
    let c1 = b.i64(1);
    let cw = b.i64(w as i64);
    let cbq = b.i64(bq as i64);
    let cbk = b.i64(bk as i64);
    let cd = b.i64(d as i64);
    let cnk = b.i64(layout.nk as i64);
    let cnv = b.i64(layout.nv as i64);
    let ch = b.i64(h_count);
    let group = b.i64(h_count / kv_count);
    let ckv = b.i64(kv_count);
    let n_qt = b.ceil_div(&t, &cbq);
    let n_kt = b.ceil_div(&t, &cbk);
    // Scores are kept in base 2 (exp2 is the cheaper exponential): scaled by log2(e) after
    // the score modifier, or together with the scale when there is none.
    let log2e = std::f64::consts::LOG2_E;
    let scale = match kernel.score {
        Some(_) => b.splat_f32(kernel.scale as f32, w),
        None => b.splat_f32((kernel.scale * log2e) as f32, w),
    };
    let log2e_v = b.splat_f32(log2e as f32, w);
    let neg_inf = b.f32(f32::NEG_INFINITY);
    let neg_inf_v = b.splat(&neg_inf, F32, w);
    let zero_v = b.splat_f32(0.0, w);
    let fzero = b.f32(0.0);
    let fone = b.f32(1.0);

    let scores = b.alloca(bq * bk, F32);
    let acc = b.alloca(bq * d, F32);
    let maxes = b.alloca(bq, F32);
    let tile_maxes = b.alloca(bq * w, F32);
    let sums = b.alloca(bq, F32);

    let step_rows = b.i64(rows as i64);
    // Masks and score modifiers in 32-bit integer lanes when their values allow.
    let narrow = vexpr::fits_in_32_bits(&kernel.mask, h_count)
        && kernel
            .score
            .as_ref()
            .is_none_or(|s| vexpr::fits_in_32_bits(s, h_count));
    // Lines (of 16 floats) of the next key and value tiles each query row prefetches.
    let prefetch_lines = (bk * d).div_ceil(16 * bq);
    let lines_per_row = b.i64((prefetch_lines * 16) as i64);
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        // pid = (batch * n_qt + qt) * H + h: the heads of one query tile run together.
        let h = b.remi(pid, &ch);
        let rest = b.divi(pid, &ch);
        let qt = b.remi(&rest, &n_qt);
        let batch = b.divi(&rest, &n_qt);
        let kv = b.divi(&h, &group);
        let q0 = b.muli(&qt, &cbq);
        let left = b.subi(&t, &q0);
        let q_valid = b.mini(&cbq, &left);
        let bh = b.muli(&batch, &ch);
        let bh = b.addi(&bh, &h);
        let q_base = b.muli(&bh, &t); // row of (b, h, 0)
        let bkv = b.muli(&batch, &ckv);
        let bkv = b.addi(&bkv, &kv);
        let kv_tiles = b.muli(&bkv, &n_kt);
        let side_rows: Vec<(String, Val)> = sides
            .iter()
            .map(|(name, ptr)| {
                let offset = b.muli(&batch, &t);
                (name.clone(), b.gep(ptr, &offset, I64))
            })
            .collect();

        // Running max, sum and accumulator.
        b.for_range(&c0, &cbq, &c1, &[], |b, i, _| {
            b.store(&neg_inf, &maxes, i, F32, F32);
            b.store(&fzero, &sums, i, F32, F32);
            let row = b.muli(i, &cd);
            b.for_range(&c0, &cd, &cw, &[], |b, c, _| {
                let at = b.addi(&row, c);
                b.store(&zero_v, &acc, &at, F32, &vf32(w));
                vec![]
            });
            vec![]
        });
        // Query rows of the register blocks, clamped to the last valid one.
        let q_row = |b: &mut Builder, i: &Val, r: usize| {
            let rr = b.i64(r as i64);
            let qi = b.addi(i, &rr);
            let last = b.subi(&q_valid, &c1);
            let qi = b.mini(&qi, &last);
            let qrow = b.addi(&q0, &qi);
            let qrow = b.addi(&q_base, &qrow);
            b.muli(&qrow, &cd)
        };

        // This query tile's row of the schedule.
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
                index: kt_index,
                first: k0,
                valid: k_valid,
                partial: is_partial,
            } = schedule_entry(b, &sched_tiles, entry_index, (&cbk, &t), (&c0, &c1));
            let is_tail = b.cmpi("slt", &k_valid, &cbk, I64);
            let needs_mask = b.bin("ori", &is_partial, &is_tail, "i1");
            let tile = b.addi(&kv_tiles, &kt_index);
            let tile = b.muli(&tile, &cd);
            let tile = b.muli(&tile, &cbk); // this tile's packed keys and values
            // The next tile of the row, prefetched a few lines per query row while this one
            // is computed (the last tile prefetches itself, harmlessly).
            let following = b.addi(entry_index, &c1);
            let last_entry = b.subi(&end, &c1);
            let following = b.mini(&following, &last_entry);
            let following = b.load(&sched_tiles, &following, I64, I64);
            let following = b.op(format!("arith.shrsi {following}, {c1} : i64"));
            let next_tile = b.addi(&kv_tiles, &following);
            let next_tile = b.muli(&next_tile, &cd);
            let next_tile = b.muli(&next_tile, &cbk);
            b.for_range(&c0, &cbq, &c1, &[], |b, i, _| {
                let at = b.muli(i, &cw);
                b.store(&neg_inf_v, &tile_maxes, &at, F32, &vt);
                vec![]
            });

            // S = Q K^T: `rows` queries x one panel of `nk` keys at a time (panel by panel, so
            // that a panel stays in the L1 cache while every query row passes); each block is
            // scaled, modified and (on partial tiles) masked as it is stored, and the row
            // maxima kept per lane.
            b.for_range(&c0, &cbk, &cnk, &[], |b, j, _| {
                b.for_range(&c0, &cbq, &step_rows, &[], |b, i, _| {
                    let q_rows: Vec<Val> = (0..rows).map(|r| q_row(b, i, r)).collect();
                    let panel = b.muli(j, &cd);
                    let panel = b.addi(&tile, &panel); // (j / nk) * D * nk + tile start
                    let sums_out = dot_panel(b, &q, &q_rows, &kp, &panel, d, layout);
                    for r in 0..rows {
                        let rr = b.i64(r as i64);
                        let qi = b.addi(i, &rr);
                        let qpos = b.addi(&q0, &qi);
                        let srow = b.muli(&qi, &cbk);
                        let mrow = b.muli(&qi, &cw);
                        let mut row_max = b.load(&tile_maxes, &mrow, F32, &vt);
                        for c in 0..kc {
                            let off = b.i64((c * w) as i64);
                            let at = b.addi(&srow, j);
                            let at = b.addi(&at, &off);
                            let kpos = b.addi(&k0, j);
                            let kpos = b.addi(&kpos, &off);
                            let s = b.bin("mulf", &sums_out[r * kc + c], &scale, &vt);
                            let env = VecEnv {
                                n: w,
                                q: qpos.clone(),
                                k0: kpos.clone(),
                                h: h.clone(),
                                b: batch.clone(),
                                score: Some(s.clone()),
                                sides: &side_rows,
                                narrow,
                                keys: None,
                            };
                            let s = match &kernel.score {
                                Some(expr) => {
                                    let modified = vexpr::score(b, expr, &env);
                                    b.bin("mulf", &modified, &log2e_v, &vt)
                                }
                                None => s,
                            };
                            let s = b.if_else(
                                &needs_mask,
                                std::slice::from_ref(&vt),
                                |b| {
                                    let visible = vexpr::mask(b, &kernel.mask, &env);
                                    let inside = env.keys_below(b, &t);
                                    let both =
                                        b.bin("andi", &visible, &inside, &crate::mlir::vi1(w));
                                    vec![b.select(&both, &s, &neg_inf_v, &vt)]
                                },
                                |_| vec![s.clone()],
                            );
                            b.store(&s[0], &scores, &at, F32, &vt);
                            row_max = b.op(format!(
                                "arith.maxnumf {row_max}, {} fastmath<nnan> : {vt}",
                                s[0]
                            ));
                        }
                        b.store(&row_max, &tile_maxes, &mrow, F32, &vt);
                    }
                    vec![]
                });
                vec![]
            });

            // The online softmax, one query row at a time (in base 2).
            b.for_range(&c0, &q_valid, &c1, &[], |b, i, _| {
                for (lines, base) in [(prefetch_lines, &kp), (prefetch_lines, &vp)] {
                    for l in 0..lines {
                        let at = b.muli(i, &lines_per_row);
                        let extra = b.i64((l * 16) as i64);
                        let at = b.addi(&at, &extra);
                        let at = b.addi(&next_tile, &at);
                        b.prefetch(base, &at, F32);
                    }
                }
                let srow = b.muli(i, &cbk);
                let mrow = b.muli(i, &cw);
                let rowmax = [b.load(&tile_maxes, &mrow, F32, &vt)];
                let tile_max = b.op(format!(
                    "vector.reduction <maxnumf>, {} fastmath<nnan> : {vt} into f32",
                    rowmax[0]
                ));
                let m_old = b.load(&maxes, i, F32, F32);
                let m_new = b.op(format!(
                    "arith.maxnumf {m_old}, {tile_max} fastmath<nnan> : f32"
                ));
                // With every key so far hidden, exponents are taken against 0: all give 0.
                let hidden = b.cmpf("oeq", &m_new, &neg_inf, F32);
                let m_use = b.select(&hidden, &fzero, &m_new, F32);
                let m_use_v = b.splat(&m_use, F32, w);
                let rowsum = b.for_range(
                    &c0,
                    &cbk,
                    &cw,
                    &[(zero_v.clone(), vt.clone())],
                    |b, j, carried| {
                        let at = b.addi(&srow, j);
                        let s = b.load(&scores, &at, F32, &vt);
                        let shifted = b.bin("subf", &s, &m_use_v, &vt);
                        let p = vexpr::exp2_nonpositive(b, &shifted, w);
                        b.store(&p, &scores, &at, F32, &vt);
                        vec![b.bin("addf", &carried[0], &p, &vt)]
                    },
                );
                let tile_sum = b.reduce("add", &rowsum[0], &vt, F32);
                let shift = b.bin("subf", &m_old, &m_use, F32);
                let shift_v = b.splat(&shift, F32, w);
                let alpha_v = vexpr::exp2_nonpositive(b, &shift_v, w);
                let alpha = b.op(format!("vector.extract {alpha_v}[0] : f32 from {vt}"));
                let l_old = b.load(&sums, i, F32, F32);
                let l_new = b.fma(&l_old, &alpha, &tile_sum, F32);
                b.store(&l_new, &sums, i, F32, F32);
                b.store(&m_new, &maxes, i, F32, F32);
                let rescale = b.cmpf("one", &alpha, &fone, F32);
                b.if_then(&rescale, |b| {
                    let orow = b.muli(i, &cd);
                    b.for_range(&c0, &cd, &cw, &[], |b, c, _| {
                        let at = b.addi(&orow, c);
                        let o = b.load(&acc, &at, F32, &vt);
                        let o = b.bin("mulf", &o, &alpha_v, &vt);
                        b.store(&o, &acc, &at, F32, &vt);
                        vec![]
                    });
                });
                vec![]
            });

            // O += P V: `rows` queries x one panel of `nv` value columns at a time, over the
            // whole tile (padded values are zero, and so are the weights of hidden keys).
            b.for_range(&c0, &cbq, &step_rows, &[], |b, i, _| {
                b.for_range(&c0, &cd, &cnv, &[], |b, c, _| {
                    let panel = b.muli(c, &cbk);
                    let panel = b.addi(&tile, &panel); // (c / nv) * bk * nv + tile start
                    let mut init = Vec::new();
                    let mut spots = Vec::new();
                    for r in 0..rows {
                        let rr = b.i64(r as i64);
                        let orow = b.addi(i, &rr);
                        let orow = b.muli(&orow, &cd);
                        for cc in 0..vc {
                            let off = b.i64((cc * w) as i64);
                            let at = b.addi(&orow, c);
                            let at = b.addi(&at, &off);
                            init.push((b.load(&acc, &at, F32, &vt), vt.clone()));
                            spots.push(at);
                        }
                    }
                    let p_rows: Vec<Val> = (0..rows)
                        .map(|r| {
                            let rr = b.i64(r as i64);
                            let prow = b.addi(i, &rr);
                            b.muli(&prow, &cbk)
                        })
                        .collect();
                    let init: Vec<Val> = init.into_iter().map(|(v, _)| v).collect();
                    let result =
                        weighted_sum(b, &scores, &p_rows, &c1, &vp, &panel, &cnv, &cbk, w, &init);
                    for (value, at) in result.iter().zip(&spots) {
                        b.store(value, &acc, at, F32, &vt);
                    }
                    vec![]
                });
                vec![]
            });
            vec![]
        });

        // Normalize and write out; a query that saw nothing gets zeros.
        b.for_range(&c0, &q_valid, &c1, &[], |b, i, _| {
            let l = b.load(&sums, i, F32, F32);
            let (seen, inverse_v) = reciprocal_or_zero(b, &l, (&fzero, &fone), w);
            let qpos = b.addi(&q0, i);
            if lse {
                // lse = (m + log2(l)) * ln 2, the running max m in base 2.
                let lse_ptr = b.ptr_at(&e.bufs, 6 + kernel.sides.len());
                let m = b.load(&maxes, i, F32, F32);
                let log_l = b.op(format!("math.log2 {l} : f32"));
                let total = b.bin("addf", &m, &log_l, F32);
                let ln2 = b.f32(std::f32::consts::LN_2);
                let value = b.bin("mulf", &total, &ln2, F32);
                let value = b.select(&seen, &value, &neg_inf, F32);
                let row = b.addi(&q_base, &qpos);
                b.store(&value, &lse_ptr, &row, F32, F32);
            }
            let dst_row = if kernel.merge_heads {
                // out[b, t, h, :]
                let bt = b.muli(&batch, &t);
                let bt = b.addi(&bt, &qpos);
                let bth = b.muli(&bt, &ch);
                let bth = b.addi(&bth, &h);
                b.muli(&bth, &cd)
            } else {
                let row = b.addi(&q_base, &qpos);
                b.muli(&row, &cd)
            };
            let orow = b.muli(i, &cd);
            store_scaled(
                b,
                &acc,
                &orow,
                &out,
                &dst_row,
                &inverse_v,
                (&c0, &cd, &cw),
                w,
            );
            vec![]
        });
        vec![]
    });
    b.finish(name)
}
