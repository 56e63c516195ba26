//! The decode-step attention: one new query per batch row against the layer's KV cache
//! (see `zebra_ir::cache`), or against one of its caches where its KV heads keep different
//! keys ([`HeadCache`]: the step then serves only the query heads of the KV heads that cache
//! holds). One program per (batch row, KV head held) appends the new key and
//! value to their slot, then answers every query head of its group in one pass over the
//! slots in use, `w` slots at a time: scores by FMAs over a transposed key block, the score
//! modifier and the mask compiled in (over the positions the slots hold, `-1` for an empty
//! slot), an online softmax and `O += P V`.
//!
//! A long cache can be shared out (flash-decoding, as [`super::decode_gpu`] does on a GPU):
//! with dim 2 = `S >= 2`, program `p` takes the `p % S`-th contiguous share of the blocks of
//! pair `p / S` (the share holding the new token's slot appends it), and leaves its
//! unnormalized output, running maximum and sum in the workspace; a second launch with dim
//! 2 = `-S`, one program per pair, rescales the shares to their largest maximum, sums and
//! normalizes them. The CPU runtime shares a cache out when its pairs are too few to keep
//! every thread busy (`CpuModel`); dim 2 = 0 is the single pass.
//!
//! Buffers: `q [B, H, 1, D]`, the new `k` and `v [B, KV, 1, D]`, the key cache in blocks of
//! `w` slots `[S / w][B][KV'][D][w]`, the value cache `[S][B][KV'][D]` (`KV'` the KV heads
//! the cache holds), the slots' positions
//! `i64 [S]` (the new one already written by the runtime), `out` (`[B, 1, H, D]`, the same
//! addresses as `[B, H, 1, D]`), then the workspace of the shares (per pair, up to
//! [`CACHE_SPLITS`] shares of each query head of its group, `D + 2` floats each; the GPU's
//! kernel lays its own out alike). Dims: `B`, `T` (1), the sharing as above, the new token's
//! position. Neither cache layout depends on its capacity, so a cache of every position
//! grows by appending.

use zebra_ir::cache::{HeadCache, KvPolicy};
use zebra_ir::op::AttentionKernel;

use super::attention::{reciprocal_or_zero, store_scaled};
use super::decode_gpu::partial_row;
use crate::mlir::{Builder, F32, I64, Val, entry, vf32, vi1, vi64};
use crate::vexpr::{self, VecEnv};

/// Independent sums a key block's scores run as on the CPU (see [`key_block_scores`]): an
/// FMA's latency is about four times its issue interval on current cores.
const SCORE_CHAINS: usize = 4;

/// The slots per block of the key cache for vectors of `vector` floats: one vector.
pub fn block_slots(vector: usize) -> usize {
    vector.clamp(1, 16)
}

