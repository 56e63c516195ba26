//! The IR's text form reads back to the same graph: `print(parse(print(g))) == print(g)`.

use crate::common::{check_ok, lower, programs, relative};

/// Every program's graph, as lowered and as optimized (fused projections, RoPE and
/// attention carry attributes of their own).
#[test]
fn text_form_round_trips_for_every_program() {
    for path in programs() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let graph = lower(spec);
            let optimized = zebra_passes::optimize(&graph, &zebra_passes::Options::default())
                .unwrap_or_else(|e| panic!("{}: {e}", relative(&path)))
                .graph;
            for graph in [graph, optimized] {
                let printed = zebra_ir::print_graph(&graph);
                let parsed = zebra_ir::parse_graph(&printed)
                    .unwrap_or_else(|e| panic!("{}: {e}", relative(&path)));
                zebra_ir::verify(&parsed).unwrap_or_else(|e| panic!("{}: {e}", relative(&path)));
                assert_eq!(
                    zebra_ir::print_graph(&parsed),
                    printed,
                    "{}",
                    relative(&path)
                );
                assert_eq!(parsed.layers, graph.layers);
            }
        }
    }
}

#[test]
fn dot_output_names_every_node_and_layer() {
    let spec = crate::common::model(&crate::common::root().join("examples/zebra_tiny.zb"));
    let graph = lower(&spec);
    let dot = zebra_ir::dot::to_dot(&graph);
    assert!(dot.starts_with("digraph \"zebra_tiny\" {"));
    assert_eq!(dot.matches(" [label=\"%").count(), graph.node_count());
    for i in 0..spec.layers.len() {
        assert!(dot.contains(&format!("subgraph cluster_layer{i} {{")));
    }
    assert!(dot.contains("label=\"layer 1: local\""));
}
