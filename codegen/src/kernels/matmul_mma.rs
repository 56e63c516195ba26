//! The batched product of two activations on tensor cores, `C[b] = A[b] B[b]`: what the
//! training step's backward is made of (`dx = dy w`, `dw = x^T dy`), computing what
//! [`super::matmul`] computes from the same buffers (f32, either operand read through a
//! transpose, either shared by the batch).
//!
//! One block of four warps per tile of 128 rows by 64 columns of one batch entry. For each
//! slice of 32 along `K`, the threads read the slices of `A` and `B` along their contiguous
//! dimension (so a transposed operand is read as fast as the other), round them to 16 bits
//! into shared memory in that layout, and each warp runs `mma.sync` over its 32 rows: A
//! fragments by `ldmatrix` from `[m][k]` or `ldmatrix.trans` from `[k][m]`, B fragments by
//! `ldmatrix.trans` from `[k][n]` or `ldmatrix` from `[n][k]`. Sizes are resolved from the
//! dims at run time, so `K = T` (a weight's gradient) works like any other.
//!
//! Entry `{name}_mma(buffers, dims)`, grid (`ceil(M / 128) ceil(N / 64)`, batch),
//! 128 threads.

use super::attention_mma::{Half, WARPS};
use super::block::{
    ChunkedTile, block_function, element_address, pack8, sliced_product, store_chunk,
};
use super::matmul::MatMulShape;
use super::warp::Lowering;
use crate::mlir::{Builder, F32, I64, Val};

/// Row blocks of 16 per warp.
const ROW_BLOCKS: usize = 2;
/// Rows per tile.
pub const BLOCK_M: usize = WARPS * 16 * ROW_BLOCKS;
/// Columns per tile.
pub const BLOCK_N: usize = 64;
/// Elements of `K` per slice.
const BLOCK_K: usize = 32;

/// One operand's tile in shared memory: `outer` rows of `inner` elements (the dimension
/// contiguous in global memory), padded by 8.
#[derive(Clone, Copy)]
struct Tile {
    outer: usize,
    inner: usize,
    offset: usize,
}

impl Tile {
    fn row_bytes(&self) -> usize {
        (self.inner + 8) * 2
    }

    fn bytes(&self) -> usize {
        self.outer * self.row_bytes()
    }

    fn chunks(&self) -> ChunkedTile {
        ChunkedTile {
            rows: self.outer,
            per_row: self.inner / 8,
            threads: super::attention_mma::THREADS,
        }
    }
}

/// The shared-memory tiles of `A` and `B`.
fn tiles(shape: &MatMulShape) -> (Tile, Tile) {
    let a = if shape.a_t {
        Tile {
            outer: BLOCK_K,
            inner: BLOCK_M,
            offset: 0,
        }
    } else {
        Tile {
            outer: BLOCK_M,
            inner: BLOCK_K,
            offset: 0,
        }
    };
    let (outer, inner) = if shape.b_t {
        (BLOCK_N, BLOCK_K)
    } else {
        (BLOCK_K, BLOCK_N)
    };
    let b = Tile {
        outer,
        inner,
        offset: a.bytes(),
    };
    (a, b)
}

/// Shared memory per block, in bytes.
pub fn shared_bytes(shape: &MatMulShape) -> usize {
    let (a, b) = tiles(shape);
    a.bytes() + b.bytes()
}

