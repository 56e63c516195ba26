//! Recognition: naming what a subgraph computes, as the lowering and users write it, so that
//! the fusion rules match it in one step. `softmax`, `qk`, `scores` and `repeat_kv` are
//! recognized forms (never extracted); `rmsnorm` and `linear` are IR operations.

use egg::{Id, Subst};
use zebra_ir::types::Dim;

use super::{
    ZGraph, ZRewrite, add_attr, attr, constant, is_last_axis, rewrite, rewrite_if, ty, var,
};
use crate::lang::{Attr, F64, ZNode, ZOp};

/// The softmax guards must be at or below these to be harmless: a max floor below any real
/// score, a sum floor below 1 (a row with a visible key sums to at least 1).
const MAX_FLOOR_LIMIT: f64 = -1e30;
const SUM_FLOOR_LIMIT: f64 = 1e-30;

#[rustfmt::skip]
pub fn rules() -> Vec<ZRewrite> {
    vec![
        // exp(s - max(rowmax(s), lo)) / max(rowsum(exp(s - max(rowmax(s), lo))), tiny) == softmax(s),
        // with zeros for rows where every s is -inf (the lowering's form)
        rewrite_if("softmax-guarded",
            "(div (exp (sub ?s (max (reduce_max ?a ?s) ?lo))) (max (reduce_sum ?a (exp (sub ?s (max (reduce_max ?a ?s) ?lo)))) ?tiny))",
            "(softmax ?s)", |g, _, s| is_last_axis(g, s[var("?a")], s[var("?s")]) && guards_are_harmless(g, s)),
        // exp(s - rowmax(s)) / rowsum(exp(s - rowmax(s))) == softmax(s), except on rows where every
        // s is -inf: NaN here, zeros in the fused kernel
        rewrite_if("softmax-plain",
            "(div (exp (sub ?s (reduce_max ?a ?s))) (reduce_sum ?a (exp (sub ?s (reduce_max ?a ?s)))))",
            "(softmax ?s)", |g, _, s| is_last_axis(g, s[var("?a")], s[var("?s")])),
        // e * recip(rowsum(e)) == e / rowsum(e) for e = exp(s - rowmax(s))
        rewrite_if("softmax-recip",
            "(mul (exp (sub ?s (reduce_max ?a ?s))) (recip (reduce_sum ?a (exp (sub ?s (reduce_max ?a ?s))))))",
            "(softmax ?s)", |g, _, s| is_last_axis(g, s[var("?a")], s[var("?s")])),
        // reshape(expand(reshape(k, [B, kv, 1, T, D]), [B, kv, G, T, D]), [B, kv * G, T, D]) == repeat_kv(k, G)
        rewrite("repeat-kv", "(reshape ?c (expand ?b (reshape ?a ?k)))", repeat_kv),
        // q @ transpose(x, p) == qk(q, transpose(x, p with its last two axes swapped))
        rewrite("qk", "(matmul ?q (transpose ?p ?x))", qk),
        // qk(q, k) * c == scores(c, q, k) for a scalar constant c
        rewrite("scores-scaled", "(mul (qk ?q ?k) ?c)", |g, _, s| scores(g, s, "?c")),
        // qk(q * c, k) == scores(c, q, k) for a scalar constant c
        rewrite("scores-scaled-query", "(qk (mul ?q ?c) ?k)", |g, _, s| scores(g, s, "?c")),
        // qk(q, k) == scores(1, q, k)
        rewrite("scores-unscaled", "(qk ?q ?k)", |g, _, s| scores(g, s, "")),
        // x * rsqrt(mean(x * x, last) + eps) * g == rmsnorm(x, g, eps)
        rewrite("rmsnorm", "(mul (mul ?x (rsqrt (add (reduce_mean ?a (mul ?x ?x)) ?eps))) ?g)", rmsnorm),
        // x @ transpose(w, [1, 0]) == linear(x, w) for a matrix w
        rewrite_if("linear", "(matmul ?x (transpose perm:1,0 ?w))", "(linear none false ?x ?w)",
            |g, _, s| ty(g, s[var("?w")]).is_some_and(|t| t.rank() == 2)),
    ]
}

