//! Attention fusion: `softmax(mask(score(scale * Q K^T))) V` becomes one fused attention
//! op carrying its mask predicate, score modifier, scale, GQA grouping and tile sizes.

use std::collections::BTreeMap;
use std::sync::Arc;

use egg::{Id, Subst};
use zebra_ir::expr::{BinOp, Expr, Func, Table, UnOp, Var};
use zebra_ir::op::AttentionKernel;
use zebra_ir::types::Dim;

use super::{ZGraph, ZRewrite, add_attr, attr, constant, rewrite, rewrite_to, ty, var};
use crate::lang::{Attr, ExprAttr, KernelAttr, ZNode, ZOp};

use crate::target::Target;
pub use crate::tiles::Blocks;
use crate::tiles::{TileTable, default_blocks};

/// The attention rules; a fused attention gets the tile sizes `tiles` chose for what it
/// computes, else the default for its mask on `target`.
#[rustfmt::skip]
pub fn rules(target: Target, tiles: TileTable) -> Vec<ZRewrite> {
    vec![
        // s + select(m, 0, -inf) == select(m, s, -inf) (an additive mask)
        rewrite_to("additive-mask",         "(add ?s (select ?m c:0 c:-inf))", "(select ?m ?s c:-inf)"),
        rewrite_to("additive-mask-left",    "(add (select ?m c:0 c:-inf) ?s)", "(select ?m ?s c:-inf)"),
        // f(select(m, s, -inf)) == select(m, f(s), -inf) when f(-inf) == -inf
        rewrite("mask-before-score-mod",    "(score_mod ?e ?n (select ?m ?s c:-inf))",          mask_before_score_mod),
        rewrite("mask-before-score-mod-1",  "(score_mod ?e ?n (select ?m ?s c:-inf) ?x)",       mask_before_score_mod),
        rewrite("mask-before-score-mod-2",  "(score_mod ?e ?n (select ?m ?s c:-inf) ?x ?y)",    mask_before_score_mod),
        // softmax(select(m, score(scale * q k^T), -inf)) @ v == attention(q, k, v)
        rewrite("fuse-attention",           "(matmul (softmax ?p) ?v)", move |g, _, s| fuse(g, s, target, &tiles)),
        // reshape(transpose(attention, [0, 2, 1, 3]), [B, T, H * D]) == attention writing merged heads
        rewrite("merge-heads",              "(reshape ?s (transpose perm:0,2,1,3 ?a))", merge_heads),
    ]
}

/// How a score modifier treats a masked score of -inf.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AtMasked {
    NegInf,
    Finite,
    Unknown,
}

/// Whether `expr` maps `score = -inf` to -inf for every index, assuming its other terms are
/// finite: then masking before or after it is the same.
pub fn keeps_masked(expr: &Expr) -> bool {
    at_masked(expr) == AtMasked::NegInf
}

fn at_masked(expr: &Expr) -> AtMasked {
    use AtMasked::*;
    let positive = |e: &Expr| {
        matches!(e, Expr::Int(v) if *v > 0)
            || matches!(e, Expr::Float(v) if *v > 0.0 && v.is_finite())
    };
    match expr {
        Expr::Var(Var::Score) => NegInf,
        Expr::Float(v) if !v.is_finite() => Unknown,
        Expr::Int(_) | Expr::Float(_) | Expr::Var(_) | Expr::Side { .. } => Finite,
        Expr::Table {
            table: Table::Float(entries),
            ..
        } if entries.iter().any(|x| !x.is_finite()) => Unknown,
        Expr::Table { .. } => Finite,
        Expr::Bool(_) => Unknown,
        Expr::Unary(UnOp::Neg, e) => match at_masked(e) {
            Finite => Finite,
            _ => Unknown,
        },
        Expr::Unary(UnOp::Not, _) => Unknown,
        Expr::Binary(op, a, b) => match (op, at_masked(a), at_masked(b)) {
            (BinOp::Add, NegInf, Finite)
            | (BinOp::Add, Finite, NegInf)
            | (BinOp::Sub, NegInf, Finite) => NegInf,
            (BinOp::Mul, NegInf, _) if positive(b) => NegInf,
            (BinOp::Mul, _, NegInf) if positive(a) => NegInf,
            (BinOp::Div, NegInf, _) if positive(b) => NegInf,
            (BinOp::Add | BinOp::Sub | BinOp::Mul, Finite, Finite) => Finite,
            (BinOp::Div, Finite, _) if positive(b) => Finite,
            _ => Unknown,
        },
        Expr::Call(func, args) => {
            let values: Vec<AtMasked> = args.iter().map(at_masked).collect();
            match func {
                Func::Min if values.contains(&NegInf) && !values.contains(&Unknown) => NegInf,
                Func::Max if values.iter().all(|v| *v == NegInf) => NegInf,
                Func::Tanh | Func::Exp | Func::Exp2 | Func::Abs | Func::Min | Func::Max
                    if values.iter().all(|v| *v == Finite) =>
                {
                    Finite
                }
                _ => Unknown,
            }
        }
    }
}

