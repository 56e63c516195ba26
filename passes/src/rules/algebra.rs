//! Algebraic cleanups: layout-op chains and scale folding. Common subexpressions need no
//! rule: the e-graph shares equal nodes by construction.

use egg::{Id, Subst};

use super::{ZGraph, ZRewrite, add_attr, attr, constant, rewrite, rewrite_if, rewrite_to, ty, var};
use crate::lang::{Attr, F64, ZNode, ZOp};

#[rustfmt::skip]
pub fn rules() -> Vec<ZRewrite> {
    vec![
        // transpose(transpose(x, p), q) == transpose(x, [p[q[0]], p[q[1]], ...])
        rewrite(   "transpose-of-transpose", "(transpose ?q (transpose ?p ?x))",  compose_transposes),
        // transpose(x, identity) == x
        rewrite_if("transpose-identity",     "(transpose ?p ?x)", "?x",          |g, _, s| is_identity(g, s)),
        // reshape(reshape(x, s1), s2) == reshape(x, s2)
        rewrite_to("reshape-of-reshape",     "(reshape ?t (reshape ?s ?x))", "(reshape ?t ?x)"),
        // reshape(x, shape(x)) == x
        rewrite_if("reshape-identity",       "(reshape ?s ?x)", "?x",            |g, _, s| same_shape(g, s)),
        // (x * a) * b == x * (a * b) for scalar constants a, b
        rewrite(   "fold-scales",            "(mul (mul ?x ?a) ?b)",             fold_scales),
        // x / c == x * (1 / c) for a scalar constant c != 0
        rewrite(   "div-by-constant",        "(div ?x ?c)",                      div_by_constant),
        // x * 1 == x when the scalar does not change the shape
        rewrite_if("mul-by-one",             "(mul ?x c:1)", "?x",               |g, c, s| ty(g, c) == ty(g, s[var("?x")])),
    ]
}

fn perm(egraph: &ZGraph, id: Id) -> Option<Vec<u8>> {
    match attr(egraph, id) {
        Some(Attr::Perm(p)) => Some(p.clone()),
        _ => None,
    }
}

fn compose_transposes(egraph: &mut ZGraph, _: Id, s: &Subst) -> Option<Id> {
    let (p, q) = (perm(egraph, s[var("?p")])?, perm(egraph, s[var("?q")])?);
    if p.len() != q.len() {
        return None;
    }
    let composed: Vec<u8> = q.iter().map(|&i| p[i as usize]).collect();
    let leaf = add_attr(egraph, Attr::Perm(composed));
    Some(egraph.add(ZNode::new(ZOp::Transpose, vec![leaf, s[var("?x")]])))
}

fn is_identity(egraph: &ZGraph, s: &Subst) -> bool {
    perm(egraph, s[var("?p")]).is_some_and(|p| p.iter().enumerate().all(|(i, &x)| i == x as usize))
}

fn same_shape(egraph: &ZGraph, s: &Subst) -> bool {
    match (attr(egraph, s[var("?s")]), ty(egraph, s[var("?x")])) {
        (Some(Attr::Shape(shape)), Some(t)) => *shape == t.shape,
        _ => false,
    }
}

fn fold_scales(egraph: &mut ZGraph, _: Id, s: &Subst) -> Option<Id> {
    let (a, b) = (
        constant(egraph, s[var("?a")])?,
        constant(egraph, s[var("?b")])?,
    );
    let c = egraph.add(ZNode::leaf(ZOp::Constant(F64(a * b))));
    Some(egraph.add(ZNode::new(
        ZOp::Binary(zebra_ir::BinaryOp::Mul),
        vec![s[var("?x")], c],
    )))
}

fn div_by_constant(egraph: &mut ZGraph, _: Id, s: &Subst) -> Option<Id> {
    let c = constant(egraph, s[var("?c")])?;
    if c == 0.0 || !c.is_finite() {
        return None;
    }
    let inverse = egraph.add(ZNode::leaf(ZOp::Constant(F64(1.0 / c))));
    Some(egraph.add(ZNode::new(
        ZOp::Binary(zebra_ir::BinaryOp::Mul),
        vec![s[var("?x")], inverse],
    )))
}
