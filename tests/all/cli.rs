//! The `zebra` command line, end to end, including its errors for bad files and flags.

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use zebra_ir::{Weights, npy};

use crate::common::root;

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn zebra(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_zebra"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .env("ZEBRA_CACHE_DIR", crate::common::cache_dir())
        .output()
        .expect("zebra runs");
    Output {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

fn example(name: &str) -> String {
    root()
        .join("examples")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn temp() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

#[test]
fn check_reports_ok_and_errors() {
    let out = zebra(&["check", "examples/zebra_tiny.zb"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("model `zebra_tiny`: 8 layers (2 x global, 6 x local)"),
        "{}",
        out.stdout
    );

    let out = zebra(&["check", "tests/fixtures/err/window_zero.zb"]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("tests/fixtures/err/window_zero.zb:5:12"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("tests/fixtures/err/window_zero.zb: 1 error"),
        "{}",
        out.stderr
    );

    let out = zebra(&["check", "no/such/file.zb"]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("cannot read no/such/file.zb"),
        "{}",
        out.stderr
    );
}

#[test]
fn compile_emits_each_stage() {
    let out = zebra(&["compile", "examples/zebra_tiny.zb", "--emit", "ast"]);
    assert!(
        out.ok && out.stdout.starts_with("attention global causal @6:1"),
        "{}",
        out.stdout
    );
    let out = zebra(&["compile", "examples/zebra_tiny.zb", "--emit", "ir"]);
    assert!(
        out.ok && out.stdout.starts_with("graph zebra_tiny {"),
        "{}",
        out.stdout
    );
    let out = zebra(&["compile", "examples/zebra_tiny.zb", "--emit", "dot"]);
    assert!(
        out.ok && out.stdout.starts_with("digraph"),
        "{}",
        out.stdout
    );

    let dir = temp();
    let ir = path(dir.path(), "tiny.zir");
    let out = zebra(&["compile", "examples/zebra_tiny.zb", "-o", &ir]);
    assert!(out.ok, "{}", out.stderr);
    let graph = zebra_ir::parse_graph(&std::fs::read_to_string(&ir).unwrap()).unwrap();
    zebra_ir::verify(&graph).unwrap();

    let out = zebra(&["compile", "examples/zebra_tiny.zb", "--emit", "mlir-please"]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("invalid value 'mlir-please' for '--emit <EMIT>'"),
        "{}",
        out.stderr
    );

    let out = zebra(&["compile", "tests/fixtures/ok/two_models.zb"]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("several models (decoder, encoder_model); pick one with --model"),
        "{}",
        out.stderr
    );
    let out = zebra(&[
        "compile",
        "tests/fixtures/ok/two_models.zb",
        "--model",
        "encoder_model",
    ]);
    assert!(
        out.ok && out.stdout.starts_with("graph encoder_model {"),
        "{}",
        out.stderr
    );
}

/// `zebra compile --emit mlir|llvm|asm|artifact`: the kernels at each stage of code
/// generation, and a loadable artifact.
#[test]
fn compile_emits_the_kernels_at_each_stage() {
    let tiny = "examples/zebra_tiny.zb";
    let out = zebra(&["compile", tiny, "--emit", "mlir"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.starts_with("module {"), "{}", out.stdout);
    assert!(out.stdout.contains("func.func @zebra_attention_"));
    assert!(out.stdout.contains("vector.fma") || out.stdout.contains("math.fma"));

    let out = zebra(&["compile", tiny, "--emit", "llvm"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("define void @zebra_attention_"));
    assert!(out.stdout.contains("<8 x float>") || out.stdout.contains("<16 x float>"));

    let out = zebra(&["compile", tiny, "--emit", "asm"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("zebra_attention_"));

    let dir = temp();
    let artifact = path(dir.path(), "artifact");
    let out = zebra(&["compile", tiny, "--emit", "artifact", "-o", &artifact]);
    assert!(out.ok, "{}", out.stderr);
    let loaded = zebra_runtime::Artifact::load(Path::new(&artifact)).expect("an artifact");
    assert_eq!(loaded.plan.name, "zebra_tiny");
    assert!(Path::new(&artifact).join("kernels.so").exists());

    let out = zebra(&["compile", tiny, "--emit", "artifact"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("-o"), "{}", out.stderr);
}

/// `zebra bench` refuses unknown benchmarks and malformed tile sizes.
#[test]
fn bench_refuses_bad_flags() {
    let out = zebra(&["bench", "attention-sideways"]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("unknown benchmark `attention-sideways`")
            && out.stderr.contains("attention-local"),
        "{}",
        out.stderr
    );
    let out = zebra(&["bench", "attention-local", "--blocks", "64by64"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("64by64"), "{}", out.stderr);
}

/// `zebra init` and `zebra run` on zebra_tiny produce logits: the compiled kernels by
/// default, the interpreter with `--interpret`, each agreeing with the interpreter run
/// in-process; the same seed gives the same weights.
#[test]
fn init_and_run_zebra_tiny() {
    let dir = temp();
    let weights = path(dir.path(), "w.safetensors");
    let tokens = path(dir.path(), "tokens.npy");
    let logits = path(dir.path(), "logits.npy");
    let out = zebra(&[
        "init",
        "examples/zebra_tiny.zb",
        "--seed",
        "3",
        "-o",
        &weights,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let out = zebra(&[
        "encode",
        "Zebra stripes: local, global, local, global.",
        "-o",
        &tokens,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "examples/zebra_tiny.zb",
            "--weights",
            &weights,
            "--tokens",
            &tokens,
            "--output",
            &logits,
        ];
        args.extend_from_slice(extra);
        let out = zebra(&args);
        assert!(out.ok, "{}", out.stderr);
        assert!(
            out.stdout.contains("logits f32[1, 44, 256]"),
            "{}",
            out.stdout
        );
        (out.stdout, npy::read_floats(Path::new(&logits)).unwrap())
    };
    let (stdout, compiled) = run(&[]);
    assert!(stdout.contains("through the compiled kernels"), "{stdout}");
    let (stdout, interpreted) = run(&["--interpret"]);
    assert!(
        stdout.contains("through the reference interpreter"),
        "{stdout}"
    );
    assert!(compiled.iter().all(|x| x.is_finite()));

    let spec = crate::common::model(&root().join("examples/zebra_tiny.zb"));
    let loaded = Weights::load(Path::new(&weights)).unwrap();
    assert_eq!(loaded, zebra_frontend::init::random_weights(&spec, 3));
    let mut inputs = std::collections::BTreeMap::new();
    inputs.insert(
        "tokens".into(),
        zebra_ir::Value::Int(npy::read_ints(Path::new(&tokens)).unwrap()),
    );
    let expected = crate::common::logits(&crate::common::lower(&spec), &inputs, &loaded);
    let expected32 = expected.mapv(|x| f64::from(x as f32));
    crate::common::assert_close(
        &interpreted,
        &expected32,
        0.0,
        "zebra run --interpret vs the interpreter in-process",
    );
    crate::common::assert_close(
        &compiled,
        &expected,
        1e-4,
        "zebra run (compiled) vs the interpreter",
    );
}

/// Weights for zebra_tiny with one change, written to a file.
fn tiny_weights(dir: &Path, change: impl FnOnce(&mut Weights)) -> String {
    let spec = crate::common::model(&root().join("examples/zebra_tiny.zb"));
    let mut weights = zebra_frontend::init::random_weights(&spec, 0);
    change(&mut weights);
    let file = dir.join("w.safetensors");
    weights.save(&file).unwrap();
    file.to_string_lossy().into_owned()
}

fn write_tokens(dir: &Path, name: &str, shape: &[usize], values: Vec<i64>) -> String {
    let file = dir.join(name);
    npy::write(
        &file,
        &ArrayD::from_shape_vec(IxDyn(shape), values).unwrap(),
    )
    .unwrap();
    file.to_string_lossy().into_owned()
}

fn run_tiny(weights: &str, tokens: &str, dir: &Path) -> Output {
    let logits = path(dir, "logits.npy");
    zebra(&[
        "run",
        "examples/zebra_tiny.zb",
        "--weights",
        weights,
        "--tokens",
        tokens,
        "--output",
        &logits,
    ])
}

#[test]
fn bad_weights_name_the_tensor_and_shapes() {
    let dir = temp();
    let tokens = write_tokens(dir.path(), "t.npy", &[1, 3], vec![1, 2, 3]);

    let weights = tiny_weights(dir.path(), |w| {
        let mut rebuilt = Weights::new();
        for (name, t) in w
            .iter()
            .filter(|(n, _)| *n != "model.layers.1.mlp.up_proj.weight")
        {
            rebuilt.insert(name, t.clone());
        }
        *w = rebuilt;
    });
    let out = run_tiny(&weights, &tokens, dir.path());
    assert!(!out.ok);
    assert!(
        out.stderr.contains(
            "weight `model.layers.1.mlp.up_proj.weight` is missing (expected shape [176, 64])"
        ),
        "{}",
        out.stderr
    );

    let weights = tiny_weights(dir.path(), |w| {
        w.insert("model.norm.weight", ArrayD::zeros(IxDyn(&[65])))
    });
    let out = run_tiny(&weights, &tokens, dir.path());
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("weight `model.norm.weight` has shape [65], expected [64]"),
        "{}",
        out.stderr
    );

    let garbage = path(dir.path(), "garbage.safetensors");
    std::fs::write(&garbage, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}").unwrap();
    let out = run_tiny(&garbage, &tokens, dir.path());
    assert!(!out.ok);
    assert!(
        out.stderr.contains("is not a valid safetensors file"),
        "{}",
        out.stderr
    );

    let out = run_tiny(&path(dir.path(), "absent.safetensors"), &tokens, dir.path());
    assert!(!out.ok);
    assert!(out.stderr.contains("absent.safetensors"), "{}", out.stderr);
}

#[test]
fn bad_tokens_are_refused() {
    let dir = temp();
    let weights = tiny_weights(dir.path(), |_| {});
    let tokens = write_tokens(dir.path(), "t.npy", &[1, 3], vec![1, 256, 3]);
    let out = run_tiny(&weights, &tokens, dir.path());
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("token id 256 at [0, 1] is out of range for a vocabulary of 256"),
        "{}",
        out.stderr
    );

    let cube = write_tokens(dir.path(), "cube.npy", &[1, 1, 2], vec![1, 2]);
    let out = run_tiny(&weights, &cube, dir.path());
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("the token array must be a [B, T] array, found 3 dimensions [1, 1, 2]"),
        "{}",
        out.stderr
    );

    let floats = path(dir.path(), "floats.npy");
    npy::write(Path::new(&floats), &ArrayD::<f32>::zeros(IxDyn(&[1, 2]))).unwrap();
    let out = run_tiny(&weights, &floats, dir.path());
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("expected int64 or int32, found element type"),
        "{}",
        out.stderr
    );

    let empty = write_tokens(dir.path(), "empty.npy", &[1, 0], vec![]);
    let out = run_tiny(&weights, &empty, dir.path());
    assert!(!out.ok);
    assert!(
        out.stderr.contains("the token array is empty"),
        "{}",
        out.stderr
    );

    // A 1-D array is one sequence.
    let flat = write_tokens(dir.path(), "flat.npy", &[3], vec![1, 2, 3]);
    let out = run_tiny(&weights, &flat, dir.path());
    assert!(out.ok, "{}", out.stderr);
}

#[test]
fn side_inputs_are_required_and_checked() {
    let dir = temp();
    let doc_example = example("attention/document.zb");
    let weights = path(dir.path(), "w.safetensors");
    assert!(zebra(&["init", &doc_example, "-o", &weights]).ok);
    let tokens = write_tokens(dir.path(), "t.npy", &[1, 4], vec![1, 2, 3, 4]);
    let logits = path(dir.path(), "l.npy");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            &doc_example,
            "--weights",
            &weights,
            "--tokens",
            &tokens,
            "--output",
            &logits,
        ];
        args.extend_from_slice(extra);
        zebra(&args)
    };
    let out = run(&[]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("reads the side input `doc`; pass it with --side doc=FILE.npy"),
        "{}",
        out.stderr
    );

    let out = run(&["--side", "doc"]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("--side takes NAME=FILE.npy, found `doc`"),
        "{}",
        out.stderr
    );

    let docs = write_tokens(dir.path(), "doc.npy", &[1, 4], vec![0, 0, 1, 1]);
    let out = run(&["--side", &format!("topic={docs}")]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("has no side input `topic` (it reads doc)"),
        "{}",
        out.stderr
    );

    let short = write_tokens(dir.path(), "short.npy", &[1, 3], vec![0, 0, 1]);
    let out = run(&["--side", &format!("doc={short}")]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("side input `doc` has shape [1, 3], but the tokens have shape [1, 4]"),
        "{}",
        out.stderr
    );

    let out = run(&["--side", &format!("doc={docs}")]);
    assert!(out.ok, "{}", out.stderr);
}

#[test]
fn every_example_runs_through_the_interpreter_from_the_command_line() {
    let dir = temp();
    let tokens = write_tokens(
        dir.path(),
        "t.npy",
        &[2, 5],
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    );
    let docs = write_tokens(
        dir.path(),
        "d.npy",
        &[2, 5],
        vec![0, 0, 1, 1, 1, 0, 1, 1, 2, 2],
    );
    for file in crate::common::zb_files("examples/attention")
        .into_iter()
        .chain([PathBuf::from(example("zebra_tiny.zb"))])
    {
        let file = file.to_string_lossy().into_owned();
        let weights = path(dir.path(), "w.safetensors");
        assert!(zebra(&["init", &file, "-o", &weights]).ok, "{file}");
        let logits = path(dir.path(), "l.npy");
        let side = format!("doc={docs}");
        let mut args = vec![
            "run",
            &file,
            "--weights",
            &weights,
            "--tokens",
            &tokens,
            "--output",
            &logits,
        ];
        if file.ends_with("document.zb") {
            args.extend(["--side", &side]);
        }
        let out = zebra(&args);
        assert!(out.ok, "{file}: {}", out.stderr);
        let written = npy::read_floats(Path::new(&logits)).unwrap();
        assert_eq!(written.shape(), &[2, 5, 256], "{file}");
        assert!(written.iter().all(|x| x.is_finite()), "{file}");
    }
}
