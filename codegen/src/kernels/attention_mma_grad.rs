//! The fused attention's backward on tensor cores (`mma.sync`), for the training steps of GPU
//! plans with a 16-bit type: the two kernels of [`super::attention_grad`] with the same
//! buffers, schedule and grids, their products on tensor cores with 16-bit operands and f32
//! accumulation. Keys and values come as 16-bit `[B, KV, T, D]` ([`super::tensor_core::pack_half`]); Q,
//! O, dO and the log-sum-exp in f32 as the plan has them, Q and dO rounded while they are
//! copied into shared memory (in padded rows, as the forward's tiles).
//!
//! - `dQ` ([`GradKernel::Dq`]): a block per (query tile, batch row and head), a warp per 16
//!   query rows. The Q and dO tiles are copied once, with each row's `delta = rowsum(dO * O)`
//!   and log-sum-exp (base 2) beside them; for each key tile of the schedule's row the K
//!   tile, then the V tile are copied with `cp.async` (V's copy overlaps `S = Q K^T`), and
//!   `dS = P * (dP - delta) * score'(s) * scale`, with `P = exp2(s - lse)` and
//!   `dP = dO V^T`, is repacked in registers as the A fragments of `dQ += dS K` (K by
//!   `ldmatrix.trans`).
//! - `dK` and `dV` ([`GradKernel::Dkv`]): a block per (key tile, batch row and KV head), a
//!   warp per 16 keys (beyond head dim 128, two: both compute the scores, each accumulates
//!   half the head dims). The K and V tiles are copied once; for every head of the KV head's
//!   group and every query tile of the schedule's column (the query tiles that visit this
//!   key tile), the Q and dO tiles are copied and walked [`GradTiles::chunk`] queries at a
//!   time: `S^T = K Q^T` and `dP^T = V dO^T`, then `dV += P^T dO` and `dK += dS^T Q`
//!   with `P^T` and `dS^T` from registers.
//!
//! Every output element is summed by one thread in a fixed order: no atomics, the same
//! result on every run. Rows of a query tile past `T` are zero with an infinite
//! log-sum-exp (so their probabilities are 0); keys past `T` are masked.

use zebra_ir::op::AttentionKernel;

use super::attention::{ScheduleRows, schedule_range};
use super::attention_grad::lse_base2;
use super::attention_mma::{Ctx, Half, MmaTiles, Product, sync_scores};
use super::block::{ChunkedTile, block_function, load8, pack8, shared_address};
use super::warp::Lowering;
use crate::mlir::{Builder, F32, I64, Val};
use crate::vexpr::{self, VecEnv};

/// The largest head dimension of the tensor-core backward.
pub const MAX_HEAD_DIM: usize = 256;

/// Which of the two backward kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GradKernel {
    /// `dQ`, per query tile.
    Dq,
    /// `dK` and `dV`, per key tile.
    Dkv,
}

/// The tiles of a tensor-core backward: those of the forward's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradTiles {
    pub block_q: usize,
    pub block_k: usize,
    pub head_dim: usize,
}

/// Byte offsets in shared memory of a backward kernel's tiles (in padded rows) and per-row
/// statistics (f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradLayout {
    pub q: usize,
    pub d_o: usize,
    pub k: usize,
    pub v: usize,
    pub lse: usize,
    pub delta: usize,
    /// Per query row and 8 head dims, the partial sums of `delta`.
    pub partials: usize,
    pub bytes: usize,
}

impl GradTiles {
    /// The tiles for an attention with the forward's tiles on `sm`, or `None` where the
    /// tensor-core backward cannot take it (a head dim not a multiple of 16 or over
    /// [`MAX_HEAD_DIM`], tiles not multiples of 16 up to 128, a target before sm_80, a score
    /// modifier without a derivative).
    pub fn of(kernel: &AttentionKernel, sm: u32) -> Option<GradTiles> {
        let d = kernel.head_dim as usize;
        let (bq, bk) = (kernel.block_q as usize, kernel.block_k as usize);
        let tile_ok = |x: usize| x.is_multiple_of(16) && (16..=128).contains(&x);
        let ok = sm >= 80
            && d > 0
            && d.is_multiple_of(16)
            && d <= MAX_HEAD_DIM
            && tile_ok(bq)
            && tile_ok(bk)
            && kernel
                .score
                .as_ref()
                .is_none_or(|s| s.score_derivative().is_ok());
        ok.then_some(GradTiles {
            block_q: bq,
            block_k: bk,
            head_dim: d,
        })
    }

    /// Queries per step of the `dK`/`dV` kernel's walk over a query tile: the scores and
    /// `dP` of a step are held beside the `dK` and `dV` accumulators (64 registers each at
    /// head dim 128, and at 256 with the head dims split), so 64 queries up to head dim 64,
    /// 32 up to 128, 16 beyond (ptxas: 152 bytes spilled at 32).
    pub fn chunk(&self) -> usize {
        let wanted: &[usize] = match self.head_dim {
            0..=64 => &[64, 32, 16],
            65..=128 => &[32, 16],
            _ => &[16],
        };
        wanted
            .iter()
            .copied()
            .find(|c| self.block_q.is_multiple_of(*c))
            .unwrap_or(16)
    }

    /// Parts of the head dims whose `dK` and `dV` one warp of the `dK`/`dV` kernel
    /// accumulates: beyond head dim 128 the accumulators of all of them would take more
    /// registers than a thread has, so two warps share 16 keys, each computing the scores
    /// and taking half the head dims.
    pub fn dim_parts(&self) -> usize {
        if self.head_dim > 128 { 2 } else { 1 }
    }

