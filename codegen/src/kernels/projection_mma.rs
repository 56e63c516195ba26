//! The projections on tensor cores, for NVIDIA GPUs from sm_80 on: `linear` (RMSNorm before,
//! a residual after), `swiglu` (gate and up, `silu(g) * u`) and `heads_proj` (RMSNorm, and
//! RoPE on the head's columns, written as `[B, H, T, D]`), computing what the kernels of
//! [`super::gemm`] compute, from the same buffers: f32 activations and the f32 weights the
//! runtime packs in panels of 8 columns (`[panel][K][8]`, RMSNorm's gain folded in).
//!
//! One block of four warps per tile of `block_m` rows by `block_n` columns (for `heads_proj`,
//! one head's columns). For each slice of 32 along `K`, the threads read the slice of the
//! activations and of the weight panels from global memory, round them to bf16 or f16 and
//! store them in shared memory (the activations row-major, the weights `[k][n]`, rows padded
//! by 8 elements so that an `ldmatrix` touches distinct banks); each warp then runs
//! `mma.sync.m16n8k16` over its 16 or 32 rows and all the tile's columns, A fragments by
//! `ldmatrix`, B fragments by `ldmatrix.trans`, accumulating in f32. The slice after the
//! current one is read into registers while the current one is multiplied. RMSNorm's
//! `1 / rms` is computed per row from the f32 activations before the loop (four threads per
//! row, combined by shuffles) and scales the accumulators in the epilogue, where the residual
//! add, SwiGLU and RoPE happen in f32 before the store.
//!
//! Entry `{name}_mma(buffers, dims)`, grid (`ceil(B T / block_m)`, column tiles or heads),
//! 128 threads, [`ProjectionMma::shared_bytes`] of dynamic shared memory.

use super::KernelSpec;
use super::attention_mma::{Half, WARPS};
use super::block::{
    ChunkedTile, block_function, element_address, load8, pack8, sliced_product, store_chunk,
};
use super::gemm::HeadsEpilogue;
use super::warp::Lowering;
use crate::mlir::{Builder, F32, I64, Val, vf32};

/// Elements of `K` per slice.
const BLOCK_K: usize = 32;
/// Columns per weight panel (the GPU plan's packing).
pub const PANEL: usize = 8;

/// Which projection, with what the epilogue needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ProjectionKind {
    Linear {
        residual: bool,
    },
    SwiGlu,
    Heads {
        heads: usize,
        epilogue: HeadsEpilogue,
    },
}

/// A projection kernel on tensor cores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProjectionMma {
    pub kind: ProjectionKind,
    /// Input features.
    pub k: usize,
    /// Output features (per head for `Heads`).
    pub n: usize,
    pub norm_eps: Option<f64>,
}

impl ProjectionMma {
    /// The tensor-core version of a plan's kernel, where there is one: the projections
    /// (`heads_proj` when its head dim is a multiple of 16 and at most 256, so that RoPE's
    /// pairs of columns sit in the same thread). GPU plans pack f32 weights (`bf16: false`:
    /// bf16-packed weights are the CPU's).
    pub fn of(spec: &KernelSpec) -> Option<ProjectionMma> {
        match *spec {
            // A prefill's last positions: a few rows, not a tensor-core tile's worth.
            KernelSpec::Linear {
                last_rows: true, ..
            } => None,
            KernelSpec::Linear {
                k,
                n,
                norm_eps,
                residual,
                last_rows: false,
                bf16: false,
            } => Some(ProjectionMma {
                kind: ProjectionKind::Linear { residual },
                k,
                n,
                norm_eps,
            }),
            KernelSpec::SwiGlu {
                k,
                n,
                norm_eps,
                bf16: false,
            } => Some(ProjectionMma {
                kind: ProjectionKind::SwiGlu,
                k,
                n,
                norm_eps,
            }),
            KernelSpec::HeadsProj {
                k,
                heads,
                head_dim,
                norm_eps,
                epilogue,
                bf16: false,
            } if head_dim.is_multiple_of(16) && head_dim <= 256 => Some(ProjectionMma {
                kind: ProjectionKind::Heads { heads, epilogue },
                k,
                n: head_dim,
                norm_eps,
            }),
            _ => None,
        }
    }

    /// Weight buffers read per tile: gate and up for SwiGLU.
    fn weights(&self) -> usize {
        if self.kind == ProjectionKind::SwiGlu {
            2
        } else {
            1
        }
    }

