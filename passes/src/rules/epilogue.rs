//! Prologue and epilogue fusion around the matrix products: RMSNorm into the projection that
//! reads it, the residual add into the projection that feeds it, SwiGLU's gate and up
//! projections into one op, and the head split and RoPE into the Q/K/V projections.

use egg::{Id, Subst};
use zebra_ir::types::Dim;

use super::{ZGraph, ZRewrite, add_attr, attr, rewrite, rewrite_if, rewrite_to, ty, var};
use crate::lang::{Attr, ZNode, ZOp};

#[rustfmt::skip]
pub fn rules() -> Vec<ZRewrite> {
    vec![
        // linear(rmsnorm(x, g, eps), w) == linear{norm eps}(x, w, g)
        rewrite_to("norm-into-linear",          "(linear none false (rmsnorm ?e ?x ?g) ?w)",   "(linear ?e false ?x ?w ?g)"),
        // r + linear(x, w) == linear{residual}(x, w, r), and the same with the sum the other way
        rewrite_if("residual-into-linear",      "(add ?r (linear ?n false ?x ?w))",          "(linear ?n true ?x ?w ?r)",    same_type("?r")),
        rewrite_if("residual-into-linear-left", "(add (linear ?n false ?x ?w) ?r)",          "(linear ?n true ?x ?w ?r)",    same_type("?r")),
        rewrite_if("residual-into-normed-linear", "(add ?r (linear ?n false ?x ?w ?g))",     "(linear ?n true ?x ?w ?g ?r)", same_type("?r")),
        // silu(x @ wg^T) * (x @ wu^T) == swiglu(x, wg, wu), plain and with the norm fused
        rewrite_to("swiglu",
            "(mul (mul (linear none false ?x ?wg) (sigmoid (linear none false ?x ?wg))) (linear none false ?x ?wu))",
            "(swiglu none ?x ?wg ?wu)"),
        rewrite_to("swiglu-normed",
            "(mul (mul (linear ?e false ?x ?wg ?g) (sigmoid (linear ?e false ?x ?wg ?g))) (linear ?e false ?x ?wu ?g))",
            "(swiglu ?e ?x ?wg ?wu ?g)"),
        // transpose(reshape(linear(x, w), [B, T, H, D]), [0, 2, 1, 3]) == heads_proj(x, w)
        rewrite("heads-proj",                   "(transpose perm:0,2,1,3 (reshape ?s (linear ?n false ?x ?w)))",    heads_proj),
        rewrite("heads-proj-normed",            "(transpose perm:0,2,1,3 (reshape ?s (linear ?n false ?x ?w ?g)))", heads_proj),
        // rope(heads_proj(x, w), pos) == heads_proj{rope}(x, w, pos)
        rewrite_to("rope-into-heads-proj",        "(rope ?b (heads_proj ?h ?d ?n none ?x ?w) ?pos)",    "(heads_proj ?h ?d ?n ?b ?x ?w ?pos)"),
        rewrite_to("rope-into-normed-heads-proj", "(rope ?b (heads_proj ?h ?d ?n none ?x ?w ?g) ?pos)", "(heads_proj ?h ?d ?n ?b ?x ?w ?g ?pos)"),
    ]
}

/// The residual has the sum's type: it is not broadcast.
fn same_type(residual: &'static str) -> impl Fn(&ZGraph, Id, &Subst) -> bool {
    move |egraph, class, s| {
        ty(egraph, s[var(residual)]).is_some() && ty(egraph, s[var(residual)]) == ty(egraph, class)
    }
}

fn heads_proj(egraph: &mut ZGraph, _: Id, s: &Subst) -> Option<Id> {
    let shape = match attr(egraph, s[var("?s")]) {
        Some(Attr::Shape(shape)) => shape.clone(),
        _ => return None,
    };
    let x = ty(egraph, s[var("?x")])?;
    if shape.len() != 4
        || x.rank() != 3
        || shape[0] != x.shape[0]
        || shape[1] != Dim::T
        || x.shape[1] != Dim::T
    {
        return None;
    }
    let (heads, head_dim) = (shape[2].as_const()?, shape[3].as_const()?);
    let mut children = vec![
        add_attr(egraph, Attr::Int(heads as i64)),
        add_attr(egraph, Attr::Int(head_dim as i64)),
        s[var("?n")],
        add_attr(egraph, Attr::None),
        s[var("?x")],
        s[var("?w")],
    ];
    if let Some(g) = s.get(var("?g")) {
        children.push(*g);
    }
    Some(egraph.add(ZNode::new(ZOp::HeadsProj, children)))
}
