//! Training kernels around the LM head and the embedding: the chunked cross-entropy
//! (`ce_lse`, `ce_loss`, `ce_grad`), which recomputes logits a vocabulary row at a time and
//! never holds `[T, vocab]` of them, and the embedding table's gradient.
//!
//! Buffers: `h [B*T, K]`, `w [V, K]`, `targets i64 [B*T]`, `lse [B*T]`, `dloss [B*T]`, then the
//! output, as each op reads them. Rows are `B * T` tokens.

use crate::mlir::{Builder, F32, I64, Val, entry, vf32};

/// Tokens per program of the row-wise kernels.
pub const ROWS: usize = 4;
/// Vocabulary rows per program of `embedding_grad`.
pub const VOCAB_ROWS: usize = 16;

/// The largest vector width (at most `max`) dividing `k`.
fn width(k: usize, max: usize) -> usize {
    crate::kernels::attention::vector_width(k, max)
}

/// `sum(x[a..a + k] * y[b..b + k])`, vectorized.
fn dot(b: &mut Builder, x: &Val, a: &Val, y: &Val, c: &Val, k: usize, w: usize) -> Val {
    let vt = vf32(w);
    let c0 = b.i64(0);
    let ck = b.i64(k as i64);
    let cw = b.i64(w as i64);
    let zero = b.splat_f32(0.0, w);
    let sum = b.for_range(&c0, &ck, &cw, &[(zero, vt.clone())], |b, i, acc| {
        let at = b.addi(a, i);
        let xv = b.load(x, &at, F32, &vt);
        let at = b.addi(c, i);
        let yv = b.load(y, &at, F32, &vt);
        vec![b.fma(&xv, &yv, &acc[0], &vt)]
    });
    b.reduce("add", &sum[0], &vt, F32)
}

/// `out[a..a + k] += s * x[c..c + k]`, vectorized.
#[allow(clippy::too_many_arguments)]
fn axpy(b: &mut Builder, out: &Val, a: &Val, s: &Val, x: &Val, c: &Val, k: usize, w: usize) {
    let vt = vf32(w);
    let c0 = b.i64(0);
    let ck = b.i64(k as i64);
    let cw = b.i64(w as i64);
    let sv = b.splat(s, F32, w);
    b.for_range(&c0, &ck, &cw, &[], |b, i, _| {
        let at = b.addi(c, i);
        let xv = b.load(x, &at, F32, &vt);
        let to = b.addi(a, i);
        let old = b.load(out, &to, F32, &vt);
        let new = b.fma(&sv, &xv, &old, &vt);
        b.store(&new, out, &to, F32, &vt);
        vec![]
    });
}

/// `out[a..a + k] = 0`.
fn zero(b: &mut Builder, out: &Val, a: &Val, k: usize, w: usize) {
    let vt = vf32(w);
    let c0 = b.i64(0);
    let ck = b.i64(k as i64);
    let cw = b.i64(w as i64);
    let z = b.splat_f32(0.0, w);
    b.for_range(&c0, &ck, &cw, &[], |b, i, _| {
        let to = b.addi(a, i);
        b.store(&z, out, &to, F32, &vt);
        vec![]
    });
}

/// The rows `[pid * ROWS, min((pid + 1) * ROWS, B * T))` of the row-wise kernels, and `B * T`.
fn row_range(b: &mut Builder, pid: &Val) -> (Val, Val, Val) {
    let e = entry();
    let batch = b.i64_at(&e.dims, 0);
    let t = b.i64_at(&e.dims, 1);
    let total = b.muli(&batch, &t);
    let rows = b.i64(ROWS as i64);
    let first = b.muli(pid, &rows);
    let last = b.addi(&first, &rows);
    let last = b.mini(&last, &total);
    (first, last, total)
}