    /// Columns per tile: a head's columns, else 64 (32 for SwiGLU's two accumulators), fewer
    /// when the output has fewer (a multiple of 16).
    pub fn block_n(&self) -> usize {
        match self.kind {
            ProjectionKind::Heads { .. } => self.n,
            ProjectionKind::SwiGlu => 32.min(self.n.next_multiple_of(16)),
            ProjectionKind::Linear { .. } => 64.min(self.n.next_multiple_of(16)),
        }
    }

    /// Row blocks of 16 per warp: two, unless a head's 256 columns would take the registers.
    pub fn row_blocks(&self) -> usize {
        if self.block_n() * self.weights() > 128 {
            1
        } else {
            2
        }
    }

    /// Rows per tile.
    pub fn block_m(&self) -> usize {
        WARPS * 16 * self.row_blocks()
    }

    /// The grid's second dimension: column tiles, or heads.
    pub fn column_blocks(&self) -> usize {
        match self.kind {
            ProjectionKind::Heads { heads, .. } => heads,
            _ => self.n.div_ceil(self.block_n()),
        }
    }

    fn x_row_bytes(&self) -> usize {
        (BLOCK_K + 8) * 2
    }

    fn w_row_bytes(&self) -> usize {
        (self.block_n() + 8) * 2
    }

    /// Byte offset of weight tile `i` in shared memory (the activations' tile is at 0).
    fn w_offset(&self, i: usize) -> usize {
        self.block_m() * self.x_row_bytes() + i * BLOCK_K * self.w_row_bytes()
    }

    /// Shared memory per block, in bytes.
    pub fn shared_bytes(&self) -> usize {
        self.w_offset(self.weights())
    }

    /// The 32-bit registers of accumulators a thread holds.
    pub fn accumulators(&self) -> usize {
        self.row_blocks() * self.block_n() / 8 * 4 * self.weights()
    }
}

