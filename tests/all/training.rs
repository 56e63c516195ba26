//! The compiled training step against the interpreter: the loss and every weight's gradient.

use std::collections::BTreeMap;

use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zebra_codegen::artifact::{BuildOptions, Cache, build};
use zebra_ir::{Graph, Value};
use zebra_passes::autodiff::training_graph;
use zebra_runtime::{CpuModel, Tensor};

use crate::common::{cache_dir, check_ok, lower, programs, random_inputs, relative, shrink};

fn optimized(graph: &Graph) -> Graph {
    zebra_passes::optimize(graph, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .graph
}

fn tensors(inputs: &BTreeMap<String, Value>) -> BTreeMap<String, Tensor> {
    inputs
        .iter()
        .map(|(name, value)| {
            let tensor = match value {
                Value::Int(a) => Tensor::I64(a.clone()),
                Value::Float(a) => Tensor::F32(a.mapv(|x| x as f32)),
                Value::Bool(_) => panic!("no boolean inputs"),
            };
            (name.clone(), tensor)
        })
        .collect()
}

/// Every program's training step, compiled (after the optimizer), gives the interpreter's
/// loss and gradients, at lengths around the tile sizes.
#[test]
fn compiled_training_steps_match_the_interpreter() {
    let out = tempfile::tempdir().expect("temporary directory");
    for path in programs() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let mut tiny = shrink(spec);
            tiny.layers.truncate(tiny.layers.len().min(4));
            let what = format!("{} ({})", relative(&path), spec.name);
            let train =
                training_graph(&optimized(&lower(&tiny))).unwrap_or_else(|e| panic!("{what}: {e}"));
            let train = optimized(&train);
            let dir = out.path().join(&spec.name);
            let options = BuildOptions {
                mode: Default::default(),
                max_seq_len: 256,
                cache: Some(Cache { dir: cache_dir() }),
            };
            build(&train, &dir, &options).unwrap_or_else(|e| panic!("{what}: {e}"));
            let weights = zebra_frontend::init::random_weights(&tiny, 8);
            let mut model =
                CpuModel::load(&dir, &weights, 2).unwrap_or_else(|e| panic!("{what}: {e}"));
            for seq in [1, 13, 70] {
                let mut inputs = random_inputs(&tiny, 2, seq, seq as u64);
                let mut rng = ChaCha8Rng::seed_from_u64(seq as u64);
                let targets: Vec<i64> = (0..2 * seq)
                    .map(|i| {
                        if i % 7 == 3 {
                            -1
                        } else {
                            rng.random_range(0..tiny.vocab as i64)
                        }
                    })
                    .collect();
                inputs.insert(
                    "targets".into(),
                    Value::Int(ArrayD::from_shape_vec(IxDyn(&[2, seq]), targets).unwrap()),
                );
                let expected = zebra_ir::interpret(&train, &inputs, &weights)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let actual = model
                    .run(&tensors(&inputs))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                // A gradient that is zero in exact arithmetic (a key projection at T = 1)
                // is rounding noise in f32: compare against the largest gradient too.
                let largest = expected
                    .values()
                    .map(|v| {
                        v.as_float()
                            .unwrap()
                            .iter()
                            .fold(0.0f64, |m, x| m.max(x.abs()))
                    })
                    .fold(0.0, f64::max);
                for (name, value) in &expected {
                    let value = value.as_float().unwrap();
                    let got = actual[name].mapv(f64::from);
                    let scale = value
                        .iter()
                        .fold(0.0f64, |m, x| m.max(x.abs()))
                        .max(1e-3 * largest);
                    let worst = got
                        .iter()
                        .zip(value.iter())
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    assert!(
                        worst <= 1e-4 * scale,
                        "{what}: `{name}` at T = {seq}: max |a - b| = {worst:e}, scale {scale:e}"
                    );
                }
            }
        }
    }
}
