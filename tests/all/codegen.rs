//! The compiled path against the reference interpreter: every program, compiled and run at
//! several lengths, gives the interpreter's logits; so does every kernel on random shapes and
//! tile sizes. MLIR verifies for every program; snapshots of representative kernels; the
//! artifact's on-disk format, its errors, and the kernel cache.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zebra_codegen::artifact::{BuildOptions, BuildReport, Cache, build};
use zebra_codegen::kernels::KernelSpec;
use zebra_ir::{Graph, Value, Weights};
use zebra_passes::{Options, optimize};
use zebra_runtime::{CpuModel, Tensor};

use crate::common::{
    assert_close, cache_dir, check_ok, lower, programs, random_inputs, relative, root, shrink,
};

/// Relative tolerance of compiled f32 results against the f64 interpreter.
const TOLERANCE: f64 = 1e-4;

fn optimized(graph: &Graph) -> Graph {
    optimize(graph, &Options::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .graph
}

fn build_at(graph: &Graph, dir: &Path, max_seq_len: usize) -> BuildReport {
    let options = BuildOptions {
        mode: Default::default(),
        max_seq_len,
        cache: Some(Cache { dir: cache_dir() }),
    };
    build(graph, dir, &options).unwrap_or_else(|e| panic!("building `{}`: {e}", graph.name))
}

pub fn tensors(inputs: &BTreeMap<String, Value>) -> BTreeMap<String, Tensor> {
    inputs
        .iter()
        .map(|(name, value)| {
            let tensor = match value {
                Value::Int(a) => Tensor::I64(a.clone()),
                Value::Float(a) => Tensor::F32(a.mapv(|x| x as f32)),
                Value::Bool(_) => panic!("no model takes boolean inputs"),
            };
            (name.clone(), tensor)
        })
        .collect()
}

/// Runs a loaded model and returns one output in f64.
fn run(model: &mut CpuModel, inputs: &BTreeMap<String, Value>, output: &str) -> ArrayD<f64> {
    let outputs = model
        .run(&tensors(inputs))
        .unwrap_or_else(|e| panic!("the compiled model fails: {e}"));
    outputs[output].mapv(f64::from)
}

/// Compiles every program (tiny versions of the large ones) once and runs it at several
/// lengths: 1, inside a tile, exactly a tile, past tile boundaries; batch 2.
#[test]
fn every_program_compiled_matches_the_interpreter() {
    let out = tempfile::tempdir().expect("temporary directory");
    for path in programs() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let tiny = shrink(spec);
            let graph = lower(&tiny);
            let dir = out.path().join(&spec.name);
            build_at(&optimized(&graph), &dir, 256);
            let weights = zebra_frontend::init::random_weights(&tiny, 11);
            let mut model = CpuModel::load(&dir, &weights, 2).unwrap_or_else(|e| panic!("{e}"));
            let lengths: &[usize] = if tiny.layers.len() > 8 {
                &[1, 70]
            } else {
                &[1, 13, 64, 70, 129]
            };
            for &seq in lengths {
                let inputs = random_inputs(&tiny, 2, seq, 100 + seq as u64);
                let expected = crate::common::logits(&graph, &inputs, &weights);
                let actual = run(&mut model, &inputs, "logits");
                let what = format!("{} ({}) at T = {seq}", relative(&path), spec.name);
                assert_close(&actual, &expected, TOLERANCE, &what);
            }
        }
    }
}

/// The unoptimized graph compiles too (every primitive op as a generic kernel: matmuls,
/// masks, softmax by its reductions) and gives the same logits.
#[test]
fn unoptimized_graphs_compile_with_generic_kernels() {
    let out = tempfile::tempdir().expect("temporary directory");
    for name in [
        "zebra_tiny.zb",
        "attention/document.zb",
        "attention/alibi.zb",
    ] {
        let path = root().join("examples").join(name);
        let (_, checked) = check_ok(&path);
        let spec = shrink(&checked.program.models[0]);
        let graph = lower(&spec);
        let dir = out.path().join(&spec.name);
        build_at(&graph, &dir, 128);
        let weights = zebra_frontend::init::random_weights(&spec, 3);
        let mut model = CpuModel::load(&dir, &weights, 2).unwrap_or_else(|e| panic!("{e}"));
        for seq in [1, 9, 33] {
            let inputs = random_inputs(&spec, 2, seq, seq as u64);
            let expected = crate::common::logits(&graph, &inputs, &weights);
            let actual = run(&mut model, &inputs, "logits");
            assert_close(
                &actual,
                &expected,
                TOLERANCE,
                &format!("{name} at T = {seq}"),
            );
        }
    }
}