/// The MLIR function of a tensor-core projection: `@name(buffers, dims, row tile, column
/// tile or head, thread, shared memory)`; the PTX entry is [`entry_ir`]'s.
pub fn projection_mma(name: &str, p: &ProjectionMma, half: Half, isa: Lowering) -> String {
    let mut builder = Builder::new();
    let b = &mut builder;
    let (mb, bn, bm) = (p.row_blocks(), p.block_n(), p.block_m());
    let n_tiles = bn / 8;
    let weights = p.weights();
    let bufs = Val("%bufs".into());
    let dims = Val("%dims".into());
    let bx = Val("%bx".into());
    let by = Val("%by".into());
    let tid = Val("%tid".into());
    let smem = b.op("llvm.ptrtoint %smem : !llvm.ptr<3> to i32");
    let (c0, c1, c2) = (b.i64(0), b.i64(1), b.i64(2));
    let (c4, c8) = (b.i64(4), b.i64(8));
    let x = b.ptr_at(&bufs, 0);
    let w: Vec<Val> = (0..weights).map(|i| b.ptr_at(&bufs, 1 + i)).collect();
    let mut next = 1 + weights;
    let mut operand = |b: &mut Builder| {
        let v = b.ptr_at(&bufs, next);
        next += 1;
        v
    };
    let residual = matches!(p.kind, ProjectionKind::Linear { residual: true }).then(|| operand(b));
    let epilogue = match p.kind {
        ProjectionKind::Heads { epilogue, .. } => epilogue,
        _ => HeadsEpilogue::default(),
    };
    let bias = epilogue.bias.then(|| operand(b));
    let qk_scales = epilogue.qk_norm.map(|_| operand(b));
    let rope = epilogue.rope.then(|| (operand(b), operand(b)));
    let out = operand(b);
    let batch = b.i64_at(&dims, 0);
    let t = b.i64_at(&dims, 1);
    let m = b.muli(&batch, &t);
    let last_row = b.subi(&m, &c1);
    let ck = b.i64(p.k as i64);
    let cn = b.i64(p.n as i64);
    let c32 = b.i64(32);
    let warp = b.divi(&tid, &c32);
    let lane = b.remi(&tid, &c32);
    let g = b.divi(&lane, &c4);
    let c = b.remi(&lane, &c4);
    let cbm = b.i64(bm as i64);
    let m0 = b.muli(&bx, &cbm);
    let warp_rows = b.i64((16 * mb) as i64);
    let warp_first = b.muli(&warp, &warp_rows);
    // The rows this thread's accumulators hold: g and g + 8 of each row block.
    let rows: Vec<Val> = (0..mb)
        .flat_map(|blk| [16 * blk, 16 * blk + 8])
        .map(|off| {
            let off = b.i64(off as i64);
            let r = b.addi(&warp_first, &off);
            let r = b.addi(&r, &g);
            b.addi(&m0, &r)
        })
        .collect();

    // 1 / rms(x[row]) for the thread's rows: the four threads of a row group take every
    // fourth group of four elements, then combine by shuffles.
    let zero = b.f32(0.0);
    let one = b.f32(1.0);
    let inverse: Vec<Val> = match p.norm_eps {
        None => rows.iter().map(|_| one.clone()).collect(),
        Some(eps) => rows
            .iter()
            .map(|row| {
                let row = b.mini(row, &last_row);
                let base = b.muli(&row, &ck);
                let sum = if p.k.is_multiple_of(4) {
                    let v4 = vf32(4);
                    let z4 = b.splat_f32(0.0, 4);
                    let start = b.muli(&c, &c4);
                    let step = b.i64(16);
                    let acc = b.for_range(&start, &ck, &step, &[(z4, v4.clone())], |b, kk, acc| {
                        let at = b.addi(&base, kk);
                        let ptr = b.gep(&x, &at, F32);
                        let v = b.op(format!(
                            "llvm.load {ptr} {{alignment = 16 : i64}} : !llvm.ptr -> {v4}"
                        ));
                        vec![b.fma(&v, &v, &acc[0], &v4)]
                    });
                    b.reduce("add", &acc[0], &v4, F32)
                } else {
                    let acc =
                        b.for_range(&c, &ck, &c4, &[(zero.clone(), F32.into())], |b, kk, acc| {
                            let at = b.addi(&base, kk);
                            let v = b.load(&x, &at, F32, F32);
                            vec![b.fma(&v, &v, &acc[0], F32)]
                        });
                    acc[0].clone()
                };
                let sum = row_sum(b, isa, sum);
                let n = b.f32(p.k as f32);
                b.inverse_rms(&sum, &n, eps)
            })
            .collect(),
    };

    // The first panel of the tile's columns, and the panels in all.
    let (panel0, panels) = match p.kind {
        ProjectionKind::Heads { heads, .. } => {
            let per_head = b.i64((p.n / PANEL) as i64);
            (b.muli(&by, &per_head), b.i64((heads * p.n / PANEL) as i64))
        }
        _ => {
            let per_tile = b.i64((bn / PANEL) as i64);
            (b.muli(&by, &per_tile), b.i64(p.n.div_ceil(PANEL) as i64))
        }
    };

    // The global reads of slice `kt`: per chunk of 8 elements, the 4 packed 16-bit pairs and
    // where they go in shared memory. The activations' chunks first, then each weight's.
    let x_tile = ChunkedTile {
        rows: bm,
        per_row: BLOCK_K / 8,
        threads: super::attention_mma::THREADS,
    };
    let w_tile = ChunkedTile {
        rows: BLOCK_K,
        per_row: bn / 8,
        threads: super::attention_mma::THREADS,
    };
    let chunk_slots: Vec<(usize, usize)> = (0..x_tile.slots())
        .map(|i| (usize::MAX, i))
        .chain((0..weights).flat_map(|wi| (0..w_tile.slots()).map(move |i| (wi, i))))
        .collect();
    let read_slice = |b: &mut Builder, kt: &Val| -> Vec<Val> {
        let cbk = b.i64(BLOCK_K as i64);
        let k0 = b.muli(kt, &cbk);
        let mut words = Vec::new();
        for &(wi, i) in &chunk_slots {
            let eight: Vec<Val> = if wi == usize::MAX {
                // Activations: a row of the tile, 8 columns.
                let (r, col) = x_tile.position(b, &tid, i);
                let row = b.addi(&m0, &r);
                let row = b.mini(&row, &last_row);
                let col = b.muli(&col, &c8);
                let kk = b.addi(&k0, &col);
                let base = b.muli(&row, &ck);
                if p.k.is_multiple_of(8) {
                    let inside = b.cmpi("slt", &kk, &ck, I64);
                    let kk = b.select(&inside, &kk, &c0, I64);
                    let at = b.addi(&base, &kk);
                    let values = load8(b, &x, &at, p.k.is_multiple_of(4));
                    values
                        .iter()
                        .map(|v| b.select(&inside, v, &zero, F32))
                        .collect()
                } else {
                    (0..8)
                        .map(|e| {
                            let ce = b.i64(e);
                            let ke = b.addi(&kk, &ce);
                            let inside = b.cmpi("slt", &ke, &ck, I64);
                            let ke = b.select(&inside, &ke, &c0, I64);
                            let at = b.addi(&base, &ke);
                            let v = b.load(&x, &at, F32, F32);
                            b.select(&inside, &v, &zero, F32)
                        })
                        .collect()
                }
            } else {
                // Weights: a row of the slice, one panel.
                let (kr, pj) = w_tile.position(b, &tid, i);
                let panel = b.addi(&panel0, &pj);
                let kk = b.addi(&k0, &kr);
                let in_k = b.cmpi("slt", &kk, &ck, I64);
                let in_n = b.cmpi("slt", &panel, &panels, I64);
                let inside = b.bin("andi", &in_k, &in_n, "i1");
                let kk = b.select(&inside, &kk, &c0, I64);
                let panel = b.select(&inside, &panel, &c0, I64);
                let at = b.muli(&panel, &ck);
                let at = b.addi(&at, &kk);
                let at = b.muli(&at, &c8);
                let values = load8(b, &w[wi], &at, true);
                values
                    .iter()
                    .map(|v| b.select(&inside, v, &zero, F32))
                    .collect()
            };
            words.extend(pack8(b, isa, half, &eight));
        }
        words
    };
    let store_slice = |b: &mut Builder, words: &[Val]| {
        for (s, &(wi, i)) in chunk_slots.iter().enumerate() {
            let (tile, row_bytes, offset) = if wi == usize::MAX {
                (x_tile, p.x_row_bytes(), 0)
            } else {
                (w_tile, p.w_row_bytes(), p.w_offset(wi))
            };
            let ws = &words[4 * s..4 * s + 4];
            store_chunk(b, isa, &smem, &tid, (tile, i), row_bytes, offset, ws);
        }
    };

    // The lanes' ldmatrix rows: lanes 8m..8m+8 give rows (m % 2) * 8.. and columns
    // (m / 2) * 8.. of a 16 x 16 fragment.
    let lrow = b.remi(&lane, &c8);
    let lmat = b.divi(&lane, &c8);
    let half_row = b.remi(&lmat, &c2);
    let half_row = b.muli(&half_row, &c8);
    let frag_row = b.addi(&lrow, &half_row);
    let frag_col = b.divi(&lmat, &c2);
    let frag_col = b.muli(&frag_col, &c8);
    let shared_at = |b: &mut Builder, row: &Val, col: &Val, row_bytes: usize, offset: usize| {
        element_address(b, &smem, (row, col), row_bytes, offset)
    };

    let slices = b.i64(p.k.div_ceil(BLOCK_K) as i64);
    let n_acc = mb * n_tiles * 4 * weights;
    let acc = sliced_product(
        b,
        isa,
        &slices,
        n_acc,
        read_slice,
        store_slice,
        |b, mut acc| {
            for step in 0..BLOCK_K / 16 {
                let a: Vec<Vec<Val>> = (0..mb)
                    .map(|blk| {
                        let off = b.i64((16 * blk) as i64);
                        let r = b.addi(&warp_first, &off);
                        let r = b.addi(&r, &frag_row);
                        let kc = b.i64((step * 16) as i64);
                        let col = b.addi(&kc, &frag_col);
                        let at = shared_at(b, &r, &col, p.x_row_bytes(), 0);
                        isa.ldmatrix(b, &at, 4, false)
                    })
                    .collect();
                for wi in 0..weights {
                    for np in 0..bn / 16 {
                        let kr = b.i64((step * 16) as i64);
                        let kr = b.addi(&kr, &frag_row);
                        let nc = b.i64((np * 16) as i64);
                        let col = b.addi(&nc, &frag_col);
                        let at = shared_at(b, &kr, &col, p.w_row_bytes(), p.w_offset(wi));
                        let r = isa.ldmatrix(b, &at, 4, true);
                        for (blk, a) in a.iter().enumerate() {
                            for (h, bf) in [[&r[0], &r[1]], [&r[2], &r[3]]].into_iter().enumerate()
                            {
                                let at = ((wi * mb + blk) * n_tiles + 2 * np + h) * 4;
                                let d = isa.mma(b, half, a, bf, &acc[at..at + 4]);
                                acc.splice(at..at + 4, d);
                            }
                        }
                    }
                }
            }
            acc
        },
    );
    let acc = &acc[..];

    // The epilogue: element (row block blk, row half r, n-tile j, element e) is
    // acc[((wi * mb + blk) * n_tiles + j) * 4 + 2 r + e] at row `rows[2 blk + r]`, column
    // j * 8 + 2 c + e of the tile.
    let at_acc = |wi: usize, blk: usize, j: usize, r: usize, e: usize| {
        acc[((wi * mb + blk) * n_tiles + j) * 4 + 2 * r + e].clone()
    };
    let two_c = b.muli(&c, &c2);
    let cbn = b.i64(bn as i64);
    let n0 = match p.kind {
        ProjectionKind::Heads { .. } => c0.clone(),
        _ => b.muli(&by, &cbn),
    };
    for blk in 0..mb {
        for r in 0..2 {
            let row = rows[2 * blk + r].clone();
            let scale = inverse[2 * blk + r].clone();
            // A head's values of this row, element (j, e) at `2 j + e`: scaled by the input's
            // norm, the bias added, QK-normalized. Every thread computes them (the
            // QK-norm's sum is shared by the shuffles of the row's four threads), live rows
            // or not.
            let head_vals: Vec<Val> = match p.kind {
                ProjectionKind::Heads { .. } => {
                    let d = p.n;
                    let cd = b.i64(d as i64);
                    let head_col0 = b.muli(&by, &cd);
                    // The column within the head of element (j, e).
                    let cols: Vec<Val> = (0..d / 4)
                        .map(|i| {
                            let off = b.i64(((i / 2) * 8 + i % 2) as i64);
                            b.addi(&off, &two_c)
                        })
                        .collect();
                    let mut vals = Vec::with_capacity(d / 4);
                    for (i, col) in cols.iter().enumerate() {
                        let v = at_acc(0, blk, i / 2, r, i % 2);
                        let mut v = b.bin("mulf", &v, &scale, F32);
                        if let Some(bias) = &bias {
                            let at = b.addi(&head_col0, col);
                            let bv = b.load(bias, &at, F32, F32);
                            v = b.bin("addf", &v, &bv, F32);
                        }
                        vals.push(v);
                    }
                    if let (Some(eps), Some(g)) = (epilogue.qk_norm, &qk_scales) {
                        let mut sum = zero.clone();
                        for v in &vals {
                            sum = b.fma(v, v, &sum, F32);
                        }
                        let sum = row_sum(b, isa, sum);
                        let n = b.f32(d as f32);
                        let rstd = b.inverse_rms(&sum, &n, eps);
                        for (v, col) in vals.iter_mut().zip(&cols) {
                            let gv = b.load(g, col, F32, F32);
                            let scaled = b.bin("mulf", v, &rstd, F32);
                            *v = b.bin("mulf", &scaled, &gv, F32);
                        }
                    }
                    vals
                }
                _ => Vec::new(),
            };
            let live = b.cmpi("slt", &row, &m, I64);
            b.if_then(&live, |b| match p.kind {
                ProjectionKind::Linear { .. } | ProjectionKind::SwiGlu => {
                    let row_base = b.muli(&row, &cn);
                    for j in 0..n_tiles {
                        for e in 0..2 {
                            let off = b.i64((j * 8 + e) as i64);
                            let col = b.addi(&n0, &off);
                            let col = b.addi(&col, &two_c);
                            let inside = b.cmpi("slt", &col, &cn, I64);
                            let v0 = at_acc(0, blk, j, r, e);
                            let v1 = (weights == 2).then(|| at_acc(1, blk, j, r, e));
                            let (scale, residual, out) = (&scale, &residual, &out);
                            b.if_then(&inside, |b| {
                                let at = b.addi(&row_base, &col);
                                let mut v = b.bin("mulf", &v0, scale, F32);
                                if let Some(up) = &v1 {
                                    // silu(g) * u = g / (1 + exp(-g)) * u
                                    let u = b.bin("mulf", up, scale, F32);
                                    let neg = b.op(format!("arith.negf {v} : f32"));
                                    let ex = b.op(format!("math.exp {neg} : f32"));
                                    let one = b.f32(1.0);
                                    let d = b.bin("addf", &ex, &one, F32);
                                    let silu = b.bin("divf", &v, &d, F32);
                                    v = b.bin("mulf", &silu, &u, F32);
                                }
                                if let Some(res) = residual {
                                    let rv = b.load(res, &at, F32, F32);
                                    v = b.bin("addf", &v, &rv, F32);
                                }
                                b.store(&v, out, &at, F32, F32);
                            });
                        }
                    }
                }
                ProjectionKind::Heads { heads, .. } => {
                    let d = p.n;
                    let bi = b.divi(&row, &t);
                    let ti = b.remi(&row, &t);
                    let ch = b.i64(heads as i64);
                    let dst = b.muli(&bi, &ch);
                    let dst = b.addi(&dst, &by);
                    let dst = b.muli(&dst, &t);
                    let dst = b.addi(&dst, &ti);
                    let cd = b.i64(d as i64);
                    let dst = b.muli(&dst, &cd);
                    let dst = b.addi(&dst, &two_c);
                    match &rope {
                        Some((cos, sin)) => {
                            let halfd = b.i64((d / 2) as i64);
                            let trow = b.muli(&ti, &halfd);
                            let trow = b.addi(&trow, &two_c);
                            for j in 0..d / 16 {
                                for e in 0..2 {
                                    let off = b.i64((j * 8 + e) as i64);
                                    let x1 = &head_vals[2 * j + e];
                                    let x2 = &head_vals[2 * (j + d / 16) + e];
                                    let tat = b.addi(&trow, &off);
                                    let cs = b.load(cos, &tat, F32, F32);
                                    let sn = b.load(sin, &tat, F32, F32);
                                    let a = b.bin("mulf", x1, &cs, F32);
                                    let bb = b.bin("mulf", x2, &sn, F32);
                                    let o1 = b.bin("subf", &a, &bb, F32);
                                    let cc = b.bin("mulf", x2, &cs, F32);
                                    let dd = b.bin("mulf", x1, &sn, F32);
                                    let o2 = b.bin("addf", &cc, &dd, F32);
                                    let d1 = b.addi(&dst, &off);
                                    let d2 = b.addi(&d1, &halfd);
                                    b.store(&o1, &out, &d1, F32, F32);
                                    b.store(&o2, &out, &d2, F32, F32);
                                }
                            }
                        }
                        None => {
                            for j in 0..d / 8 {
                                for e in 0..2 {
                                    let off = b.i64((j * 8 + e) as i64);
                                    let at = b.addi(&dst, &off);
                                    b.store(&head_vals[2 * j + e], &out, &at, F32, F32);
                                }
                            }
                        }
                    }
                }
            });
        }
    }
    block_function(builder, name, "bx", "by")
}

