//! The decode-step attention shaped for a GPU. The portable kernel ([`super::decode`]) runs
//! one program per (batch row, KV head), which on a GPU is one thread walking the whole KV
//! cache: fine for a ring of a few hundred slots, thousands of times too slow for the cache
//! of a global layer after a long prompt. Here each (batch row, KV head)'s cache is split
//! over up to [`SPLITS`] blocks of [`THREADS`] threads (flash-decoding; the runtime launches
//! one block per chunk of slots in use, up to that many), over the same buffers and cache
//! layout, and a second launch combines their shares:
//!
//! 1. the block whose share holds the new token's slot appends its key and value (no other
//!    block reads that slot, so a barrier is all the later reads need);
//! 2. the block's share is walked `threads` cache blocks (`w` slots each) at a time: each
//!    thread scores its block's slots for every query head of the group (a `w`-wide load of
//!    the transposed key block per head dim, as on the CPU, with the mask and the score
//!    modifier compiled in), the block's maxima come from shuffles within warps and shared
//!    memory across them, each thread turns its scores into `exp2(s - m)` in shared memory,
//!    and then each thread accumulates `O += P V` and the sums for `vw` head dims of one
//!    query head (adjacent threads reading adjacent values: coalesced);
//! 3. the share's unnormalized output, maximum and sum go to the step's workspace;
//! 4. the combining launch ([`attention_decode_combine`]) rescales the shares to their common
//!    maximum, sums and normalizes them (a query that saw nothing gets zeros).
//!
//! The running maxima are kept in shared memory, two copies alternating from one chunk of
//! slots to the next, so that the update of one chunk never races with the reads of the
//! previous one; three barriers a chunk keep the phases apart.

use zebra_ir::cache::HeadCache;
use zebra_ir::op::AttentionKernel;

use super::block::{block_function, trunc32};
use super::decode::{
    append_new_token, key_block_scores, layer_kv_head, share_blocks, slot_and_used,
};
use super::warp::Lowering;
use crate::mlir::{Builder, F32, I64, Val, vf32, vi64};
use crate::vexpr;

/// Threads per block (a multiple of 32; fewer where a large group's scores would not fit in
/// shared memory, and in tests, for chunks of fewer slots).
pub const THREADS: usize = 256;

/// Blocks a (batch row, KV head)'s cache is split over, at most: one per chunk of the cache
/// up to this many (the runtime launches as many as the cache in use needs), then several
/// chunks each.
pub const SPLITS: usize = 32;

/// The workspace of the decode step: per (batch row, KV head), split and query head of the
/// group, `head_dim + 2` floats (the unnormalized output, the running maximum, the sum).
pub fn workspace_floats_per_batch_row(kernel: &AttentionKernel) -> u64 {
    kernel.heads * SPLITS as u64 * (kernel.head_dim + 2)
}

/// The first float of the partial result of `(pair, split, head i)` in the workspace.
pub(super) fn partial_row(
    b: &mut Builder,
    pair: &Val,
    split: &Val,
    i: &Val,
    (group, d): (usize, usize),
) -> Val {
    let csplits = b.i64(SPLITS as i64);
    // Laid out for the most splits, whatever a launch takes.
    let cgroup = b.i64(group as i64);
    let width = b.i64(d as i64 + 2);
    let row = b.muli(pair, &csplits);
    let row = b.addi(&row, split);
    let row = b.muli(&row, &cgroup);
    let row = b.addi(&row, i);
    b.muli(&row, &width)
}

/// The splits launched for a cache of `blocks` key blocks: one per chunk of `threads` key
/// blocks, at most `splits` (as [`zebra_runtime::plan::TensorCoreGrid::Splits`] counts them
/// on the host).
fn launched_splits(b: &mut Builder, blocks: &Val, threads: usize, splits: usize) -> Val {
    let cthreads = b.i64(threads as i64);
    let wanted = b.ceil_div(blocks, &cthreads);
    let most = b.i64(splits as i64);
    b.mini(&wanted, &most)
}

/// The most shared memory a block takes (the scores of a chunk for every query head of the
/// group); a group too large for it keeps the portable kernel.
pub const MAX_SHARED_BYTES: usize = 96 * 1024;

