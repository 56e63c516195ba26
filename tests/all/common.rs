//! Helpers shared by the integration tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zebra_frontend::{Checked, ModelSpec, check_source, render};
use zebra_ir::{Graph, Value, Weights};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path relative to the repository root, with `/` separators, for stable snapshots.
pub fn relative(path: &Path) -> String {
    let path = path.strip_prefix(root()).unwrap_or(path);
    path.to_string_lossy().replace('\\', "/")
}

/// Every `.zb` file under a folder of the repository, sorted.
pub fn zb_files(folder: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "zb") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(folder), &mut out);
    out
}

/// Every program in `examples/`.
pub fn examples() -> Vec<PathBuf> {
    zb_files("examples")
}

/// Reads and checks a file; panics with the rendered diagnostics if it has errors.
pub fn check_ok(path: &Path) -> (String, Checked) {
    let source = std::fs::read_to_string(path).expect("readable source");
    let checked = check_source(&source);
    assert!(
        !checked.has_errors(),
        "{} has errors:\n{}",
        relative(path),
        render(&relative(path), &source, &checked.diagnostics)
    );
    (source, checked)
}

/// The only model of a file, checked.
pub fn model(path: &Path) -> ModelSpec {
    let (_, checked) = check_ok(path);
    checked.program.model(None).expect("one model").clone()
}

/// Lowers a model and verifies the graph.
pub fn lower(spec: &ModelSpec) -> Graph {
    let graph = zebra_frontend::lower::lower(spec).expect("lowering succeeds");
    if let Err(e) = zebra_ir::verify(&graph) {
        panic!("the lowered graph of `{}` does not verify:\n{e}", spec.name);
    }
    graph
}

/// zebra_tiny, optimized.
pub fn tiny_graph() -> Graph {
    let (_, checked) = check_ok(&root().join("examples/zebra_tiny.zb"));
    zebra_passes::optimize(
        &lower(&checked.program.models[0]),
        &zebra_passes::Options::default(),
    )
    .unwrap()
    .graph
}

/// Random token ids (and side inputs: a few documents per row) for a model.
pub fn random_inputs(
    spec: &ModelSpec,
    batch: usize,
    seq: usize,
    seed: u64,
) -> BTreeMap<String, Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tokens: Vec<i64> = (0..batch * seq)
        .map(|_| rng.random_range(0..spec.vocab as i64))
        .collect();
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "tokens".to_string(),
        Value::Int(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), tokens).expect("shape")),
    );
    for side in &spec.side_inputs {
        let mut ids = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let mut doc = 0;
            for _ in 0..seq {
                if rng.random_bool(0.15) {
                    doc += 1;
                }
                ids.push(doc);
            }
        }
        inputs.insert(
            side.clone(),
            Value::Int(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), ids).expect("shape")),
        );
    }
    inputs
}

/// Runs the reference interpreter and returns the logits.
pub fn logits(graph: &Graph, inputs: &BTreeMap<String, Value>, weights: &Weights) -> ArrayD<f64> {
    let outputs = zebra_ir::interpret(graph, inputs, weights).expect("the interpreter runs");
    outputs["logits"].as_float().expect("float logits").clone()
}

/// Asserts that two arrays have the same shape and agree within `max |a - b| <= tol * max |b|`.
pub fn assert_close(actual: &ArrayD<f64>, expected: &ArrayD<f64>, tol: f64, what: &str) {
    assert_eq!(actual.shape(), expected.shape(), "{what}: shapes differ");
    let scale = expected
        .iter()
        .fold(0.0f64, |m, x| m.max(x.abs()))
        .max(1e-30);
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (a, e)) in actual.iter().zip(expected.iter()).enumerate() {
        let d = (a - e).abs();
        assert!(!d.is_nan(), "{what}: NaN at flat index {i} ({a} vs {e})");
        if d > worst {
            worst = d;
            at = i;
        }
    }
    assert!(
        worst <= tol * scale,
        "{what}: max |a - b| = {worst:e} at flat index {at}, above {tol:e} x {scale:e}"
    );
}

/// A tiny version of a model with the same layer pattern, attention kinds and RoPE
/// settings: small enough to run through the interpreter in a test.
pub fn shrink(spec: &ModelSpec) -> ModelSpec {
    let mut tiny = spec.clone();
    tiny.vocab = 40;
    tiny.n_heads = 4;
    tiny.n_kv_heads = 4 / spec.group_size().clamp(1, 4);
    tiny.head_dim = 8;
    tiny.dim = 32;
    tiny.ffn_hidden = 24;
    tiny
}

/// Every program whose models the optimizer and code generator are tested on: the examples
/// and the good fixtures.
pub fn programs() -> Vec<PathBuf> {
    let mut files = examples();
    files.extend(zb_files("tests/fixtures/ok"));
    files.extend(zb_files("tests/fixtures/golden"));
    files
}

/// The kernel cache the tests share (inside the build's target directory).
pub fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("zebra-cache")
}
