//! A second, independent computation of a Llama-style forward pass, written for the tests
//! with plain loops over explicit matrices and a dense boolean mask per layer. It shares no
//! code with the IR or its interpreter, so it checks the oracle itself.

use zebra_ir::Weights;

use crate::common::{assert_close, model};

/// A dense mask: whether query `q` sees key `k`.
pub type MaskFn = Box<dyn Fn(usize, usize) -> bool>;

/// What the dense forward needs to know about a model.
pub struct DenseModel {
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub tied: bool,
    /// Per layer: the RoPE base (or none) and the mask as a function of (query, key).
    pub layers: Vec<(Option<f64>, MaskFn)>,
}

fn matrix(weights: &Weights, name: &str) -> Vec<Vec<f64>> {
    let t = weights
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"));
    let (rows, cols) = (t.shape()[0], t.shape()[1]);
    let flat: Vec<f64> = t.iter().map(|&x| f64::from(x)).collect();
    (0..rows)
        .map(|r| flat[r * cols..(r + 1) * cols].to_vec())
        .collect()
}

fn vector(weights: &Weights, name: &str) -> Vec<f64> {
    weights
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .iter()
        .map(|&x| f64::from(x))
        .collect()
}

/// `x @ w^T` for `w` stored `[out, in]`.
fn linear(x: &[Vec<f64>], w: &[Vec<f64>]) -> Vec<Vec<f64>> {
    x.iter()
        .map(|row| {
            w.iter()
                .map(|wr| row.iter().zip(wr).map(|(a, b)| a * b).sum())
                .collect()
        })
        .collect()
}

fn rmsnorm(x: &[Vec<f64>], w: &[f64], eps: f64) -> Vec<Vec<f64>> {
    x.iter()
        .map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
            let r = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(|(v, g)| v * r * g).collect()
        })
        .collect()
}

fn rope(x: &mut [Vec<f64>], heads: usize, hd: usize, base: f64) {
    for (t, row) in x.iter_mut().enumerate() {
        for h in 0..heads {
            for i in 0..hd / 2 {
                let angle = t as f64 / base.powf(2.0 * i as f64 / hd as f64);
                let (a, b) = (row[h * hd + i], row[h * hd + i + hd / 2]);
                row[h * hd + i] = a * angle.cos() - b * angle.sin();
                row[h * hd + i + hd / 2] = b * angle.cos() + a * angle.sin();
            }
        }
    }
}

/// Logits `[T][vocab]` for one sequence of token ids.
pub fn forward(m: &DenseModel, weights: &Weights, tokens: &[i64]) -> Vec<Vec<f64>> {
    let n = tokens.len();
    let embed = matrix(weights, "model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> = tokens.iter().map(|&t| embed[t as usize].clone()).collect();
    let (hd, group) = (m.head_dim, m.heads / m.kv_heads);
    for (i, (rope_base, mask)) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let h = rmsnorm(
            &x,
            &vector(weights, &format!("{p}.input_layernorm.weight")),
            m.eps,
        );
        let mut q = linear(
            &h,
            &matrix(weights, &format!("{p}.self_attn.q_proj.weight")),
        );
        let mut k = linear(
            &h,
            &matrix(weights, &format!("{p}.self_attn.k_proj.weight")),
        );
        let v = linear(
            &h,
            &matrix(weights, &format!("{p}.self_attn.v_proj.weight")),
        );
        if let Some(base) = rope_base {
            rope(&mut q, m.heads, hd, *base);
            rope(&mut k, m.kv_heads, hd, *base);
        }
        let dense_mask: Vec<Vec<bool>> = (0..n)
            .map(|a| (0..n).map(|b| mask(a, b)).collect())
            .collect();
        let mut o = vec![vec![0.0; m.heads * hd]; n];
        for head in 0..m.heads {
            let kv = head / group;
            for t in 0..n {
                let scores: Vec<Option<f64>> = (0..n)
                    .map(|u| {
                        dense_mask[t][u].then(|| {
                            (0..hd)
                                .map(|j| q[t][head * hd + j] * k[u][kv * hd + j])
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                    })
                    .collect();
                let max = scores
                    .iter()
                    .flatten()
                    .fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let total: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                for (u, s) in scores.iter().enumerate() {
                    if let Some(s) = s {
                        let p = (s - max).exp() / total;
                        for j in 0..hd {
                            o[t][head * hd + j] += p * v[u][kv * hd + j];
                        }
                    }
                }
            }
        }
        let out = linear(
            &o,
            &matrix(weights, &format!("{p}.self_attn.o_proj.weight")),
        );
        for (row, add) in x.iter_mut().zip(&out) {
            row.iter_mut().zip(add).for_each(|(a, b)| *a += b);
        }
        let h = rmsnorm(
            &x,
            &vector(weights, &format!("{p}.post_attention_layernorm.weight")),
            m.eps,
        );
        let gate = linear(&h, &matrix(weights, &format!("{p}.mlp.gate_proj.weight")));
        let up = linear(&h, &matrix(weights, &format!("{p}.mlp.up_proj.weight")));
        let act: Vec<Vec<f64>> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| {
                g.iter()
                    .zip(u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect()
            })
            .collect();
        let down = linear(&act, &matrix(weights, &format!("{p}.mlp.down_proj.weight")));
        for (row, add) in x.iter_mut().zip(&down) {
            row.iter_mut().zip(add).for_each(|(a, b)| *a += b);
        }
    }
    let x = rmsnorm(&x, &vector(weights, "model.norm.weight"), m.eps);
    let head = if m.tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let logits = linear(&x, &matrix(weights, head));
    assert_eq!(logits[0].len(), m.vocab);
    logits
}

#[test]
fn the_interpreter_matches_a_dense_computation_on_zebra_tiny() {
    let path = crate::common::root().join("examples/zebra_tiny.zb");
    let spec = model(&path);
    // Written from the example's text, not from the compiler's view of it.
    let global = |q: usize, k: usize| k <= q;
    let local = |q: usize, k: usize| k <= q && q - k < 32;
    let dense = DenseModel {
        vocab: 256,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        eps: 1e-5,
        tied: true,
        // `2 * [global, 3 * local]`: G = 4, global first.
        layers: (0..8)
            .map(|layer| -> (Option<f64>, MaskFn) {
                if layer % 4 == 0 {
                    (Some(10000.0), Box::new(global))
                } else {
                    (Some(10000.0), Box::new(local))
                }
            })
            .collect(),
    };
    let weights = zebra_frontend::init::random_weights(&spec, 7);
    let graph = crate::common::lower(&spec);
    // 50 tokens: past the window of 32, so the local layers really differ from the global.
    let inputs = crate::common::random_inputs(&spec, 2, 50, 11);
    let actual = crate::common::logits(&graph, &inputs, &weights);
    let tokens = inputs["tokens"].clone();
    let zebra_ir::Value::Int(tokens) = tokens else {
        panic!("int tokens")
    };
    for b in 0..2 {
        let row: Vec<i64> = tokens
            .index_axis(ndarray::Axis(0), b)
            .iter()
            .copied()
            .collect();
        let expected = forward(&dense, &weights, &row);
        let flat: Vec<f64> = expected.into_iter().flatten().collect();
        let expected = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[50, 256]), flat).unwrap();
        let actual_row = actual.index_axis(ndarray::Axis(0), b).to_owned();
        assert_close(
            &actual_row,
            &expected,
            1e-10,
            &format!("zebra_tiny row {b}"),
        );
    }
}