pub fn attention_decode(
    name: &str,
    kernel: &AttentionKernel,
    cache: &HeadCache,
    vector: usize,
) -> String {
    let policy = cache.policy;
    let (h_count, kv_count) = (kernel.heads as i64, kernel.kv_heads as i64);
    let held = cache.kv_heads.len() as i64;
    let group = (h_count / kv_count) as usize;
    let d = kernel.head_dim as usize;
    let w = block_slots(vector);
    // Value rows are read `wv` floats at a time.
    let wv = super::attention::vector_width(d, vector);
    let (vt, vtv) = (vf32(w), vf32(wv));
    // `O += P V` keeps `SCORE_CHAINS` sums in flight in all: its head dims' vectors are
    // independent of each other, so fewer chains over the slots where there are several.
    let value_chains = SCORE_CHAINS.div_ceil(d / wv).max(1);

    let mut b = Builder::new();
    let e = entry();
    let q = b.ptr_at(&e.bufs, 0);
    let k_new = b.ptr_at(&e.bufs, 1);
    let v_new = b.ptr_at(&e.bufs, 2);
    let kc = b.ptr_at(&e.bufs, 3);
    let vc = b.ptr_at(&e.bufs, 4);
    let positions = b.ptr_at(&e.bufs, 5);
    let out = b.ptr_at(&e.bufs, 6);
    let batch_count = b.i64_at(&e.dims, 0);
    let qpos = b.i64_at(&e.dims, 3);

    let c0 = b.i64(0);
    let c1 = b.i64(1);
    let cw = b.i64(w as i64);
    let cwv = b.i64(wv as i64);
    let cd = b.i64(d as i64);
    let ckv = b.i64(kv_count);
    let cheld = b.i64(held);
    let ch = b.i64(h_count);
    let cgroup = b.i64(group as i64);
    let neg_inf = b.f32(f32::NEG_INFINITY);
    let zero_vv = b.splat_f32(0.0, wv);
    let fzero = b.f32(0.0);
    let fone = b.f32(1.0);
    let minus_one = b.splat_i64(-1, w);

    let maxes = b.alloca(group, F32);
    let sums = b.alloca(group, F32);
    let acc = b.alloca(group * d, F32);
    let weights = b.alloca(CACHE_SPLITS, F32); // the shares' weights, when combining

    let (slot, used) = slot_and_used(&mut b, policy, &qpos);
    let blocks = b.ceil_div(&used, &cw);
    let row_stride = b.muli(&batch_count, &cheld); // (batch, kv head) pairs per slot

    // Dim 2 says how the cache is shared out: 0 or 1, one program per (batch row, KV head
    // held) attends over all of it; S >= 2, S programs each take a contiguous share of its
    // blocks and leave their unnormalized outputs, maxima and sums in the workspace; -S, a
    // second launch with one program per pair combines those S shares.
    let work = b.ptr_at(&e.bufs, 7);
    let mode = b.i64_at(&e.dims, 2);
    let combining = b.cmpi("slt", &mode, &c0, I64);
    let splits = b.maxi(&mode, &c1);
    let sharing = b.cmpi("sgt", &splits, &c1, I64);
    let per_split = b.ceil_div(&blocks, &splits);
    let slot_block = b.divi(&slot, &cw);

    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        b.if_then(&combining, |b| {
            let parts = b.subi(&c0, &mode);
            let batch = b.divi(pid, &cheld);
            let local = b.remi(pid, &cheld);
            let kv = layer_kv_head(b, &cache.kv_heads, &local);
            combine_shares(
                b,
                (&work, &out, &weights),
                (pid, &batch, &kv, &parts),
                (h_count, group, d, wv),
            );
        });
        let attending = b.cmpi("sge", &mode, &c0, I64);
        b.if_then(&attending, |b| {
            let pair = b.divi(pid, &splits); // (batch, kv head held)
            let split = b.remi(pid, &splits);
            let batch = b.divi(&pair, &cheld);
            let local = b.remi(&pair, &cheld);
            let kv = layer_kv_head(b, &cache.kv_heads, &local);
            let new_pair = b.muli(&batch, &ckv);
            let new_pair = b.addi(&new_pair, &kv);
            let (first_block, end_block, owns_slot) =
                share_blocks(b, (&split, &per_split), &blocks, &slot_block);
            // The share that holds the new token's slot appends it (no other reads that slot).
            b.if_then(&owns_slot, |b| {
                append_new_token(
                    b,
                    [&k_new, &v_new, &kc, &vc],
                    (&slot, (&new_pair, &pair), &row_stride),
                    (d, w),
                    (&c0, &c1),
                );
            });

            b.for_range(&c0, &cgroup, &c1, &[], |b, i, _| {
                b.store(&neg_inf, &maxes, i, F32, F32);
                b.store(&fzero, &sums, i, F32, F32);
                let row = b.muli(i, &cd);
                b.for_range(&c0, &cd, &cwv, &[], |b, c, _| {
                    let at = b.addi(&row, c);
                    b.store(&zero_vv, &acc, &at, F32, &vtv);
                    vec![]
                });
                vec![]
            });

            b.for_range(&first_block, &end_block, &c1, &[], |b, blk, _| {
                let s0 = b.muli(blk, &cw);
                let keys = b.load(&positions, &s0, I64, &vi64(w));
                let filled = b.cmpi("sgt", &keys, &minus_one, &vi64(w));
                let kbase = b.muli(blk, &row_stride);
                let kbase = b.addi(&kbase, &pair);
                let kbase = b.muli(&kbase, &cd);
                let kbase = b.muli(&kbase, &cw);
                b.for_range(&c0, &cgroup, &c1, &[], |b, i, _| {
                    let gh = b.muli(&kv, &cgroup);
                    let h = b.addi(&gh, i);
                    let qrow = b.muli(&batch, &ch);
                    let qrow = b.addi(&qrow, &h);
                    let qrow = b.muli(&qrow, &cd);
                    let s = key_block_scores(
                        b,
                        kernel,
                        (&q, &qrow),
                        (&kc, &kbase, 4),
                        (&keys, &filled),
                        (&qpos, &h, &batch),
                        (w, SCORE_CHAINS),
                    );
                    let tile_max = b.op(format!(
                        "vector.reduction <maxnumf>, {s} fastmath<nnan> : {vt} into f32"
                    ));
                    let m_old = b.load(&maxes, i, F32, F32);
                    let m_new = b.op(format!(
                        "arith.maxnumf {m_old}, {tile_max} fastmath<nnan> : f32"
                    ));
                    let hidden = b.cmpf("oeq", &m_new, &neg_inf, F32);
                    let m_use = b.select(&hidden, &fzero, &m_new, F32);
                    let m_use_v = b.splat(&m_use, F32, w);
                    let shifted = b.bin("subf", &s, &m_use_v, &vt);
                    let p = vexpr::exp2_nonpositive(b, &shifted, w);
                    let tile_sum = b.reduce("add", &p, &vt, F32);
                    let shift = b.bin("subf", &m_old, &m_use, F32);
                    let shift_v = b.splat(&shift, F32, w);
                    let alpha_v = vexpr::exp2_nonpositive(b, &shift_v, w);
                    let alpha = b.op(format!("vector.extract {alpha_v}[0] : f32 from {vt}"));
                    let l_old = b.load(&sums, i, F32, F32);
                    let l_new = b.fma(&l_old, &alpha, &tile_sum, F32);
                    b.store(&l_new, &sums, i, F32, F32);
                    b.store(&m_new, &maxes, i, F32, F32);
                    let alpha_vv = b.splat(&alpha, F32, wv);
                    let weights: Vec<Val> = (0..w)
                        .map(|j| {
                            let pj = b.op(format!("vector.extract {p}[{j}] : f32 from {vt}"));
                            b.splat(&pj, F32, wv)
                        })
                        .collect();
                    let arow = b.muli(i, &cd);
                    b.for_range(&c0, &cd, &cwv, &[], |b, c, _| {
                        let at = b.addi(&arow, c);
                        let o = b.load(&acc, &at, F32, &vtv);
                        let o = b.bin("mulf", &o, &alpha_vv, &vtv);
                        // `value_chains` independent sums over the slots (the first starting
                        // from the rescaled output), added at the end.
                        let mut sums = vec![o];
                        for (j, pj) in weights.iter().enumerate() {
                            let sj = b.i64(j as i64);
                            let sj = b.addi(&s0, &sj);
                            let row = b.muli(&sj, &row_stride);
                            let row = b.addi(&row, &pair);
                            let row = b.muli(&row, &cd);
                            let row = b.addi(&row, c);
                            let v = b.load(&vc, &row, F32, &vtv);
                            let chain = j % value_chains;
                            if chain < sums.len() {
                                sums[chain] = b.fma(pj, &v, &sums[chain], &vtv);
                            } else {
                                sums.push(b.bin("mulf", pj, &v, &vtv));
                            }
                        }
                        let o = add_pairwise(b, sums, &vtv);
                        b.store(&o, &acc, &at, F32, &vtv);
                        vec![]
                    });
                    vec![]
                });
                vec![]
            });

            b.if_else(
                &sharing,
                &[],
                |b| {
                    // This share's unnormalized output, maximum and sum, for the combining.
                    b.for_range(&c0, &cgroup, &c1, &[], |b, i, _| {
                        let row = partial_row(b, &pair, &split, i, (group, d));
                        let one = b.f32(1.0);
                        let one_v = b.splat(&one, F32, wv);
                        let arow = b.muli(i, &cd);
                        store_scaled(b, &acc, &arow, &work, &row, &one_v, (&c0, &cd, &cwv), wv);
                        let at = b.addi(&row, &cd);
                        let m = b.load(&maxes, i, F32, F32);
                        b.store(&m, &work, &at, F32, F32);
                        let at = b.addi(&at, &c1);
                        let l = b.load(&sums, i, F32, F32);
                        b.store(&l, &work, &at, F32, F32);
                        vec![]
                    });
                    vec![]
                },
                |b| {
                    // Normalize and write out; a query that saw nothing gets zeros.
                    b.for_range(&c0, &cgroup, &c1, &[], |b, i, _| {
                        let l = b.load(&sums, i, F32, F32);
                        let (_, inverse_v) = reciprocal_or_zero(b, &l, (&fzero, &fone), wv);
                        let orow = out_row(b, (&batch, &kv, i), (h_count, group, d));
                        let arow = b.muli(i, &cd);
                        store_scaled(
                            b,
                            &acc,
                            &arow,
                            &out,
                            &orow,
                            &inverse_v,
                            (&c0, &cd, &cwv),
                            wv,
                        );
                        vec![]
                    });
                    vec![]
                },
            );
        });
        vec![]
    });
    b.finish(name)
}