/// Cache slots per chunk: one cache block of `w` slots per thread.
fn chunk(w: usize, threads: usize) -> usize {
    threads * w
}

/// Byte offsets in shared memory: the chunk's scores (then weights) `[group][chunk]`, the
/// warps' maxima `[group][warps]`, and the two copies of the running maxima `[2][group]`.
#[derive(Clone, Copy, Debug)]
struct Layout {
    scores: usize,
    warp_max: usize,
    running: usize,
    bytes: usize,
}

impl Layout {
    fn of(group: usize, w: usize, threads: usize) -> Layout {
        let scores = 0;
        let warp_max = scores + group * chunk(w, threads) * 4;
        let running = warp_max + group * threads / 32 * 4;
        Layout {
            scores,
            warp_max,
            running,
            bytes: running + 2 * group * 4,
        }
    }
}

/// The shared memory of the kernel for `kernel` with cache blocks of `w` slots.
pub fn shared_bytes(kernel: &AttentionKernel, w: usize, threads: usize) -> usize {
    Layout::of(group(kernel), w, threads).bytes
}

fn group(kernel: &AttentionKernel) -> usize {
    (kernel.heads / kernel.kv_heads.max(1)) as usize
}

/// The threads per block of the GPU kernel for this decode attention: [`THREADS`], or fewer
/// (down to a warp) where a large group's scores would not fit in shared memory; `None`
/// where it does not take it (side inputs, which decoding has none of, or a group too large
/// even for a warp).
pub fn threads_for(kernel: &AttentionKernel, w: usize) -> Option<usize> {
    let ok = kernel.sides.is_empty()
        && kernel.head_dim > 0
        && kernel.kv_heads > 0
        && kernel.heads.is_multiple_of(kernel.kv_heads)
        && (1..=16).contains(&w);
    [THREADS, 128, 64, 32]
        .into_iter()
        .find(|&threads| ok && shared_bytes(kernel, w, threads) <= MAX_SHARED_BYTES)
}

/// Head dims per thread in the `O += P V` phase: the widest of 4, 2 and 1 that divides the
/// head dim and still gives every thread of the block a share.
fn value_width(group: usize, d: usize, threads: usize) -> usize {
    [4, 2]
        .into_iter()
        .find(|&vw| d.is_multiple_of(vw) && group * d / vw >= threads)
        .unwrap_or(1)
}

