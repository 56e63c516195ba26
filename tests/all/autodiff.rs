//! Gradient checks: the autodiff gradients, run through the f64 interpreter, against central
//! finite differences: for every op (small graphs in the IR's text form) and for the training
//! graph of a tiny version of every example.

use std::collections::{BTreeMap, HashMap};

use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zebra_ir::{DType, Graph, Node, NodeId, Op, TensorType, Value, Weights};
use zebra_passes::autodiff::{grad_name, gradients, training_graph};

use crate::common::{check_ok, lower, programs, random_inputs, relative, shrink};

/// The value of one scalar output of a graph under the interpreter.
fn scalar(graph: &Graph, output: &str, inputs: &BTreeMap<String, Value>, weights: &Weights) -> f64 {
    let out = zebra_ir::interpret(graph, inputs, weights).unwrap_or_else(|e| panic!("{e}"));
    let value = out[output].as_float().expect("a float output");
    assert_eq!(value.len(), 1, "`{output}` is not a scalar");
    value.iter().next().copied().unwrap()
}

/// Only the named output, and what it needs.
fn keep_output(graph: &Graph, name: &str) -> Graph {
    let mut g = graph.clone();
    let id = g
        .outputs()
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, id)| *id)
        .unwrap_or_else(|| panic!("no output `{name}`"));
    g.clear_outputs();
    g.add_output(name, id);
    g.remove_dead();
    g
}

