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

/// Training runs AdamW's compiled kernels where the weights are (the norm's partial sums,
/// the update, the packed weights packed again); over several steps, with warm-up, weight
/// decay and clipping engaged, they follow the f64 reference on the host: the same losses,
/// norms and learning rates, and the same weights and moments within f32 rounding. For
/// zebra_tiny, also with the kernels a GPU plan has (4-lane vectors), and for a version of it
/// whose sizes are not multiples of the vector width or of the packed panels.
#[test]
fn the_compiled_optimizer_follows_adamw_on_the_host() {
    let spec = crate::common::model(&crate::common::root().join("examples/zebra_tiny.zb"));
    follows_adamw_on_the_host(&spec, None);
    follows_adamw_on_the_host(&spec, Some(zebra_codegen::ptx::GPU_VECTOR));
    let mut odd = spec.clone();
    odd.vocab = 41;
    odd.n_heads = 3;
    odd.n_kv_heads = 1;
    odd.head_dim = 6;
    odd.dim = 18;
    odd.ffn_hidden = 23;
    odd.layers.truncate(2);
    follows_adamw_on_the_host(&odd, None);
}

/// [`the_compiled_optimizer_follows_adamw_on_the_host`] for one model, with kernels of
/// `vector` lanes (the host's widest when `None`).
fn follows_adamw_on_the_host(spec: &zebra_frontend::ModelSpec, vector: Option<usize>) {
    use zebra_runtime::optim::{AdamW, AdamWConfig};
    use zebra_runtime::train::{Trainer, decays};

    let what = format!("{} (dim {}, vectors {vector:?})", spec.name, spec.dim);
    let train = optimized(&training_graph(&optimized(&lower(spec))).expect("training graph"));
    let out = tempfile::tempdir().expect("temporary directory");
    let options = BuildOptions {
        mode: Default::default(),
        max_seq_len: 64,
        cache: Some(Cache { dir: cache_dir() }),
    };
    zebra_codegen::artifact::build_with_vector(&train, out.path(), &options, vector)
        .expect("training artifact");
    let weights = zebra_frontend::init::random_weights(spec, 3);
    let config = AdamWConfig {
        lr: 3e-3,
        warmup_steps: 2,
        total_steps: 6,
        clip_norm: 0.5,
        ..AdamWConfig::default()
    };
    let mut trainer =
        Trainer::new(out.path(), &weights, AdamW::default(), config.clone(), 2).expect("trainer");
    let mut reference = CpuModel::load(out.path(), &weights, 2).expect("reference model");
    let mut params: BTreeMap<String, Vec<f32>> = weights
        .iter()
        .map(|(name, w)| (name.to_string(), w.iter().copied().collect()))
        .collect();
    let shapes: BTreeMap<String, Vec<usize>> = weights
        .iter()
        .map(|(name, w)| (name.to_string(), w.shape().to_vec()))
        .collect();
    let mut host = AdamW::default();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut clipped = 0;
    for step in 0..5 {
        let (b, t) = (2, 48);
        let mut batch = zebra_runtime::data::Batch::with_capacity(b, t).unwrap();
        batch.tokens = (0..b * t)
            .map(|_| rng.random_range(0..spec.vocab as i64))
            .collect();
        batch.targets = (0..b * t)
            .map(|i| {
                if i % 5 == 0 {
                    -1
                } else {
                    rng.random_range(0..spec.vocab as i64)
                }
            })
            .collect();
        batch.documents = vec![0; b * t];
        let report = trainer.step(&batch).expect("a training step");

        let shape = IxDyn(&[b, t]);
        let inputs = BTreeMap::from([
            (
                "tokens".to_string(),
                Tensor::I64(ArrayD::from_shape_vec(shape.clone(), batch.tokens.clone()).unwrap()),
            ),
            (
                "targets".to_string(),
                Tensor::I64(ArrayD::from_shape_vec(shape, batch.targets.clone()).unwrap()),
            ),
        ]);
        let outputs = reference.run(&inputs).expect("the reference step");
        let scale = 1.0 / batch.scored() as f32;
        let grads: BTreeMap<String, Vec<f32>> = params
            .keys()
            .map(|name| {
                let grad = &outputs[&format!("grad:{name}")];
                (name.clone(), grad.iter().map(|g| g * scale).collect())
            })
            .collect();
        let update = host.update(&config, &mut params, &grads, &|name| {
            decays(name, &shapes[name])
        });
        let mut weights_now = zebra_ir::Weights::new();
        for (name, values) in &params {
            let array = ArrayD::from_shape_vec(IxDyn(&shapes[name]), values.clone());
            weights_now.insert(name.clone(), array.unwrap());
        }
        reference
            .set_weights(&weights_now)
            .expect("reference weights");

        let loss = f64::from(outputs["loss"].iter().copied().next().unwrap()) * f64::from(scale);
        assert!(
            (report.loss - loss).abs() <= 1e-5 * loss.abs(),
            "{what}, step {step}: loss {} against {loss}",
            report.loss
        );
        assert!(
            (report.grad_norm - update.grad_norm).abs() <= 1e-4 * update.grad_norm,
            "{what}, step {step}: norm {} against {}",
            report.grad_norm,
            update.grad_norm
        );
        assert_eq!(report.lr, update.lr, "{what}, step {step}");
        clipped += usize::from(update.grad_norm > config.clip_norm);
    }
    assert!(clipped > 0, "{what}: clipping never engaged");
    // The optimizer reads a step's gradients: before one it says so.
    let mut fresh = CpuModel::load(out.path(), &weights, 1).expect("model");
    let error = fresh.grad_partials().unwrap_err().to_string();
    assert!(error.contains("run the step first"), "{error}");
    // Moments that do not fit their weight (a checkpoint of another model) are refused.
    let name = params.keys().next().unwrap().clone();
    let wrong = zebra_runtime::optim::Moments {
        m: vec![0.0; 3],
        v: vec![0.0; 3],
    };
    let model = CpuModel::load(out.path(), &weights, 1).expect("model");
    let state = AdamW {
        step: 1,
        moments: BTreeMap::from([(name.clone(), wrong)]),
    };
    let error = Trainer::with_executor(Box::new(model), state, config.clone())
        .err()
        .expect("wrong moments refused")
        .to_string();
    assert!(
        error.contains(&name) && error.contains("expected"),
        "{error}"
    );
    let state = trainer.optimizer_state().expect("optimizer state");
    assert_eq!(state.step, host.step);
    let trained = trainer.weights().expect("weights");
    for (name, expected) in &params {
        let got: Vec<f32> = trained.get(name).unwrap().iter().copied().collect();
        let worst = max_difference(&got, expected);
        // Five steps move a weight by up to 5 lr; f32 rounding moves it far less.
        assert!(
            worst <= 1e-3 * config.lr as f32,
            "{what}: `{name}`: max |a - b| = {worst:e}"
        );
        let moments = &state.moments[name];
        let expected = &host.moments[name];
        for (got, expected, which) in [
            (&moments.m, &expected.m, "m"),
            (&moments.v, &expected.v, "v"),
        ] {
            let scale = expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let worst = max_difference(got, expected);
            assert!(
                worst <= 1e-4 * scale,
                "{what}: `{name}` {which}: {worst:e} of {scale:e}"
            );
        }
    }
}

/// The largest `|a - b|` of two arrays.
fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
