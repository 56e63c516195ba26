//! Prologue and epilogue fusion around the matrix products: RMSNorm into the projection that
//! reads it, the residual add into the projection that feeds it, SwiGLU's gate and up
//! projections into one op, and the head split, a bias, QK-norm and RoPE into the Q/K/V
//! projections.

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
        // transpose(reshape(linear(x, w), [B, T, H, D]), [0, 2, 1, 3]) == heads_proj(x, w), and
        // the same with a bias b added to the product: heads_proj{bias}(x, w, b)
        rewrite("heads-proj",                   "(transpose perm:0,2,1,3 (reshape ?s (linear ?n false ?x ?w)))",    heads_proj),
        rewrite("heads-proj-normed",            "(transpose perm:0,2,1,3 (reshape ?s (linear ?n false ?x ?w ?g)))", heads_proj),
        rewrite("heads-proj-biased",            "(transpose perm:0,2,1,3 (reshape ?s (add (linear ?n false ?x ?w) ?b)))",    heads_proj),
        rewrite("heads-proj-normed-biased",     "(transpose perm:0,2,1,3 (reshape ?s (add (linear ?n false ?x ?w ?g) ?b)))", heads_proj),
        // rmsnorm(heads_proj(...), gh) over each head == heads_proj{qk_norm}(..., gh)
        rewrite("qk-norm-into-heads-proj",      "(rmsnorm ?e ?p ?gh)",  |g, _, s| extend_heads_proj(g, s, QK_NORM, "?e", "?gh")),
        // rope(heads_proj(...), pos) == heads_proj{rope}(..., pos)
        rewrite("rope-into-heads-proj",         "(rope ?r ?p ?pos)",    |g, _, s| extend_heads_proj(g, s, ROPE, "?r", "?pos")),
    ]
}

/// The residual has the sum's type: it is not broadcast.
fn same_type(residual: &'static str) -> impl Fn(&ZGraph, Id, &Subst) -> bool {
    move |egraph, class, s| {
        ty(egraph, s[var(residual)]).is_some() && ty(egraph, s[var(residual)]) == ty(egraph, class)
    }
}

/// The attribute children of a `heads_proj` node: heads, head dim, the input's norm, the
/// bias, the QK-norm and the RoPE; its operands come after them.
const QK_NORM: usize = 4;
const ROPE: usize = 5;
const HEADS_PROJ_ATTRS: usize = 6;

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
    let bias = s.get(var("?b")).copied();
    // A bias is one value per output column, added to every row.
    if let Some(b) = bias
        && ty(egraph, b)?.shape != [Dim::Const(heads * head_dim)]
    {
        return None;
    }
    let none = add_attr(egraph, Attr::None);
    let mut children = vec![
        add_attr(egraph, Attr::Int(heads as i64)),
        add_attr(egraph, Attr::Int(head_dim as i64)),
        s[var("?n")],
        add_attr(egraph, Attr::Bool(bias.is_some())),
        none,
        none,
        s[var("?x")],
        s[var("?w")],
    ];
    children.extend(s.get(var("?g")).copied());
    children.extend(bias);
    Some(egraph.add(ZNode::new(ZOp::HeadsProj, children)))
}

/// Folds an op applied to each head of a `heads_proj` into it: the class `?p` holds a
/// `heads_proj` without that op (attribute `slot`, and none after it, so that the ops keep
/// their order), which takes the op's attribute `attr` and its extra operand `operand` (the
/// QK-norm's scales over the head dim, or RoPE's positions).
fn extend_heads_proj(
    egraph: &mut ZGraph,
    s: &Subst,
    slot: usize,
    attr_var: &str,
    operand: &str,
) -> Option<Id> {
    let extra = s[var(operand)];
    // QK-norm is an RMSNorm over the head dim (the last axis), one scale per element of a head.
    if slot == QK_NORM {
        let head_dim = *ty(egraph, s[var("?p")])?.shape.last()?;
        if ty(egraph, extra)?.shape != [head_dim] {
            return None;
        }
    }
    let none = |egraph: &ZGraph, id: Id| matches!(attr(egraph, id), Some(Attr::None));
    // Every such node of the class (one may have the input's norm fused, another not).
    let nodes: Vec<ZNode> = egraph[s[var("?p")]]
        .nodes
        .iter()
        .filter(|n| {
            n.op == ZOp::HeadsProj && (slot..HEADS_PROJ_ATTRS).all(|a| none(egraph, n.children[a]))
        })
        .cloned()
        .collect();
    let mut built: Option<Id> = None;
    for node in nodes {
        let mut children = node.children.clone();
        children[slot] = s[var(attr_var)];
        children.push(extra);
        let id = egraph.add(ZNode::new(ZOp::HeadsProj, children));
        match built {
            Some(first) => {
                egraph.union(first, id);
            }
            None => built = Some(id),
        }
    }
    built
}