/// The MLIR function of a tensor-core matmul: `@name(buffers, dims, tile, batch entry,
/// thread, shared memory)`.
pub fn matmul_mma(name: &str, shape: &MatMulShape, half: Half, isa: Lowering) -> String {
    let mut builder = Builder::new();
    let b = &mut builder;
    let bufs = Val("%bufs".into());
    let dims = Val("%dims".into());
    let bx = Val("%bx".into());
    let bi = Val("%by".into());
    let tid = Val("%tid".into());
    let smem = b.op("llvm.ptrtoint %smem : !llvm.ptr<3> to i32");
    let (c0, c2) = (b.i64(0), b.i64(2));
    let (c4, c8) = (b.i64(4), b.i64(8));
    let a = b.ptr_at(&bufs, 0);
    let bm = b.ptr_at(&bufs, 1);
    let c = b.ptr_at(&bufs, 2);
    let batch_dim = b.i64_at(&dims, 0);
    let seq = b.i64_at(&dims, 1);
    let m = super::matmul::resolve(b, shape.m, &batch_dim, &seq);
    let k = super::matmul::resolve(b, shape.k, &batch_dim, &seq);
    let n = super::matmul::resolve(b, shape.n, &batch_dim, &seq);
    let (a_tile, b_tile) = tiles(shape);
    let cbn = b.i64(BLOCK_N as i64);
    let cbm = b.i64(BLOCK_M as i64);
    let n_tiles = b.ceil_div(&n, &cbn);
    let mt = b.divi(&bx, &n_tiles);
    let nt = b.remi(&bx, &n_tiles);
    let m0 = b.muli(&mt, &cbm);
    let n0 = b.muli(&nt, &cbn);
    let mk = b.muli(&m, &k);
    let kn = b.muli(&k, &n);
    let mn = b.muli(&m, &n);
    let (a_base, b_base, c_base) = super::matmul::batch_bases(b, shape, &bi, [&mk, &kn, &mn]);
    let c32 = b.i64(32);
    let warp = b.divi(&tid, &c32);
    let lane = b.remi(&tid, &c32);
    let g = b.divi(&lane, &c4);
    let cq = b.remi(&lane, &c4);
    let warp_rows = b.i64((16 * ROW_BLOCKS) as i64);
    let warp_first = b.muli(&warp, &warp_rows);
    let zero = b.f32(0.0);

    // An operand as read from global memory: rows along `outer`, `inner` contiguous (the
    // row stride is the inner length).
    struct Operand<'a> {
        ptr: &'a Val,
        base: &'a Val,
        tile: Tile,
    }
    let a_op = Operand {
        ptr: &a,
        base: &a_base,
        tile: a_tile,
    };
    let b_op = Operand {
        ptr: &bm,
        base: &b_base,
        tile: b_tile,
    };
    // (outer start, outer length, inner start, inner length) of an operand's tile for the
    // slice from `k0`: `A` is `[M][K]` or, transposed, `[K][M]`; `B` is `[K][N]` or `[N][K]`.
    let extents = |op_is_a: bool, k0: &Val| -> (Val, Val, Val, Val) {
        let (mn0, mn_len, outer_is_k) = if op_is_a {
            (m0.clone(), m.clone(), shape.a_t)
        } else {
            (n0.clone(), n.clone(), !shape.b_t)
        };
        if outer_is_k {
            (k0.clone(), k.clone(), mn0, mn_len)
        } else {
            (mn0, mn_len, k0.clone(), k.clone())
        }
    };
    let slots: Vec<(bool, usize)> = [true, false]
        .into_iter()
        .flat_map(|is_a| {
            let tile = if is_a { a_tile } else { b_tile };
            (0..tile.chunks().slots()).map(move |i| (is_a, i))
        })
        .collect();
    let read_slice = |b: &mut Builder, kt: &Val| -> Vec<Val> {
        let cbk = b.i64(BLOCK_K as i64);
        let k0 = b.muli(kt, &cbk);
        let mut words = Vec::new();
        for &(is_a, i) in &slots {
            let op = if is_a { &a_op } else { &b_op };
            let (o0, o_len, i0, i_len) = extents(is_a, &k0);
            let (r, col) = op.tile.chunks().position(b, &tid, i);
            let outer = b.addi(&o0, &r);
            let col = b.muli(&col, &c8);
            let inner = b.addi(&i0, &col);
            let in_outer = b.cmpi("slt", &outer, &o_len, I64);
            let outer_c = b.select(&in_outer, &outer, &c0, I64);
            let row_at = b.muli(&outer_c, &i_len);
            let row_at = b.addi(op.base, &row_at);
            let values: Vec<Val> = (0..8)
                .map(|e| {
                    let ce = b.i64(e);
                    let ie = b.addi(&inner, &ce);
                    let in_inner = b.cmpi("slt", &ie, &i_len, I64);
                    let inside = b.bin("andi", &in_outer, &in_inner, "i1");
                    let ie = b.select(&inside, &ie, &c0, I64);
                    let at = b.addi(&row_at, &ie);
                    let v = b.load(op.ptr, &at, F32, F32);
                    b.select(&inside, &v, &zero, F32)
                })
                .collect();
            words.extend(pack8(b, isa, half, &values));
        }
        words
    };
    let store_slice = |b: &mut Builder, words: &[Val]| {
        for (s, &(is_a, i)) in slots.iter().enumerate() {
            let tile = if is_a { a_tile } else { b_tile };
            let ws = &words[4 * s..4 * s + 4];
            let place = (tile.chunks(), i);
            store_chunk(
                b,
                isa,
                &smem,
                &tid,
                place,
                tile.row_bytes(),
                tile.offset,
                ws,
            );
        }
    };

    // ldmatrix lanes: lanes 8j..8j+8 give the rows of matrix j; `a` is (j % 2) * 8, `b` is
    // (j / 2) * 8.
    let lrow = b.remi(&lane, &c8);
    let lmat = b.divi(&lane, &c8);
    let lo = b.remi(&lmat, &c2);
    let lo = b.muli(&lo, &c8);
    let hi = b.divi(&lmat, &c2);
    let hi = b.muli(&hi, &c8);
    let shared_at = |b: &mut Builder, tile: &Tile, row: &Val, col: &Val| {
        element_address(b, &smem, (row, col), tile.row_bytes(), tile.offset)
    };

    let n_acc = ROW_BLOCKS * BLOCK_N / 8 * 4;
    let cbk = b.i64(BLOCK_K as i64);
    let slices = b.ceil_div(&k, &cbk);
    let finals = sliced_product(
        b,
        isa,
        &slices,
        n_acc,
        read_slice,
        store_slice,
        |b, mut acc| {
            for step in 0..BLOCK_K / 16 {
                let ks = b.i64((step * 16) as i64);
                // A fragments: rows m, columns k.
                let frags: Vec<Vec<Val>> = (0..ROW_BLOCKS)
                    .map(|blk| {
                        let off = b.i64((16 * blk) as i64);
                        let m_first = b.addi(&warp_first, &off);
                        if shape.a_t {
                            // [k][m]: matrix j is k (j / 2) * 8.., m (j % 2) * 8..
                            let row = b.addi(&ks, &lrow);
                            let row = b.addi(&row, &hi);
                            let col = b.addi(&m_first, &lo);
                            let at = shared_at(b, &a_tile, &row, &col);
                            isa.ldmatrix(b, &at, 4, true)
                        } else {
                            let row = b.addi(&m_first, &lrow);
                            let row = b.addi(&row, &lo);
                            let col = b.addi(&ks, &hi);
                            let at = shared_at(b, &a_tile, &row, &col);
                            isa.ldmatrix(b, &at, 4, false)
                        }
                    })
                    .collect();
                for np in 0..BLOCK_N / 16 {
                    let nc = b.i64((np * 16) as i64);
                    let r = if shape.b_t {
                        // [n][k]: matrix j is n (j / 2) * 8.., k (j % 2) * 8..
                        let row = b.addi(&nc, &lrow);
                        let row = b.addi(&row, &hi);
                        let col = b.addi(&ks, &lo);
                        let at = shared_at(b, &b_tile, &row, &col);
                        isa.ldmatrix(b, &at, 4, false)
                    } else {
                        // [k][n]: matrix j is k (j % 2) * 8.., n (j / 2) * 8..
                        let row = b.addi(&ks, &lrow);
                        let row = b.addi(&row, &lo);
                        let col = b.addi(&nc, &hi);
                        let at = shared_at(b, &b_tile, &row, &col);
                        isa.ldmatrix(b, &at, 4, true)
                    };
                    for (blk, af) in frags.iter().enumerate() {
                        for (h, bf) in [[&r[0], &r[1]], [&r[2], &r[3]]].into_iter().enumerate() {
                            let at = (blk * BLOCK_N / 8 + 2 * np + h) * 4;
                            let d = isa.mma(b, half, af, bf, &acc[at..at + 4]);
                            acc.splice(at..at + 4, d);
                        }
                    }
                }
            }
            acc
        },
    );

    // C[row][col]: accumulator (blk, n-tile j, element 2 r + e) is row warp_first + 16 blk +
    // g + 8 r, column j * 8 + 2 q + e of the tile.
    let two_q = b.muli(&cq, &c2);
    for blk in 0..ROW_BLOCKS {
        for r in 0..2 {
            let off = b.i64((16 * blk + 8 * r) as i64);
            let row = b.addi(&warp_first, &off);
            let row = b.addi(&row, &g);
            let row = b.addi(&m0, &row);
            let live = b.cmpi("slt", &row, &m, I64);
            let finals = &finals;
            b.if_then(&live, |b| {
                let row_at = b.muli(&row, &n);
                let row_at = b.addi(&c_base, &row_at);
                for j in 0..BLOCK_N / 8 {
                    for e in 0..2 {
                        let off = b.i64((j * 8 + e) as i64);
                        let col = b.addi(&n0, &off);
                        let col = b.addi(&col, &two_q);
                        let inside = b.cmpi("slt", &col, &n, I64);
                        let v = finals[(blk * BLOCK_N / 8 + j) * 4 + 2 * r + e].clone();
                        b.if_then(&inside, |b| {
                            let at = b.addi(&row_at, &col);
                            b.store(&v, &c, &at, F32, F32);
                        });
                    }
                }
            });
        }
    }
    block_function(builder, name, "bx", "by")
}