fn expr_attr(egraph: &ZGraph, id: Id) -> Option<ExprAttr> {
    match attr(egraph, id) {
        Some(Attr::Expr(e)) => Some(e.clone()),
        _ => None,
    }
}

fn mask_before_score_mod(egraph: &mut ZGraph, eclass: Id, s: &Subst) -> Option<Id> {
    let expr = expr_attr(egraph, s[var("?e")])?;
    if !keeps_masked(&expr.expr) {
        return None;
    }
    // Rebuild the score modifier on the unmasked scores, keeping its side inputs.
    let modded = egraph[eclass]
        .nodes
        .iter()
        .find(|n| n.op == ZOp::ScoreMod && n.children[0] == s[var("?e")])?
        .clone();
    let mut children = modded.children.clone();
    children[2] = s[var("?s")];
    let inner = egraph.add(ZNode::new(ZOp::ScoreMod, children));
    let fill = egraph.add(ZNode::leaf(ZOp::Constant(crate::lang::F64(
        f64::NEG_INFINITY,
    ))));
    Some(egraph.add(ZNode::new(ZOp::Select, vec![s[var("?m")], inner, fill])))
}

/// A class's node with this operator, if any (the first in the class's order).
fn node_with(egraph: &ZGraph, class: Id, op: &ZOp) -> Option<ZNode> {
    egraph[class].nodes.iter().find(|n| &n.op == op).cloned()
}

/// A key or value operand, seen through `repeat_kv`: the unrepeated class and the group.
fn unrepeated(egraph: &ZGraph, class: Id) -> (Id, u64) {
    match node_with(egraph, class, &ZOp::RepeatKv) {
        Some(n) => match attr(egraph, n.children[0]) {
            Some(Attr::Int(g)) if *g > 0 => (n.children[1], *g as u64),
            _ => (class, 1),
        },
        None => (class, 1),
    }
}

/// The parts of a recognized attention.
struct Parts {
    mask: Option<ZNode>,
    score_mod: Option<ZNode>,
    scores: ZNode,
}

/// Finds `select(mask, score_mod(scores), -inf)`, with the mask and the modifier optional.
fn parts(egraph: &ZGraph, p: Id) -> Option<Parts> {
    let (mask, scored) =
        match egraph[p].nodes.iter().find(|n| {
            n.op == ZOp::Select && constant(egraph, n.children[2]) == Some(f64::NEG_INFINITY)
        }) {
            Some(select) => (
                Some(node_with(egraph, select.children[0], &ZOp::Mask)?),
                select.children[1],
            ),
            None => (None, p),
        };
    if let Some(scores) = node_with(egraph, scored, &ZOp::Scores) {
        return Some(Parts {
            mask,
            score_mod: None,
            scores,
        });
    }
    let score_mod = node_with(egraph, scored, &ZOp::ScoreMod)?;
    let scores = node_with(egraph, score_mod.children[2], &ZOp::Scores)?;
    Some(Parts {
        mask,
        score_mod: Some(score_mod),
        scores,
    })
}