/// Random f32 arrays for every input and weight of a graph, at `[batch, seq]`.
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
        let value = if ty.dtype == zebra_ir::DType::I64 {
            // Side inputs: runs of equal ids (documents).
            let mut doc = 0;
            Value::Int(ArrayD::from_shape_fn(IxDyn(&shape), |_| {
                if rng.random_bool(0.1) {
                    doc += 1;
                }
                doc
            }))
        } else {
            Value::Float(ArrayD::from_shape_fn(IxDyn(&shape), |_| {
                rng.random_range(-1.0f32..1.0) as f64
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
            .map(|d| d.as_const().expect("weights have constant shapes") as usize)
            .collect();
        weights.insert(
            name,
            ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.random_range(-1.0f32..1.0)),
        );
    }
    (inputs, weights)
}

/// Compiles a graph given as text and checks it against the interpreter at each length.
fn check_graph(text: &str, lengths: &[usize], dir: &Path, seed: u64) {
    let graph = zebra_ir::parse_graph(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    zebra_ir::verify(&graph).unwrap_or_else(|e| panic!("{e}\n{text}"));
    build_at(&graph, dir, 512);
    let (_, weights) = random_data(&graph, 1, 1, seed);
    let mut model = CpuModel::load(dir, &weights, 2).unwrap_or_else(|e| panic!("{e}"));
    for &seq in lengths {
        for batch in [1, 2] {
            let (inputs, _) = random_data(&graph, batch, seq, seed + seq as u64);
            let expected =
                zebra_ir::interpret(&graph, &inputs, &weights).unwrap_or_else(|e| panic!("{e}"));
            let actual = model
                .run(&tensors(&inputs))
                .unwrap_or_else(|e| panic!("the compiled graph fails: {e}"));
            assert_eq!(actual.len(), expected.len());
            for (name, value) in &expected {
                assert_close(
                    &actual[name].mapv(f64::from),
                    value.as_float().expect("a float output"),
                    TOLERANCE,
                    &format!("output `{name}` at B = {batch}, T = {seq} of\n{text}"),
                );
            }
        }
    }
}

const MASKS: [&str; 9] = [
    "k <= q",
    "k <= q && q - k < 7",
    "k <= q && (q - k < 5 || k < 2)",
    "k <= q && q / 16 == k / 16",
    "k <= q && q - k < 24 && (q - k) % 3 == 0",
    "k <= q || k < 9",
    "q - k < 6 && k - q < 6",
    "k < q",
    "k <= q && doc[q] == doc[k]",
];

const SCORES: [Option<&str>; 4] = [
    None,
    Some("50.0 * tanh(score / 50.0)"),
    Some("score - 0.25 * (h + 1) * (q - k)"),
    Some("score + 0.125 * h"),
];

/// The fused attention kernel on random shapes, tile sizes, masks and score modifiers,
/// against the interpreter's dense attention.
#[test]
fn attention_kernels_on_random_shapes() {
    let out = tempfile::tempdir().expect("temporary directory");
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    for case in 0..20 {
        let kv_heads = [1, 2, 3][rng.random_range(0..3)];
        let heads = kv_heads * [1, 2][rng.random_range(0..2)];
        let head_dim = [4, 8, 12, 16, 32, 64][rng.random_range(0..6)];
        let block_q = [8, 16, 32, 64][rng.random_range(0..4)];
        let block_k = [8, 16, 32, 64][rng.random_range(0..4)];
        let mask = MASKS[case % MASKS.len()];
        let score = SCORES[rng.random_range(0..SCORES.len())];
        let merge = rng.random_bool(0.5);
        let sides = if mask.contains("doc") {
            ", sides = [\"doc\"]"
        } else {
            ""
        };
        let score_attr = score
            .map(|s| format!(", score = {}", zebra_ir::print::quote(s)))
            .unwrap_or_default();
        let out_ty = if merge {
            format!("f32[B, T, {}]", heads * head_dim)
        } else {
            format!("f32[B, {heads}, T, {head_dim}]")
        };
        let doc_input = if sides.is_empty() {
            String::new()
        } else {
            format!(
                "  %3 = input {{name = \"doc\"}} : i64[B, T]\n  %5 = tile_ranges(%3) {{block = {block_q}}} : i64[B, T/{block_q}, 2]\n  %6 = tile_ranges(%3) {{block = {block_k}}} : i64[B, T/{block_k}, 2]\n"
            )
        };
        let doc_operand = if sides.is_empty() { "" } else { ", %3, %5, %6" };
        let text = format!(
            "graph case{case} {{\n  kernel @a = attention {{mask = {m}{score_attr}{sides}, scale = 0.3, heads = {heads}, kv_heads = {kv_heads}, head_dim = {head_dim}, block_q = {block_q}, block_k = {block_k}, merge_heads = {merge}}}\n  %0 = input {{name = \"q\"}} : f32[B, {heads}, T, {head_dim}]\n  %1 = input {{name = \"k\"}} : f32[B, {kv_heads}, T, {head_dim}]\n  %2 = input {{name = \"v\"}} : f32[B, {kv_heads}, T, {head_dim}]\n{doc_input}  %4 = attention(%0, %1, %2{doc_operand}) {{kernel = @a}} : {out_ty}\n  output out = %4\n}}\n",
            m = zebra_ir::print::quote(mask),
        );
        let lengths = [1, rng.random_range(2..70), rng.random_range(70..200)];
        check_graph(
            &text,
            &lengths,
            &out.path().join(format!("case{case}")),
            case as u64,
        );
    }
}

/// The fused projections (with and without RMSNorm, residual, a bias, QK-norm, RoPE) and
/// SwiGLU on random sizes, including sizes that are not multiples of the vector width or the
/// tiles.
#[test]
fn projection_kernels_on_random_shapes() {
    let out = tempfile::tempdir().expect("temporary directory");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for case in 0..8 {
        let k = [3, 8, 16, 24, 37, 64, 100][rng.random_range(0..7)];
        let n = [1, 5, 8, 16, 33, 72, 130][rng.random_range(0..7)];
        let heads = [1, 2, 4][rng.random_range(0..3)];
        let head_dim = [2, 4, 8, 6, 64][rng.random_range(0..5)];
        let eps = ["1e-5", "1e-6"][rng.random_range(0..2)];
        let text = format!(
            "graph proj{case} {{\n  %0 = input {{name = \"x\"}} : f32[B, T, {k}]\n  %1 = weight {{name = \"w\"}} : f32[{n}, {k}]\n  %2 = weight {{name = \"g\"}} : f32[{k}]\n  %3 = weight {{name = \"u\"}} : f32[{n}, {k}]\n  %4 = weight {{name = \"o\"}} : f32[{k}, {n}]\n  %5 = weight {{name = \"hq\"}} : f32[{hn}, {k}]\n  %6 = positions : i64[T]\n  %7 = linear(%0, %1) : f32[B, T, {n}]\n  %8 = swiglu(%0, %1, %3, %2) {{norm_eps = {eps}}} : f32[B, T, {n}]\n  %9 = linear(%8, %4, %0) {{residual = true}} : f32[B, T, {k}]\n  %10 = heads_proj(%9, %5, %2, %6) {{heads = {heads}, head_dim = {head_dim}, norm_eps = {eps}, rope_base = 10000.0}} : f32[B, {heads}, T, {head_dim}]\n  %11 = heads_proj(%9, %5, %2) {{heads = {heads}, head_dim = {head_dim}, norm_eps = {eps}}} : f32[B, {heads}, T, {head_dim}]\n  %12 = linear(%0, %1, %2) {{norm_eps = {eps}}} : f32[B, T, {n}]\n  %13 = weight {{name = \"bq\"}} : f32[{hn}]\n  %14 = weight {{name = \"gq\"}} : f32[{head_dim}]\n  %15 = heads_proj(%9, %5, %2, %13, %14, %6) {{heads = {heads}, head_dim = {head_dim}, norm_eps = {eps}, bias = true, qk_norm_eps = {eps}, rope_base = 10000.0}} : f32[B, {heads}, T, {head_dim}]\n  %16 = heads_proj(%9, %5, %13) {{heads = {heads}, head_dim = {head_dim}, bias = true}} : f32[B, {heads}, T, {head_dim}]\n  %17 = heads_proj(%9, %5, %14) {{heads = {heads}, head_dim = {head_dim}, qk_norm_eps = {eps}}} : f32[B, {heads}, T, {head_dim}]\n  output linear = %7\n  output swiglu = %8\n  output residual = %9\n  output rope = %10\n  output heads = %11\n  output normed = %12\n  output qwen3 = %15\n  output biased = %16\n  output qk_normed = %17\n}}\n",
            hn = heads * head_dim,
        );
        let lengths = [1, rng.random_range(2..40), rng.random_range(40..130)];
        check_graph(
            &text,
            &lengths,
            &out.path().join(format!("proj{case}")),
            case as u64,
        );
    }
}

/// Products of activations (the backward's matmuls) on random sizes: either operand read
/// through a transpose, shared by the batch or not, with sizes in `T` or constant.
#[test]
fn matmul_kernels_on_random_shapes() {
    let out = tempfile::tempdir().expect("temporary directory");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for case in 0..10 {
        let k = [1, 5, 16, 33, 130][rng.random_range(0..5)];
        let n = [1, 7, 16, 17, 40, 200][rng.random_range(0..6)];
        let a_t = rng.random_bool(0.5);
        let b_t = rng.random_bool(0.5);
        let shared_b = rng.random_bool(0.5);
        // A: [B, T, K] (stored [B, K, T] when read through a transpose).
        let a = if a_t {
            format!(
                "  %0 = input {{name = \"a\"}} : f32[B, {k}, T]\n  %1 = transpose(%0) {{perm = [0, 2, 1]}} : f32[B, T, {k}]\n"
            )
        } else {
            format!(
                "  %0 = input {{name = \"a\"}} : f32[B, T, {k}]\n  %1 = reshape(%0) {{shape = [B, T, {k}]}} : f32[B, T, {k}]\n"
            )
        };
        let (b_decl, b_ty) = match (shared_b, b_t) {
            (true, false) => (
                format!("weight {{name = \"b\"}} : f32[{k}, {n}]"),
                format!("f32[{k}, {n}]"),
            ),
            (true, true) => (
                format!("weight {{name = \"b\"}} : f32[{n}, {k}]"),
                format!("f32[{k}, {n}]"),
            ),
            (false, false) => (
                format!("input {{name = \"b\"}} : f32[B, {k}, {n}]"),
                format!("f32[B, {k}, {n}]"),
            ),
            (false, true) => (
                format!("input {{name = \"b\"}} : f32[B, {n}, {k}]"),
                format!("f32[B, {k}, {n}]"),
            ),
        };
        let b_use = if b_t {
            let perm = if shared_b { "[1, 0]" } else { "[0, 2, 1]" };
            format!("  %3 = transpose(%2) {{perm = {perm}}} : {b_ty}\n")
        } else {
            format!(
                "  %3 = reshape(%2) {{shape = {}}} : {b_ty}\n",
                b_ty.trim_start_matches("f32")
            )
        };
        // And T x T: A^T A-like products where both sizes are T.
        let text = format!(
            "graph mm{case} {{\n{a}  %2 = {b_decl}\n{b_use}  %4 = matmul(%1, %3) : f32[B, T, {n}]\n  %5 = transpose(%1) {{perm = [0, 2, 1]}} : f32[B, {k}, T]\n  %6 = matmul(%1, %5) : f32[B, T, T]\n  output out = %4\n  output square = %6\n}}\n"
        );
        let lengths = [1, rng.random_range(2..70), rng.random_range(70..160)];
        check_graph(
            &text,
            &lengths,
            &out.path().join(format!("mm{case}")),
            case as u64,
        );
    }
}

/// Every kernel of every program (full size) is valid MLIR, for CPUs with 4-, 8- and 16-lane
/// f32 vectors (SSE or NEON, AVX2, AVX-512): the verifier runs on each module, the decode
/// step's kernels included (for programs generation serves).
#[test]
fn mlir_of_every_program_verifies() {
    use zebra_codegen::plan::PlanMode;
    let mlir = zebra_codegen::backend::Mlir::new();
    for path in programs() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let graph = optimized(&lower(spec));
            for (vector, mode) in [
                (4, PlanMode::Forward),
                (8, PlanMode::Forward),
                (16, PlanMode::Forward),
                (4, PlanMode::Decode),
                (8, PlanMode::Decode),
                (16, PlanMode::Decode),
            ] {
                let planned = match zebra_codegen::plan::plan(&graph, "test", vector, 4096, mode) {
                    Ok(planned) => planned,
                    // Masks no KV cache serves (checked in `generate`).
                    Err(_) if mode == PlanMode::Decode => continue,
                    Err(e) => panic!("{}: {e}", relative(&path)),
                };
                for kernel in &planned.kernels {
                    let text = zebra_codegen::mlir::module(&[kernel.mlir(vector)]);
                    if let Err(e) = mlir.verify(&text) {
                        let symbol = kernel.symbol(vector);
                        panic!("{} ({}): {symbol}: {e}", relative(&path), spec.name);
                    }
                }
            }
        }
    }
}