/// The sum of `v` over the four threads of a row group (lanes `4 g` to `4 g + 3`), which
/// hold the columns of the same rows between them.
fn row_sum(b: &mut Builder, isa: Lowering, mut v: Val) -> Val {
    for bit in [1, 2] {
        let other = isa.shuffle_xor(b, &v, bit);
        v = b.bin("addf", &v, &other, F32);
    }
    v
}

/// The PTX entry of a tensor-core projection, in LLVM IR: `{name}_mma(buffers, dims)` on a
/// grid of (row tiles, column tiles or heads) blocks of 128 threads.
pub fn entry_ir(name: &str) -> String {
    super::block::entry_ir(name, false, super::attention_mma::THREADS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_the_registers_and_shared_memory() {
        for kind in [
            ProjectionKind::Linear { residual: true },
            ProjectionKind::SwiGlu,
            ProjectionKind::Heads {
                heads: 4,
                epilogue: HeadsEpilogue {
                    bias: true,
                    qk_norm: Some(1e-6),
                    rope: true,
                },
            },
        ] {
            for n in [16, 48, 64, 128, 176, 256, 4096] {
                if matches!(kind, ProjectionKind::Heads { .. }) && n > 256 {
                    continue;
                }
                let p = ProjectionMma {
                    kind,
                    k: 4096,
                    n,
                    norm_eps: Some(1e-5),
                };
                assert!(p.accumulators() <= 128, "{p:?}");
                assert!(p.shared_bytes() <= 48 * 1024, "{p:?}");
                assert!(p.block_n().is_multiple_of(16), "{p:?}");
                assert!(p.column_blocks() * p.block_n() >= n || p.column_blocks() == 4);
            }
        }
    }
}