/// The most programs a (batch row, KV head held)'s cache is shared out over, as the GPU's
/// kernel: the workspace holds this many shares per pair.
pub const CACHE_SPLITS: usize = super::decode_gpu::SPLITS;

/// Share `split` of `blocks` key blocks, `per_split` each: its blocks `start..end`, and whether
/// it holds `slot_block`, the new token's (the share that appends the token).
pub(crate) fn share_blocks(
    b: &mut Builder,
    (split, per_split): (&Val, &Val),
    blocks: &Val,
    slot_block: &Val,
) -> (Val, Val, Val) {
    let start = b.muli(split, per_split);
    let start = b.mini(&start, blocks);
    let end = b.addi(&start, per_split);
    let end = b.mini(&end, blocks);
    let after_start = b.cmpi("sge", slot_block, &start, I64);
    let before_end = b.cmpi("slt", slot_block, &end, I64);
    let holds = b.bin("andi", &after_start, &before_end, "i1");
    (start, end, holds)
}

/// Where query head `i` of KV head `kv`'s group writes its output for batch row `batch`.
fn out_row(
    b: &mut Builder,
    (batch, kv, i): (&Val, &Val, &Val),
    (heads, group, d): (i64, usize, usize),
) -> Val {
    let cgroup = b.i64(group as i64);
    let ch = b.i64(heads);
    let cd = b.i64(d as i64);
    let gh = b.muli(kv, &cgroup);
    let h = b.addi(&gh, i);
    let orow = b.muli(batch, &ch);
    let orow = b.addi(&orow, &h);
    b.muli(&orow, &cd)
}