/// The block function `@name(buffers, dims, x, y, thread, shared memory)` on a grid of
/// (splits launched, `B * KV'`, `KV'` the KV heads the cache holds) blocks of `threads`
/// threads: each block's share of the cache (`ceil(blocks / launched)` key blocks), to the
/// workspace; [`attention_decode_combine`] then combines them. Buffers and dims are the portable kernel's, the workspace after them.
pub fn attention_decode_gpu(
    name: &str,
    kernel: &AttentionKernel,
    cache: &HeadCache,
    (w, threads, splits): (usize, usize, usize),
    isa: Lowering,
) -> String {
    let policy = cache.policy;
    assert!(
        threads.is_multiple_of(32) && threads > 0,
        "whole warps ({threads} threads)"
    );
    assert!((1..=SPLITS).contains(&splits), "{splits} splits");
    let warps = threads / 32;
    let group = group(kernel);
    let (h_count, kv_count) = (kernel.heads as i64, kernel.kv_heads as i64);
    let d = kernel.head_dim as usize;
    let layout = Layout::of(group, w, threads);
    let vw = value_width(group, d, threads);
    let units = group * d / vw;
    let per_thread = units.div_ceil(threads);
    let (vt, vtv) = (vf32(w), vf32(vw));
    // Buffers start on 16 bytes at least; a key block's column starts on `w` floats, and a
    // unit's values on `vw`.
    let align_of = |floats: usize| (floats.min(4) & floats.min(4).wrapping_neg()) * 4;
    let (k_align, v_align) = (align_of(w), align_of(vw));

    let mut builder = Builder::new();
    let b = &mut builder;
    let bufs = Val("%bufs".into());
    let dims = Val("%dims".into());
    let split = Val("%bx".into());
    let pair = Val("%by".into());
    let tid = Val("%tid".into());
    let smem = b.op("llvm.ptrtoint %smem : !llvm.ptr<3> to i32");
    let q = b.ptr_at(&bufs, 0);
    let k_new = b.ptr_at(&bufs, 1);
    let v_new = b.ptr_at(&bufs, 2);
    let kc = b.ptr_at(&bufs, 3);
    let vc = b.ptr_at(&bufs, 4);
    let positions = b.ptr_at(&bufs, 5);
    let ws = b.ptr_at(&bufs, 7);
    let batch_count = b.i64_at(&dims, 0);
    let qpos = b.i64_at(&dims, 3);

    let c0 = b.i64(0);
    let c1 = b.i64(1);
    let cw = b.i64(w as i64);
    let cd = b.i64(d as i64);
    let ckv = b.i64(kv_count);
    let cheld = b.i64(cache.kv_heads.len() as i64);
    let ch = b.i64(h_count);
    let cgroup = b.i64(group as i64);
    let cthreads = b.i64(threads as i64);
    let cchunk = b.i64(chunk(w, threads) as i64);
    let neg_inf = b.f32(f32::NEG_INFINITY);
    let neg_inf_v = b.splat(&neg_inf, F32, w);
    let zero_v = b.splat_f32(0.0, w);
    let zero_vv = b.splat_f32(0.0, vw);
    let fzero = b.f32(0.0);
    let minus_one = b.splat_i64(-1, w);

    // Shared f32 arrays: element `index` of the array at byte `offset`.
    let shared_at = |b: &mut Builder, offset: usize, index: &Val| -> Val {
        let c4 = b.i64(4);
        let bytes = b.muli(index, &c4);
        let off = b.i64(offset as i64);
        let bytes = b.addi(&bytes, &off);
        let bytes = trunc32(b, &bytes);
        b.bin("addi", &bytes, &smem, "i32")
    };
    let store_shared = |b: &mut Builder, offset: usize, index: &Val, value: &Val| {
        let at = shared_at(b, offset, index);
        let word = b.op(format!("arith.bitcast {value} : f32 to i32"));
        isa.store_shared32(b, &at, &word);
    };
    let load_shared = |b: &mut Builder, offset: usize, index: &Val| -> Val {
        let at = shared_at(b, offset, index);
        let word = isa.load_shared32(b, &at);
        b.op(format!("arith.bitcast {word} : i32 to f32"))
    };
    let max = |b: &mut Builder, x: &Val, y: &Val| -> Val {
        b.op(format!("llvm.intr.maxnum({x}, {y}) : (f32, f32) -> f32"))
    };

    let (slot, used) = slot_and_used(b, policy, &qpos);
    let blocks = b.ceil_div(&used, &cw);
    let slot_block = b.divi(&slot, &cw);
    let row_stride = b.muli(&batch_count, &cheld); // (batch, kv head held) pairs per slot
    let batch = b.divi(&pair, &cheld);
    let local = b.remi(&pair, &cheld);
    let kv = layer_kv_head(b, &cache.kv_heads, &local);
    let first_head = b.muli(&kv, &cgroup);
    let new_pair = b.muli(&batch, &ckv);
    let new_pair = b.addi(&new_pair, &kv);

    // This split's key blocks: an equal share of those in use among the splits launched.
    let launched = launched_splits(b, &blocks, threads, splits);
    let per_split = b.ceil_div(&blocks, &launched);
    let (start, end, appends) = share_blocks(b, (&split, &per_split), &blocks, &slot_block);
    // 1. Append, by the split whose key blocks hold the new slot (no other reads it); and the
    // running maxima start at -inf.
    b.if_then(&appends, |b| {
        append_new_token(
            b,
            [&k_new, &v_new, &kc, &vc],
            (&slot, (&new_pair, &pair), &row_stride),
            (d, w),
            (&tid, &cthreads),
        );
    });
    b.for_range(&tid, &cgroup, &cthreads, &[], |b, i, _| {
        store_shared(b, layout.running, i, &neg_inf);
        vec![]
    });
    isa.barrier(b);

    // The block's maximum of head `i` over the chunk, from the warps' maxima.
    let chunk_max = |b: &mut Builder, i: &Val| -> Val {
        let cwarps = b.i64(warps as i64);
        let row = b.muli(i, &cwarps);
        let mut m = neg_inf.clone();
        for warp in 0..warps {
            let at = b.i64(warp as i64);
            let at = b.addi(&row, &at);
            let x = load_shared(b, layout.warp_max, &at);
            m = max(b, &m, &x);
        }
        m
    };
    // The running maximum of head `i` before chunk `c` (copy `c % 2`) and after it, and the
    // maximum the weights of chunk `c` are taken against (0 while nothing is visible).
    let maxima = |b: &mut Builder, c: &Val, i: &Val| -> (Val, Val, Val) {
        let c2 = b.i64(2);
        let parity = b.remi(c, &c2);
        let at = b.muli(&parity, &cgroup);
        let at = b.addi(&at, i);
        let m_old = load_shared(b, layout.running, &at);
        let m_chunk = chunk_max(b, i);
        let m_new = max(b, &m_old, &m_chunk);
        let hidden = b.cmpf("oeq", &m_new, &neg_inf, F32);
        let m_use = b.select(&hidden, &fzero, &m_new, F32);
        (m_old, m_new, m_use)
    };

    // The output units this thread accumulates: `vw` head dims of one query head each (the
    // last ones clamped to the last unit, computed twice and stored once).
    let cvw = b.i64(vw as i64);
    let last_unit = b.i64(units as i64 - 1);
    let mine: Vec<(Val, Val)> = (0..per_thread)
        .map(|k| {
            let off = b.i64((k * threads) as i64);
            let unit = b.addi(&tid, &off);
            let unit = b.mini(&unit, &last_unit);
            let dim = b.muli(&unit, &cvw);
            (b.divi(&dim, &cd), b.remi(&dim, &cd))
        })
        .collect();

    let slots = b.muli(&end, &cw);
    let mine_blocks = b.subi(&end, &start);
    let chunks = b.ceil_div(&mine_blocks, &cthreads);
    let first_slot = b.muli(&start, &cw);
    let mut carried: Vec<(Val, String)> = Vec::new();
    for _ in 0..per_thread {
        carried.push((zero_vv.clone(), vtv.clone()));
        carried.push((fzero.clone(), F32.to_string()));
    }
    let finals = b.for_range(&c0, &chunks, &c1, &carried, |b, c, carried| {
        // 2a. Scores of this thread's cache block, for every head of the group.
        let cthreads = b.i64(threads as i64);
        let sb = b.muli(c, &cthreads);
        let sb = b.addi(&sb, &start);
        let sb = b.addi(&sb, &tid);
        let s0 = b.muli(&sb, &cw);
        let in_use = b.cmpi("slt", &sb, &end, I64);
        let my_scores = b.muli(&tid, &cw);
        let kbase = b.muli(&sb, &row_stride);
        let kbase = b.addi(&kbase, &pair);
        let kbase = b.muli(&kbase, &cd);
        let kbase = b.muli(&kbase, &cw);
        b.for_range(&c0, &cgroup, &c1, &[], |b, i, _| {
            let h = b.addi(&first_head, i);
            let s = b.if_else(
                &in_use,
                std::slice::from_ref(&vt),
                |b| {
                    let keys = b.load(&positions, &s0, I64, &vi64(w));
                    let filled = b.cmpi("sgt", &keys, &minus_one, &vi64(w));
                    let qrow = b.muli(&batch, &ch);
                    let qrow = b.addi(&qrow, &h);
                    let qrow = b.muli(&qrow, &cd);
                    vec![key_block_scores(
                        b,
                        kernel,
                        (&q, &qrow),
                        (&kc, &kbase, k_align),
                        (&keys, &filled),
                        (&qpos, &h, &batch),
                        // A GPU thread's latencies are hidden by the other warps.
                        (w, 1),
                    )]
                },
                |_| vec![neg_inf_v.clone()],
            );
            let row = b.muli(i, &cchunk);
            let row = b.addi(&row, &my_scores);
            let mut m = neg_inf.clone();
            for lane in 0..w {
                let x = b.op(format!("vector.extract {}[{lane}] : f32 from {vt}", s[0]));
                let at = b.i64(lane as i64);
                let at = b.addi(&row, &at);
                store_shared(b, layout.scores, &at, &x);
                m = max(b, &m, &x);
            }
            for bit in [16, 8, 4, 2, 1] {
                let other = isa.shuffle_xor(b, &m, bit);
                m = max(b, &m, &other);
            }
            let c32 = b.i64(32);
            let lane = b.remi(&tid, &c32);
            let first = b.cmpi("eq", &lane, &c0, I64);
            b.if_then(&first, |b| {
                let warp = b.divi(&tid, &c32);
                let cwarps = b.i64(warps as i64);
                let at = b.muli(i, &cwarps);
                let at = b.addi(&at, &warp);
                store_shared(b, layout.warp_max, &at, &m);
            });
            vec![]
        });
        isa.barrier(b);

        // 2b. Weights `exp2(s - m)`, in place of the scores; the running maxima after this
        // chunk into the other copy.
        b.for_range(&c0, &cgroup, &c1, &[], |b, i, _| {
            let (_, m_new, m_use) = maxima(b, c, i);
            let m_use_v = b.splat(&m_use, F32, w);
            let row = b.muli(i, &cchunk);
            let row = b.addi(&row, &my_scores);
            let mut s = zero_v.clone();
            for lane in 0..w {
                let at = b.i64(lane as i64);
                let at = b.addi(&row, &at);
                let x = load_shared(b, layout.scores, &at);
                s = b.op(format!("vector.insert {x}, {s} [{lane}] : f32 into {vt}"));
            }
            let shifted = b.bin("subf", &s, &m_use_v, &vt);
            let p = vexpr::exp2_nonpositive(b, &shifted, w);
            for lane in 0..w {
                let x = b.op(format!("vector.extract {p}[{lane}] : f32 from {vt}"));
                let at = b.i64(lane as i64);
                let at = b.addi(&row, &at);
                store_shared(b, layout.scores, &at, &x);
            }
            let first = b.cmpi("eq", &tid, &c0, I64);
            b.if_then(&first, |b| {
                let c2 = b.i64(2);
                let next = b.addi(c, &c1);
                let parity = b.remi(&next, &c2);
                let at = b.muli(&parity, &cgroup);
                let at = b.addi(&at, i);
                store_shared(b, layout.running, &at, &m_new);
            });
            vec![]
        });
        isa.barrier(b);

        // 2c. `O = alpha O + P V` and `l = alpha l + sum P` for this thread's units.
        let base = b.muli(c, &cchunk);
        let base = b.addi(&base, &first_slot);
        let left = b.subi(&slots, &base);
        let here = b.mini(&left, &cchunk);
        let mut next = Vec::new();
        for (k, (i, dim)) in mine.iter().enumerate() {
            let (m_old, _, m_use) = maxima(b, c, i);
            let shift = b.bin("subf", &m_old, &m_use, F32);
            let shift_v = b.splat(&shift, F32, w);
            let alpha_v = vexpr::exp2_nonpositive(b, &shift_v, w);
            let alpha = b.op(format!("vector.extract {alpha_v}[0] : f32 from {vt}"));
            let alpha_vv = b.splat(&alpha, F32, vw);
            let acc = b.bin("mulf", &carried[2 * k], &alpha_vv, &vtv);
            let sum = b.bin("mulf", &carried[2 * k + 1], &alpha, F32);
            let weights = b.muli(i, &cchunk);
            let sums = b.for_range(
                &c0,
                &here,
                &c1,
                &[(acc, vtv.clone()), (sum, F32.to_string())],
                |b, j, carried| {
                    let at = b.addi(&weights, j);
                    let p = load_shared(b, layout.scores, &at);
                    let s = b.addi(&base, j);
                    let row = b.muli(&s, &row_stride);
                    let row = b.addi(&row, &pair);
                    let row = b.muli(&row, &cd);
                    let row = b.addi(&row, dim);
                    let v = b.load_aligned(&vc, &row, F32, &vtv, v_align);
                    let pv = b.splat(&p, F32, vw);
                    let acc = b.fma(&pv, &v, &carried[0], &vtv);
                    let sum = b.bin("addf", &carried[1], &p, F32);
                    vec![acc, sum]
                },
            );
            next.extend(sums);
        }
        // Every thread is done with this chunk's scores and maxima before the next
        // overwrites them.
        isa.barrier(b);
        next
    });

    // 3. This split's share, to the workspace: per head its unnormalized `O`, the running
    // maximum (-inf where nothing was visible) and the sum, for the combining launch.
    let total = b.i64(units as i64);
    let c2 = b.i64(2);
    let parity = b.remi(&chunks, &c2);
    for (k, (i, dim)) in mine.iter().enumerate() {
        // Clamped units are stored by the thread they belong to.
        let off = b.i64((k * threads) as i64);
        let unit = b.addi(&tid, &off);
        let ours = b.cmpi("slt", &unit, &total, I64);
        let acc = finals[2 * k].clone();
        let sum = finals[2 * k + 1].clone();
        b.if_then(&ours, |b| {
            let row = partial_row(b, &pair, &split, i, (group, d));
            let at = b.addi(&row, dim);
            b.store(&acc, &ws, &at, F32, &vtv);
            let first = b.cmpi("eq", dim, &c0, I64);
            b.if_then(&first, |b| {
                let at = b.muli(&parity, &cgroup);
                let at = b.addi(&at, i);
                let m = load_shared(b, layout.running, &at);
                let at = b.addi(&row, &cd);
                b.store(&m, &ws, &at, F32, F32);
                let at = b.addi(&at, &c1);
                b.store(&sum, &ws, &at, F32, F32);
            });
        });
    }
    block_function(builder, name, "bx", "by")
}