    /// [`GradTiles::dim_parts`] for `dK`/`dV`, else 1.
    fn parts(&self, which: GradKernel) -> usize {
        match which {
            GradKernel::Dq => 1,
            GradKernel::Dkv => self.dim_parts(),
        }
    }

    /// Warps per block: one per 16 rows of the tile the block owns (times
    /// [`GradTiles::dim_parts`] for `dK`/`dV`).
    pub fn warps(&self, which: GradKernel) -> usize {
        self.parts(which)
            * match which {
                GradKernel::Dq => self.block_q / 16,
                GradKernel::Dkv => self.block_k / 16,
            }
    }

    pub fn threads(&self, which: GradKernel) -> usize {
        self.warps(which) * 32
    }

    /// The view of the forward kernel's helpers: one row block of 16 rows per warp.
    fn mma_tiles(&self, which: GradKernel) -> MmaTiles {
        MmaTiles {
            block_q: self.block_q,
            block_k: self.block_k,
            head_dim: self.head_dim,
            row_blocks: 1,
            stages: 1,
            product: Product::Sync,
            warps: self.warps(which),
        }
    }

    fn row_bytes(&self) -> usize {
        (self.head_dim + 8) * 2
    }

    /// The shared memory of a kernel: for `dQ` the Q and dO tiles, then K and V; for `dK`
    /// and `dV` K and V, then Q and dO; then the statistics.
    pub fn layout(&self, which: GradKernel) -> GradLayout {
        let queries = self.block_q * self.row_bytes();
        let keys = self.block_k * self.row_bytes();
        let (q, d_o, k, v) = match which {
            GradKernel::Dq => (0, queries, 2 * queries, 2 * queries + keys),
            GradKernel::Dkv => (2 * keys, 2 * keys + queries, 0, keys),
        };
        let lse = 2 * queries + 2 * keys;
        let delta = lse + self.block_q * 4;
        let partials = delta + self.block_q * 4;
        GradLayout {
            q,
            d_o,
            k,
            v,
            lse,
            delta,
            partials,
            bytes: partials + self.block_q * self.head_dim / 8 * 4,
        }
    }
}

/// Rounds rows `first..first + rows` of an f32 tensor to 16 bits into the padded tile at byte
/// `offset` of shared memory (rows past `T` zero); `row_at` gives a row's first element
/// (for a row below `T`). With `dot`, also stores each thread's part of `rowsum(x * o)`
/// (8 elements) at `partials` (f32, `D / 8` per row).
#[allow(clippy::too_many_arguments)]
fn round_rows(
    b: &mut Builder,
    ctx: &Ctx,
    half: Half,
    src: &Val,
    row_at: &dyn Fn(&mut Builder, &Val) -> Val,
    (first, rows): (&Val, usize),
    offset: usize,
    dot: Option<(&Val, usize)>,
) {
    let d = ctx.tiles.head_dim;
    let tile = ChunkedTile {
        rows,
        per_row: d / 8,
        threads: ctx.tiles.threads(),
    };
    let c1 = b.i64(1);
    let last = b.subi(&ctx.t, &c1);
    for i in 0..tile.slots() {
        tile.for_slot(b, &ctx.tid, i, |b, row, col| {
            let pos = b.addi(first, row);
            let inside = b.cmpi("slt", &pos, &ctx.t, I64);
            let pos = b.mini(&pos, &last);
            let at = row_at(b, &pos);
            let c8 = b.i64(8);
            let col8 = b.muli(col, &c8);
            let at = b.addi(&at, &col8);
            let zero = b.f32(0.0);
            let values: Vec<Val> = load8(b, src, &at, true)
                .iter()
                .map(|x| b.select(&inside, x, &zero, F32))
                .collect();
            let words = pack8(b, ctx.isa, half, &values);
            let c16 = b.i64(16);
            let col_bytes = b.muli(col, &c16);
            let off = b.i64(offset as i64);
            let to = shared_address(b, &ctx.smem, row, &col_bytes, ctx.tiles.row() * 2, &off);
            ctx.isa
                .store_shared(b, &to, [&words[0], &words[1], &words[2], &words[3]]);
            if let Some((o, partials)) = dot {
                let others = load8(b, o, &at, true);
                let mut sum = zero.clone();
                for (x, y) in values.iter().zip(&others) {
                    sum = b.fma(x, y, &sum, F32);
                }
                let per_row = b.i64((d / 8) as i64);
                let index = b.muli(row, &per_row);
                let index = b.addi(&index, col);
                store_f32(b, ctx, partials, &index, &sum);
            }
        });
    }
}

/// Stores `value` as element `index` of the f32 array at byte `offset` of shared memory.
fn store_f32(b: &mut Builder, ctx: &Ctx, offset: usize, index: &Val, value: &Val) {
    let at = f32_address(b, ctx, offset, index);
    let word = b.op(format!("arith.bitcast {value} : f32 to i32"));
    ctx.isa.store_shared32(b, &at, &word);
}

/// Element `index` of the f32 array at byte `offset` of shared memory.
fn load_f32(b: &mut Builder, ctx: &Ctx, offset: usize, index: &Val) -> Val {
    let at = f32_address(b, ctx, offset, index);
    let word = ctx.isa.load_shared32(b, &at);
    b.op(format!("arith.bitcast {word} : i32 to f32"))
}