/// Combines the `parts` shares of pair `pair` (batch row `batch`, KV head `kv`) from the
/// workspace: each share's output and sum rescaled to the largest maximum, summed and
/// normalized (a query that no share let see a key gets zeros); `weights` holds
/// [`CACHE_SPLITS`] floats of scratch.
fn combine_shares(
    b: &mut Builder,
    (work, out, weights): (&Val, &Val, &Val),
    (pair, batch, kv, parts): (&Val, &Val, &Val, &Val),
    (heads, group, d, wv): (i64, usize, usize, usize),
) {
    let vtv = vf32(wv);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let cd = b.i64(d as i64);
    let cwv = b.i64(wv as i64);
    let cgroup = b.i64(group as i64);
    let neg_inf = b.f32(f32::NEG_INFINITY);
    let (fzero, fone) = (b.f32(0.0), b.f32(1.0));
    let zero_v = b.splat_f32(0.0, wv);
    b.for_range(&c0, &cgroup, &c1, &[], |b, i, _| {
        // The largest maximum over the shares.
        let top = b.for_range(
            &c0,
            parts,
            &c1,
            &[(neg_inf.clone(), F32.to_string())],
            |b, s, m| {
                let row = partial_row(b, pair, s, i, (group, d));
                let at = b.addi(&row, &cd);
                let ms = b.load(work, &at, F32, F32);
                vec![b.op(format!("arith.maxnumf {}, {ms} : f32", m[0]))]
            },
        )[0]
        .clone();
        // Each share's weight 2^(m_s - top) (0 for a share that saw nothing), kept in
        // `weights` for its outputs, and the sum of the weighted sums.
        let total = b.for_range(
            &c0,
            parts,
            &c1,
            &[(fzero.clone(), F32.to_string())],
            |b, s, l| {
                let row = partial_row(b, pair, s, i, (group, d));
                let at = b.addi(&row, &cd);
                let ms = b.load(work, &at, F32, F32);
                let hidden = b.cmpf("oeq", &ms, &neg_inf, F32);
                let shift = b.bin("subf", &ms, &top, F32);
                let shift = b.select(&hidden, &neg_inf, &shift, F32);
                let shift_v = b.splat(&shift, F32, 1);
                let f = vexpr::exp2_nonpositive(b, &shift_v, 1);
                let f = b.op(format!("vector.extract {f}[0] : f32 from {}", vf32(1)));
                b.store(&f, weights, s, F32, F32);
                let at = b.addi(&at, &c1);
                let ls = b.load(work, &at, F32, F32);
                vec![b.fma(&f, &ls, &l[0], F32)]
            },
        )[0]
        .clone();
        let (_, inverse_v) = reciprocal_or_zero(b, &total, (&fzero, &fone), wv);
        let orow = out_row(b, (batch, kv, i), (heads, group, d));
        b.for_range(&c0, &cd, &cwv, &[], |b, c, _| {
            let o = b.for_range(
                &c0,
                parts,
                &c1,
                &[(zero_v.clone(), vtv.clone())],
                |b, s, o| {
                    let row = partial_row(b, pair, s, i, (group, d));
                    let f = b.load(weights, s, F32, F32);
                    let fv = b.splat(&f, F32, wv);
                    let at = b.addi(&row, c);
                    let x = b.load(work, &at, F32, &vtv);
                    vec![b.fma(&fv, &x, &o[0], &vtv)]
                },
            )[0]
            .clone();
            let o = b.bin("mulf", &o, &inverse_v, &vtv);
            let to = b.addi(&orow, c);
            b.store(&o, out, &to, F32, &vtv);
            vec![]
        });
        vec![]
    });
}

