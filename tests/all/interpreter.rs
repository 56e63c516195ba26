//! The reference interpreter on small graphs whose results are computed by hand.

use std::collections::BTreeMap;

use ndarray::{ArrayD, IxDyn, array};
use zebra_ir::{Value, Weights, interpret, parse_graph};

/// Parses a graph from its text form, runs it, and returns output `out` as floats.
fn check(text: &str, inputs: Vec<(&str, Value)>, weights: &Weights) -> ArrayD<f64> {
    let graph = parse_graph(text).unwrap_or_else(|e| panic!("{e}"));
    let inputs: BTreeMap<String, Value> = inputs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let outputs = interpret(&graph, &inputs, weights).unwrap_or_else(|e| panic!("{e}"));
    outputs["out"].as_float().expect("float output").clone()
}

fn floats(shape: &[usize], values: &[f64]) -> Value {
    Value::Float(ArrayD::from_shape_vec(IxDyn(shape), values.to_vec()).unwrap())
}

fn assert_values(actual: &ArrayD<f64>, expected: &[f64]) {
    let flat: Vec<f64> = actual.iter().copied().collect();
    assert_eq!(flat.len(), expected.len(), "{flat:?} vs {expected:?}");
    for (a, e) in flat.iter().zip(expected) {
        assert!((a - e).abs() < 1e-12, "{flat:?} vs {expected:?}");
    }
}

#[test]
fn softmax_of_one_two_three() {
    let text = r#"graph softmax {
  %0 = input {name = "x"} : f32[B, T]
  %1 = reduce_max(%0) {axis = 1} : f32[B, 1]
  %2 = sub(%0, %1) : f32[B, T]
  %3 = exp(%2) : f32[B, T]
  %4 = reduce_sum(%3) {axis = 1} : f32[B, 1]
  %5 = div(%3, %4) : f32[B, T]
  output out = %5
}
"#;
    let out = check(
        text,
        vec![("x", floats(&[1, 3], &[1.0, 2.0, 3.0]))],
        &Weights::new(),
    );
    let z = 1.0 + (-1.0f64).exp() + (-2.0f64).exp();
    assert_values(&out, &[(-2.0f64).exp() / z, (-1.0f64).exp() / z, 1.0 / z]);
}

#[test]
fn rmsnorm_of_three_four() {
    let text = r#"graph rmsnorm {
  %0 = input {name = "x"} : f32[B, 2]
  %1 = mul(%0, %0) : f32[B, 2]
  %2 = reduce_mean(%1) {axis = 1} : f32[B, 1]
  %3 = rsqrt(%2) : f32[B, 1]
  %4 = mul(%0, %3) : f32[B, 2]
  output out = %4
}
"#;
    let out = check(
        text,
        vec![("x", floats(&[1, 2], &[3.0, 4.0]))],
        &Weights::new(),
    );
    // mean(9, 16) = 12.5.
    assert_values(&out, &[3.0 / 12.5f64.sqrt(), 4.0 / 12.5f64.sqrt()]);
}

#[test]
fn rope_rotates_each_pair_by_position_times_frequency() {
    // Head dim 4: pair 0 is (x0, x2) at frequency 1, pair 1 is (x1, x3) at 10000^(-1/2).
    let text = r#"graph rope {
  %0 = input {name = "x"} : f32[1, 1, T, 4]
  %1 = positions : i64[T]
  %2 = rope(%0, %1) {base = 10000.0} : f32[1, 1, T, 4]
  output out = %2
}
"#;
    let x = floats(&[1, 1, 2, 4], &[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    let out = check(text, vec![("x", x)], &Weights::new());
    let (c0, s0) = (1.0f64.cos(), 1.0f64.sin());
    let (c1, s1) = (0.01f64.cos(), 0.01f64.sin());
    assert_values(
        &out,
        &[
            // Position 0: unchanged.
            1.0,
            2.0,
            3.0,
            4.0,
            // Position 1: (x0, x2) by 1 radian, (x1, x3) by 0.01 radian.
            1.0 * c0 - 3.0 * s0,
            2.0 * c1 - 4.0 * s1,
            3.0 * c0 + 1.0 * s0,
            4.0 * c1 + 2.0 * s1,
        ],
    );
}

#[test]
fn matmul_broadcasts_batch_dims() {
    let text = r#"graph mm {
  %0 = input {name = "a"} : f32[B, 1, 2, 2]
  %1 = weight {name = "w"} : f32[2, 2, 1]
  %2 = matmul(%0, %1) : f32[B, 2, 2, 1]
  output out = %2
}
"#;
    let mut weights = Weights::new();
    weights.insert("w", array![[[1.0f32], [1.0]], [[1.0], [-1.0]]].into_dyn());
    let out = check(
        text,
        vec![("a", floats(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 5.0]))],
        &weights,
    );
    // Row sums, then row differences.
    assert_values(&out, &[3.0, 8.0, -1.0, -2.0]);
}