fn fuse(egraph: &mut ZGraph, s: &Subst, target: Target, tiles: &TileTable) -> Option<Id> {
    let Parts {
        mask,
        score_mod,
        scores,
    } = parts(egraph, s[var("?p")])?;
    let scale = match attr(egraph, scores.children[0]) {
        Some(Attr::Float(f)) => f.0,
        _ => return None,
    };
    let q = scores.children[1];
    let (k, k_group) = unrepeated(egraph, scores.children[2]);
    let (v, v_group) = unrepeated(egraph, s[var("?v")]);
    let (qt, kt, vt) = (
        ty(egraph, q)?.clone(),
        ty(egraph, k)?.clone(),
        ty(egraph, v)?.clone(),
    );
    if qt.rank() != 4 || kt.rank() != 4 || vt.rank() != 4 || k_group != v_group {
        return None;
    }
    let (heads, head_dim) = (qt.shape[1].as_const()?, qt.shape[3].as_const()?);
    let kv_heads = kt.shape[1].as_const()?;
    let same_layout = qt.shape[2] == Dim::T
        && kt.shape[2] == Dim::T
        && vt.shape[2] == Dim::T
        && kt.shape[3] == qt.shape[3]
        && vt.shape[3] == qt.shape[3]
        && vt.shape[1] == kt.shape[1]
        && kv_heads * k_group == heads
        && kt.shape[0] == qt.shape[0]
        && vt.shape[0] == qt.shape[0];
    if !same_layout {
        return None;
    }
    // The mask and the score modifier, with the side inputs they read.
    let mut sides: BTreeMap<Arc<str>, Id> = BTreeMap::new();
    let mut read = |node: &ZNode, names_at: usize, first_side: usize| -> Option<ExprAttr> {
        let names = match attr(egraph, node.children[names_at]) {
            Some(Attr::Names(n)) => n.clone(),
            _ => return None,
        };
        for (name, &id) in names.iter().zip(&node.children[first_side..]) {
            if *sides.entry(name.clone()).or_insert(id) != id {
                return None;
            }
        }
        expr_attr(egraph, node.children[0])
    };
    let mask_expr = match &mask {
        Some(m) => {
            let shape = match attr(egraph, m.children[2]) {
                Some(Attr::Shape(shape)) => shape.clone(),
                _ => return None,
            };
            // A head-dependent mask must span exactly the query heads.
            if shape[1] != Dim::ONE && shape[1] != Dim::Const(heads) {
                return None;
            }
            Some(read(m, 1, 3)?)
        }
        None => None,
    };
    let score_expr = match &score_mod {
        Some(m) => Some(read(m, 1, 3)?),
        None => None,
    };
    let loc = mask_expr
        .as_ref()
        .and_then(|e| e.loc)
        .or(score_expr.as_ref().and_then(|e| e.loc));
    let mut kernel = AttentionKernel {
        name: String::new(),
        mask: mask_expr.map_or(Expr::Bool(true), |e| e.expr),
        score: score_expr.map(|e| e.expr),
        sides: sides.keys().map(|s| s.to_string()).collect(),
        scale,
        heads,
        kv_heads,
        head_dim,
        block_q: 0,
        block_k: 0,
        merge_heads: false,
        loc,
    };
    let blocks = tiles.blocks(
        &kernel,
        default_blocks(target, &kernel.mask, kernel.heads as usize),
    );
    (kernel.block_q, kernel.block_k) = (blocks.block_q, blocks.block_k);
    let mut children = vec![
        add_attr(egraph, Attr::Kernel(KernelAttr::new(kernel))),
        q,
        k,
        v,
    ];
    for (_, side) in sides {
        children.push(side);
        for block in [blocks.block_q, blocks.block_k] {
            let leaf = add_attr(egraph, Attr::Int(block as i64));
            children.push(egraph.add(ZNode::new(ZOp::TileRanges, vec![leaf, side])));
        }
    }
    Some(egraph.add(ZNode::new(ZOp::Attention, children)))
}

fn merge_heads(egraph: &mut ZGraph, _: Id, s: &Subst) -> Option<Id> {
    let attention = node_with(egraph, s[var("?a")], &ZOp::Attention)?;
    let mut kernel = match attr(egraph, attention.children[0]) {
        Some(Attr::Kernel(k)) if !k.kernel.merge_heads => (*k.kernel).clone(),
        _ => return None,
    };
    let shape = match attr(egraph, s[var("?s")]) {
        Some(Attr::Shape(shape)) => shape.clone(),
        _ => return None,
    };
    let q = ty(egraph, attention.children[1])?;
    if shape
        != [
            q.shape[0],
            Dim::T,
            Dim::Const(kernel.heads * kernel.head_dim),
        ]
    {
        return None;
    }
    kernel.merge_heads = true;
    let mut children = attention.children.clone();
    children[0] = add_attr(egraph, Attr::Kernel(KernelAttr::new(kernel)));
    Some(egraph.add(ZNode::new(ZOp::Attention, children)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zebra_ir::expr::parse_expr;

    #[test]
    fn which_score_modifiers_keep_masked_scores_masked() {
        let keeps = |e: &str| keeps_masked(&parse_expr(e).unwrap());
        assert!(keeps("score"));
        assert!(keeps("score - exp2(-8.0 * (h + 1) / 8) * (q - k)"));
        assert!(keeps("score * 0.5"));
        assert!(!keeps("50.0 * tanh(score / 50.0)"));
        assert!(!keeps("-score"));
        assert!(!keeps("score * (q - k)"));
    }
}