fn f32_address(b: &mut Builder, ctx: &Ctx, offset: usize, index: &Val) -> Val {
    let c4 = b.i64(4);
    let bytes = b.muli(index, &c4);
    let c0 = b.i64(0);
    let off = b.i64(offset as i64);
    shared_address(b, &ctx.smem, &c0, &bytes, 0, &off)
}

/// Per row `first..first + rows` of the tile (after [`round_rows`] with `dot` and a
/// barrier): the log-sum-exp in base 2 (`+inf` for a row that sees no key or lies past `T`,
/// so that its probabilities come out 0) and `delta`, the sum of the row's partials, into
/// shared memory.
fn row_statistics(
    b: &mut Builder,
    ctx: &Ctx,
    layout: &GradLayout,
    lse: &Val,
    lse_at: &dyn Fn(&mut Builder, &Val) -> Val,
    (first, rows): (&Val, usize),
) {
    let d = ctx.tiles.head_dim;
    let crows = b.i64(rows as i64);
    let step = b.i64(ctx.tiles.threads() as i64);
    let c1 = b.i64(1);
    let last = b.subi(&ctx.t, &c1);
    b.for_range(&ctx.tid, &crows, &step, &[], |b, r, _| {
        let pos = b.addi(first, r);
        let inside = b.cmpi("slt", &pos, &ctx.t, I64);
        let pos = b.mini(&pos, &last);
        let at = lse_at(b, &pos);
        let l = b.load(lse, &at, F32, F32);
        let l2 = lse_base2(b, &l);
        let inf = b.f32(f32::INFINITY);
        let l2 = b.select(&inside, &l2, &inf, F32);
        store_f32(b, ctx, layout.lse, r, &l2);
        let per_row = b.i64((d / 8) as i64);
        let base = b.muli(r, &per_row);
        let mut delta = b.f32(0.0);
        for j in 0..d / 8 {
            let cj = b.i64(j as i64);
            let index = b.addi(&base, &cj);
            let x = load_f32(b, ctx, layout.partials, &index);
            delta = b.bin("addf", &delta, &x, F32);
        }
        store_f32(b, ctx, layout.delta, r, &delta);
        vec![]
    });
}

/// What the gradients of a group of score elements need: `n` (1 or 2) consecutive keys
/// from `k` of query `q`, their raw scores `Q K^T` and `dP`, and the query row's base-2
/// log-sum-exp and `delta` (per element).
struct Group {
    q: Val,
    k: Val,
    raw: Vec<Val>,
    dp: Vec<Val>,
    lse2: Vec<Val>,
    delta: Vec<Val>,
}

/// What the mask and score expressions read besides the positions.
struct Scope<'a> {
    kernel: &'a AttentionKernel,
    isa: Lowering,
    h: Val,
    batch: Val,
    t: Val,
    sides: &'a [(String, Val)],
    narrow: bool,
}

impl Scope<'_> {
    fn env(&self, group: &Group, score: Option<Val>) -> VecEnv<'_> {
        VecEnv {
            n: group.raw.len(),
            q: group.q.clone(),
            k0: group.k.clone(),
            h: self.h.clone(),
            b: self.batch.clone(),
            score,
            sides: self.sides,
            narrow: self.narrow,
            keys: None,
        }
    }

    /// `P` and `dS` (scaled, ready for `dQ += dS K` and `dK += dS^T Q`) of every element of
    /// `groups`, flat in their order; the mask evaluated where `needs_mask`.
    fn gradients(
        &self,
        b: &mut Builder,
        groups: &[Group],
        needs_mask: &Val,
    ) -> (Vec<Val>, Vec<Val>) {
        let kernel = self.kernel;
        let log2e = std::f64::consts::LOG2_E;
        let mut p = Vec::new();
        let mut slopes = Vec::new();
        for group in groups {
            let n = group.raw.len();
            match &kernel.score {
                None => {
                    let scale = b.f32((kernel.scale * log2e) as f32);
                    for (raw, lse2) in group.raw.iter().zip(&group.lse2) {
                        let neg = b.op(format!("arith.negf {lse2} : f32"));
                        let x = b.fma(raw, &scale, &neg, F32);
                        p.push(self.isa.exp2(b, &x));
                    }
                }
                Some(expr) => {
                    let derivative = expr.score_derivative().expect("checked by GradTiles::of");
                    let scale = b.f32(kernel.scale as f32);
                    let scaled: Vec<String> = group
                        .raw
                        .iter()
                        .map(|x| b.bin("mulf", x, &scale, F32).to_string())
                        .collect();
                    let vt = format!("vector<{n}xf32>");
                    let scores = b.op(format!("vector.from_elements {} : {vt}", scaled.join(", ")));
                    let env = self.env(group, Some(scores));
                    let z = vexpr::score(b, expr, &env);
                    let slope = vexpr::score(b, &derivative, &env);
                    let log2e = b.f32(log2e as f32);
                    for (lane, lse2) in group.lse2.iter().enumerate() {
                        let zl = b.op(format!("vector.extract {z}[{lane}] : f32 from {vt}"));
                        let neg = b.op(format!("arith.negf {lse2} : f32"));
                        let x = b.fma(&zl, &log2e, &neg, F32);
                        p.push(self.isa.exp2(b, &x));
                        slopes
                            .push(b.op(format!("vector.extract {slope}[{lane}] : f32 from {vt}")));
                    }
                }
            }
        }
        let types = vec![F32.to_string(); p.len()];
        let p = b.if_else(
            needs_mask,
            &types,
            |b| {
                let zero = b.f32(0.0);
                let mut out = Vec::new();
                for group in groups {
                    let n = group.raw.len();
                    let env = self.env(group, None);
                    let seen = vexpr::mask(b, &kernel.mask, &env);
                    let below = env.keys_below(b, &self.t);
                    let seen = b.bin("andi", &seen, &below, &format!("vector<{n}xi1>"));
                    for lane in 0..n {
                        let ok = b.op(format!(
                            "vector.extract {seen}[{lane}] : i1 from vector<{n}xi1>"
                        ));
                        out.push(b.select(&ok, &p[out.len()], &zero, F32));
                    }
                }
                out
            },
            |_| p.clone(),
        );
        let scale = b.f32(kernel.scale as f32);
        let mut ds = Vec::new();
        let mut at = 0;
        for group in groups {
            for (dp, delta) in group.dp.iter().zip(&group.delta) {
                let centered = b.bin("subf", dp, delta, F32);
                let dz = b.bin("mulf", &p[at], &centered, F32);
                let dz = match slopes.get(at) {
                    Some(slope) => b.bin("mulf", &dz, slope, F32),
                    None => dz,
                };
                ds.push(b.bin("mulf", &dz, &scale, F32));
                at += 1;
            }
        }
        (p, ds)
    }
}

