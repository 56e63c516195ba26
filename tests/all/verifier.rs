//! The verifier rejects broken graphs with messages that name the node and the problem.

use zebra_ir::op::{Op, UnaryOp};
use zebra_ir::{DType, Dim, Graph, Node, TensorType, parse_graph, verify};

/// Parses a graph and returns the verifier's message, or panics if it verifies.
fn check(text: &str) -> String {
    let graph = parse_graph(text).unwrap_or_else(|e| panic!("{e}"));
    verify(&graph)
        .expect_err("the graph should not verify")
        .to_string()
}

#[test]
fn contraction_mismatch() {
    let err = check(
        r#"graph g {
  %0 = input {name = "x"} : f32[B, 3]
  %1 = weight {name = "w"} : f32[4, 2]
  %2 = matmul(%0, %1) : f32[B, 2]
  output out = %2
}"#,
    );
    assert_eq!(
        err,
        "the graph is invalid:\n  %2: `matmul`: matmul contraction mismatch: f32[B, 3] x f32[4, 2] (3 vs 4)\n"
    );
}

#[test]
fn declared_type_differs_from_computed() {
    let err = check(
        r#"graph g {
  %0 = input {name = "x"} : f32[B, T]
  %1 = exp(%0) : f32[B, 5]
  output out = %1
}"#,
    );
    assert_eq!(
        err,
        "the graph is invalid:\n  %1: `exp` is declared f32[B, 5] but computes f32[B, T]\n"
    );
}

#[test]
fn wrong_arity_and_bad_operands_are_all_reported() {
    let err = check(
        r#"graph g {
  %0 = input {name = "x"} : f32[B, T]
  %1 = add(%0) : f32[B, T]
  %2 = input {name = "ids"} : i64[B, T]
  %3 = exp(%2) : i64[B, T]
  %4 = mask {expr = "k <= q + h"} : bool[1, 1, T, T]
  output out = %1
}"#,
    );
    assert!(
        err.contains("%1: `add`: `add` takes 2 operand(s), found 1"),
        "{err}"
    );
    assert!(
        err.contains("%3: `exp`: operand 0 of `exp` must be f32, found i64[B, T]"),
        "{err}"
    );
    assert!(
        err.contains("%4: `mask`: the mask reads `h`, so its head dim cannot be 1"),
        "{err}"
    );
}

#[test]
fn side_inputs_must_be_the_named_graph_inputs() {
    let err = check(
        r#"graph g {
  %0 = input {name = "other"} : i64[B, T]
  %1 = mask(%0) {expr = "doc[q] == doc[k]", sides = ["doc"]} : bool[B, 1, T, T]
  %2 = constant {value = 1.0} : f32[]
  %3 = select(%1, %2, %2) : f32[B, 1, T, T]
  output out = %3
}"#,
    );
    assert!(
        err.contains("%1: side input `doc` must be the graph input of that name"),
        "{err}"
    );
}

#[test]
fn cycles_are_found() {
    let mut graph = Graph::new("cycle");
    let f32_bt = TensorType::new(DType::F32, vec![Dim::B, Dim::T]);
    let node = |op: Op| Node {
        op,
        ty: f32_bt.clone(),
        layer: None,
        loc: None,
    };
    let x = graph.add(node(Op::Input { name: "x".into() }), &[]);
    let y = graph.add(node(Op::Unary(UnaryOp::Neg)), &[x]);
    let z = graph.add(node(Op::Unary(UnaryOp::Neg)), &[y]);
    graph.add_output("out", z);
    // y now reads z, which reads y.
    graph.replace_uses(x, z);
    assert_eq!(
        verify(&graph).unwrap_err().to_string(),
        "the graph is invalid:\n  the graph has a cycle\n"
    );
}

#[test]
fn a_graph_without_outputs_and_a_stray_layer() {
    let err = check(
        r#"graph g {
  layers ["global"]
  %0 = input {name = "x"} : f32[B, T]
  layer 3 {
    %1 = exp(%0) : f32[B, T]
  }
}"#,
    );
    assert!(
        err.contains("%1: the node is in layer 3, but the graph has 1 layer(s)"),
        "{err}"
    );
    assert!(err.contains("the graph has no outputs"), "{err}");
}

#[test]
fn the_text_parser_reports_the_line() {
    let err = parse_graph("graph g {\n  %0 = input {name = \"x\"} : f32[B, T]\n  %1 = frobnicate(%0) : f32[B, T]\n}\n").unwrap_err();
    assert_eq!(err.to_string(), "line 3: unknown operation `frobnicate`");
    let err = parse_graph("graph g {\n  %1 = exp(%0) : f32[B, T]\n}\n").unwrap_err();
    assert_eq!(err.to_string(), "line 2: `%0` is used before it is defined");
}