/// The attention kernel of `mask` in a program, as MLIR for 8-lane vectors.
fn attention_mlir(program: &str, mask: &str) -> String {
    let path = root().join("examples").join(program);
    let graph = optimized(&lower(&crate::common::model(&path)));
    let planned = zebra_codegen::plan::plan(&graph, "x86_64 test", 8, 4096, Default::default())
        .expect("plans");
    planned
        .kernels
        .iter()
        .find(|k| matches!(k, KernelSpec::Attention { kernel, .. } if kernel.mask.to_string() == mask))
        .unwrap_or_else(|| panic!("{program} has no attention kernel with mask `{mask}`"))
        .mlir(8)
}

#[test]
fn mlir_snapshots_of_representative_attention_kernels() {
    for (name, program, mask) in [
        ("zebra_local", "zebra_llama2_7b.zb", "k <= q && q - k < 513"),
        ("zebra_global", "zebra_llama2_7b.zb", "k <= q"),
        (
            "document",
            "attention/document.zb",
            "k <= q && doc[q] == doc[k]",
        ),
    ] {
        insta::assert_snapshot!(format!("mlir_{name}"), attention_mlir(program, mask));
    }
}

fn tiny_zebra() -> (Graph, zebra_frontend::ModelSpec) {
    let spec = crate::common::model(&root().join("examples/zebra_tiny.zb"));
    (optimized(&lower(&spec)), spec)
}