/// Per 16 columns `j`, the A fragment (four words) of a thread's values of a 16-row block
/// held as accumulator tiles of 8 columns: element (`n`, `r`, `lane`) of `flat` is column
/// `8 n + 2 c + lane` of row `g + 8 r`, at `(n * 2 + r) * 2 + lane`.
fn a_fragments(
    b: &mut Builder,
    isa: Lowering,
    half: Half,
    flat: &[Val],
    columns: usize,
) -> Vec<Vec<Val>> {
    let at = |n: usize, r: usize, lane: usize| (n * 2 + r) * 2 + lane;
    (0..columns / 16)
        .map(|j| {
            [(2 * j, 0), (2 * j, 1), (2 * j + 1, 0), (2 * j + 1, 1)]
                .into_iter()
                .map(|(n, r)| isa.pack(b, half, &flat[at(n, r, 0)], &flat[at(n, r, 1)]))
                .collect()
        })
        .collect()
}

/// `acc += A B` for a warp's 16 rows: A as [`a_fragments`] over rows of the padded tile at
/// byte `b_at` (from row `first`), B those rows read transposed by `ldmatrix.trans`, head
/// dims `col0 + 16 np` for `np` below `pairs`; `acc` holds their accumulator tiles, four
/// values per 8 head dims.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    b: &mut Builder,
    ctx: &Ctx,
    half: Half,
    (frag_row, frag_col): (&Val, &Val),
    a: &[Vec<Val>],
    (b_at, first): (&Val, usize),
    (pairs, col0): (usize, &Val),
    acc: &mut [Val],
) {
    for (j, fragment) in a.iter().enumerate() {
        let row = b.i64((first + j * 16) as i64);
        let row = b.addi(&row, frag_row);
        for np in 0..pairs {
            let col = b.i64((np * 16) as i64);
            let col = b.addi(&col, col0);
            let col = b.addi(&col, frag_col);
            let at = ctx.shared_at(b, &row, &col, b_at);
            let r = ctx.isa.ldmatrix(b, &at, 4, true);
            for (half_tile, bf) in [[&r[0], &r[1]], [&r[2], &r[3]]].into_iter().enumerate() {
                let at = (2 * np + half_tile) * 4;
                let out = ctx.isa.mma(b, half, fragment, bf, &acc[at..at + 4]);
                acc[at..at + 4].clone_from_slice(&out);
            }
        }
    }
}

/// What both kernels set up: the block's view, lane roles, side inputs.
struct Common {
    ctx: Ctx,
    /// Whether the schedule has rows per batch row (dims[2]).
    per_batch: Val,
    /// `heads`, the heads per KV head, `kv_heads`, `D` and `T D` as i64 values.
    ch: Val,
    group: Val,
    ckv: Val,
    cd: Val,
    td: Val,
    warp_first: Val,
    /// The part of the head dims the warp accumulates (0 but in a dK/dV kernel beyond head
    /// dim 128).
    part: Val,
    g: Val,
    two_c: Val,
    frag_row: Val,
    frag_col: Val,
    lrow: Val,
    lmat: Val,
    narrow: bool,
}

