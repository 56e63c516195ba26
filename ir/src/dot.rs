//! Graphviz output: one box per node, layers as clusters, edges labelled by operand position.

use std::fmt::Write;

use crate::graph::Graph;
use crate::print::{attributes, node_names};

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Renders the graph in Graphviz's DOT language.
pub fn to_dot(graph: &Graph) -> String {
    let order = graph.topo_order().unwrap_or_else(|| graph.node_ids());
    let names = node_names(graph);
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", escape(&graph.name));
    out.push_str("  node [shape=box, fontname=\"monospace\"];\n");
    let mut clusters: Vec<Vec<String>> = vec![Vec::new(); graph.layers.len()];
    for &id in &order {
        let node = graph.node(id);
        let attrs: Vec<String> = attributes(&node.op)
            .into_iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        let mut label = format!("{} = {}", names[&id], node.op.name());
        if !attrs.is_empty() {
            let _ = write!(label, "\n{}", attrs.join(", "));
        }
        let _ = write!(label, "\n{}", node.ty);
        let line = format!(
            "n{} [label=\"{}\"];",
            id.index(),
            escape(&label).replace('\n', "\\n")
        );
        match node.layer.and_then(|l| clusters.get_mut(l as usize)) {
            Some(cluster) => cluster.push(line),
            None => {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    for (i, lines) in clusters.iter().enumerate() {
        let _ = writeln!(out, "  subgraph cluster_layer{i} {{");
        let _ = writeln!(
            out,
            "    label=\"layer {i}: {}\";",
            escape(&graph.layers[i].kind)
        );
        for line in lines {
            let _ = writeln!(out, "    {line}");
        }
        out.push_str("  }\n");
    }
    for &id in &order {
        for (position, operand) in graph.operands(id).into_iter().enumerate() {
            let _ = writeln!(
                out,
                "  n{} -> n{} [label=\"{position}\"];",
                operand.index(),
                id.index()
            );
        }
    }
    for (name, id) in graph.outputs() {
        let _ = writeln!(
            out,
            "  \"out:{0}\" [shape=ellipse, label=\"{0}\"];\n  n{1} -> \"out:{0}\";",
            escape(name),
            id.index()
        );
    }
    out.push_str("}\n");
    out
}