/// Compares `grad:{w}` outputs with central differences of `loss` at a few elements of each
/// weight. The perturbation is measured on the f32 values actually stored.
fn check_against_differences(
    train: &Graph,
    inputs: &BTreeMap<String, Value>,
    weights: &Weights,
    elements_per_weight: usize,
    what: &str,
) {
    let outputs =
        zebra_ir::interpret(train, inputs, weights).unwrap_or_else(|e| panic!("{what}: {e}"));
    let loss_graph = keep_output(train, "loss");
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let mut checked = 0;
    for name in weights.names().map(str::to_string).collect::<Vec<_>>() {
        let Some(grad) = outputs.get(&grad_name(&name)) else {
            continue;
        };
        let grad = grad.as_float().expect("float gradients");
        let count = weights.get(&name).unwrap().len();
        for _ in 0..elements_per_weight.min(count) {
            let at = rng.random_range(0..count);
            let mut perturbed = weights.clone();
            let base = weights.get(&name).unwrap().as_slice().unwrap()[at];
            let step = 1e-3f32 * base.abs().max(1.0);
            let mut value_at = |v: f32| {
                perturbed.get_mut(&name).unwrap().as_slice_mut().unwrap()[at] = v;
                scalar(&loss_graph, "loss", inputs, &perturbed)
            };
            let (up, down) = (base + step, base - step);
            let difference = (value_at(up) - value_at(down)) / (f64::from(up) - f64::from(down));
            let analytic = grad.as_slice().unwrap()[at];
            let tolerance = 2e-3 * analytic.abs().max(difference.abs()).max(1e-2);
            assert!(
                (analytic - difference).abs() <= tolerance,
                "{what}: d loss / d {name}[{at}]: autodiff {analytic:e}, finite differences {difference:e}"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{what}: no gradient was checked");
}

/// Builds the gradient graph of `sum(out * probe)` for a graph whose output is `out`, with a
/// fixed random `probe` weight, so that every element of `out` matters differently.
fn probe_training_graph(graph: &Graph) -> Graph {
    let mut g = graph.clone();
    let out = g.outputs()[0].1;
    let ty = g.node(out).ty.clone();
    let shape: Vec<zebra_ir::Dim> = ty.shape.clone();
    let probe = g.add(
        Node {
            op: Op::Input {
                name: "probe".into(),
            },
            ty: TensorType::new(DType::F32, shape.clone()),
            layer: None,
            loc: None,
        },
        &[],
    );
    let product = g
        .add_inferred(Op::Binary(zebra_ir::BinaryOp::Mul), &[out, probe], None)
        .unwrap();
    let mut total = product;
    for axis in (0..shape.len()).rev() {
        total = g
            .add_inferred(
                Op::Reduce {
                    op: zebra_ir::ReduceOp::Sum,
                    axis,
                },
                &[total],
                None,
            )
            .unwrap();
    }
    let loss = g
        .add_inferred(Op::Reshape { shape: vec![] }, &[total], None)
        .unwrap();
    g.clear_outputs();
    g.add_output("loss", loss);
    let one = g
        .add_inferred(Op::Constant { value: 1.0 }, &[], None)
        .unwrap();
    let mut seeds = HashMap::new();
    seeds.insert(loss, one);
    zebra_passes::autodiff::decompose(&mut g).unwrap();
    let adjoints = gradients(&mut g, seeds).unwrap_or_else(|e| panic!("{e}"));
    let weights: Vec<(String, NodeId)> = g.weights();
    for (name, id) in weights {
        if let Some(&grad) = adjoints.get(&id) {
            g.add_output(grad_name(&name), grad);
        }
    }
    zebra_ir::verify(&g).unwrap_or_else(|e| panic!("{e}\n{}", zebra_ir::print_graph(&g)));
    g
}

/// Random inputs (f32 in [-1, 1], i64 as runs of document ids) and weights for a graph.
fn random_data(
    graph: &Graph,
    batch: usize,
    seq: usize,
    seed: u64,
) -> (BTreeMap<String, Value>, Weights) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let bind = zebra_ir::Bindings { batch, seq };
    let mut inputs = BTreeMap::new();
    for (name, id) in graph.inputs() {
        let ty = &graph.node(id).ty;
        let shape = zebra_ir::types::resolve_shape(&ty.shape, &bind);
        let value = if ty.dtype == DType::I64 {
            let mut doc = 0;
            let limit = if name == "ids" { 7 } else { i64::MAX };
            Value::Int(ArrayD::from_shape_fn(IxDyn(&shape), |_| {
                if limit < i64::MAX {
                    rng.random_range(0..limit)
                } else {
                    doc += i64::from(rng.random_bool(0.3));
                    doc
                }
            }))
        } else {
            Value::Float(ArrayD::from_shape_fn(IxDyn(&shape), |_| {
                rng.random_range(-1.0..1.0)
            }))
        };
        inputs.insert(name, value);
    }
    let mut weights = Weights::new();
    for (name, id) in graph.weights() {
        let shape: Vec<usize> = graph
            .node(id)
            .ty
            .shape
            .iter()
            .map(|d| d.as_const().unwrap() as usize)
            .collect();
        // Norm gains near 1, everything else around 0.
        let center = if name.starts_with('g') { 1.0 } else { 0.0 };
        weights.insert(
            name,
            ArrayD::from_shape_fn(IxDyn(&shape), |_| center + rng.random_range(-0.7f32..0.7)),
        );
    }
    (inputs, weights)
}

fn check_op(text: &str) {
    let graph = zebra_ir::parse_graph(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    zebra_ir::verify(&graph).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let train = probe_training_graph(&graph);
    let (inputs, weights) = random_data(&train, 2, 5, 1);
    check_against_differences(&train, &inputs, &weights, 4, text);
}

/// A graph with weights `a: f32[shape_a]` (and `b: f32[shape_b]`) and `out = op(a, b)`.
fn unary_graph(op: &str, shape: &str) -> String {
    format!(
        "graph g {{\n  %0 = weight {{name = \"a\"}} : f32[{shape}]\n  %1 = {op}(%0) : f32[{shape}]\n  output out = %1\n}}\n"
    )
}

#[test]
fn elementwise_ops() {
    for op in ["neg", "exp", "tanh", "sigmoid"] {
        check_op(&unary_graph(op, "3, 4"));
    }
    // Positive arguments: add 2 first.
    for op in ["log", "sqrt", "rsqrt", "recip"] {
        check_op(&format!(
            "graph g {{\n  %0 = weight {{name = \"a\"}} : f32[3, 4]\n  %1 = constant {{value = 2.0}} : f32[]\n  %2 = add(%0, %1) : f32[3, 4]\n  %3 = {op}(%2) : f32[3, 4]\n  output out = %3\n}}\n"
        ));
    }
    for op in ["add", "sub", "mul", "max", "min"] {
        // Broadcasting both ways.
        check_op(&format!(
            "graph g {{\n  %0 = weight {{name = \"a\"}} : f32[3, 1]\n  %1 = weight {{name = \"b\"}} : f32[4]\n  %2 = {op}(%0, %1) : f32[3, 4]\n  output out = %2\n}}\n"
        ));
    }
    check_op(
        "graph g {\n  %0 = weight {name = \"a\"} : f32[3, 4]\n  %1 = weight {name = \"b\"} : f32[4]\n  %2 = constant {value = 3.0} : f32[]\n  %3 = add(%1, %2) : f32[4]\n  %4 = div(%0, %3) : f32[3, 4]\n  output out = %4\n}\n",
    );
}

#[test]
fn reductions_and_shapes() {
    for op in ["reduce_sum", "reduce_mean", "reduce_max"] {
        for axis in [0, 1] {
            let shape = if axis == 0 { "1, 4" } else { "3, 1" };
            check_op(&format!(
                "graph g {{\n  %0 = weight {{name = \"a\"}} : f32[3, 4]\n  %1 = {op}(%0) {{axis = {axis}}} : f32[{shape}]\n  output out = %1\n}}\n"
            ));
        }
    }
    check_op(
        "graph g {\n  %0 = weight {name = \"a\"} : f32[3, 4]\n  %1 = reshape(%0) {shape = [2, 6]} : f32[2, 6]\n  %2 = transpose(%1) {perm = [1, 0]} : f32[6, 2]\n  %3 = expand(%2) {shape = [3, 6, 2]} : f32[3, 6, 2]\n  output out = %3\n}\n",
    );
}

#[test]
fn matmul_rope_norm_embedding_and_select() {
    check_op(
        "graph g {\n  %0 = weight {name = \"a\"} : f32[2, 3, 4]\n  %1 = weight {name = \"b\"} : f32[4, 5]\n  %2 = matmul(%0, %1) : f32[2, 3, 5]\n  output out = %2\n}\n",
    );
    check_op(
        "graph g {\n  %0 = input {name = \"x\"} : f32[B, T, 6]\n  %1 = weight {name = \"w\"} : f32[6, 6]\n  %2 = transpose(%1) {perm = [1, 0]} : f32[6, 6]\n  %3 = matmul(%0, %2) : f32[B, T, 6]\n  %4 = reshape(%3) {shape = [B, T, 3, 2]} : f32[B, T, 3, 2]\n  %5 = transpose(%4) {perm = [0, 2, 1, 3]} : f32[B, 3, T, 2]\n  %6 = positions : i64[T]\n  %7 = rope(%5, %6) {base = 10000.0} : f32[B, 3, T, 2]\n  output out = %7\n}\n",
    );
    check_op(
        "graph g {\n  %0 = weight {name = \"a\"} : f32[3, 8]\n  %1 = weight {name = \"g\"} : f32[8]\n  %2 = rmsnorm(%0, %1) {eps = 1e-5} : f32[3, 8]\n  output out = %2\n}\n",
    );
    check_op(
        "graph g {\n  %0 = weight {name = \"table\"} : f32[7, 3]\n  %1 = input {name = \"ids\"} : i64[B, T]\n  %2 = embedding(%0, %1) : f32[B, T, 3]\n  output out = %2\n}\n",
    );
    check_op(
        "graph g {\n  %0 = weight {name = \"a\"} : f32[3, 4]\n  %1 = weight {name = \"b\"} : f32[3, 4]\n  %2 = lt(%0, %1) : bool[3, 4]\n  %3 = select(%2, %0, %1) : f32[3, 4]\n  %4 = constant {value = 0.5} : f32[]\n  %5 = mul(%3, %4) : f32[3, 4]\n  output out = %5\n}\n",
    );
}

#[test]
fn score_modifiers_and_masks() {
    for expr in [
        "50.0 * tanh(score / 50.0)",
        "score - 0.5 * (h + 1) * (q - k)",
        "abs(score) + max(score, 0.25) + min(score, -0.25)",
        "exp(score / 4.0) + exp2(score) + log(score * score + 1.0) + sqrt(score * score + 1.0)",
    ] {
        check_op(&format!(
            "graph g {{\n  %0 = weight {{name = \"s\"}} : f32[1, 2, 3, 3]\n  %1 = score_mod(%0) {{expr = {}}} : f32[1, 2, 3, 3]\n  output out = %1\n}}\n",
            zebra_ir::print::quote(expr)
        ));
    }
    // A masked softmax written in primitives, as the lowering writes attention.
    check_op(
        "graph g {\n  %0 = input {name = \"x\"} : f32[B, 1, T, 3]\n  %1 = weight {name = \"w\"} : f32[3, 3]\n  %2 = matmul(%0, %1) : f32[B, 1, T, 3]\n  %3 = transpose(%0) {perm = [0, 1, 3, 2]} : f32[B, 1, 3, T]\n  %4 = matmul(%2, %3) : f32[B, 1, T, T]\n  %5 = mask {expr = \"k <= q\"} : bool[1, 1, T, T]\n  %6 = constant {value = -inf} : f32[]\n  %7 = select(%5, %4, %6) : f32[B, 1, T, T]\n  %8 = reduce_max(%7) {axis = 3} : f32[B, 1, T, 1]\n  %9 = sub(%7, %8) : f32[B, 1, T, T]\n  %10 = exp(%9) : f32[B, 1, T, T]\n  %11 = reduce_sum(%10) {axis = 3} : f32[B, 1, T, 1]\n  %12 = div(%10, %11) : f32[B, 1, T, T]\n  output out = %12\n}\n",
    );
}

#[test]
fn fused_projections() {
    let x = "  %0 = input {name = \"x\"} : f32[B, T, 6]\n  %1 = weight {name = \"w\"} : f32[4, 6]\n  %2 = weight {name = \"g\"} : f32[6]\n  %3 = weight {name = \"u\"} : f32[4, 6]\n  %4 = input {name = \"r\"} : f32[B, T, 4]\n  %5 = positions : i64[T]\n";
    for op in [
        "linear(%0, %1, %2, %4) {norm_eps = 1e-5, residual = true} : f32[B, T, 4]",
        "linear(%0, %1) : f32[B, T, 4]",
        "swiglu(%0, %1, %3, %2) {norm_eps = 1e-5} : f32[B, T, 4]",
        "heads_proj(%0, %1, %2, %5) {heads = 2, head_dim = 2, norm_eps = 1e-5, rope_base = 10000.0} : f32[B, 2, T, 2]",
    ] {
        check_op(&format!(
            "graph g {{\n{x}  %6 = {op}\n  output out = %6\n}}\n"
        ));
    }
}

#[test]
fn fused_attention() {
    let cases = [
        ("k <= q", "", 2, 1, true),
        (
            "k <= q && q - k < 3",
            ", score = \"30.0 * tanh(score / 30.0)\"",
            2,
            2,
            false,
        ),
        (
            "k <= q || k < 2",
            ", score = \"score - 0.5 * (q - k)\"",
            4,
            2,
            true,
        ),
        ("k < q", "", 1, 1, false),
        (
            "k <= q && doc[q] == doc[k]",
            ", sides = [\"doc\"]",
            2,
            1,
            true,
        ),
    ];
    for (mask, extra, heads, kv_heads, merge) in cases {
        let d = 4;
        let out = if merge {
            format!("f32[B, T, {}]", heads * d)
        } else {
            format!("f32[B, {heads}, T, {d}]")
        };
        let sides = if extra.contains("doc") {
            "  %3 = input {name = \"doc\"} : i64[B, T]\n  %5 = tile_ranges(%3) {block = 2} : i64[B, T/2, 2]\n"
        } else {
            ""
        };
        let side_operands = if sides.is_empty() { "" } else { ", %3, %5, %5" };
        check_op(&format!(
            "graph g {{\n  kernel @a = attention {{mask = {}{extra}, scale = 0.5, heads = {heads}, kv_heads = {kv_heads}, head_dim = {d}, block_q = 2, block_k = 2, merge_heads = {merge}}}\n  %0 = input {{name = \"xq\"}} : f32[B, {heads}, T, {d}]\n  %1 = input {{name = \"xk\"}} : f32[B, {kv_heads}, T, {d}]\n  %2 = input {{name = \"xv\"}} : f32[B, {kv_heads}, T, {d}]\n{sides}  %6 = weight {{name = \"wq\"}} : f32[{d}, {d}]\n  %7 = weight {{name = \"wk\"}} : f32[{d}, {d}]\n  %8 = weight {{name = \"wv\"}} : f32[{d}, {d}]\n  %9 = matmul(%0, %6) : f32[B, {heads}, T, {d}]\n  %10 = matmul(%1, %7) : f32[B, {kv_heads}, T, {d}]\n  %11 = matmul(%2, %8) : f32[B, {kv_heads}, T, {d}]\n  %12 = attention(%9, %10, %11{side_operands}) {{kernel = @a}} : {out}\n  output out = %12\n}}\n",
            zebra_ir::print::quote(mask)
        ));
    }
}

/// The training graph of a tiny version of every example: the loss's gradient with respect
/// to a few elements of every weight, against finite differences.
#[test]
fn training_graphs_of_every_example() {
    for path in programs() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let mut tiny = shrink(spec);
            tiny.layers.truncate(tiny.layers.len().min(4));
            let graph = lower(&tiny);
            let optimized = zebra_passes::optimize(&graph, &Default::default())
                .unwrap_or_else(|e| panic!("{e}"))
                .graph;
            let what = format!("{} ({})", relative(&path), spec.name);
            let train = training_graph(&optimized).unwrap_or_else(|e| panic!("{what}: {e}"));
            let weights = zebra_frontend::init::random_weights(&tiny, 3);
            let mut inputs = random_inputs(&tiny, 2, 6, 4);
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let targets: Vec<i64> = (0..12)
                .map(|_| rng.random_range(0..tiny.vocab as i64))
                .collect();
            inputs.insert(
                "targets".into(),
                Value::Int(ArrayD::from_shape_vec(IxDyn(&[2, 6]), targets).unwrap()),
            );
            check_against_differences(&train, &inputs, &weights, 2, &what);
        }
    }
}
