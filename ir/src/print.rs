//! The stable text form of a graph. `parse::parse_graph` reads it back.
//!
//! ```text
//! graph tiny {
//!   layers ["global"]
//!   %0 = input {name = "tokens"} : i64[B, T]
//!   layer 0 {
//!     %1 = weight {name = "model.layers.0.input_layernorm.weight"} : f32[64]
//!     ...
//!   }
//!   output logits = %9
//! }
//! ```
//!
//! Nodes are numbered in the graph's canonical order (`Graph::topo_order`), so the text does
//! not depend on how the graph was built, only on what it computes and the order of creation.

use std::collections::HashMap;
use std::fmt::Write;

use crate::expr::fmt_float;
use crate::graph::{Graph, NodeId};
use crate::op::{AttentionKernel, Op};
use crate::rope::Rope;
use crate::types::fmt_shape;

/// Writes a string literal with `"` and `\` escaped.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The attributes of an operation, as `name = value` pairs in a fixed order.
pub fn attributes(op: &Op) -> Vec<(&'static str, String)> {
    let list = |items: Vec<String>| format!("[{}]", items.join(", "));
    match op {
        Op::Input { name } | Op::Weight { name } => vec![("name", quote(name))],
        Op::Constant { value } => vec![("value", fmt_float(*value))],
        Op::Reduce { axis, .. } => vec![("axis", axis.to_string())],
        Op::Reshape { shape } | Op::Expand { shape } => vec![("shape", fmt_shape(shape))],
        Op::Transpose { perm } => {
            vec![("perm", list(perm.iter().map(|p| p.to_string()).collect()))]
        }
        Op::Rope { rope } | Op::RopeGrad { rope } => rope_attributes(rope, "base", "scaling"),
        Op::Mask { expr, sides } | Op::ScoreMod { expr, sides } => {
            let mut attrs = vec![("expr", quote(&expr.to_string()))];
            if !sides.is_empty() {
                attrs.push(("sides", list(sides.iter().map(|s| quote(s)).collect())));
            }
            attrs
        }
        Op::RmsNorm { eps } => vec![("eps", fmt_float(*eps))],
        Op::Linear { norm_eps, residual } => {
            let mut attrs = Vec::new();
            if let Some(eps) = norm_eps {
                attrs.push(("norm_eps", fmt_float(*eps)));
            }
            if *residual {
                attrs.push(("residual", "true".to_string()));
            }
            attrs
        }
        Op::SwiGlu { norm_eps } => norm_eps
            .iter()
            .map(|e| ("norm_eps", fmt_float(*e)))
            .collect(),
        Op::HeadsProj {
            heads,
            head_dim,
            norm_eps,
            bias,
            qk_norm,
            rope,
        } => {
            let mut attrs = vec![
                ("heads", heads.to_string()),
                ("head_dim", head_dim.to_string()),
            ];
            if let Some(eps) = norm_eps {
                attrs.push(("norm_eps", fmt_float(*eps)));
            }
            if *bias {
                attrs.push(("bias", "true".to_string()));
            }
            if let Some(eps) = qk_norm {
                attrs.push(("qk_norm_eps", fmt_float(*eps)));
            }
            if let Some(rope) = rope {
                attrs.extend(rope_attributes(rope, "rope_base", "rope_scaling"));
            }
            attrs
        }
        Op::Attention(kernel) | Op::AttentionLse(kernel) => {
            vec![("kernel", format!("@{}", kernel.name))]
        }
        Op::AttentionGrad { kernel, wrt } => vec![
            ("kernel", format!("@{}", kernel.name)),
            ("wrt", quote(wrt.name())),
        ],
        Op::TileRanges { block } => vec![("block", block.to_string())],
        Op::EmbeddingGrad { vocab } => vec![("vocab", vocab.to_string())],
        Op::CeGrad { wrt } => vec![("wrt", quote(wrt.name()))],
        Op::CeLse | Op::CeLoss => vec![],
        Op::Positions
        | Op::Embedding
        | Op::MatMul
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::Select => vec![],
    }
}

/// A RoPE's base and, when it is scaled, its scaling in the language's form, quoted.
fn rope_attributes(
    rope: &Rope,
    base: &'static str,
    scaling: &'static str,
) -> Vec<(&'static str, String)> {
    let mut attrs = vec![(base, fmt_float(rope.base))];
    if !rope.scaling.is_none() {
        attrs.push((scaling, quote(&rope.scaling.to_string())));
    }
    attrs
}

