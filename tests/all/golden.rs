//! The reference interpreter against logits that Hugging Face transformers computed for a
//! tiny Llama (global, sliding-window and Zebra layouts), and the dense test computation
//! against the same logits.

use std::collections::BTreeMap;

use ndarray::Axis;
use zebra_ir::{Value, Weights, npy};

use zebra_frontend::ModelSpec;

use crate::common::{assert_close, logits, lower, model, root};
use crate::reference_model::{DenseModel, MaskFn, forward};

/// transformers builds its RoPE tables in float32, so agreement is about 1e-6 relative.
const TOLERANCE: f64 = 1e-5;

fn golden(name: &str) {
    let dir = root().join("tests/fixtures/golden");
    let spec = model(&dir.join(format!("{name}.zb")));
    let weights = Weights::load(&dir.join("tiny_llama.safetensors")).expect("golden weights");
    let tokens = npy::read_ints(&dir.join("tokens.npy")).expect("golden tokens");
    let expected =
        npy::read_floats(&dir.join(format!("logits_{name}.npy"))).expect("golden logits");
    let mut inputs = BTreeMap::new();
    inputs.insert("tokens".to_string(), Value::Int(tokens.clone()));
    let actual = logits(&lower(&spec), &inputs, &weights);
    assert_close(
        &actual,
        &expected,
        TOLERANCE,
        &format!("interpreter vs transformers ({name})"),
    );

    // The dense test computation agrees with transformers too.
    let window = |q: usize, k: usize| k <= q && q - k < 4;
    let global = |q: usize, k: usize| k <= q;
    let masks: Vec<MaskFn> = match name {
        "all_causal" => vec![Box::new(global), Box::new(global)],
        "all_window4" => vec![Box::new(window), Box::new(window)],
        _ => vec![Box::new(global), Box::new(window)],
    };
    let dense = DenseModel {
        vocab: 64,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        eps: 1e-5,
        tied: false,
        layers: masks.into_iter().map(|m| (Some(10000.0), m)).collect(),
    };
    let row: Vec<i64> = tokens.index_axis(Axis(0), 1).iter().copied().collect();
    let dense_logits: Vec<f64> = forward(&dense, &weights, &row)
        .into_iter()
        .flatten()
        .collect();
    let dense_logits =
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[row.len(), 64]), dense_logits).unwrap();
    let expected_row = expected.index_axis(Axis(0), 1).to_owned();
    assert_close(
        &dense_logits,
        &expected_row,
        TOLERANCE,
        &format!("dense vs transformers ({name})"),
    );
}

#[test]
fn all_causal_matches_transformers() {
    golden("all_causal");
}

#[test]
fn all_window4_matches_transformers() {
    golden("all_window4");
}

#[test]
fn zebra_g2_window4_matches_transformers() {
    golden("zebra_g2_window4");
}

/// The reference interpreter on golden model `zb` with `weights` against transformers'
/// logits `expected` on the 160 golden tokens, and the same model changed by `without` (what
/// the test is about taken away) far from them: that is what matches.
fn golden_160(zb: &str, weights: &str, expected: &str, without: impl FnOnce(&mut ModelSpec)) {
    let dir = root().join("tests/fixtures/golden");
    let weights = Weights::load(&dir.join(weights)).expect("golden weights");
    let tokens = npy::read_ints(&dir.join("tokens_160.npy")).expect("golden tokens");
    let expected = npy::read_floats(&dir.join(expected)).expect("golden logits");
    let mut inputs = BTreeMap::new();
    inputs.insert("tokens".to_string(), Value::Int(tokens));
    let spec = model(&dir.join(zb));
    let actual = logits(&lower(&spec), &inputs, &weights);
    assert_close(
        &actual,
        &expected,
        TOLERANCE,
        &format!("interpreter vs transformers ({zb})"),
    );
    let mut plain = spec.clone();
    without(&mut plain);
    let plain = logits(&lower(&plain), &inputs, &weights);
    let largest = expected.iter().fold(0f64, |m, x| m.max(x.abs()));
    let apart = plain
        .iter()
        .zip(&expected)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(apart > 0.1 * largest, "{zb}: without it only {apart} apart");
}

/// Each RoPE scaling (160 positions, so that the scaled low frequencies turn far enough to
/// matter); unscaled, the model is far from transformers' logits.
fn golden_rope(scaling: &str) {
    golden_160(
        &format!("rope_{scaling}.zb"),
        "tiny_llama.safetensors",
        &format!("logits_rope_{scaling}.npy"),
        |spec| {
            for kind in &mut spec.kinds {
                kind.rope = kind.rope.map(|r| zebra_ir::rope::Rope::new(r.base));
            }
        },
    );
}

#[test]
fn linear_rope_scaling_matches_transformers() {
    golden_rope("linear");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    golden_rope("llama3");
}

#[test]
fn yarn_rope_scaling_matches_transformers() {
    golden_rope("yarn");
}

/// The golden tiny Llama built as Qwen2 (Q, K and V biases; a sliding layer) and as Qwen3
/// (QK-norm; biases on all four projections), on weights with random biases and norm scales;
/// without its biases and QK-norm, the model is far from transformers' logits.
fn golden_qwen(name: &str) {
    golden_160(
        &format!("{name}.zb"),
        "tiny_qwen.safetensors",
        &format!("logits_{name}.npy"),
        |spec| {
            spec.biases = Default::default();
            spec.qk_norm = None;
        },
    );
}

#[test]
fn qwen2_biases_match_transformers() {
    golden_qwen("qwen2");
}

#[test]
fn qwen3_qk_norm_matches_transformers() {
    golden_qwen("qwen3");
}