fn common(
    b: &mut Builder,
    kernel: &AttentionKernel,
    tiles: GradTiles,
    which: GradKernel,
    isa: Lowering,
) -> Common {
    let tid = Val("%tid".into());
    let dims = Val("%dims".into());
    let smem = b.op("llvm.ptrtoint %smem : !llvm.ptr<3> to i32");
    let t = b.i64_at(&dims, 1);
    let (c2, c4, c8) = (b.i64(2), b.i64(4), b.i64(8));
    let c32 = b.i64(32);
    let c16 = b.i64(16);
    let warp = b.divi(&tid, &c32);
    let lane = b.remi(&tid, &c32);
    let g = b.divi(&lane, &c4);
    let c = b.remi(&lane, &c4);
    let two_c = b.muli(&c, &c2);
    // Beyond head dim 128 two warps of the dK/dV kernel share each 16 keys.
    let row_warps = b.i64((tiles.warps(which) / tiles.parts(which)) as i64);
    let part = b.divi(&warp, &row_warps);
    let row_warp = b.remi(&warp, &row_warps);
    let warp_first = b.muli(&row_warp, &c16);
    let ctx = Ctx {
        isa,
        tiles: tiles.mma_tiles(which),
        tid,
        lane,
        t,
        smem,
    };
    let (lrow, lmat) = ctx.lane_split(b);
    let half_row = b.remi(&lmat, &c2);
    let half_row = b.muli(&half_row, &c8);
    let frag_row = b.addi(&lrow, &half_row);
    let frag_col = b.divi(&lmat, &c2);
    let frag_col = b.muli(&frag_col, &c8);
    let heads = kernel.heads as i64;
    let narrow = vexpr::fits_in_32_bits(&kernel.mask, heads)
        && kernel
            .score
            .as_ref()
            .is_none_or(|s| vexpr::fits_in_32_bits(s, heads));
    let per_batch = b.i64_at(&dims, 2);
    let ch = b.i64(kernel.heads as i64);
    let group = b.i64((kernel.heads / kernel.kv_heads.max(1)).max(1) as i64);
    let ckv = b.i64(kernel.kv_heads as i64);
    let cd = b.i64(tiles.head_dim as i64);
    let td = b.muli(&ctx.t, &cd);
    Common {
        ctx,
        per_batch,
        ch,
        group,
        ckv,
        cd,
        td,
        warp_first,
        part,
        g,
        two_c,
        frag_row,
        frag_col,
        lrow,
        lmat,
        narrow,
    }
}

/// Entry `index` of a schedule's tiles: the tile, and whether it is partial (its mask must be
/// evaluated).
fn schedule_entry(b: &mut Builder, tiles: &Val, index: &Val) -> (Val, Val) {
    let (c0, c1) = (b.i64(0), b.i64(1));
    let entry = b.load(tiles, index, I64, I64);
    let tile = b.op(format!("arith.shrsi {entry}, {c1} : i64"));
    let partial = b.bin("andi", &entry, &c1, I64);
    (tile, b.cmpi("ne", &partial, &c0, I64))
}

/// Each side input's row `batch`, from buffer 10 on.
fn side_rows(
    b: &mut Builder,
    kernel: &AttentionKernel,
    batch: &Val,
    t: &Val,
) -> Vec<(String, Val)> {
    let bufs = Val("%bufs".into());
    kernel
        .sides
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let p = b.ptr_at(&bufs, 10 + i);
            let at = b.muli(batch, t);
            (name.clone(), b.gep(&p, &at, I64))
        })
        .collect()
}

/// The first element of row `pos` of head `h` of the attention's output (`o`, `dO`):
/// `[B, T, heads * D]` when the kernel merges heads, else `[B, heads, T, D]`.
fn output_row(
    b: &mut Builder,
    kernel: &AttentionKernel,
    (batch, h, t): (&Val, &Val, &Val),
    pos: &Val,
) -> Val {
    let ch = b.i64(kernel.heads as i64);
    let cd = b.i64(kernel.head_dim as i64);
    let at = if kernel.merge_heads {
        let at = b.muli(batch, t);
        let at = b.addi(&at, pos);
        let at = b.muli(&at, &ch);
        b.addi(&at, h)
    } else {
        let at = b.muli(batch, &ch);
        let at = b.addi(&at, h);
        let at = b.muli(&at, t);
        b.addi(&at, pos)
    };
    b.muli(&at, &cd)
}

/// The kernel's MLIR function `@name(buffers, dims, x, y, thread, shared memory)`.
pub fn attention_mma_grad(
    name: &str,
    kernel: &AttentionKernel,
    half: Half,
    tiles: GradTiles,
    which: GradKernel,
    isa: Lowering,
) -> String {
    match which {
        GradKernel::Dq => dq(name, kernel, half, tiles, isa),
        GradKernel::Dkv => dkv(name, kernel, half, tiles, isa),
    }
}