/// The combining launch: `@name(buffers, dims, x, y, thread, shared memory)` on a grid of
/// (1, `B * KV'`) blocks of `threads` threads, each thread taking head dims of the group's
/// heads: the splits' partial results rescaled to their common maximum and summed, then
/// normalized (a query that saw nothing gets zeros).
pub fn attention_decode_combine(
    name: &str,
    kernel: &AttentionKernel,
    cache: &HeadCache,
    (w, threads, splits): (usize, usize, usize),
) -> String {
    let policy = cache.policy;
    let group = group(kernel);
    let d = kernel.head_dim as usize;
    let mut builder = Builder::new();
    let b = &mut builder;
    let bufs = Val("%bufs".into());
    let dims = Val("%dims".into());
    let qpos = b.i64_at(&dims, 3);
    let (_, used) = slot_and_used(b, policy, &qpos);
    let cw = b.i64(w as i64);
    let blocks = b.ceil_div(&used, &cw);
    let launched = launched_splits(b, &blocks, threads, splits);
    let pair = Val("%by".into());
    let tid = Val("%tid".into());
    let out = b.ptr_at(&bufs, 6);
    let ws = b.ptr_at(&bufs, 7);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let cd = b.i64(d as i64);
    let cheld = b.i64(cache.kv_heads.len() as i64);
    let ch = b.i64(kernel.heads as i64);
    let cgroup = b.i64(group as i64);
    let cthreads = b.i64(threads as i64);
    let outputs = b.i64((group * d) as i64);
    let neg_inf = b.f32(f32::NEG_INFINITY);
    let (fzero, fone) = (b.f32(0.0), b.f32(1.0));
    let batch = b.divi(&pair, &cheld);
    let local = b.remi(&pair, &cheld);
    let kv = layer_kv_head(b, &cache.kv_heads, &local);
    let first_head = b.muli(&kv, &cgroup);
    let vt = vf32(4);
    b.for_range(&tid, &outputs, &cthreads, &[], |b, o, _| {
        let i = b.divi(o, &cd);
        let dim = b.remi(o, &cd);
        let statistic = |b: &mut Builder, split: &Val, which: i64| -> Val {
            let row = partial_row(b, &pair, split, &i, (group, d));
            let at = b.i64(d as i64 + which);
            let at = b.addi(&row, &at);
            b.load(&ws, &at, F32, F32)
        };
        let m = b.for_range(
            &c0,
            &launched,
            &c1,
            &[(neg_inf.clone(), F32.to_string())],
            |b, split, carried| {
                let m = statistic(b, split, 0);
                vec![b.op(format!(
                    "llvm.intr.maxnum({}, {m}) : (f32, f32) -> f32",
                    carried[0]
                ))]
            },
        );
        let hidden = b.cmpf("oeq", &m[0], &neg_inf, F32);
        let m_use = b.select(&hidden, &fzero, &m[0], F32);
        let sums = b.for_range(
            &c0,
            &launched,
            &c1,
            &[
                (fzero.clone(), F32.to_string()),
                (fzero.clone(), F32.to_string()),
            ],
            |b, split, carried| {
                let m = statistic(b, split, 0);
                let l = statistic(b, split, 1);
                let shift = b.bin("subf", &m, &m_use, F32);
                let shift = b.splat(&shift, F32, 4);
                let factor = vexpr::exp2_nonpositive(b, &shift, 4);
                let factor = b.op(format!("vector.extract {factor}[0] : f32 from {vt}"));
                let row = partial_row(b, &pair, split, &i, (group, d));
                let at = b.addi(&row, &dim);
                let x = b.load(&ws, &at, F32, F32);
                vec![
                    b.fma(&x, &factor, &carried[0], F32),
                    b.fma(&l, &factor, &carried[1], F32),
                ]
            },
        );
        let seen = b.cmpf("ogt", &sums[1], &fzero, F32);
        let inverse = b.bin("divf", &fone, &sums[1], F32);
        let inverse = b.select(&seen, &inverse, &fzero, F32);
        let value = b.bin("mulf", &sums[0], &inverse, F32);
        let h = b.addi(&first_head, &i);
        let row = b.muli(&batch, &ch);
        let row = b.addi(&row, &h);
        let row = b.muli(&row, &cd);
        let at = b.addi(&row, &dim);
        b.store(&value, &out, &at, F32, F32);
        vec![]
    });
    block_function(builder, name, "bx", "by")
}