/// An artifact's plan survives its on-disk format: loaded and written again, the same text.
#[test]
fn artifacts_round_trip() {
    let out = tempfile::tempdir().expect("temporary directory");
    let (graph, _) = tiny_zebra();
    build_at(&graph, out.path(), 256);
    let artifact = zebra_runtime::Artifact::load(out.path()).expect("loads");
    let written = serde_json::to_string_pretty(&artifact.plan).expect("serializes");
    let on_disk = std::fs::read_to_string(out.path().join("plan.json")).expect("readable");
    assert_eq!(written, on_disk);
    assert_eq!(artifact.plan.max_seq_len, 256);
    assert!(
        artifact.plan.kernels.len() >= 6,
        "{:?}",
        artifact.plan.kernels
    );
}

fn load_error(dir: &Path) -> String {
    let weights = zebra_frontend::init::random_weights(&tiny_zebra().1, 0);
    match CpuModel::load(dir, &weights, 1) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A missing, corrupt, outdated or incomplete artifact is refused with a message that names
/// the problem and the file.
#[test]
fn broken_artifacts_are_refused() {
    let out = tempfile::tempdir().expect("temporary directory");
    let (graph, _) = tiny_zebra();
    let good = out.path().join("good");
    build_at(&graph, &good, 256);
    let copy = |name: &str| {
        let dir = out.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["plan.json", "kernels.so"] {
            std::fs::copy(good.join(file), dir.join(file)).unwrap();
        }
        dir
    };

    let missing = out.path().join("nothing");
    let message = load_error(&missing);
    assert!(message.contains("no plan.json"), "{message}");

    let dir = copy("truncated_plan");
    let plan = std::fs::read_to_string(dir.join("plan.json")).unwrap();
    std::fs::write(dir.join("plan.json"), &plan[..plan.len() / 2]).unwrap();
    let message = load_error(&dir);
    assert!(message.contains("plan.json is corrupt"), "{message}");

    let dir = copy("old_format");
    let mut value: serde_json::Value = serde_json::from_str(&plan).unwrap();
    value["format"] = 0.into();
    std::fs::write(dir.join("plan.json"), value.to_string()).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("plan format 0") && message.contains("recompile"),
        "{message}"
    );

    // An optimizer whose step reads moments of a weight it does not train.
    let dir = copy("bad_optimizer");
    let mut value: serde_json::Value = serde_json::from_str(&plan).unwrap();
    value["optimizer"] = serde_json::json!({
        "params": [],
        "norm": [{"Kernel": {"kernel": 0, "operands": [{"MomentM": 0}],
            "grid": {"rows": [], "row_chunk": 1, "cols": 1}, "schedule": null}}],
        "partials": 0,
        "update": [],
    });
    std::fs::write(dir.join("plan.json"), value.to_string()).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("optimizer step refers to something"),
        "{message}"
    );

    // KV caches with no slot for the new key, or that hold fewer KV heads than they say.
    for (name, held, ring, message) in [
        ("cache_without_room", vec![0, 1], 0, "has no room"),
        ("cache_without_heads", vec![0], 8, "refers to KV heads"),
    ] {
        let dir = copy(name);
        let mut value: serde_json::Value = serde_json::from_str(&plan).unwrap();
        value["caches"] = serde_json::json!([{
            "kv_heads": 2, "kv_heads_held": held, "prefill_outputs": 0, "head_dim": 8,
            "sinks": 4, "ring": ring, "min_prompt": 0, "block": 16, "layer": 0,
        }]);
        std::fs::write(dir.join("plan.json"), value.to_string()).unwrap();
        let error = load_error(&dir);
        assert!(error.contains(message), "{name}: {error}");
    }

    let dir = copy("no_library");
    std::fs::remove_file(dir.join("kernels.so")).unwrap();
    let message = load_error(&dir);
    assert!(message.contains("kernels.so"), "{message}");

    let dir = copy("truncated_library");
    let bytes = std::fs::read(dir.join("kernels.so")).unwrap();
    std::fs::write(dir.join("kernels.so"), &bytes[..bytes.len() / 3]).unwrap();
    let message = load_error(&dir);
    assert!(message.contains("kernels.so"), "{message}");

    let dir = copy("wrong_library");
    let other = out.path().join("other");
    let (doc_graph, _) = {
        let spec = shrink(&crate::common::model(
            &root().join("examples/attention/alibi.zb"),
        ));
        (optimized(&lower(&spec)), spec)
    };
    build_at(&doc_graph, &other, 64);
    std::fs::copy(other.join("kernels.so"), dir.join("kernels.so")).unwrap();
    let message = load_error(&dir);
    assert!(
        message.contains("kernels.so") && message.contains("recompile"),
        "{message}"
    );
}