/// `dQ`. Buffers: q, k, v (16-bit), keys again (unused: the f32 kernel's keys in value
/// panels), o, do, lse, dq (`[B, H, T, D]`), the schedule's rows and tiles, the side inputs.
fn dq(name: &str, kernel: &AttentionKernel, half: Half, tiles: GradTiles, isa: Lowering) -> String {
    let mut builder = Builder::new();
    let b = &mut builder;
    let (d, bq, bk) = (tiles.head_dim, tiles.block_q, tiles.block_k);
    let layout = tiles.layout(GradKernel::Dq);
    let cm = common(b, kernel, tiles, GradKernel::Dq, isa);
    let ctx = &cm.ctx;
    let t = ctx.t.clone();
    let bufs = Val("%bufs".into());
    let qt = Val("%qt".into());
    let bh = Val("%bh".into());
    let [q, k, v, _, o, d_o, lse, dq_out, sched_rows, sched_tiles] =
        std::array::from_fn(|i| b.ptr_at(&bufs, i));
    let Common {
        per_batch,
        ch,
        group,
        ckv,
        cd,
        td,
        ..
    } = &cm;
    let (c0, c1) = (b.i64(0), b.i64(1));
    let batch = b.divi(&bh, ch);
    let h = b.remi(&bh, ch);
    let kvh = b.divi(&h, group);
    let sides = side_rows(b, kernel, &batch, &t);
    let q_head = b.muli(&batch, ch);
    let q_head = b.addi(&q_head, &h);
    let q_base = b.muli(&q_head, td);
    let kv_head = b.muli(&batch, ckv);
    let kv_head = b.addi(&kv_head, &kvh);
    let kv_base = b.muli(&kv_head, td);
    let cbq = b.i64(bq as i64);
    let cbk = b.i64(bk as i64);
    let q0 = b.muli(&qt, &cbq);
    let n_qt = b.ceil_div(&t, &cbq);
    let row_offsets = ScheduleRows {
        kernel,
        rows: &sched_rows,
        batch: &batch,
        per_batch,
        tiles: &n_qt,
        head: (&h, ch),
    };
    let (start, end) = schedule_range(b, &row_offsets, &qt, &c1);
    let any = b.cmpi("slt", &start, &end, I64);
    let tile_at = |b: &mut Builder, index: &Val| schedule_entry(b, &sched_tiles, index).0;
    let k_at = b.i64(layout.k as i64);
    let v_at = b.i64(layout.v as i64);
    let q_at = b.i64(layout.q as i64);
    let do_at = b.i64(layout.d_o as i64);
    // The first K tile's copy overlaps the rounding of Q and dO.
    b.if_then(&any, |b| {
        let kt = tile_at(b, &start);
        ctx.load_tile(b, &k, &kv_base, &kt, &k_at, false);
        isa.commit(b);
    });
    let q_row = |b: &mut Builder, pos: &Val| {
        let at = b.muli(pos, cd);
        b.addi(&q_base, &at)
    };
    let o_row = |b: &mut Builder, pos: &Val| output_row(b, kernel, (&batch, &h, &t), pos);
    let lse_at = |b: &mut Builder, pos: &Val| {
        let at = b.muli(&q_head, &t);
        b.addi(&at, pos)
    };
    round_rows(b, ctx, half, &q, &q_row, (&q0, bq), layout.q, None);
    round_rows(
        b,
        ctx,
        half,
        &d_o,
        &o_row,
        (&q0, bq),
        layout.d_o,
        Some((&o, layout.partials)),
    );
    isa.barrier(b);
    row_statistics(b, ctx, &layout, &lse, &lse_at, (&q0, bq));
    isa.barrier(b);
    // This thread's rows (g and g + 8 of its warp's 16): positions and statistics.
    let c8 = b.i64(8);
    let local0 = b.addi(&cm.warp_first, &cm.g);
    let local1 = b.addi(&local0, &c8);
    let locals = [local0, local1];
    let rows: Vec<Val> = locals.iter().map(|l| b.addi(&q0, l)).collect();
    let lse2: Vec<Val> = locals
        .iter()
        .map(|l| load_f32(b, ctx, layout.lse, l))
        .collect();
    let deltas: Vec<Val> = locals
        .iter()
        .map(|l| load_f32(b, ctx, layout.delta, l))
        .collect();
    let scope = Scope {
        kernel,
        isa,
        h: h.clone(),
        batch: batch.clone(),
        t: t.clone(),
        sides: &sides,
        narrow: cm.narrow,
    };
    let zero = b.f32(0.0);
    let n_o = d / 8 * 4;
    let carried: Vec<(Val, String)> = (0..n_o).map(|_| (zero.clone(), F32.to_string())).collect();
    let acc = b.for_range(&start, &end, &c1, &carried, |b, i, acc| {
        let (kt, partial) = schedule_entry(b, &sched_tiles, i);
        let k0 = b.muli(&kt, &cbk);
        let k_end = b.addi(&k0, &cbk);
        let tail = b.cmpi("sgt", &k_end, &t, I64);
        let needs_mask = b.bin("ori", &partial, &tail, "i1");
        isa.wait_copies(b);
        isa.barrier(b);
        ctx.load_tile(b, &v, &kv_base, &kt, &v_at, false);
        isa.commit(b);
        let views = (&cm.warp_first, &cm.frag_row, &cm.frag_col);
        let lanes = (&cm.lrow, &cm.lmat);
        let s = sync_scores(b, ctx, half, views, lanes, &q_at, (&k_at, bk));
        isa.wait_copies(b);
        isa.barrier(b);
        let dp = sync_scores(b, ctx, half, views, lanes, &do_at, (&v_at, bk));
        let mut groups = Vec::new();
        for n in 0..bk / 8 {
            let key = b.i64((n * 8) as i64);
            let key = b.addi(&k0, &key);
            let key = b.addi(&key, &cm.two_c);
            for r in 0..2 {
                groups.push(Group {
                    q: rows[r].clone(),
                    k: key.clone(),
                    raw: s[0][n][2 * r..2 * r + 2].to_vec(),
                    dp: dp[0][n][2 * r..2 * r + 2].to_vec(),
                    lse2: vec![lse2[r].clone(); 2],
                    delta: vec![deltas[r].clone(); 2],
                });
            }
        }
        let (_, ds) = scope.gradients(b, &groups, &needs_mask);
        let frags = a_fragments(b, isa, half, &ds, bk);
        let mut acc = acc.to_vec();
        accumulate(
            b,
            ctx,
            half,
            (&cm.frag_row, &cm.frag_col),
            &frags,
            (&k_at, 0),
            (d / 16, &c0),
            &mut acc,
        );
        // Every warp is done with this K and V tile: the next K tile's copy.
        isa.barrier(b);
        let following = b.addi(i, &c1);
        let more = b.cmpi("slt", &following, &end, I64);
        b.if_then(&more, |b| {
            let kt = tile_at(b, &following);
            ctx.load_tile(b, &k, &kv_base, &kt, &k_at, false);
            isa.commit(b);
        });
        acc
    });
    for (r, row) in rows.iter().enumerate() {
        let inside = b.cmpi("slt", row, &t, I64);
        b.if_then(&inside, |b| {
            let at = q_row(b, row);
            let at = b.addi(&at, &cm.two_c);
            for n in 0..d / 8 {
                let off = b.i64((n * 8) as i64);
                let at = b.addi(&at, &off);
                b.store(&acc[n * 4 + 2 * r], &dq_out, &at, F32, F32);
                let next = b.addi(&at, &c1);
                b.store(&acc[n * 4 + 2 * r + 1], &dq_out, &next, F32, F32);
            }
        });
    }
    block_function(builder, name, "qt", "bh")
}

