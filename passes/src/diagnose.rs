//! Saying why: attention-like computations that the optimizer left unfused, each with the
//! node to point at and the reason, so that `zebra compile` can warn instead of silently
//! producing slow code.

use zebra_ir::op::{BinaryOp, Op};
use zebra_ir::types::Dim;
use zebra_ir::{Graph, NodeId};

use crate::rules::attention::keeps_masked;

/// One attention left unfused.
#[derive(Clone, Debug, PartialEq)]
pub struct Unfused {
    /// The node to point at: the mask, the score modifier or the score product.
    pub node: NodeId,
    pub reason: String,
}

fn is_scores(graph: &Graph, id: NodeId) -> bool {
    let shape = &graph.node(id).ty.shape;
    shape.len() >= 2 && shape[shape.len() - 1] == Dim::T && shape[shape.len() - 2] == Dim::T
}

/// Walks from a score tensor through scalings and score modifiers to a product of queries
/// and keys.
fn reaches_product(graph: &Graph, mut id: NodeId) -> bool {
    for _ in 0..16 {
        match &graph.node(id).op {
            Op::MatMul => return true,
            Op::ScoreMod { .. } | Op::Binary(BinaryOp::Mul | BinaryOp::Div) | Op::Select => {
                // Scores flow through the first operand (the second of a select).
                let operands = graph.operands(id);
                id = if matches!(graph.node(id).op, Op::Select) {
                    operands[1]
                } else {
                    operands[0]
                };
            }
            _ => return false,
        }
    }
    false
}

/// Finds the attention-like computations left in an optimized graph.
pub fn unfused_attention(graph: &Graph) -> Vec<Unfused> {
    let mut found = Vec::new();
    for id in graph.topo_order().unwrap_or_default() {
        let node = graph.node(id);
        match &node.op {
            Op::Mask { .. } => {
                let users = graph.users(id);
                let select = users.iter().copied().find(|u| matches!(graph.node(*u).op, Op::Select));
                let reason = match select {
                    None => "the mask is not applied with select(mask, scores, -inf)".to_string(),
                    Some(select) => {
                        let operands = graph.operands(select);
                        let fill = match graph.node(operands[2]).op {
                            Op::Constant { value } => Some(value),
                            _ => None,
                        };
                        let modified = graph.users(select).into_iter().find_map(|u| match &graph.node(u).op {
                            Op::ScoreMod { expr, .. } if !keeps_masked(expr) => Some(expr.clone()),
                            _ => None,
                        });
                        if fill != Some(f64::NEG_INFINITY) {
                            "masked scores are filled with something other than -inf, so the softmax still weighs them".to_string()
                        } else if let Some(expr) = modified {
                            format!(
                                "the score modifier `{expr}` is applied after the mask and does not keep masked scores at -inf; apply it before masking"
                            )
                        } else if !reaches_product(graph, operands[1]) {
                            "the masked scores are not a scaled product of queries and keys".to_string()
                        } else {
                            "the masked scores do not feed a recognized softmax(...) @ V".to_string()
                        }
                    }
                };
                found.push(Unfused { node: id, reason });
            }
            Op::Compare(c) if is_scores(graph, id) => found.push(Unfused {
                node: id,
                reason: format!(
                    "the mask is computed from a float tensor (`{}`), which the fused kernel cannot classify per tile; write it as an index predicate over q, k, h, b",
                    c.name()
                ),
            }),
            Op::ScoreMod { .. } if !graph.operands(id).iter().any(|o| matches!(graph.node(*o).op, Op::Select)) => {
                found.push(Unfused { node: id, reason: "the modified scores do not feed a recognized softmax(...) @ V".into() })
            }
            Op::MatMul if is_scores(graph, id) && graph.users(id).iter().all(|u| !matches!(graph.node(*u).op, Op::ScoreMod { .. })) => {
                let masked = found.iter().any(|f| graph.node(f.node).loc.is_some());
                if !masked {
                    found.push(Unfused {
                        node: id,
                        reason: "a [T, T] score tensor is materialized: its softmax(...) @ V was not recognized".into(),
                    });
                }
            }
            _ => {}
        }
    }
    found
}