fn guards_are_harmless(egraph: &ZGraph, s: &Subst) -> bool {
    let lo = constant(egraph, s[var("?lo")]);
    let tiny = constant(egraph, s[var("?tiny")]);
    matches!(lo, Some(lo) if lo.is_finite() && lo <= MAX_FLOOR_LIMIT)
        && matches!(tiny, Some(t) if t > 0.0 && t <= SUM_FLOOR_LIMIT)
}

fn shape(egraph: &ZGraph, id: Id) -> Option<Vec<Dim>> {
    match attr(egraph, id) {
        Some(Attr::Shape(s)) => Some(s.clone()),
        _ => None,
    }
}

fn repeat_kv(egraph: &mut ZGraph, _: Id, s: &Subst) -> Option<Id> {
    let k = ty(egraph, s[var("?k")])?.clone();
    let (a, b, c) = (
        shape(egraph, s[var("?a")])?,
        shape(egraph, s[var("?b")])?,
        shape(egraph, s[var("?c")])?,
    );
    if k.rank() != 4 || a.len() != 5 || b.len() != 5 || c.len() != 4 {
        return None;
    }
    let (batch, kv, t, d) = (k.shape[0], k.shape[1].as_const()?, k.shape[2], k.shape[3]);
    let group = b[2].as_const()?;
    let ok = a == [batch, Dim::Const(kv), Dim::ONE, t, d]
        && b == [batch, Dim::Const(kv), Dim::Const(group), t, d]
        && c == [batch, Dim::Const(kv * group), t, d];
    if !ok {
        return None;
    }
    let g = add_attr(egraph, Attr::Int(group as i64));
    Some(egraph.add(ZNode::new(ZOp::RepeatKv, vec![g, s[var("?k")]])))
}

fn qk(egraph: &mut ZGraph, _: Id, s: &Subst) -> Option<Id> {
    let mut p = match attr(egraph, s[var("?p")]) {
        Some(Attr::Perm(p)) => p.clone(),
        _ => return None,
    };
    let n = p.len();
    if n < 2 || ty(egraph, s[var("?q")])?.rank() != n {
        return None;
    }
    p.swap(n - 2, n - 1);
    let leaf = add_attr(egraph, Attr::Perm(p));
    let k = egraph.add(ZNode::new(ZOp::Transpose, vec![leaf, s[var("?x")]]));
    Some(egraph.add(ZNode::new(ZOp::Qk, vec![s[var("?q")], k])))
}

fn scores(egraph: &mut ZGraph, s: &Subst, scale: &str) -> Option<Id> {
    let scale = if scale.is_empty() {
        1.0
    } else {
        constant(egraph, s[var(scale)])?
    };
    let (q, k) = (ty(egraph, s[var("?q")])?, ty(egraph, s[var("?k")])?);
    if q.rank() != k.rank() || q.rank() < 2 {
        return None;
    }
    let leaf = add_attr(egraph, Attr::Float(F64(scale)));
    Some(egraph.add(ZNode::new(
        ZOp::Scores,
        vec![leaf, s[var("?q")], s[var("?k")]],
    )))
}

fn rmsnorm(egraph: &mut ZGraph, _: Id, s: &Subst) -> Option<Id> {
    let (x, g) = (s[var("?x")], s[var("?g")]);
    let eps = constant(egraph, s[var("?eps")])?;
    let xt = ty(egraph, x)?;
    let gt = ty(egraph, g)?;
    if !is_last_axis(egraph, s[var("?a")], x)
        || xt.shape.last().map(|d| vec![*d]) != Some(gt.shape.clone())
        || eps <= 0.0
    {
        return None;
    }
    let leaf = add_attr(egraph, Attr::Float(F64(eps)));
    Some(egraph.add(ZNode::new(ZOp::RmsNorm, vec![leaf, x, g])))
}