/// `dK` and `dV`. Buffers: q, k, v (16-bit), o, do, lse, dk, dv (`[B, KV, T, D]` each), the
/// schedule's column rows and column tiles (per key tile, the query tiles that visit it),
/// the side inputs.
fn dkv(
    name: &str,
    kernel: &AttentionKernel,
    half: Half,
    tiles: GradTiles,
    isa: Lowering,
) -> String {
    let mut builder = Builder::new();
    let b = &mut builder;
    let (d, bq, bk) = (tiles.head_dim, tiles.block_q, tiles.block_k);
    let chunk = tiles.chunk();
    let layout = tiles.layout(GradKernel::Dkv);
    let cm = common(b, kernel, tiles, GradKernel::Dkv, isa);
    let ctx = &cm.ctx;
    let t = ctx.t.clone();
    let bufs = Val("%bufs".into());
    let kt = Val("%kt".into());
    let bkv = Val("%bkv".into());
    let [q, k, v, o, d_o, lse, dk_out, dv_out, col_rows, col_tiles] =
        std::array::from_fn(|i| b.ptr_at(&bufs, i));
    let Common {
        per_batch,
        ch,
        group,
        ckv,
        cd,
        td,
        ..
    } = &cm;
    let c1 = b.i64(1);
    let batch = b.divi(&bkv, ckv);
    let kvh = b.remi(&bkv, ckv);
    let sides = side_rows(b, kernel, &batch, &t);
    let kv_base = b.muli(&bkv, td);
    let cbq = b.i64(bq as i64);
    let cbk = b.i64(bk as i64);
    let k0 = b.muli(&kt, &cbk);
    let k_end = b.addi(&k0, &cbk);
    let tail = b.cmpi("sgt", &k_end, &t, I64);
    let n_kt = b.ceil_div(&t, &cbk);
    let k_at = b.i64(layout.k as i64);
    let v_at = b.i64(layout.v as i64);
    ctx.load_tile(b, &k, &kv_base, &kt, &k_at, false);
    ctx.load_tile(b, &v, &kv_base, &kt, &v_at, false);
    isa.commit(b);
    // This thread's keys (g and g + 8 of its warp's 16).
    let c8 = b.i64(8);
    let key0 = b.addi(&k0, &cm.warp_first);
    let key0 = b.addi(&key0, &cm.g);
    let key1 = b.addi(&key0, &c8);
    let keys = [key0, key1];
    // The head dims whose dK and dV this warp accumulates: `col0..col0 + dims`.
    let dims_per_part = d / tiles.dim_parts();
    let c_dims = b.i64(dims_per_part as i64);
    let col0 = b.muli(&cm.part, &c_dims);
    let zero = b.f32(0.0);
    let n_o = dims_per_part / 8 * 4;
    let carried: Vec<(Val, String)> = (0..2 * n_o)
        .map(|_| (zero.clone(), F32.to_string()))
        .collect();
    let h0 = b.muli(&kvh, group);
    let h1 = b.addi(&h0, group);
    let acc = b.for_range(&h0, &h1, &c1, &carried, |b, h, acc| {
        let columns = ScheduleRows {
            kernel,
            rows: &col_rows,
            batch: &batch,
            per_batch,
            tiles: &n_kt,
            head: (h, ch),
        };
        let (start, end) = schedule_range(b, &columns, &kt, &c1);
        let q_head = b.muli(&batch, ch);
        let q_head = b.addi(&q_head, h);
        let q_base = b.muli(&q_head, td);
        let scope = Scope {
            kernel,
            isa,
            h: h.clone(),
            batch: batch.clone(),
            t: t.clone(),
            sides: &sides,
            narrow: cm.narrow,
        };
        let carried: Vec<(Val, String)> =
            acc.iter().map(|x| (x.clone(), F32.to_string())).collect();
        b.for_range(&start, &end, &c1, &carried, |b, e, acc| {
            let (qt, partial) = schedule_entry(b, &col_tiles, e);
            let needs_mask = b.bin("ori", &partial, &tail, "i1");
            let q0 = b.muli(&qt, &cbq);
            let q_row = |b: &mut Builder, pos: &Val| {
                let at = b.muli(pos, cd);
                b.addi(&q_base, &at)
            };
            let o_row = |b: &mut Builder, pos: &Val| output_row(b, kernel, (&batch, h, &t), pos);
            let lse_at = |b: &mut Builder, pos: &Val| {
                let at = b.muli(&q_head, &t);
                b.addi(&at, pos)
            };
            // The K and V tiles have landed (the first time), and every warp is done with
            // the previous query tile.
            isa.wait_copies(b);
            isa.barrier(b);
            round_rows(b, ctx, half, &q, &q_row, (&q0, bq), layout.q, None);
            round_rows(
                b,
                ctx,
                half,
                &d_o,
                &o_row,
                (&q0, bq),
                layout.d_o,
                Some((&o, layout.partials)),
            );
            isa.barrier(b);
            row_statistics(b, ctx, &layout, &lse, &lse_at, (&q0, bq));
            isa.barrier(b);
            let (dk, dv) = acc.split_at(n_o);
            let (mut dk, mut dv) = (dk.to_vec(), dv.to_vec());
            let views = (&cm.warp_first, &cm.frag_row, &cm.frag_col);
            let lanes = (&cm.lrow, &cm.lmat);
            for part in 0..bq / chunk {
                let first = part * chunk;
                let row_bytes = tiles.row_bytes();
                let q_part = b.i64((layout.q + first * row_bytes) as i64);
                let do_part = b.i64((layout.d_o + first * row_bytes) as i64);
                let st = sync_scores(b, ctx, half, views, lanes, &k_at, (&q_part, chunk));
                let dpt = sync_scores(b, ctx, half, views, lanes, &v_at, (&do_part, chunk));
                let mut groups = Vec::new();
                for n in 0..chunk / 8 {
                    for (r, key) in keys.iter().enumerate() {
                        for lane in 0..2 {
                            let local = b.i64((first + n * 8 + lane) as i64);
                            let local = b.addi(&local, &cm.two_c);
                            let pos = b.addi(&q0, &local);
                            groups.push(Group {
                                q: pos,
                                k: key.clone(),
                                raw: vec![st[0][n][2 * r + lane].clone()],
                                dp: vec![dpt[0][n][2 * r + lane].clone()],
                                lse2: vec![load_f32(b, ctx, layout.lse, &local)],
                                delta: vec![load_f32(b, ctx, layout.delta, &local)],
                            });
                        }
                    }
                }
                let (p, ds) = scope.gradients(b, &groups, &needs_mask);
                let p_frags = a_fragments(b, isa, half, &p, chunk);
                let ds_frags = a_fragments(b, isa, half, &ds, chunk);
                let frag = (&cm.frag_row, &cm.frag_col);
                let do_at = b.i64(layout.d_o as i64);
                let q_at = b.i64(layout.q as i64);
                let columns = (dims_per_part / 16, &col0);
                accumulate(
                    b,
                    ctx,
                    half,
                    frag,
                    &p_frags,
                    (&do_at, first),
                    columns,
                    &mut dv,
                );
                accumulate(
                    b,
                    ctx,
                    half,
                    frag,
                    &ds_frags,
                    (&q_at, first),
                    columns,
                    &mut dk,
                );
            }
            dk.extend(dv);
            dk
        })
    });
    let (dk, dv) = acc.split_at(n_o);
    for (r, key) in keys.iter().enumerate() {
        let inside = b.cmpi("slt", key, &t, I64);
        b.if_then(&inside, |b| {
            let at = b.muli(key, cd);
            let at = b.addi(&kv_base, &at);
            let at = b.addi(&at, &col0);
            let at = b.addi(&at, &cm.two_c);
            for (acc, out) in [(dk, &dk_out), (dv, &dv_out)] {
                for n in 0..dims_per_part / 8 {
                    let off = b.i64((n * 8) as i64);
                    let at = b.addi(&at, &off);
                    b.store(&acc[n * 4 + 2 * r], out, &at, F32, F32);
                    let next = b.addi(&at, &c1);
                    b.store(&acc[n * 4 + 2 * r + 1], out, &next, F32, F32);
                }
            }
        });
    }
    block_function(builder, name, "kt", "bkv")
}