/// The attention's KV head that a cache holds at `local`: a chain of selects over
/// `kv_heads` (none where it holds every KV head, or a range of them).
pub(crate) fn layer_kv_head(b: &mut Builder, kv_heads: &[usize], local: &Val) -> Val {
    let first = kv_heads.first().copied().unwrap_or(0);
    if kv_heads.iter().enumerate().all(|(i, &kv)| kv == first + i) {
        return match first {
            0 => local.clone(),
            _ => {
                let first = b.i64(first as i64);
                b.addi(local, &first)
            }
        };
    }
    let mut kv = b.i64(first as i64);
    for (i, &head) in kv_heads.iter().enumerate().skip(1) {
        let at = b.i64(i as i64);
        let here = b.cmpi("eq", local, &at, I64);
        let head = b.i64(head as i64);
        kv = b.select(&here, &head, &kv, I64);
    }
    kv
}

/// The new token's slot and the slots in use, for the token at position `qpos`.
pub(crate) fn slot_and_used(b: &mut Builder, policy: KvPolicy, qpos: &Val) -> (Val, Val) {
    let c1 = b.i64(1);
    match policy.ring {
        None => (qpos.clone(), b.addi(qpos, &c1)),
        Some(ring) => {
            let sinks = b.i64(policy.sinks as i64);
            let ring_v = b.i64(ring.max(1) as i64);
            let past = b.subi(qpos, &sinks);
            let in_ring = b.remi(&past, &ring_v);
            let in_ring = b.addi(&sinks, &in_ring);
            let is_sink = b.cmpi("slt", qpos, &sinks, I64);
            let slot = b.select(&is_sink, qpos, &in_ring, I64);
            let capacity = b.i64(policy.capacity().unwrap_or(0) as i64);
            let tokens = b.addi(qpos, &c1);
            (slot, b.mini(&tokens, &capacity))
        }
    }
}

/// Appends the new token's key into its key block's column and its value into its row, for
/// the (batch row, KV head) pair `new_pair` of the new key and value, `pair` of the caches
/// (`row_stride` pairs per slot): head dims `first`, `first + step`, ... (buffers: the new
/// key and value, the key and value caches).
pub(crate) fn append_new_token(
    b: &mut Builder,
    [k_new, v_new, kc, vc]: [&Val; 4],
    (slot, (new_pair, pair), row_stride): (&Val, (&Val, &Val), &Val),
    (d, w): (usize, usize),
    (first, step): (&Val, &Val),
) {
    let cd = b.i64(d as i64);
    let cw = b.i64(w as i64);
    let new_row = b.muli(new_pair, &cd);
    let slot_block = b.divi(slot, &cw);
    let slot_lane = b.remi(slot, &cw);
    let kblock = b.muli(&slot_block, row_stride);
    let kblock = b.addi(&kblock, pair);
    let kblock = b.muli(&kblock, &cd);
    let kblock = b.muli(&kblock, &cw);
    let vrow = b.muli(slot, row_stride);
    let vrow = b.addi(&vrow, pair);
    let vrow = b.muli(&vrow, &cd);
    b.for_range(first, &cd, step, &[], |b, dd, _| {
        let at = b.addi(&new_row, dd);
        let x = b.load(k_new, &at, F32, F32);
        let to = b.muli(dd, &cw);
        let to = b.addi(&kblock, &to);
        let to = b.addi(&to, &slot_lane);
        b.store(&x, kc, &to, F32, F32);
        let y = b.load(v_new, &at, F32, F32);
        let to = b.addi(&vrow, dd);
        b.store(&y, vc, &to, F32, F32);
        vec![]
    });
}