/// `ce_lse`: per token, the log-sum-exp of its logits, with a running max. Buffers: h, w, out.
pub fn ce_lse(name: &str, k: usize, vocab: usize, max_vector: usize) -> String {
    let w = width(k, max_vector);
    let mut b = Builder::new();
    let e = entry();
    let [h, wt, out] = std::array::from_fn(|i| b.ptr_at(&e.bufs, i));
    let (c0, c1) = (b.i64(0), b.i64(1));
    let ck = b.i64(k as i64);
    let cv = b.i64(vocab as i64);
    let neg_inf = b.f32(f32::NEG_INFINITY);
    let fzero = b.f32(0.0);
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        let (first, last, _) = row_range(b, pid);
        b.for_range(&first, &last, &c1, &[], |b, row, _| {
            let hrow = b.muli(row, &ck);
            let init = [
                (neg_inf.clone(), F32.to_string()),
                (fzero.clone(), F32.to_string()),
            ];
            let state = b.for_range(&c0, &cv, &c1, &init, |b, v, acc| {
                let wrow = b.muli(v, &ck);
                let logit = dot(b, &h, &hrow, &wt, &wrow, k, w);
                // Running max m and sum s of exp(logit - m).
                let m = b.bin("maxnumf", &acc[0], &logit, F32);
                let shift = b.bin("subf", &acc[0], &m, F32);
                let scale = b.op(format!("math.exp {shift} : f32"));
                let rest = b.bin("subf", &logit, &m, F32);
                let term = b.op(format!("math.exp {rest} : f32"));
                let s = b.fma(&acc[1], &scale, &term, F32);
                vec![m, s]
            });
            let log_s = b.op(format!("math.log {} : f32", state[1]));
            let lse = b.bin("addf", &state[0], &log_s, F32);
            b.store(&lse, &out, row, F32, F32);
            vec![]
        });
        vec![]
    });
    b.finish(name)
}

/// `ce_loss`: per token, `lse - logit[target]`, or 0 where the target is negative. Buffers:
/// h, w, targets, lse, out.
pub fn ce_loss(name: &str, k: usize, max_vector: usize) -> String {
    let w = width(k, max_vector);
    let mut b = Builder::new();
    let e = entry();
    let [h, wt, targets, lse, out] = std::array::from_fn(|i| b.ptr_at(&e.bufs, i));
    let (c0, c1) = (b.i64(0), b.i64(1));
    let ck = b.i64(k as i64);
    let fzero = b.f32(0.0);
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        let (first, last, _) = row_range(b, pid);
        b.for_range(&first, &last, &c1, &[], |b, row, _| {
            let target = b.load(&targets, row, I64, I64);
            let valid = b.cmpi("sge", &target, &c0, I64);
            let safe = b.maxi(&target, &c0);
            let hrow = b.muli(row, &ck);
            let wrow = b.muli(&safe, &ck);
            let logit = dot(b, &h, &hrow, &wt, &wrow, k, w);
            let l = b.load(&lse, row, F32, F32);
            let loss = b.bin("subf", &l, &logit, F32);
            let loss = b.select(&valid, &loss, &fzero, F32);
            b.store(&loss, &out, row, F32, F32);
            vec![]
        });
        vec![]
    });
    b.finish(name)
}

/// The weight of vocabulary row `v` in a token's gradient: `dloss * (exp(logit - lse) -
/// [v == target])`, 0 for a negative target.
#[allow(clippy::too_many_arguments)]
fn token_weight(
    b: &mut Builder,
    logit: &Val,
    lse: &Val,
    dloss: &Val,
    target: &Val,
    v: &Val,
) -> Val {
    let c0 = b.i64(0);
    let shifted = b.bin("subf", logit, lse, F32);
    let p = b.op(format!("math.exp {shifted} : f32"));
    let hit = b.cmpi("eq", target, v, I64);
    let one = b.f32(1.0);
    let fzero = b.f32(0.0);
    let onehot = b.select(&hit, &one, &fzero, F32);
    let g = b.bin("subf", &p, &onehot, F32);
    let g = b.bin("mulf", &g, dloss, F32);
    let valid = b.cmpi("sge", target, &c0, I64);
    b.select(&valid, &g, &fzero, F32)
}