/// Rebuilding an unchanged model compiles nothing: every kernel comes from the cache.
#[test]
fn the_kernel_cache_makes_rebuilds_instant() {
    let out = tempfile::tempdir().expect("temporary directory");
    let cache = tempfile::tempdir().expect("temporary directory");
    let (graph, _) = tiny_zebra();
    let options = BuildOptions {
        mode: Default::default(),
        max_seq_len: 128,
        cache: Some(Cache {
            dir: cache.path().to_path_buf(),
        }),
    };
    let first = build(&graph, &out.path().join("a"), &options).expect("builds");
    assert_eq!(first.compiled, first.kernels);
    let second = build(&graph, &out.path().join("b"), &options).expect("builds");
    assert_eq!(second.kernels, first.kernels);
    assert_eq!(second.compiled, 0, "a warm rebuild compiled kernels");
    let a = std::fs::read(out.path().join("a/kernels.so")).unwrap();
    let b = std::fs::read(out.path().join("b/kernels.so")).unwrap();
    assert_eq!(a, b);
}

/// One artifact serves every length up to its maximum, and refuses longer inputs clearly.
#[test]
fn one_artifact_serves_every_length_up_to_its_maximum() {
    let out = tempfile::tempdir().expect("temporary directory");
    let (graph, spec) = tiny_zebra();
    build_at(&graph, out.path(), 100);
    let weights = zebra_frontend::init::random_weights(&spec, 4);
    let mut model = CpuModel::load(out.path(), &weights, 2).expect("loads");
    for seq in [100, 1, 37] {
        let inputs = random_inputs(&spec, 1, seq, seq as u64);
        let expected = crate::common::logits(&graph, &inputs, &weights);
        let actual = run(&mut model, &inputs, "logits");
        assert_close(&actual, &expected, TOLERANCE, &format!("T = {seq}"));
    }
    let inputs = random_inputs(&spec, 1, 101, 0);
    let error = model.run(&tensors(&inputs)).expect_err("T = 101 runs");
    let message = error.to_string();
    assert!(
        message.contains("101") && message.contains("100"),
        "{message}"
    );
}