/// The sum of `values` (at least one), added pairwise.
fn add_pairwise(b: &mut Builder, mut values: Vec<Val>, ty: &str) -> Val {
    while values.len() > 1 {
        let half = values.len().div_ceil(2);
        let (low, high) = values.split_at(half);
        let mut sums: Vec<Val> = low
            .iter()
            .zip(high)
            .map(|(x, y)| b.bin("addf", x, y, ty))
            .collect();
        sums.extend(low[high.len()..].iter().cloned());
        values = sums;
    }
    values.swap_remove(0)
}

/// The scores (base 2) of query head `h`, row `qrow` of `q`, against the `w` slots of one
/// key block, at `kbase` of the key cache (its columns `align` bytes aligned): scaled, the
/// score modifier applied and the mask compiled in over the slots' positions `keys`; `-inf`
/// where hidden or where a slot is not `filled`. The dot products run as up to `chains`
/// independent sums over the head dims, added at the end: in one sum each FMA waits for the
/// one before it, and on a CPU the head dims' FMA latencies, not their throughput, set the
/// time of a decode step's attention.
#[allow(clippy::too_many_arguments)]
pub(crate) fn key_block_scores(
    b: &mut Builder,
    kernel: &AttentionKernel,
    (q, qrow): (&Val, &Val),
    (kc, kbase, align): (&Val, &Val, usize),
    (keys, filled): (&Val, &Val),
    (qpos, h, batch): (&Val, &Val, &Val),
    (w, chains): (usize, usize),
) -> Val {
    let vt = vf32(w);
    let d = kernel.head_dim as usize;
    let chains = (1..=chains.max(1))
        .rev()
        .find(|c| d.is_multiple_of(*c))
        .unwrap_or(1);
    let (c0, c1) = (b.i64(0), b.i64(1));
    let cd = b.i64(d as i64);
    let cw = b.i64(w as i64);
    let log2e = std::f64::consts::LOG2_E;
    let scale = match kernel.score {
        Some(_) => b.splat_f32(kernel.scale as f32, w),
        None => b.splat_f32((kernel.scale * log2e) as f32, w),
    };
    let zero_v = b.splat_f32(0.0, w);
    let step = if chains == 1 {
        c1.clone()
    } else {
        b.i64(chains as i64)
    };
    let init = vec![(zero_v, vt.clone()); chains];
    let dots = b.for_range(&c0, &cd, &step, &init, |b, dd, carried| {
        (0..chains)
            .map(|j| {
                let dd = match j {
                    0 => dd.clone(),
                    _ => {
                        let j = b.i64(j as i64);
                        b.addi(dd, &j)
                    }
                };
                let at = b.addi(qrow, &dd);
                let x = b.load(q, &at, F32, F32);
                let xv = b.splat(&x, F32, w);
                let col = b.muli(&dd, &cw);
                let col = b.addi(kbase, &col);
                let lanes = b.load_aligned(kc, &col, F32, &vt, align);
                b.fma(&xv, &lanes, &carried[j], &vt)
            })
            .collect()
    });
    let dots = add_pairwise(b, dots, &vt);
    let s = b.bin("mulf", &dots, &scale, &vt);
    let env = VecEnv {
        n: w,
        q: qpos.clone(),
        k0: c0.clone(),
        h: h.clone(),
        b: batch.clone(),
        score: Some(s.clone()),
        sides: &[],
        narrow: false,
        keys: Some(keys.clone()),
    };
    let s = match &kernel.score {
        Some(expr) => {
            let modified = vexpr::score(b, expr, &env);
            let log2e_v = b.splat_f32(log2e as f32, w);
            b.bin("mulf", &modified, &log2e_v, &vt)
        }
        None => s,
    };
    let visible = vexpr::mask(b, &kernel.mask, &env);
    let visible = b.bin("andi", &visible, filled, &vi1(w));
    let neg_inf_v = b.splat_f32(f32::NEG_INFINITY, w);
    b.select(&visible, &s, &neg_inf_v, &vt)
}