/// `ce_grad` with respect to the hidden states: per token, `sum_v g_v * w[v]`. Buffers: h,
/// w, targets, lse, dloss, out `[B*T, K]`.
pub fn ce_grad_hidden(name: &str, k: usize, vocab: usize, max_vector: usize) -> String {
    let w = width(k, max_vector);
    let mut b = Builder::new();
    let e = entry();
    let [h, wt, targets, lse, dloss, out] = std::array::from_fn(|i| b.ptr_at(&e.bufs, i));
    let (c0, c1) = (b.i64(0), b.i64(1));
    let ck = b.i64(k as i64);
    let cv = b.i64(vocab as i64);
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        let (first, last, _) = row_range(b, pid);
        b.for_range(&first, &last, &c1, &[], |b, row, _| {
            let hrow = b.muli(row, &ck);
            zero(b, &out, &hrow, k, w);
            let target = b.load(&targets, row, I64, I64);
            let l = b.load(&lse, row, F32, F32);
            let d = b.load(&dloss, row, F32, F32);
            b.for_range(&c0, &cv, &c1, &[], |b, v, _| {
                let wrow = b.muli(v, &ck);
                let logit = dot(b, &h, &hrow, &wt, &wrow, k, w);
                let g = token_weight(b, &logit, &l, &d, &target, v);
                axpy(b, &out, &hrow, &g, &wt, &wrow, k, w);
                vec![]
            });
            vec![]
        });
        vec![]
    });
    b.finish(name)
}

/// `ce_grad` with respect to the output weight: per vocabulary row `v`, `sum_t g_tv * h[t]`.
/// Buffers as `ce_grad_hidden`, out `[V, K]`. One program per vocabulary row.
pub fn ce_grad_weight(name: &str, k: usize, max_vector: usize) -> String {
    let w = width(k, max_vector);
    let mut b = Builder::new();
    let e = entry();
    let [h, wt, targets, lse, dloss, out] = std::array::from_fn(|i| b.ptr_at(&e.bufs, i));
    let (c0, c1) = (b.i64(0), b.i64(1));
    let ck = b.i64(k as i64);
    let batch = b.i64_at(&e.dims, 0);
    let t = b.i64_at(&e.dims, 1);
    let total = b.muli(&batch, &t);
    b.for_range(&e.first, &e.last, &c1, &[], |b, v, _| {
        let wrow = b.muli(v, &ck);
        zero(b, &out, &wrow, k, w);
        b.for_range(&c0, &total, &c1, &[], |b, row, _| {
            let hrow = b.muli(row, &ck);
            let logit = dot(b, &h, &hrow, &wt, &wrow, k, w);
            let target = b.load(&targets, row, I64, I64);
            let l = b.load(&lse, row, F32, F32);
            let d = b.load(&dloss, row, F32, F32);
            let g = token_weight(b, &logit, &l, &d, &target, v);
            axpy(b, &out, &wrow, &g, &h, &hrow, k, w);
            vec![]
        });
        vec![]
    });
    b.finish(name)
}

/// `embedding_grad`: rows `[pid * VOCAB_ROWS, ...)` of the table's gradient, each the sum of
/// the gradients of the tokens that read it. Buffers: ids `i64 [N]`, dy `[N, D]`, out `[V, D]`;
/// `N` is `B * T` times `tokens_per_position`.
pub fn embedding_grad(name: &str, vocab: usize, d: usize, max_vector: usize) -> String {
    let w = width(d, max_vector);
    let mut b = Builder::new();
    let e = entry();
    let [ids, dy, out] = std::array::from_fn(|i| b.ptr_at(&e.bufs, i));
    let (c0, c1) = (b.i64(0), b.i64(1));
    let cd = b.i64(d as i64);
    let cv = b.i64(vocab as i64);
    let per = b.i64(VOCAB_ROWS as i64);
    let batch = b.i64_at(&e.dims, 0);
    let t = b.i64_at(&e.dims, 1);
    let total = b.muli(&batch, &t);
    b.for_range(&e.first, &e.last, &c1, &[], |b, pid, _| {
        let v0 = b.muli(pid, &per);
        let v1 = b.addi(&v0, &per);
        let v1 = b.mini(&v1, &cv);
        b.for_range(&v0, &v1, &c1, &[], |b, v, _| {
            let row = b.muli(v, &cd);
            zero(b, &out, &row, d, w);
            vec![]
        });
        b.for_range(&c0, &total, &c1, &[], |b, token, _| {
            let id = b.load(&ids, token, I64, I64);
            let above = b.cmpi("sge", &id, &v0, I64);
            let below = b.cmpi("slt", &id, &v1, I64);
            let mine = b.bin("andi", &above, &below, "i1");
            b.if_then(&mine, |b| {
                let to = b.muli(&id, &cd);
                let from = b.muli(token, &cd);
                let one = b.f32(1.0);
                axpy(b, &out, &to, &one, &dy, &from, d, w);
            });
            vec![]
        });
        vec![]
    });
    b.finish(name)
}