/// The PTX entry of a backward kernel, in LLVM IR: `{name}_mma(buffers, dims)`. `dQ` takes
/// the query tiles last to first (the longest causal rows first), `dK`/`dV` the key tiles
/// first to last (the longest causal columns first).
pub fn entry_ir(name: &str, tiles: &GradTiles, which: GradKernel) -> String {
    super::block::entry_ir(name, which == GradKernel::Dq, tiles.threads(which))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_fit_every_target() {
        for d in (16..=MAX_HEAD_DIM).step_by(16) {
            // The forward's tiles, which the schedule has.
            let forward = MmaTiles::for_head_dim(d, 80).unwrap();
            let tiles = GradTiles {
                block_q: forward.block_q,
                block_k: forward.block_k,
                head_dim: d,
            };
            for which in [GradKernel::Dq, GradKernel::Dkv] {
                let layout = tiles.layout(which);
                assert!(layout.bytes <= MmaTiles::shared_limit(80), "{d} {which:?}");
                let (q, k) = (tiles.block_q * (d + 8) * 2, tiles.block_k * (d + 8) * 2);
                let mut tiles_at = [(layout.q, q), (layout.d_o, q), (layout.k, k), (layout.v, k)];
                tiles_at.sort_unstable();
                // The tiles follow each other without overlapping, then the statistics.
                let mut next = 0;
                for (at, bytes) in tiles_at {
                    assert_eq!(at, next, "{d} {which:?}");
                    next = at + bytes;
                }
                assert_eq!(layout.lse, next);
                assert_eq!(layout.partials + tiles.block_q * d / 8 * 4, layout.bytes);
                assert!(tiles.threads(which) <= 256);
            }
            assert!(tiles.block_q.is_multiple_of(tiles.chunk()));
            // Beyond head dim 128 two warps share each 16 keys of dK/dV.
            assert_eq!(
                tiles.warps(GradKernel::Dkv),
                tiles.block_k / 16 * if d > 128 { 2 } else { 1 }
            );
        }
        let at = |d| GradTiles {
            block_q: 128,
            block_k: 64,
            head_dim: d,
        };
        assert_eq!((at(64).chunk(), at(128).chunk()), (64, 32));
    }
}