/// The attributes of an attention kernel, in a fixed order.
pub fn kernel_attributes(kernel: &AttentionKernel) -> Vec<(&'static str, String)> {
    let mut attrs = vec![("mask", quote(&kernel.mask.to_string()))];
    if let Some(score) = &kernel.score {
        attrs.push(("score", quote(&score.to_string())));
    }
    if !kernel.sides.is_empty() {
        let sides: Vec<String> = kernel.sides.iter().map(|s| quote(s)).collect();
        attrs.push(("sides", format!("[{}]", sides.join(", "))));
    }
    attrs.extend([
        ("scale", fmt_float(kernel.scale)),
        ("heads", kernel.heads.to_string()),
        ("kv_heads", kernel.kv_heads.to_string()),
        ("head_dim", kernel.head_dim.to_string()),
        ("block_q", kernel.block_q.to_string()),
        ("block_k", kernel.block_k.to_string()),
        ("merge_heads", kernel.merge_heads.to_string()),
    ]);
    attrs
}

/// The distinct attention kernels of a graph in canonical order, each with the name the
/// text form gives it (a kernel whose name another kernel already took gets a suffix).
pub fn kernel_table(graph: &Graph) -> Vec<(String, AttentionKernel)> {
    let mut table: Vec<(String, AttentionKernel)> = Vec::new();
    for id in graph.topo_order().unwrap_or_else(|| graph.node_ids()) {
        if let Some(kernel) = graph.node(id).op.attention_kernel() {
            if table.iter().any(|(_, k)| k == kernel) {
                continue;
            }
            let mut name = kernel.name.clone();
            let mut n = 2;
            while table.iter().any(|(taken, _)| *taken == name) {
                name = format!("{}_{n}", kernel.name);
                n += 1;
            }
            table.push((name, kernel.clone()));
        }
    }
    table
}

/// The canonical name of every node: `%0`, `%1`, ... in canonical order.
pub fn node_names(graph: &Graph) -> HashMap<NodeId, String> {
    graph
        .topo_order()
        .unwrap_or_else(|| graph.node_ids())
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, format!("%{i}")))
        .collect()
}

/// Prints the graph in its text form.
pub fn print_graph(graph: &Graph) -> String {
    let order = graph.topo_order().unwrap_or_else(|| graph.node_ids());
    let names = node_names(graph);
    let mut out = String::new();
    let _ = writeln!(out, "graph {} {{", graph.name);
    if !graph.layers.is_empty() {
        let kinds: Vec<String> = graph.layers.iter().map(|l| quote(&l.kind)).collect();
        let _ = writeln!(out, "  layers [{}]", kinds.join(", "));
    }
    let kernels = kernel_table(graph);
    for (name, kernel) in &kernels {
        let attrs: Vec<String> = kernel_attributes(kernel)
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        let _ = write!(out, "  kernel @{name} = attention {{{}}}", attrs.join(", "));
        if let Some(loc) = kernel.loc {
            let _ = write!(out, " loc({}:{})", loc.line, loc.col);
        }
        let tiles = crate::schedule::describe(
            &kernel.mask,
            kernel.heads as usize,
            kernel.block_q as usize,
            kernel.block_k as usize,
        );
        let _ = writeln!(out, "\n  // tiles: {tiles}");
    }
    let mut open_layer: Option<u32> = None;
    for id in order {
        let node = graph.node(id);
        if node.layer != open_layer {
            if open_layer.is_some() {
                out.push_str("  }\n");
            }
            if let Some(layer) = node.layer {
                let _ = writeln!(out, "  layer {layer} {{");
            }
            open_layer = node.layer;
        }
        let indent = if open_layer.is_some() { "    " } else { "  " };
        let _ = write!(out, "{indent}{} = {}", names[&id], node.op.name());
        let operands = graph.operands(id);
        if !operands.is_empty() {
            let list: Vec<&str> = operands.iter().map(|o| names[o].as_str()).collect();
            let _ = write!(out, "({})", list.join(", "));
        }
        let mut attrs = attributes(&node.op);
        if let Some(kernel) = node.op.attention_kernel()
            && let Some((name, _)) = kernels.iter().find(|(_, k)| k == kernel)
        {
            attrs[0] = ("kernel", format!("@{name}"));
        }
        if !attrs.is_empty() {
            let list: Vec<String> = attrs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            let _ = write!(out, " {{{}}}", list.join(", "));
        }
        let _ = write!(out, " : {}", node.ty);
        if let Some(loc) = node.loc {
            let _ = write!(out, " loc({}:{})", loc.line, loc.col);
        }
        out.push('\n');
    }
    if open_layer.is_some() {
        out.push_str("  }\n");
    }
    for (name, id) in graph.outputs() {
        let target = names.get(id).map_or("%?", String::as_str);
        let _ = writeln!(out, "  output {name} = {target}");
    }
    out.push_str("}\n");
    out
}