#[cfg(test)]
mod tests {
    use super::*;
    use zebra_ir::expr::parse_expr;

    fn kernel(heads: u64, kv_heads: u64, head_dim: u64) -> AttentionKernel {
        AttentionKernel {
            name: "global".into(),
            mask: parse_expr("k <= q").unwrap(),
            score: None,
            sides: Vec::new(),
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            block_q: 64,
            block_k: 64,
            merge_heads: false,
            loc: None,
        }
    }

    #[test]
    fn large_groups_take_fewer_threads_within_shared_memory() {
        // A group of 8: 256 threads, each chunk's scores 32 KiB.
        assert_eq!(threads_for(&kernel(32, 4, 128), 4), Some(256));
        assert_eq!(
            shared_bytes(&kernel(32, 4, 128), 4, 256),
            8 * 1024 * 4 + 8 * 8 * 4 + 64
        );
        // Multi-query attention with 64 heads: 128 threads, then 64.
        assert_eq!(threads_for(&kernel(32, 1, 128), 4), Some(128));
        assert_eq!(threads_for(&kernel(64, 1, 128), 4), Some(64));
        for (heads, kv) in [(8, 8), (32, 1), (64, 1), (128, 1)] {
            let k = kernel(heads, kv, 64);
            let threads = threads_for(&k, 4).unwrap();
            assert!(
                shared_bytes(&k, 4, threads) <= MAX_SHARED_BYTES,
                "{heads}/{kv}"
            );
        }
        // A group too large even for a warp, heads not a multiple of the KV heads, side
        // inputs: not taken.
        assert_eq!(threads_for(&kernel(256, 1, 64), 4), None);
        assert_eq!(threads_for(&kernel(6, 4, 64), 4), None);
        let mut documents = kernel(8, 8, 64);
        documents.sides.push("doc".into());
        assert_eq!(threads_for(&documents, 4), None);
    }

    #[test]
    fn value_widths_give_every_thread_a_share() {
        assert_eq!(value_width(8, 128, 256), 4);
        assert_eq!(value_width(4, 128, 256), 2);
        assert_eq!(value_width(1, 128, 256), 1);
        assert_eq!(value_width(2, 48, 32), 2);
        assert_eq!(value_width(1, 20, 32), 1);
        assert_eq!(value_width(8, 30, 32), 2);
    }
}