#[test]
fn document_mask_and_select() {
    let text = r#"graph doc {
  %0 = input {name = "doc"} : i64[B, T]
  %1 = input {name = "s"} : f32[B, 1, T, T]
  %2 = mask(%0) {expr = "k <= q && doc[q] == doc[k]", sides = ["doc"]} : bool[B, 1, T, T]
  %3 = constant {value = -1.0} : f32[]
  %4 = select(%2, %1, %3) : f32[B, 1, T, T]
  output out = %4
}
"#;
    let doc = Value::Int(array![[0i64, 0, 1]].into_dyn());
    let s = floats(&[1, 1, 3, 3], &[1.0; 9]);
    let out = check(text, vec![("doc", doc), ("s", s)], &Weights::new());
    assert_values(&out, &[1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0]);
}

#[test]
fn score_modifier_sees_indices_and_score() {
    let text = r#"graph alibi {
  %0 = input {name = "s"} : f32[1, 2, T, T]
  %1 = score_mod(%0) {expr = "score - exp2(-4.0 * (h + 1) / 2) * (q - k)"} : f32[1, 2, T, T]
  output out = %1
}
"#;
    let out = check(
        text,
        vec![("s", floats(&[1, 2, 2, 2], &[0.0; 8]))],
        &Weights::new(),
    );
    // Head 0 slope 1/4, head 1 slope 1/16; entry (q, k) is -slope * (q - k).
    assert_values(&out, &[0.0, 0.25, -0.25, 0.0, 0.0, 0.0625, -0.0625, 0.0]);
}

#[test]
fn a_row_with_every_key_masked_gives_zeros_not_nan() {
    // The softmax exactly as the lowering writes it, with its guards.
    let text = r#"graph guarded {
  %0 = input {name = "s"} : f32[1, 1, T, T]
  %1 = mask {expr = "k < q"} : bool[1, 1, T, T]
  %2 = constant {value = -inf} : f32[]
  %3 = select(%1, %0, %2) : f32[1, 1, T, T]
  %4 = reduce_max(%3) {axis = 3} : f32[1, 1, T, 1]
  %5 = constant {value = -3.4028234663852886e38} : f32[]
  %6 = max(%4, %5) : f32[1, 1, T, 1]
  %7 = sub(%3, %6) : f32[1, 1, T, T]
  %8 = exp(%7) : f32[1, 1, T, T]
  %9 = reduce_sum(%8) {axis = 3} : f32[1, 1, T, 1]
  %10 = constant {value = 1.1754943508222875e-38} : f32[]
  %11 = max(%9, %10) : f32[1, 1, T, 1]
  %12 = div(%8, %11) : f32[1, 1, T, T]
  output out = %12
}
"#;
    let out = check(
        text,
        vec![("s", floats(&[1, 1, 2, 2], &[5.0, 6.0, 7.0, 8.0]))],
        &Weights::new(),
    );
    // Query 0 sees nothing: zeros. Query 1 sees key 0 only.
    assert_values(&out, &[0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn bad_inputs_are_errors_that_name_the_problem() {
    let text = r#"graph emb {
  %0 = input {name = "tokens"} : i64[B, T]
  %1 = weight {name = "table"} : f32[4, 2]
  %2 = embedding(%1, %0) : f32[B, T, 2]
  output out = %2
}
"#;
    let graph = parse_graph(text).unwrap();
    let mut weights = Weights::new();
    weights.insert("table", ArrayD::zeros(IxDyn(&[4, 2])));
    let run = |tokens: Value, weights: &Weights| {
        let inputs = BTreeMap::from([("tokens".to_string(), tokens)]);
        interpret(&graph, &inputs, weights).unwrap_err().to_string()
    };
    let err = run(Value::Int(array![[1i64, 9]].into_dyn()), &weights);
    assert_eq!(
        err,
        "token id 9 at [0, 1] is out of range for a vocabulary of 4"
    );
    let err = run(Value::Int(array![1i64, 2].into_dyn()), &weights);
    assert_eq!(err, "input `tokens` must be i64[B, T], found i64[2]");
    let mut wrong = Weights::new();
    wrong.insert("table", ArrayD::zeros(IxDyn(&[4, 3])));
    let err = run(Value::Int(array![[1i64]].into_dyn()), &wrong);
    assert_eq!(err, "weight `table` has shape [4, 3], expected [4, 2]");
    let err = run(Value::Int(array![[1i64]].into_dyn()), &Weights::new());
    assert_eq!(err, "weight `table` is missing (expected shape [4, 2])");
}
