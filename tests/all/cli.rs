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

impl Output {
    /// Asserts that the command failed and said `says`.
    #[track_caller]
    fn refused(&self, says: &str) {
        assert!(
            !self.ok && self.stderr.contains(says),
            "expected a refusal saying {says:?}: {}",
            self.stderr
        );
    }
}

fn zebra(args: &[&str]) -> Output {
    zebra_with(("NO_COLOR", Path::new("1")), args)
}

/// Standard output of one JSON object per line.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `zebra` with an environment variable set.
fn zebra_with(env: (&str, &Path), args: &[&str]) -> Output {
    zebra_with_all(&[(env.0, env.1.as_os_str())], args)
}

/// `zebra` with environment variables set.
fn zebra_with_all(envs: &[(&str, &std::ffi::OsStr)], args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_zebra"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .env("ZEBRA_CACHE_DIR", crate::common::cache_dir())
        .envs(envs.iter().copied())
        .output()
        .expect("zebra runs");
    Output {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `zebra-run` in this process: its standard output, or its error.
fn zebra_run(args: &[&str]) -> Result<String, String> {
    use clap::Parser;
    let cli =
        zebra_run::Cli::try_parse_from(std::iter::once("zebra-run").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    zebra_run::run(cli, &mut out).map_err(|e| format!("{e:#}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
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
    // What the projections add is in the summary.
    let out = zebra(&["check", "tests/fixtures/golden/qwen3.zb"]);
    assert!(
        out.stdout
            .contains("4 heads / 2 KV heads of dim 8, biases on q, k, v, o, QK-norm, vocab 64"),
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

    // For the CPU, --dtype bf16 packs the projections' weights in bf16: the kernels load
    // 16-bit vectors, the plan says so; f16 is a GPU's, and training keeps f32 weights.
    let out = zebra(&["compile", tiny, "--emit", "mlir", "--dtype", "bf16"]);
    assert!(out.ok && out.stdout.contains("xi16>"), "{}", out.stderr);
    let bf16 = path(dir.path(), "bf16");
    let out = zebra(&[
        "compile", tiny, "--emit", "artifact", "--dtype", "bf16", "-o", &bf16,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let loaded = zebra_runtime::Artifact::load(Path::new(&bf16)).expect("an artifact");
    assert!(loaded.plan.packed.iter().all(|p| p.bf16));
    let info = zebra_run(&["info", &bf16]).unwrap();
    assert!(info.contains("the projections' in bf16"), "{info}");
    let out = zebra(&[
        "compile", tiny, "--emit", "artifact", "--dtype", "f16", "-o", &bf16,
    ]);
    out.refused("--dtype f16 runs projections on a GPU");
    let out = zebra(&[
        "compile", tiny, "--emit", "artifact", "--for", "train", "--dtype", "bf16", "-o", &bf16,
    ]);
    out.refused("bf16 weights are for inference");
}

/// `zebra bench attention-per-head` gives the heads windows of W, W/2, W/4 and W/8 keys and
/// checks the kernel against the naive dense-mask attention, which reads `h` itself.
#[test]
fn bench_times_per_head_windows_against_the_naive_attention() {
    let out = zebra_with(
        ("ZEBRA_TUNING_DB", Path::new("")),
        &[
            "bench",
            "attention-per-head",
            "--seq-len",
            "300",
            "--window",
            "64",
            "--heads",
            "4",
            "--head-dim",
            "16",
            "--repeats",
            "1",
            "--json",
        ],
    );
    assert!(out.ok, "{}", out.stderr);
    let record: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(record["name"], "attention-per-head");
    assert_eq!(record["mask"], "k <= q && q - k < [64, 32, 16, 8][h % 4]");
    assert!(record["gflops"].as_f64().unwrap() > 0.0, "{record}");
    assert!(record["speedup_vs_baseline"].as_f64().is_some(), "{record}");
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
    let out = zebra(&["bench", "attention-local", "--head-dim", "4294967297"]);
    out.refused("--head-dim 4294967297 is more than the 16384 Zebra compiles");
    // Counts that must be positive, and a thread count past the limit, by their flags.
    for (flag, value, says) in [
        ("--window", "0", "must be at least 1"),
        ("--repeats", "0", "must be at least 1"),
        ("--heads", "two", "`two` is not a whole number"),
        ("--threads", "100000", "at most 1024 threads"),
    ] {
        let out = zebra(&["bench", "attention-local", flag, value]);
        assert!(!out.ok, "{flag} {value} was accepted");
        assert!(
            out.stderr
                .contains(&format!("invalid value '{value}' for '{flag}"))
                && out.stderr.contains(says),
            "{flag} {value}: {}",
            out.stderr
        );
    }
    let out = zebra(&[
        "compile",
        "examples/zebra_tiny.zb",
        "--emit",
        "artifact",
        "--max-seq-len",
        "0",
        "-o",
        "unused",
    ]);
    assert!(!out.ok);
    assert!(out.stderr.contains("must be at least 1"), "{}", out.stderr);
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
    let run = |weights: &str, extra: &[&str]| {
        let mut args = vec![
            "run",
            "examples/zebra_tiny.zb",
            "--weights",
            weights,
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
    let (stdout, compiled) = run(&weights, &[]);
    assert!(stdout.contains("through the compiled kernels"), "{stdout}");
    let (stdout, interpreted) = run(&weights, &["--interpret"]);
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

    // The same weights as a Hugging Face checkpoint in shards: a folder with an index.
    let folder = dir.path().join("hf");
    std::fs::create_dir(&folder).unwrap();
    let mut shards = [Weights::new(), Weights::new()];
    let mut map = serde_json::Map::new();
    for (i, (name, tensor)) in loaded.iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        shards[i % 2].insert(name, tensor.clone());
        map.insert(name.to_string(), file.into());
    }
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        shard.save(&folder.join(file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        folder.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let (_, from_shards) = run(&folder.to_string_lossy(), &[]);
    assert_eq!(from_shards, compiled, "the sharded weights ran differently");
}

/// The golden tiny Llama's weights in a model folder `name`, as the Hub gives them.
fn tiny_llama_folder(dir: &Path, name: &str) -> PathBuf {
    let folder = dir.join(name);
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(
        root().join("tests/fixtures/golden/tiny_llama.safetensors"),
        folder.join("model.safetensors"),
    )
    .unwrap();
    folder
}

/// `zebra import` of the golden tiny Llama's configuration, as Hugging Face writes it, runs
/// its weights to transformers' logits; so does its Zebra rearrangement (`--zebra 2:4`), to
/// the Zebra layout's.
#[test]
fn imported_configurations_reproduce_transformers() {
    let dir = temp();
    let golden = root().join("tests/fixtures/golden");
    let folder = tiny_llama_folder(dir.path(), "Tiny-Llama");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "head_dim": 8, "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 128,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
        "torch_dtype": "float32"
    });
    std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    let folder_arg = folder.to_string_lossy().into_owned();
    let tokens = golden.join("tokens.npy").to_string_lossy().into_owned();
    // `zebra run SOURCE` on the folder's weights and `tokens` gives the golden `expected`.
    let runs_to = |source: &str, tokens: &str, expected: &str, what: &str| {
        let logits = path(dir.path(), "logits.npy");
        let args = ["run", source, "--weights", &folder_arg, "--tokens", tokens];
        let out = zebra(&[&args[..], &["--output", &logits]].concat());
        assert!(out.ok, "{what}: {}", out.stderr);
        crate::common::assert_close(
            &npy::read_floats(Path::new(&logits)).unwrap(),
            &npy::read_floats(&golden.join(expected)).unwrap(),
            1e-4,
            &format!("{what}, vs transformers"),
        );
    };
    for (extra, expected) in [
        (vec![], "logits_all_causal.npy"),
        (vec!["--zebra", "2:4"], "logits_zebra_g2_window4.npy"),
    ] {
        let source = path(dir.path(), "tiny.zb");
        let mut args = vec!["import", &folder_arg, "-o", &source];
        args.extend(extra.iter().copied());
        let out = zebra(&args);
        assert!(out.ok, "{}", out.stderr);
        assert!(
            out.stderr.contains("`tiny_llama`: 2 layers")
                && out.stderr.contains(&format!("--weights {folder_arg}")),
            "{}",
            out.stderr
        );
        let what = format!("zebra import {extra:?}, then zebra run, vs transformers");
        runs_to(&source, &tokens, expected, &what);
    }

    // Scaled RoPEs (transformers 5's `rope_parameters`), imported and run compiled, give
    // transformers' logits for each scaling (`scripts/golden_transformers.py`).
    let tokens_160 = golden.join("tokens_160.npy").to_string_lossy().into_owned();
    for (scaling, params) in [
        (
            "linear",
            serde_json::json!({"rope_type": "linear", "factor": 4.0}),
        ),
        (
            "llama3",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 200}),
        ),
        (
            "yarn",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 64}),
        ),
    ] {
        let mut config = config.clone();
        config["max_position_embeddings"] = 256.into();
        config["rope_parameters"] = params;
        config["rope_parameters"]["rope_theta"] = 10000.0.into();
        std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
        let source = path(dir.path(), &format!("{scaling}.zb"));
        let out = zebra(&["import", &folder_arg, "-o", &source]);
        assert!(out.ok, "{}", out.stderr);
        let what = format!("zebra import of a {scaling} RoPE scaling, then zebra run");
        runs_to(
            &source,
            &tokens_160,
            &format!("logits_rope_{scaling}.npy"),
            &what,
        );
    }

    // `zebra import` of the configuration as `model_type` with `extra` settings, then `zebra
    // run` of the folder's weights, gives transformers' logits for that model type.
    let imports_as = |model_type: &str, extra: serde_json::Value| {
        let mut config = config.clone();
        config["model_type"] = model_type.into();
        for (key, value) in extra.as_object().unwrap() {
            config[key] = value.clone();
        }
        std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
        let source = path(dir.path(), &format!("{model_type}.zb"));
        let out = zebra(&["import", &folder_arg, "-o", &source]);
        assert!(out.ok, "{}", out.stderr);
        let what = format!("zebra import of {model_type}, then zebra run");
        runs_to(
            &source,
            &tokens_160,
            &format!("logits_{model_type}.npy"),
            &what,
        );
    };
    // SmolLM3 (its second layer without RoPE, and that layer a window of 4, as the
    // configuration's defaults make them) and Ministral (`layer_types`: a window of 4, then
    // full attention) give transformers' logits too.
    imports_as(
        "smollm3",
        serde_json::json!({"no_rope_layer_interval": 2, "use_sliding_window": true,
            "sliding_window": 4}),
    );
    imports_as(
        "ministral",
        serde_json::json!({"layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 4}),
    );
    // Qwen2 (Q, K and V biases; layer 1 a window of 4 from `max_window_layers = 1` on) and
    // Qwen3 (QK-norm; `attention_bias` on all four projections) on the weights with random
    // biases and QK-norm scales. A Qwen2 checkpoint's extra tensors (here the o_proj bias and
    // the QK-norm scales it does not read) are named in a warning, not silently dropped.
    std::fs::copy(
        golden.join("tiny_qwen.safetensors"),
        folder.join("model.safetensors"),
    )
    .unwrap();
    imports_as(
        "qwen2",
        serde_json::json!({"use_sliding_window": true, "sliding_window": 4,
            "max_window_layers": 1}),
    );
    imports_as("qwen3", serde_json::json!({"attention_bias": true}));
    let out = zebra(&[
        "run",
        &path(dir.path(), "qwen2.zb"),
        "--weights",
        &folder_arg,
        "--tokens",
        &tokens_160,
        "--output",
        &path(dir.path(), "logits.npy"),
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("6 tensors of the weights are not read by model `tiny_llama`")
            && out
                .stderr
                .contains("model.layers.0.self_attn.k_norm.weight"),
        "{}",
        out.stderr
    );

    // What it cannot import, it names.
    std::fs::write(
        folder.join("config.json"),
        serde_json::json!({"model_type": "gemma2"}).to_string(),
    )
    .unwrap();
    let out = zebra(&["import", &folder_arg]);
    out.refused("`model_type` is `gemma2`");
    let out = zebra(&["import", &folder_arg, "--zebra", "1:4"]);
    out.refused("at least 2 layers");
    let empty = path(dir.path(), "empty");
    std::fs::create_dir(&empty).unwrap();
    let out = zebra(&["import", &empty]);
    out.refused("is not a Hugging Face model folder");
}

/// A Hugging Face model folder (weights, config.json, tokenizer.json) imported and run on
/// text: the prompt is encoded by its tokenizer, the first greedy token is the one the
/// logits of `zebra run` pick, and generation stops at the configuration's end token.
#[test]
fn hugging_face_folders_generate_with_their_tokenizer() {
    let dir = temp();
    let root = root();
    let folder = tiny_llama_folder(dir.path(), "tiny");
    let config = |eos: i64| {
        let config = serde_json::json!({
            "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "eos_token_id": eos
        });
        std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    };
    config(2);
    let folder_arg = folder.to_string_lossy().into_owned();
    let source = path(dir.path(), "tiny.zb");
    assert!(zebra(&["import", &folder_arg, "-o", &source]).ok);
    let prompt = "a zebra is local";
    let generate = |max: &str| {
        zebra(&[
            "generate",
            &folder_arg,
            "--model-file",
            &source,
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            max,
        ])
    };
    let out = generate("4");
    assert!(
        !out.ok && out.stderr.contains("--tokenizer"),
        "a vocabulary of 64 without a tokenizer: {}",
        out.stderr
    );
    let tokenizer = root.join("tests/fixtures/tokenizer/tokenizer.json");
    std::fs::copy(&tokenizer, folder.join("tokenizer.json")).unwrap();

    let tokens = path(dir.path(), "tokens.npy");
    let out = zebra(&[
        "encode",
        prompt,
        "--tokenizer",
        &tokenizer.to_string_lossy(),
        "-o",
        &tokens,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let ids = npy::read_ints(Path::new(&tokens)).unwrap();
    assert_eq!(
        ids.iter().copied().collect::<Vec<_>>(),
        [1, 25, 38, 22, 11, 18, 31]
    );
    let logits = path(dir.path(), "logits.npy");
    let out = zebra(&[
        "run",
        &source,
        "--weights",
        &folder_arg,
        "--tokens",
        &tokens,
        "--output",
        &logits,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let logits = npy::read_floats(Path::new(&logits)).unwrap();
    let last: Vec<f64> = logits.iter().skip(6 * 64).copied().collect();
    let greedy = (0..64).fold(0, |best, i| if last[i] > last[best] { i } else { best });

    let out = generate("6");
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.starts_with(prompt) && out.stdout.trim_end().len() > prompt.len(),
        "{}",
        out.stdout
    );
    // The greedy token as the end token: generation stops at once, printing nothing more.
    config(greedy as i64);
    let out = generate("6");
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout, format!("{prompt}\n"));
    assert!(
        out.stderr
            .contains("stopped at the end-of-sequence token, after 1 token\n"),
        "{}",
        out.stderr
    );

    // Fine-tuning on text encoded by the folder's tokenizer, which the run keeps for
    // generating and evaluating.
    config(2);
    let corpus = path(dir.path(), "corpus.txt");
    std::fs::write(
        &corpus,
        "a zebra attends to local keys and global keys; the stripes of a zebra. ".repeat(20),
    )
    .unwrap();
    let run = path(dir.path(), "run");
    let out = zebra(&[
        "train",
        &source,
        "--init-from",
        &folder_arg,
        "--data",
        &corpus,
        "--seq-len",
        "16",
        "--batch",
        "2",
        "--steps",
        "12",
        "--lr",
        "3e-3",
        "--out",
        &run,
        "--quiet",
    ]);
    assert!(out.ok, "{}", out.stderr);
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&run).join("checkpoint.json")).unwrap(),
    )
    .unwrap();
    let kept = meta["config"]["tokenizer"].as_str().unwrap_or_default();
    assert!(kept.ends_with("tokenizer.json"), "{meta}");
    let losses = losses(&run);
    assert!(losses[11] < losses[0], "{losses:?}");
    let out = zebra(&[
        "generate",
        &run,
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "4",
    ]);
    assert!(out.ok && out.stdout.starts_with(prompt), "{}", out.stderr);
    let out = zebra(&[
        "eval",
        &run,
        &folder_arg,
        "--model-file",
        &source,
        "--data",
        &corpus,
        "--context",
        "16",
        "--json",
    ]);
    assert!(out.ok, "{}", out.stderr);
    let perplexity = |line: &serde_json::Value| line["perplexity"].as_f64().unwrap();
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(
        perplexity(&lines[0]) < perplexity(&lines[1]),
        "fine-tuned vs the golden weights: {}",
        out.stdout
    );
    zebra(&[
        "train",
        &source,
        "--task",
        "recall",
        "--tokenizer",
        &tokenizer.to_string_lossy(),
        "--out",
        &path(dir.path(), "recall"),
    ])
    .refused("--tokenizer encodes --data");
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

/// A model too large for any machine's memory is refused with its size before a weight is
/// drawn or a run directory made, and weights of another shape before anything is compiled.
#[test]
fn models_too_large_for_memory_are_refused_with_their_size() {
    let dir = temp();
    let source = std::fs::read_to_string(example("zebra_tiny.zb")).unwrap();
    let huge = path(dir.path(), "huge.zb");
    std::fs::write(
        &huge,
        source.replace("vocab      = 256", "vocab = 1000000000000"),
    )
    .unwrap();
    assert!(
        std::fs::read_to_string(&huge)
            .unwrap()
            .contains("vocab = 1000000000000")
    );
    let weights = path(dir.path(), "w.safetensors");
    zebra(&["init", &huge, "-o", &weights]).refused(
        "the 64000000369728 parameters of `zebra_tiny`, drawn and written in f32, need \
         698.5 TiB of memory",
    );
    assert!(!Path::new(&weights).exists());
    let run = path(dir.path(), "run");
    zebra(&["train", &huge, "--task", "recall", "--out", &run]).refused(
        "the 64000000369728 parameters of `zebra_tiny` in training (weights, gradients and \
         two moments in f32) need 931.3 TiB of memory",
    );
    assert!(!Path::new(&run).exists());
    // zebra-run's random weights of an artifact's shapes, likewise.
    let artifact = path(dir.path(), "huge");
    assert!(zebra(&["compile", &huge, "--emit", "artifact", "-o", &artifact]).ok);
    let tokens = write_tokens(dir.path(), "t.npy", &[1, 3], vec![1, 2, 3]);
    let logits = path(dir.path(), "logits.npy");
    let out = zebra_run(&[
        "forward",
        &artifact,
        "--random-weights",
        "1",
        "--tokens",
        &tokens,
        "--output",
        &logits,
    ]);
    let error = out.expect_err("random weights of 64e12 parameters were drawn");
    assert!(
        error.contains("random weights for the plan's 64000000369728 parameters need 465.7 TiB"),
        "{error}"
    );

    let wide = path(dir.path(), "wide.zb");
    std::fs::write(&wide, source.replace("dim        = 64", "dim = 4096")).unwrap();
    assert!(
        std::fs::read_to_string(&wide)
            .unwrap()
            .contains("dim = 4096")
    );
    assert!(zebra(&["init", &example("zebra_tiny.zb"), "-o", &weights]).ok);
    let expected = "weight `model.embed_tokens.weight` has shape [256, 64], expected [256, 4096]";
    zebra(&[
        "run",
        &wide,
        "--weights",
        &weights,
        "--tokens",
        &tokens,
        "--output",
        &logits,
    ])
    .refused(expected);
    zebra(&["generate", &weights, "--model-file", &wide, "--prompt", "a"]).refused(expected);
    let wider = path(dir.path(), "wider.zb");
    std::fs::write(&wider, source.replace("dim        = 64", "dim = 128")).unwrap();
    zebra(&[
        "train",
        &wider,
        "--init-from",
        &weights,
        "--task",
        "recall",
        "--steps",
        "1",
        "--seq-len",
        "64",
        "--out",
        &run,
    ])
    .refused("weight `model.embed_tokens.weight` has shape [256, 64], expected [256, 128]");
    assert!(!Path::new(&run).join("checkpoint.json").exists());
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

    // Longer than the artifact was compiled for.
    let long = write_tokens(dir.path(), "long.npy", &[1, 40], vec![1; 40]);
    let logits = path(dir.path(), "long-logits.npy");
    let out = zebra(&[
        "run",
        "examples/zebra_tiny.zb",
        "--weights",
        &weights,
        "--tokens",
        &long,
        "--output",
        &logits,
        "--max-seq-len",
        "32",
    ]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("the sequence length 40 is above the 32"),
        "{}",
        out.stderr
    );
    assert!(!Path::new(&logits).exists());

    // Missing files are named once, with the system's reason once.
    let missing = path(dir.path(), "missing.npy");
    let out = run_tiny(&weights, &missing, dir.path());
    assert!(!out.ok);
    assert!(out.stderr.contains("missing.npy"), "{}", out.stderr);
    assert_eq!(out.stderr.matches("os error").count(), 1, "{}", out.stderr);
    let out = run_tiny(
        &path(dir.path(), "missing.safetensors"),
        &flat_tokens(dir.path()),
        dir.path(),
    );
    assert!(!out.ok);
    assert!(out.stderr.contains("missing.safetensors"), "{}", out.stderr);
    assert_eq!(out.stderr.matches("os error").count(), 1, "{}", out.stderr);

    // A 1-D array is one sequence.
    let flat = flat_tokens(dir.path());
    let out = run_tiny(&weights, &flat, dir.path());
    assert!(out.ok, "{}", out.stderr);
}

fn flat_tokens(dir: &Path) -> String {
    write_tokens(dir, "flat.npy", &[3], vec![1, 2, 3])
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

/// A small text corpus: a few sentences repeated, so a tiny model learns it quickly.
fn corpus(dir: &Path) -> String {
    let text = "the quick brown fox jumps over the lazy dog. a zebra has stripes. ".repeat(40);
    let file = path(dir, "corpus.txt");
    std::fs::write(&file, text).unwrap();
    file
}

fn train_tiny(data: &str, out: &str, steps: &str, extra: &[&str]) -> Output {
    let zb = example("zebra_tiny.zb");
    let mut args = vec![
        "train",
        &zb,
        "--data",
        data,
        "--steps",
        steps,
        "--seq-len",
        "32",
        "--batch",
        "4",
        "--lr",
        "3e-3",
        "--seed",
        "1",
        "--threads",
        "2",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    zebra(&args)
}

/// `zebra train` refuses optimizer settings out of range, naming the flag, and writes no
/// run directory.
#[test]
fn train_refuses_bad_optimizer_flags() {
    let dir = temp();
    let data = corpus(dir.path());
    let run = path(dir.path(), "run");
    for (flag, says) in [
        (
            "--clip=-1",
            "--clip must be 0 (no clipping) or a positive norm, found -1",
        ),
        (
            "--weight-decay=nan",
            "--weight-decay must be 0 or a positive number, found NaN",
        ),
        ("--min-lr-ratio=2", "--min-lr-ratio must be between 0 and 1"),
    ] {
        let out = train_tiny(&data, &run, "2", &[flag]);
        assert!(!out.ok, "{flag} was accepted");
        assert!(out.stderr.contains(says), "{flag}: {}", out.stderr);
        assert!(!Path::new(&run).exists(), "{flag} left a run directory");
    }
}

fn losses(run: &str) -> Vec<f64> {
    std::fs::read_to_string(Path::new(run).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn training_lowers_the_loss_and_the_run_generates_and_evaluates() {
    let dir = temp();
    let data = corpus(dir.path());
    let run = path(dir.path(), "run");
    let out = train_tiny(&data, &run, "40", &["--quiet"]);
    assert!(out.ok, "{}", out.stderr);
    let loss = losses(&run);
    assert_eq!(loss.len(), 40);
    let (first, last) = (
        loss[..5].iter().sum::<f64>(),
        loss[35..].iter().sum::<f64>(),
    );
    assert!(
        last < 0.6 * first,
        "the loss went from {first} to {last} (sums of 5)"
    );
    for file in [
        "loss.svg",
        "checkpoint.json",
        "model.zb",
        "checkpoints/step-000040/model.safetensors",
    ] {
        assert!(Path::new(&run).join(file).exists(), "{file} is missing");
    }

    // Long-context adaptation: continue from the checkpoint at twice the length.
    let longer = path(dir.path(), "longer");
    let out = zebra(&[
        "train",
        &example("zebra_tiny.zb"),
        "--init-from",
        &run,
        "--data",
        &data,
        "--steps",
        "3",
        "--seq-len",
        "64",
        "--batch",
        "2",
        "--quiet",
        "--out",
        &longer,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let continued = losses(&longer);
    assert!(
        continued[0] < loss[0] * 0.8,
        "{} vs {}",
        continued[0],
        loss[0]
    );

    let out = zebra(&[
        "eval",
        &run,
        "--data",
        &data,
        "--context",
        "16",
        "32",
        "--samples",
        "8",
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("perplexity"), "{}", out.stdout);
    let rows: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("16") || l.trim_start().starts_with("32"))
        .collect();
    assert_eq!(rows.len(), 2, "{}", out.stdout);

    let out = zebra(&[
        "generate",
        &run,
        "--prompt",
        "the quick",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--stats",
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.starts_with("the quick"), "{}", out.stdout);
    assert_eq!(
        out.stdout.trim_end_matches('\n').len(),
        "the quick".len() + 12
    );
    assert!(out.stderr.contains("KV cache"), "{}", out.stderr);
    // Greedy decoding repeats itself exactly.
    let again = zebra(&[
        "generate",
        &run,
        "--prompt",
        "the quick",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ]);
    assert_eq!(again.stdout, out.stdout);
    // The same from the checkpoint's weights file and the model's source.
    let weights = path(Path::new(&run), "checkpoints/step-000040/model.safetensors");
    let zb = example("zebra_tiny.zb");
    let args = [
        "generate",
        &weights,
        "--prompt",
        "the quick",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ];
    let out = zebra(&args);
    out.refused("--model-file");
    let mut with_source = args.to_vec();
    with_source.extend(["--model-file", zb.as_str()]);
    let from_file = zebra(&with_source);
    assert!(from_file.ok, "{}", from_file.stderr);
    assert_eq!(from_file.stdout, again.stdout);
}

/// Ctrl-C saves a checkpoint; resuming gives the losses of a run never interrupted.
#[test]
fn an_interrupted_run_resumes_exactly() {
    let dir = temp();
    let data = corpus(dir.path());
    let whole = path(dir.path(), "whole");
    let out = train_tiny(&data, &whole, "30", &["--quiet"]);
    assert!(out.ok, "{}", out.stderr);

    let cut = path(dir.path(), "cut");
    let zb = example("zebra_tiny.zb");
    let child = Command::new(env!("CARGO_BIN_EXE_zebra"))
        .args([
            "train",
            &zb,
            "--data",
            &data,
            "--steps",
            "30",
            "--seq-len",
            "32",
            "--batch",
            "4",
            "--lr",
            "3e-3",
            "--seed",
            "1",
            "--threads",
            "2",
            "--out",
            &cut,
            "--quiet",
            "--checkpoint-every",
            "1000",
        ])
        .env("ZEBRA_CACHE_DIR", crate::common::cache_dir())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = Path::new(&cut).join("metrics.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(start.elapsed().as_secs() < 120, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait_with_output().unwrap();
    let stopped = losses(&cut).len();
    if stopped < 30 {
        assert_eq!(
            exit.status.code(),
            Some(130),
            "{}",
            String::from_utf8_lossy(&exit.stderr)
        );
        assert!(String::from_utf8_lossy(&exit.stderr).contains("--resume"));
    }
    let out = zebra(&["train", "--resume", &cut, "--quiet", "--threads", "2"]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        losses(&cut),
        losses(&whole),
        "stopped after {stopped} steps"
    );
    // Setup flags cannot change on resume.
    let out = zebra(&["train", "--resume", &cut, "--lr", "1"]);
    out.refused("--lr");
}

#[test]
fn broken_checkpoints_are_refused_and_nothing_is_overwritten() {
    let dir = temp();
    let data = corpus(dir.path());
    let run = path(dir.path(), "run");
    let out = train_tiny(&data, &run, "4", &["--quiet", "--checkpoint-every", "2"]);
    assert!(out.ok, "{}", out.stderr);
    let snapshot = |run: &str| -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = Vec::new();
        let mut stack = vec![PathBuf::from(run)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    if !p.ends_with("artifacts") {
                        stack.push(p);
                    }
                } else {
                    files.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        files.sort();
        files
    };

    // A checkpoint cut short.
    let weights = Path::new(&run).join("checkpoints/step-000004/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let before = snapshot(&run);
    let resume = zebra(&["train", "--resume", &run, "--steps", "8"]);
    let out = zebra(&["train", "--resume", &run]);
    assert!(!out.ok);
    assert_eq!(
        out.stderr.matches("model.safetensors").count(),
        1,
        "the file named once: {}",
        out.stderr
    );
    let out = zebra(&["generate", &run, "--prompt", "a"]);
    out.refused("model.safetensors");
    assert!(!resume.ok);
    assert_eq!(snapshot(&run), before, "a refused resume changed the run");
    std::fs::write(&weights, &bytes).unwrap();

    // A model that is no longer the one trained.
    let model = Path::new(&run).join("model.zb");
    let source = std::fs::read_to_string(&model).unwrap();
    std::fs::write(&model, source.replace("hidden = 176", "hidden = 160")).unwrap();
    let before = snapshot(&run);
    let out = zebra(&["train", "--resume", &run]);
    assert!(!out.ok);
    assert!(out.stderr.contains("no longer matches"), "{}", out.stderr);
    assert_eq!(snapshot(&run), before);

    // A new run over an old one is refused too.
    std::fs::write(&model, source).unwrap();
    let out = train_tiny(&data, &run, "4", &[]);
    out.refused("already holds a run");
}

#[test]
fn bad_training_and_generation_inputs_are_refused() {
    let dir = temp();
    let data = corpus(dir.path());
    let out_dir = path(dir.path(), "run");
    let missing = path(dir.path(), "missing.txt");
    let empty = path(dir.path(), "empty.txt");
    std::fs::write(&empty, "").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--data", &missing], "missing.txt"),
        (vec!["--data", &empty], "holds no text"),
        (
            vec!["--data", &data, "--seq-len", "100000"],
            "too few for sequences",
        ),
        (vec!["--data", &data, "--lr=-1"], "--lr"),
        (vec!["--data", &data, "--steps", "0"], "--steps"),
        (
            vec!["--data", &data, "--checkpoint-every", "0"],
            "--checkpoint-every must be positive",
        ),
        (vec!["--task", "sorting"], "unknown task `sorting`"),
        (vec!["--task", "recall", "--seq-len", "8"], "at least"),
        (vec!["--data", &data, "--task", "recall"], "not both"),
        (
            vec!["--data", &data, "--every-layer", "nonsense"],
            "nonsense",
        ),
        (vec!["--data", &data, "--frobnicate"], "--frobnicate"),
        // Sizes past the kernels' positions or the machine's memory: refused with the sizes,
        // not killed by the system as the pages are written.
        (
            vec!["--task", "recall", "--seq-len", "99999999999"],
            "--seq-len is 99999999999 positions, more than the 16777216 Zebra's kernels address",
        ),
        (
            vec![
                "--task",
                "recall",
                "--seq-len",
                "4000",
                "--batch",
                "1000000000",
            ],
            "a batch of 1000000000 x 4000 tokens needs 87.3 TiB of memory for its tokens alone",
        ),
        (
            vec!["--task", "recall", "--seq-len", "16000000", "--batch", "1"],
            "running 1 x 16000000 tokens needs",
        ),
    ];
    let zb = example("zebra_tiny.zb");
    for (flags, expected) in cases {
        let mut args = vec!["train", zb.as_str(), "--out", &out_dir];
        args.extend(flags.iter().copied());
        let out = zebra(&args);
        assert!(!out.ok, "{args:?} should fail");
        assert!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
        assert!(
            !Path::new(&out_dir).join("checkpoint.json").exists(),
            "{args:?} wrote a run"
        );
    }
    // The recall task's bytes need a vocabulary of 256: refused before anything is written.
    let small = root().join("tests/fixtures/golden/qwen3.zb");
    let small = small.to_string_lossy();
    let out = zebra(&["train", &small, "--task", "recall", "--out", &out_dir]);
    out.refused("has a vocabulary of 64, too small for the recall task");
    assert!(!Path::new(&out_dir).join("checkpoint.json").exists());

    let run = path(dir.path(), "trained");
    assert!(train_tiny(&data, &run, "2", &["--quiet"]).ok);
    let long = "x".repeat(50);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--prompt", &long, "--context", "20"],
            "more than the context of 20",
        ),
        (vec!["--prompt", ""], "the prompt is empty"),
        (vec!["--prompt", "a", "--top-p", "2"], "--top-p"),
        (vec!["--prompt", "a", "--temperature=-1"], "--temperature"),
        (
            vec!["--prompt", "a", "--temperature", "-1"],
            "--temperature must be 0 (greedy) or positive, found -1",
        ),
        (
            vec!["--prompt", "a", "--max-tokens", "100000000"],
            "a prompt of 1 token and --max-tokens 100000000 is 100000001 positions, more than \
             the 16777216",
        ),
    ];
    for (flags, expected) in cases {
        let mut args = vec!["generate", run.as_str()];
        args.extend(flags.iter().copied());
        let out = zebra(&args);
        assert!(!out.ok, "{args:?} should fail");
        assert!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
    }
    zebra(&["generate", &zb, "--prompt", "a"]).refused("is a model's source, not its weights");
    let nowhere = path(dir.path(), "nowhere");
    let out = zebra(&["generate", &nowhere, "--prompt", "a"]);
    out.refused("does not exist");
    let out = zebra(&["eval", &run]);
    out.refused("--task recall");
    let out = zebra(&["eval", &run, "--data", &data, "--context", "100000"]);
    out.refused("too few");
    let out = zebra(&["eval", &run, "--task", "recall", "--context", "20000000"]);
    out.refused("--context is 20000000 positions, more than the 16777216");
    for pairs in ["0", "100"] {
        let out = zebra(&["eval", &run, "--task", "recall", "--pairs", pairs]);
        out.refused(&format!("the recall task plants 1 to 26 pairs (an uppercase letter each as its key), found {pairs}"));
    }

    // The device options: refused with a reason where they do not go together, and, on a
    // machine without an NVIDIA driver, `--device cuda` says so before anything is written.
    let nothing = path(dir.path(), "nothing.npy");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["generate", &run, "--prompt", "a", "--dtype", "f16"],
            "--dtype `f16` on the CPU",
        ),
        (
            vec!["train", &zb, "--out", &out_dir, "--dtype", "bf16"],
            "training keeps them in f32",
        ),
        (
            vec!["eval", &run, "--task", "recall", "--device", "tpu"],
            "unknown --device `tpu`",
        ),
        (
            vec![
                "generate", &run, "--prompt", "a", "--device", "cuda", "--dtype", "f8",
            ],
            "unknown --dtype `f8`",
        ),
        (
            vec![
                "train", &zb, "--out", &out_dir, "--device", "cuda", "--target", "sm_70",
            ],
            "unknown --target `sm_70`",
        ),
        (
            vec![
                "run",
                &zb,
                "--weights",
                &nothing,
                "--tokens",
                &nothing,
                "--output",
                &nothing,
                "--target",
                "sm_90",
            ],
            "use it with --device cuda",
        ),
        (
            vec![
                "run",
                &zb,
                "--weights",
                &nothing,
                "--tokens",
                &nothing,
                "--output",
                &nothing,
                "--interpret",
                "--dtype",
                "bf16",
            ],
            "leave out --dtype bf16",
        ),
    ];
    let mut cases = cases;
    if !zebra_runtime::cuda::driver_present() {
        for args in [
            vec![
                "train", &zb, "--out", &out_dir, "--data", &data, "--device", "cuda",
            ],
            vec!["generate", &run, "--prompt", "a", "--device", "cuda"],
            vec![
                "eval", &run, "--task", "recall", "--device", "cuda", "--dtype", "bf16",
            ],
            vec![
                "run",
                &zb,
                "--weights",
                &nothing,
                "--tokens",
                &nothing,
                "--output",
                &nothing,
                "--device",
                "cuda",
            ],
        ] {
            cases.push((args, "no NVIDIA driver was found"));
        }
    }
    for (args, expected) in cases {
        let out = zebra(&args);
        assert!(!out.ok, "{args:?} should fail");
        assert!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
        assert!(
            !Path::new(&out_dir).join("checkpoint.json").exists(),
            "{args:?} wrote a run"
        );
    }
    // On the CPU, --dtype bf16 keeps the projections' weights in bf16.
    let out = zebra(&[
        "generate",
        &run,
        "--prompt",
        "a",
        "--max-tokens",
        "4",
        "--dtype",
        "bf16",
        "--stats",
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stderr.contains("bf16 weights"), "{}", out.stderr);
}

/// `zebra-run` (the runtime-only binary) runs the artifacts `zebra compile` writes: forward,
/// generation and training steps, with the results of the compiler's own commands.
#[test]
fn the_runtime_only_binary_runs_compiled_artifacts() {
    let dir = temp();
    let data = corpus(dir.path());
    let run = path(dir.path(), "run");
    assert!(train_tiny(&data, &run, "3", &["--quiet"]).ok);
    let weights = path(Path::new(&run), "checkpoints/step-000003/model.safetensors");
    let zb = example("zebra_tiny.zb");
    let artifact = |purpose: &str| {
        let out_dir = path(dir.path(), purpose);
        let out = zebra(&[
            "compile",
            &zb,
            "--emit",
            "artifact",
            "--for",
            purpose,
            "--max-seq-len",
            "128",
            "-o",
            &out_dir,
        ]);
        assert!(out.ok, "{}", out.stderr);
        out_dir
    };
    let run_tool = zebra_run;

    // Forward: the logits of `zebra run`.
    let forward = artifact("forward");
    let tokens = write_tokens(
        dir.path(),
        "t.npy",
        &[1, 9],
        vec![116, 104, 101, 32, 113, 117, 105, 99, 107],
    );
    let ours = path(dir.path(), "ours.npy");
    run_tool(&[
        "forward",
        &forward,
        "--weights",
        &weights,
        "--tokens",
        &tokens,
        "--output",
        &ours,
    ])
    .unwrap();
    let theirs = path(dir.path(), "theirs.npy");
    let out = zebra(&[
        "run",
        &zb,
        "--weights",
        &weights,
        "--tokens",
        &tokens,
        "--output",
        &theirs,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let a = npy::read_floats(Path::new(&ours)).unwrap();
    let b = npy::read_floats(Path::new(&theirs)).unwrap();
    assert_eq!(a.shape(), b.shape());
    let worst = a
        .iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst < 1e-5, "zebra-run and zebra run differ by {worst}");
    // Timed passes on random weights of the plan's shapes (benchmarks of large models), as
    // JSON; the weights must come from somewhere.
    let json = run_tool(&[
        "forward",
        &forward,
        "--random-weights",
        "3",
        "--tokens",
        &tokens,
        "--output",
        &ours,
        "--repeat",
        "2",
        "--json",
    ])
    .unwrap();
    let line: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(line["timed_passes"], 2, "{json}");
    assert_eq!(line["tokens_shape"], serde_json::json!([1, 9]), "{json}");
    assert!(line["time_ms"].as_f64().unwrap() > 0.0, "{json}");
    let random = npy::read_floats(Path::new(&ours)).unwrap();
    assert!(random.iter().all(|x| x.is_finite()) && random != a);
    let error =
        run_tool(&["forward", &forward, "--tokens", &tokens, "--output", &ours]).unwrap_err();
    assert!(error.contains("--weights"), "{error}");

    // Generation: what `zebra generate` writes.
    let generate = artifact("generate");
    let info = run_tool(&["info", &generate]).unwrap();
    assert!(
        info.contains("KV caches  all 32 32 32 all 32 32 32"),
        "{info}"
    );
    let text = run_tool(&[
        "generate",
        &generate,
        "--weights",
        &weights,
        "--prompt",
        "the quick",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ])
    .unwrap();
    let out = zebra(&[
        "generate",
        &weights,
        "--model-file",
        &zb,
        "--prompt",
        "the quick",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(text, out.stdout);
    // Random weights of the plan's shapes (benchmarks of decoding): the same for a seed.
    let random = |seed: &str| {
        run_tool(&[
            "generate",
            &generate,
            "--random-weights",
            seed,
            "--prompt",
            "the quick",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ])
        .unwrap()
    };
    let first = random("5");
    assert!(
        first.starts_with("the quick") && first.len() > "the quick".len(),
        "{first}"
    );
    assert_eq!(first, random("5"));
    let error = run_tool(&["generate", &generate, "--prompt", "the quick"]).unwrap_err();
    assert!(error.contains("--weights"), "{error}");
    // Teacher-forced decoding: each step's logits are the forward's at that position.
    let stepped = path(dir.path(), "stepped.npy");
    run_tool(&[
        "decode",
        &generate,
        "--weights",
        &weights,
        "--tokens",
        &tokens,
        "--prompt-len",
        "4",
        "--output",
        &stepped,
    ])
    .unwrap();
    let stepped = npy::read_floats(Path::new(&stepped)).unwrap();
    assert_eq!(stepped.shape(), [5, 256]);
    for (step, row) in stepped.outer_iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            let y = b[[0, 4 + step, v]];
            assert!(
                (x - y).abs() < 1e-4,
                "decode step {step}, token {v}: {x} vs {y}"
            );
        }
    }
    let error =
        run_tool(&["generate", &forward, "--weights", &weights, "--prompt", "a"]).unwrap_err();
    assert!(error.contains("--for generate"), "{error}");

    // Training steps: the loss falls, the weights are written.
    let train = artifact("train");
    let trained = path(dir.path(), "trained.safetensors");
    let log = run_tool(&[
        "train",
        &train,
        "--weights",
        &weights,
        "--data",
        &data,
        "--steps",
        "6",
        "--seq-len",
        "32",
        "--batch",
        "4",
        "--lr",
        "3e-3",
        "--out",
        &trained,
    ])
    .unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(losses[5] < losses[0], "{losses:?}");
    assert!(Weights::load(Path::new(&trained)).is_ok());
    // `diff` compares weight files tensor by tensor and names the one that differs most.
    let same = run_tool(&["diff", &trained, &trained]).unwrap();
    assert!(same.contains("\"relative\":0.0"), "{same}");
    let report = run_tool(&["diff", &trained, &weights, "--tolerance", "10"]).unwrap();
    assert!(report.contains("\"tensor\":\"model."), "{report}");
    let error = run_tool(&["diff", &trained, &weights, "--tolerance", "1e-9"]).unwrap_err();
    assert!(error.contains("above 1e-9"), "{error}");
    let error = run_tool(&[
        "train",
        &train,
        "--weights",
        &weights,
        "--data",
        &data,
        "--seq-len",
        "1000",
        "--out",
        &trained,
    ])
    .unwrap_err();
    assert!(error.contains("above the 128"), "{error}");
    // Training steps of a model too large to carry weights for: random ones; without
    // either, the weights are asked for.
    let log = run_tool(&[
        "train",
        &train,
        "--random-weights",
        "1",
        "--steps",
        "1",
        "--seq-len",
        "32",
        "--batch",
        "1",
        "--out",
        &trained,
    ])
    .unwrap();
    let step: serde_json::Value = serde_json::from_str(log.trim()).unwrap();
    assert!(step["loss"].as_f64().unwrap().is_finite(), "{log}");
    let error = run_tool(&["train", &train, "--steps", "1", "--out", &trained]).unwrap_err();
    assert!(error.contains("--weights"), "{error}");
}

#[test]
fn compile_emits_ptx_for_nvidia_targets() {
    let zb = example("zebra_tiny.zb");
    let out = zebra(&["compile", &zb, "--target", "sm_90", "--emit", "ptx"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains(".target sm_90"),
        "{}",
        &out.stdout[..200.min(out.stdout.len())]
    );
    assert!(out.stdout.contains(".visible .entry zebra_attention_"));
    let out = zebra(&["compile", &zb, "--target", "sm_80", "--emit", "llvm"]);
    assert!(
        out.ok && out.stdout.contains("nvptx64-nvidia-cuda"),
        "{}",
        out.stderr
    );
    let out = zebra(&["compile", &zb, "--target", "sm_90", "--emit", "asm"]);
    out.refused("--emit ptx");
    let out = zebra(&["compile", &zb, "--emit", "ptx"]);
    out.refused("--target sm_80");
    // A bf16 training step: `zebra-run info` says which kernels run on tensor cores, the
    // attention's backward among them.
    let dir = tempfile::tempdir().unwrap();
    let artifact = path(dir.path(), "train");
    let out = zebra(&[
        "compile", &zb, "--target", "sm_90", "--dtype", "bf16", "--for", "train", "--emit",
        "artifact", "-o", &artifact,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let info = zebra_run(&["info", &artifact]).unwrap();
    let line = info
        .lines()
        .find(|l| l.trim_start().starts_with("tensor"))
        .unwrap_or_else(|| panic!("{info}"));
    for kind in ["attention_dq", "attention_dkv", "linear", "gemm"] {
        assert!(line.contains(kind), "{line}");
    }
    assert!(line.contains("(bf16)"), "{line}");
    assert!(info.contains("optimizer  AdamW over 74 weights"), "{info}");
    // An f32 plan for generation: its decode steps' attentions run the GPU-shaped decode
    // kernel, nothing on tensor cores.
    let artifact = path(dir.path(), "generate");
    let out = zebra(&[
        "compile", &zb, "--target", "sm_90", "--for", "generate", "--emit", "artifact", "-o",
        &artifact,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let info = zebra_run(&["info", &artifact]).unwrap();
    assert!(!info.contains("tensor cores"), "{info}");
    let shaped: Vec<&str> = info
        .lines()
        .filter(|l| l.trim_start().starts_with("gpu"))
        .collect();
    assert_eq!(shaped.len(), 1, "{info}");
    assert!(
        shaped[0].contains("GPU-shaped (f32): attention_decode"),
        "{info}"
    );
    // It lists the decode plan's KV caches: G = 4, the global layer first, a window of 32.
    assert!(
        out.stdout.contains("layer 0   every key\n")
            && out.stdout.contains("layer 1   a ring of 32\n")
            && out.stdout.contains("layer 7   a ring of 32\n"),
        "{}",
        out.stdout
    );
    // KV heads that keep different keys: a cache per kind, with the KV heads it holds.
    let apart = root().join("tests/fixtures/ok/kv_heads_apart.zb");
    let out = zebra(&[
        "compile",
        &apart.to_string_lossy(),
        "--for",
        "generate",
        "--emit",
        "artifact",
        "-o",
        &path(dir.path(), "apart"),
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("layer 1   every key (KV heads 0, 2)\n")
            && out
                .stdout
                .contains("layer 1   4 sinks + a ring of 8 (KV heads 1)\n"),
        "{}",
        out.stdout
    );
}

/// `zebra compile --for attention` writes tensor-core kernels (PTX, MLIR, an artifact that
/// `zebra-run attention` reads), and refuses what does not make sense with a reason.
#[test]
fn compile_for_attention_builds_tensor_core_kernels() {
    let zb = example("zebra_tiny.zb");
    let out = zebra(&[
        "compile",
        &zb,
        "--for",
        "attention",
        "--target",
        "sm_80",
        "--emit",
        "ptx",
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")
    );
    let out = zebra(&[
        "compile",
        &zb,
        "--for",
        "attention",
        "--target",
        "sm_90",
        "--dtype",
        "f16",
        "--emit",
        "mlir",
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")
    );

    let dir = temp();
    let artifact = path(dir.path(), "attention");
    let out = zebra(&[
        "compile",
        &zb,
        "--for",
        "attention",
        "--target",
        "sm_90",
        "--block-k",
        "32",
        "--emit",
        "artifact",
        "-o",
        &artifact,
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("2 tensor-core attention kernels"),
        "{}",
        out.stdout
    );
    let run = zebra_run;
    if !zebra_runtime::cuda::driver_present() {
        let error = run(&["attention", &artifact, "--seq-len", "100"]).unwrap_err();
        assert!(error.contains("no NVIDIA driver was found"), "{error}");
    }
    // A model's artifact with its projections on tensor cores names their entries.
    let bf16 = path(dir.path(), "bf16");
    let out = zebra(&[
        "compile", &zb, "--target", "sm_80", "--dtype", "bf16", "--emit", "artifact", "-o", &bf16,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let plan = zebra_runtime::Artifact::load(std::path::Path::new(&bf16))
        .unwrap()
        .plan;
    assert!(
        plan.kernels
            .iter()
            .any(|k| k.tensor_cores.as_ref().is_some_and(|t| t.dtype == "bf16")),
        "{:?}",
        plan.kernels
    );
    // Its attentions on wgmma: PTX for sm_90a, which the plan says.
    let wgmma = path(dir.path(), "wgmma");
    let out = zebra(&[
        "compile", &zb, "--target", "sm_90", "--dtype", "bf16", "--mma", "wgmma", "--emit",
        "artifact", "-o", &wgmma,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let plan = zebra_runtime::Artifact::load(std::path::Path::new(&wgmma))
        .unwrap()
        .plan;
    assert!(plan.target.ends_with("sm_90a"), "{}", plan.target);
    let ptx = std::fs::read_to_string(std::path::Path::new(&wgmma).join("kernels.ptx")).unwrap();
    assert!(ptx.contains("wgmma.mma_async"));
    // A model artifact is not an attention artifact.
    let model = path(dir.path(), "model");
    let out = zebra(&[
        "compile", &zb, "--target", "sm_90", "--emit", "artifact", "-o", &model,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let error = run(&["attention", &model]).unwrap_err();
    assert!(error.contains("not an attention artifact"), "{error}");

    for (args, says) in [
        ("--for attention --emit ptx", "--target sm_80 or sm_90"),
        (
            "--for attention --target sm_90 --emit opt",
            "--emit mlir, llvm, ptx or artifact",
        ),
        (
            "--stages 2 --target sm_90 --emit ptx",
            "use them with --for attention",
        ),
        (
            "--for attention --target sm_90 --emit ptx --stages 3",
            "3 is not in 1..=2",
        ),
        (
            "--for attention --target sm_90 --emit ptx --block-k 48",
            "invalid value '48'",
        ),
        (
            "--for attention --target sm_80 --emit ptx --mma wgmma",
            "wgmma attention kernels run on sm_90, not sm_80",
        ),
        (
            "--mma wgmma --target sm_90 --emit ptx",
            "use it with --dtype bf16 or f16",
        ),
        (
            "--mma wgmma --dtype bf16 --target sm_80 --emit ptx",
            "use it with --target sm_90",
        ),
        (
            "--block-k 32 --dtype bf16 --target sm_90 --emit ptx",
            "use them with --for attention",
        ),
        (
            "--for attention --target sm_90 --emit ptx --mma wgmma --stages 2",
            "wgmma kernels take one K/V stage, not 2",
        ),
        (
            "--for attention --target sm_90 --emit ptx --block-q 96",
            "invalid value '96'",
        ),
        (
            "--for attention --target sm_90 --dtype f32 --emit ptx",
            "bf16 or f16, not f32",
        ),
        (
            "--dtype f16 --emit artifact -o /nonexistent",
            "use it with --target sm_80 or sm_90",
        ),
    ] {
        let mut all = vec!["compile", zb.as_str()];
        all.extend(args.split_whitespace());
        let out = zebra(&all);
        assert!(
            !out.ok && out.stderr.contains(says),
            "{args}: {}",
            out.stderr
        );
    }
}

/// `zebra emulate` runs a model's tensor-core attention kernels in the warp emulator and
/// checks them (one JSON line each), and refuses a target or type it cannot emulate.
#[test]
fn emulate_checks_tensor_core_attention_without_a_gpu() {
    let zb = root()
        .join("examples/attention/softcap.zb")
        .to_string_lossy()
        .into_owned();
    // More rows asked for than the output has: every row is checked, and said so.
    let out = zebra(&[
        "emulate",
        &zb,
        "--seq-len",
        "90",
        "--batch",
        "1",
        "--rows",
        "4294967297",
    ]);
    assert!(out.ok, "{}", out.stderr);
    let lines = json_lines(&out.stdout);
    assert!(!lines.is_empty());
    for line in &lines {
        assert_eq!(line["ok"], true, "{line}");
        assert!(line["worst_error"].as_f64().unwrap() > 0.0, "{line}");
        assert_eq!(line["seq_len"], 90);
        assert_eq!(
            line["checked_rows"],
            line["heads"].as_u64().unwrap() * 90,
            "{line}"
        );
    }
    assert!(lines.iter().any(|l| l["score"].is_string()), "soft-capping");
    for (args, says) in [
        (vec!["--target", "cpu"], "sm_80 or sm_90"),
        (vec!["--dtype", "f32"], "not f32"),
        (vec!["--seq-len", "0"], "at least 1"),
        (
            vec!["--batch", "4294967297"],
            "random inputs of 4294967297 x 200 tokens",
        ),
    ] {
        let mut all = vec!["emulate", zb.as_str()];
        all.extend(args);
        let out = zebra(&all);
        assert!(
            !out.ok && out.stderr.contains(says),
            "{says}: {}",
            out.stderr
        );
    }
}

/// `zebra tune` measures every distinct attention of a model at the candidate tiles (the
/// default's always among them), checks each against the default's output and records the
/// fastest; a second tuning replaces the entry instead of adding one.
#[test]
fn tune_records_the_fastest_checked_tiles_of_each_attention() {
    let dir = temp();
    let db = dir.path().join("nested/tuning.json");
    let db_text = db.to_str().unwrap();
    let tune = |json: bool| {
        let mut args = vec![
            "tune",
            "examples/zebra_tiny.zb",
            "--seq-len",
            "200",
            "--repeats",
            "1",
            "--block-q",
            "32",
            "--block-k",
            "32,128",
            "--db",
            db_text,
        ];
        if json {
            args.push("--json");
        }
        zebra(&args)
    };
    let out = tune(false);
    assert!(out.ok, "{}", out.stderr);
    for line in [
        "@global: mask `k <= q`",
        "@local: mask `k <= q && q - k < 32`",
    ] {
        assert!(out.stdout.contains(line), "{}", out.stdout);
    }
    // The global attention's default tiles are 64 x 64, the local one's (a window of 32)
    // 32 x 32.
    let rows = |tiles: &str| {
        let row = format!("{tiles} ");
        out.stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(&row))
            .count()
    };
    assert_eq!(
        (rows("64x64"), rows("32x32"), rows("32x128")),
        (1, 2, 2),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("recorded 2 attentions in"),
        "{}",
        out.stdout
    );
    let read = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&db).unwrap()).unwrap()
    };
    let entries = read()["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 2, "{entries:?}");
    for entry in &entries {
        let tiles = (
            entry["block_q"].as_u64().unwrap(),
            entry["block_k"].as_u64().unwrap(),
        );
        assert!([(64, 64), (32, 32), (32, 128)].contains(&tiles), "{entry}");
        assert_eq!(entry["target"], "cpu");
        assert_eq!(entry["seq_len"], 200);
        let (time, default) = (
            entry["time_ms"].as_f64().unwrap(),
            entry["default_time_ms"].as_f64().unwrap(),
        );
        assert!(time > 0.0 && time <= default, "{entry}");
    }
    // Again, as JSON lines: one per candidate, the entries replaced.
    let out = tune(true);
    assert!(out.ok, "{}", out.stderr);
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 5, "{}", out.stdout);
    assert!(
        lines
            .iter()
            .all(|l| l["ok"] == true && l["relative_error"].as_f64().unwrap() < 1e-4)
    );
    assert_eq!(read()["entries"].as_array().unwrap().len(), 2);

    // With the backward pass (GQA, and a side input's tile ranges): checked on `dq`, `dk`
    // and `dv` too, and so recorded.
    for file in [
        "examples/attention/sliding_window.zb",
        "examples/attention/document.zb",
    ] {
        let out = zebra(&[
            "tune",
            file,
            "--seq-len",
            "100",
            "--repeats",
            "1",
            "--block-q",
            "32",
            "--block-k",
            "64",
            "--backward",
            "--json",
            "--db",
            db_text,
        ]);
        assert!(out.ok, "{file}: {}", out.stderr);
        let lines = json_lines(&out.stdout);
        assert_eq!(lines.len(), 2, "{}", out.stdout);
        assert!(
            lines
                .iter()
                .all(|l| l["ok"] == true && l["backward"] == true)
        );
    }
    let entries = read()["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 4);
    assert!(entries[2..].iter().all(|e| e["backward"] == true));
    assert!(entries[..2].iter().all(|e| e.get("backward").is_none()));
}

/// Compiling for the CPU reads the tuning database's entries for this machine: the attention
/// tuned gets its tiles (and a note says so), the others keep the default, entries of
/// another machine or target are ignored; a database it cannot read is a warning, never a
/// failure, and `zebra tune` refuses to overwrite it.
#[test]
fn compiling_uses_the_tuned_tiles_of_this_machine() {
    let dir = temp();
    let db = dir.path().join("tuning.json");
    let machine = {
        // What `zebra tune` recorded here is the machine's name.
        let out = zebra(&[
            "tune",
            "examples/attention/sliding_window.zb",
            "--seq-len",
            "64",
            "--repeats",
            "1",
            "--block-q",
            "64",
            "--block-k",
            "64",
            "--db",
            db.to_str().unwrap(),
        ]);
        assert!(out.ok, "{}", out.stderr);
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&db).unwrap()).unwrap();
        value["entries"][0]["machine"].as_str().unwrap().to_string()
    };
    let entry = |machine: &str, target: &str, mask: &str, tiles: (u64, u64)| {
        serde_json::json!({
            "target": target, "machine": machine, "mask": mask, "heads": 4, "kv_heads": 2,
            "head_dim": 16, "block_q": tiles.0, "block_k": tiles.1, "seq_len": 4096,
            "threads": 2, "time_ms": 1.0, "default_time_ms": 1.5,
        })
    };
    let file = serde_json::json!({"version": 1, "entries": [
        entry(&machine, "cpu", "k <= q && q - k < 32", (16, 128)),
        entry("riscv64", "cpu", "k <= q", (8, 8)),
        entry(&machine, "sm_90", "k <= q", (8, 8)),
    ]});
    // Compiles zebra_tiny.zb with `text` as the database.
    let compile_with = |text: &str| {
        std::fs::write(&db, text).unwrap();
        zebra_with(
            ("ZEBRA_TUNING_DB", &db),
            &["compile", "examples/zebra_tiny.zb", "--emit", "opt"],
        )
    };
    let out = compile_with(&file.to_string());
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("mask = \"k <= q && q - k < 32\", scale = 0.25, heads = 4, kv_heads = 2, head_dim = 16, block_q = 16, block_k = 128"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("mask = \"k <= q\", scale = 0.25, heads = 4, kv_heads = 2, head_dim = 16, block_q = 64, block_k = 64"),
        "{}",
        out.stdout
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("note: @local: tiles 16x128 from the tuning database")
            && out.stderr.contains("1.50x the default tiles' speed"),
        "{}",
        out.stderr
    );
    // `zebra bench` times its attentions with the tiles recorded for them, and says so.
    let bench = |db: &Path| {
        let out = zebra_with(
            ("ZEBRA_TUNING_DB", db),
            &[
                "bench",
                "attention-local",
                "--seq-len",
                "256",
                "--window",
                "32",
                "--heads",
                "4",
                "--head-dim",
                "16",
                "--repeats",
                "1",
                "--no-baseline",
                "--json",
            ],
        );
        assert!(out.ok, "{}", out.stderr);
        let record: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
        (
            record["block_q"].as_u64().unwrap(),
            record["block_k"].as_u64().unwrap(),
            record["tiles"].as_str().unwrap().to_string(),
        )
    };
    let bench_db = dir.path().join("bench.json");
    std::fs::write(
        &bench_db,
        serde_json::json!({"version": 1, "entries": [{
            "target": "cpu", "machine": machine, "mask": "k <= q && q - k < 32", "heads": 4,
            "kv_heads": 4, "head_dim": 16, "block_q": 16, "block_k": 64, "seq_len": 256,
            "threads": 2, "time_ms": 1.0, "default_time_ms": 1.0,
        }]})
        .to_string(),
    )
    .unwrap();
    assert_eq!(bench(&bench_db), (16, 64, "tuning database".into()));
    assert_eq!(bench(Path::new("")), (32, 32, "default".into()));
    // Compiling for a GPU reads none of the CPU's entries (and this sm_90 one, without a
    // product instruction, only for tensor-core kernels: see the next test).
    let out = zebra_with(
        ("ZEBRA_TUNING_DB", &db),
        &[
            "compile",
            "examples/zebra_tiny.zb",
            "--emit",
            "opt",
            "--target",
            "sm_90",
        ],
    );
    assert!(out.ok && out.stderr.is_empty(), "{}", out.stderr);
    assert!(!out.stdout.contains("block_q = 16") && !out.stdout.contains("block_q = 8,"));
    // The tuned graph runs and gives the default tiles' logits.
    let weights = dir.path().join("w.safetensors");
    assert!(
        zebra(&[
            "init",
            "examples/zebra_tiny.zb",
            "-o",
            weights.to_str().unwrap()
        ])
        .ok
    );
    let tokens = dir.path().join("tokens.npy");
    npy::write(
        &tokens,
        &ArrayD::from_shape_fn(IxDyn(&[1, 150]), |i| (i[1] * 7 % 256) as i64),
    )
    .unwrap();
    let logits = |env: &Path, name: &str| {
        let out_path = dir.path().join(name);
        let out = zebra_with(
            ("ZEBRA_TUNING_DB", env),
            &[
                "run",
                "examples/zebra_tiny.zb",
                "--weights",
                weights.to_str().unwrap(),
                "--tokens",
                tokens.to_str().unwrap(),
                "--output",
                out_path.to_str().unwrap(),
            ],
        );
        assert!(out.ok, "{}", out.stderr);
        npy::read_floats(&out_path).unwrap()
    };
    let tuned = logits(&db, "tuned.npy");
    let default = logits(Path::new(""), "default.npy");
    let worst = tuned
        .iter()
        .zip(default.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    assert!(worst < 1e-4, "tuned tiles change the logits by {worst}");

    // A database that is not valid: compiling warns and uses the default tiles; tuning
    // refuses and leaves the file as it was.
    let out = compile_with("{\"version\": 1, \"entries\": [{\"target\": 3}]}");
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("block_q = 64, block_k = 64"));
    assert!(
        out.stderr.contains("warning: the tuning database")
            && out.stderr.contains("is not valid")
            && out.stderr.contains("compiling with the default tile sizes"),
        "{}",
        out.stderr
    );
    let out = zebra_with(
        ("ZEBRA_TUNING_DB", &db),
        &["tune", "examples/zebra_tiny.zb", "--seq-len", "64"],
    );
    assert!(!out.ok);
    assert!(
        out.stderr.contains("move it away or delete it"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&db).unwrap(),
        "{\"version\": 1, \"entries\": [{\"target\": 3}]}"
    );
    // Tiles no kernel can take: the same.
    let bad = serde_json::json!({"version": 1, "entries": [
        entry(&machine, "cpu", "k <= q && q - k < 32", (0, 128)),
    ]});
    let out = compile_with(&bad.to_string());
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("entry 0, mask `k <= q && q - k < 32`: tiles 0x128 are not from 1 to 1024"),
        "{}",
        out.stderr
    );
    // One of another format version: the same.
    let out = compile_with("{\"version\": 2, \"entries\": []}");
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("has version 2; this zebra reads version 1"),
        "{}",
        out.stderr
    );
    // A graph in the IR's text form is tuned as a model is; one whose attention the
    // optimizer could not fuse has nothing to tune.
    let zir = dir.path().join("zir.json");
    let zir_db = zir.to_str().unwrap();
    let tune = |file: &str| {
        zebra(&[
            "tune",
            file,
            "--seq-len",
            "64",
            "--repeats",
            "1",
            "--block-q",
            "32",
            "--block-k",
            "32",
            "--db",
            zir_db,
        ])
    };
    let out = tune("tests/fixtures/zir/additive_mask.zir");
    assert!(
        out.ok && out.stdout.contains("recorded 1 attention"),
        "{}",
        out.stderr
    );
    let out = tune("tests/fixtures/zir/float_mask.zir");
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("float_mask.zir has no fused attention to tune"),
        "{}",
        out.stderr
    );
    // Bad candidates.
    let out = zebra(&["tune", "examples/zebra_tiny.zb", "--block-q", "32,12"]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("`12` is not a tile size: give multiples of 8 up to 1024"),
        "{}",
        out.stderr
    );
}

/// A GPU's tuning run: `zebra tune --target sm_90 -o DIR` compiles every candidate of each
/// attention here as an attention artifact of its own; `zebra-run tune DIR` (on the GPU; here
/// it says there is none) times them into `DIR/results.json`; `zebra tune --record DIR`
/// records the fastest that passed its check where it beats the defaults; and compiling for
/// sm_90 (the attentions alone, or a model's bf16 plan) then takes each attention's recorded
/// settings, unless the command line sets them, for the GPU this machine has, `$ZEBRA_TUNING_GPU`
/// or the only GPU the database knows.
#[test]
fn gpu_tuning_runs_are_compiled_here_timed_there_and_recorded() {
    let dir = temp();
    let run = dir.path().join("run");
    let run_str = run.to_str().unwrap();
    let db = dir.path().join("tuning.json");
    let tune = [
        "tune",
        "examples/zebra_tiny.zb",
        "--target",
        "sm_90",
        "--block-q",
        "64",
        "--block-k",
        "32,64",
        "--mma",
        "sync,wgmma",
        "-o",
        run_str,
    ];
    let out = zebra(&tune);
    assert!(out.ok, "{}", out.stderr);
    let manifest = zebra_runtime::tuning::TuneManifest::load(&run).unwrap();
    assert_eq!(
        (manifest.target.as_str(), manifest.dtype.as_str()),
        ("sm_90", "bf16")
    );
    // What `zebra-run tune` times at unless told otherwise: `zebra tune`'s defaults.
    assert_eq!((manifest.seq_len, manifest.repeats), (4096, 20));
    let names: Vec<&str> = manifest
        .attentions
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(names, ["global", "local"]);
    for (i, _) in manifest.attentions.iter().enumerate() {
        let candidates: Vec<(&str, usize, usize, bool)> = manifest
            .candidates
            .iter()
            .filter(|c| c.attention == i)
            .map(|c| (c.mma.as_str(), c.block_q, c.block_k, c.default))
            .collect();
        assert_eq!(
            candidates,
            [
                ("sync", 128, 64, true),
                ("sync", 64, 32, false),
                ("sync", 64, 64, false),
                ("wgmma", 64, 32, false),
                ("wgmma", 64, 64, false),
            ]
        );
    }
    // Each candidate is an attention artifact that `zebra-run attention` runs.
    for candidate in &manifest.candidates {
        let (artifact, ptx) =
            zebra_runtime::artifact::AttentionArtifact::load(&run.join(&candidate.dir)).unwrap();
        let kernel = &artifact.kernels[0];
        assert_eq!(artifact.kernels.len(), 1);
        assert_eq!(
            (kernel.name.as_str(), kernel.block_q, kernel.block_k),
            (
                names[candidate.attention],
                candidate.block_q,
                candidate.block_k
            )
        );
        let wgmma = candidate.mma == "wgmma";
        assert_eq!(artifact.target == "sm_90a", wgmma, "{}", candidate.dir);
        assert_eq!(ptx.contains("wgmma.mma_async"), wgmma, "{}", candidate.dir);
    }
    let driver = zebra_runtime::cuda::driver_present();
    if !driver {
        assert!(
            out.stdout.contains("no GPU here") && out.stdout.contains("zebra-run tune"),
            "{}",
            out.stdout
        );
        let error = zebra_run(&["tune", run_str]).unwrap_err();
        assert!(error.contains("no NVIDIA driver"), "{error}");
    }
    // A run never writes over files.
    let again = zebra(&tune);
    again.refused("is not empty");
    // Recording before the GPU ran it says what to do.
    let db_str = db.to_str().unwrap();
    let out = zebra(&["tune", "--record", run_str, "--db", db_str]);
    if !driver {
        assert!(
            !out.ok
                && out
                    .stderr
                    .contains("run `zebra-run tune DIR` on the GPU first"),
            "{}",
            out.stderr
        );
    }

    // What a GPU measured (as `zebra-run tune` writes it): the local attention's fastest
    // candidate failed its check, the next is twice as fast as the defaults; no global
    // candidate is 3% faster than the defaults.
    let h100 = "NVIDIA H100 80GB HBM3";
    let time = |dir: &str| match dir {
        "a1-sync-64x32" => 0.3,
        "a1-wgmma-64x32" => 0.5,
        "a0-sync-64x64" => 0.99,
        _ => 1.0,
    };
    let results = zebra_runtime::tuning::TuneResults {
        format: zebra_runtime::tuning::TUNE_FORMAT,
        device: h100.into(),
        seq_len: 4096,
        batch: 1,
        runs: manifest
            .candidates
            .iter()
            .map(|c| zebra_runtime::tuning::TuneRun {
                dir: c.dir.clone(),
                time_ms: Some(time(&c.dir)),
                worst_error: Some(if c.dir == "a1-sync-64x32" { 3.0 } else { 0.2 }),
                ok: c.dir != "a1-sync-64x32",
                error: None,
            })
            .collect(),
    };
    results.save(&run).unwrap();
    let out = zebra(&["tune", "--record", run_str, "--db", db_str]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("@global: the defaults (sync 128x64, 1.000 ms) stay")
            && out
                .stdout
                .contains("@local: wgmma 64x32 (0.500 ms, 2.00x the defaults' speed) recorded")
            && out
                .stdout
                .contains("recorded 1 attention for NVIDIA H100 80GB HBM3 (sm_90)"),
        "{}",
        out.stdout
    );
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&db).unwrap()).unwrap();
    let entries = value["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{value}");
    let entry = &entries[0];
    assert_eq!(
        (
            entry["target"].as_str(),
            entry["machine"].as_str(),
            entry["mask"].as_str(),
            entry["mma"].as_str(),
            entry["block_q"].as_u64(),
            entry["block_k"].as_u64(),
            entry["default_time_ms"].as_f64(),
        ),
        (
            Some("sm_90"),
            Some(h100),
            Some("k <= q && q - k < 32"),
            Some("wgmma"),
            Some(64),
            Some(32),
            Some(1.0)
        )
    );

    // A run cut short on the GPU (results of the first three candidates, all the global
    // attention's) records what it can and says so.
    let mut partial = results.clone();
    partial.runs.truncate(3);
    partial.save(&run).unwrap();
    let partial_db = dir.path().join("partial.json");
    let out = zebra(&[
        "tune",
        "--record",
        run_str,
        "--db",
        partial_db.to_str().unwrap(),
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains(
            "note: results for 3 of the 10 candidates (the run on the GPU was cut short)"
        ) && out
            .stdout
            .contains("@local: no candidate ran and passed its check")
            && out.stdout.contains("recorded 0 attentions"),
        "{}",
        out.stdout
    );
    results.save(&run).unwrap();

    // Compiling the attentions for sm_90 takes the local attention's recorded settings.
    let no_gpu = std::ffi::OsStr::new("");
    let compile = |db: &Path, gpu: &std::ffi::OsStr, extra: &[&str], name: &str| {
        let artifact = dir.path().join(name);
        let mut args = vec![
            "compile",
            "examples/zebra_tiny.zb",
            "--target",
            "sm_90",
            "--emit",
            "artifact",
            "-o",
            artifact.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = zebra_with_all(
            &[
                ("ZEBRA_TUNING_DB", db.as_os_str()),
                ("ZEBRA_TUNING_GPU", gpu),
            ],
            &args,
        );
        assert!(out.ok, "{}", out.stderr);
        (artifact, out.stderr)
    };
    let tiles = |artifact: &Path| -> Vec<(String, usize, usize)> {
        let (artifact, _) = zebra_runtime::artifact::AttentionArtifact::load(artifact).unwrap();
        artifact
            .kernels
            .iter()
            .map(|k| (k.name.clone(), k.block_q, k.block_k))
            .collect()
    };
    let tuned = vec![
        ("global".to_string(), 128, 64),
        ("local".to_string(), 64, 32),
    ];
    let defaults = vec![
        ("global".to_string(), 128, 64),
        ("local".to_string(), 128, 64),
    ];
    let (artifact, stderr) = compile(&db, no_gpu, &["--for", "attention"], "attention");
    if !driver {
        assert_eq!(tiles(&artifact), tuned);
        assert!(
            stderr.starts_with("note: @local: wgmma 64x32 from the tuning database")
                && stderr.contains("(NVIDIA H100 80GB HBM3, at T = 4096: 0.500 ms, 2.00x"),
            "{stderr}"
        );
        // A model's bf16 plan too: its local attention's kernel is on wgmma (sm_90a).
        let (plan, stderr) = compile(&db, no_gpu, &["--dtype", "bf16"], "plan");
        assert!(stderr.contains("note: @local: wgmma 64x32"), "{stderr}");
        let plan = std::fs::read_to_string(plan.join("plan.json")).unwrap();
        assert!(plan.contains("sm_90a"));
    }
    // The command line's settings win.
    let (artifact, stderr) = compile(
        &db,
        no_gpu,
        &["--for", "attention", "--mma", "sync"],
        "flags",
    );
    assert_eq!(tiles(&artifact), defaults);
    assert!(stderr.is_empty(), "{stderr}");

    // Entries of two GPUs: the one named, else (with no GPU here) none, with a warning.
    let mut h200 = entry.clone();
    h200["machine"] = "NVIDIA H200".into();
    h200["block_k"] = 64.into();
    let two = dir.path().join("two.json");
    std::fs::write(
        &two,
        serde_json::json!({"version": 1, "entries": [entry, h200]}).to_string(),
    )
    .unwrap();
    let (artifact, stderr) = compile(
        &two,
        std::ffi::OsStr::new(h100),
        &["--for", "attention"],
        "h100",
    );
    assert_eq!(tiles(&artifact), tuned, "{stderr}");
    let (artifact, _) = compile(
        &two,
        std::ffi::OsStr::new("NVIDIA H200"),
        &["--for", "attention"],
        "h200",
    );
    assert_eq!(
        tiles(&artifact),
        vec![
            ("global".to_string(), 128, 64),
            ("local".to_string(), 64, 64)
        ]
    );
    if !driver {
        let (artifact, stderr) = compile(&two, no_gpu, &["--for", "attention"], "several");
        assert_eq!(tiles(&artifact), defaults);
        assert!(
            stderr.contains("settings for sm_90 on several GPUs (NVIDIA H100 80GB HBM3, NVIDIA H200): set ZEBRA_TUNING_GPU"),
            "{stderr}"
        );
    }
    // Settings the kernel does not take (a database edited by hand): a warning, the defaults.
    let mut odd = entry.clone();
    odd["block_q"] = 96.into();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        serde_json::json!({"version": 1, "entries": [odd]}).to_string(),
    )
    .unwrap();
    let (artifact, stderr) = compile(
        &bad,
        std::ffi::OsStr::new(h100),
        &["--for", "attention"],
        "bad",
    );
    assert_eq!(tiles(&artifact), defaults);
    assert!(
        stderr.contains("has settings for @local that its kernel does not take (wgmma 96x32)"),
        "{stderr}"
    );

    // A model whose attentions no tensor-core kernel takes (head dim 8): refused, and the
    // directory is not created.
    let narrow = dir.path().join("narrow.zb");
    let text = std::fs::read_to_string(root().join("examples/zebra_tiny.zb"))
        .unwrap()
        .replace("dim        = 64", "dim        = 32");
    std::fs::write(&narrow, text).unwrap();
    let never = dir.path().join("never");
    let out = zebra(&[
        "tune",
        narrow.to_str().unwrap(),
        "--target",
        "sm_80",
        "-o",
        never.to_str().unwrap(),
    ]);
    assert!(
        !out.ok
            && out
                .stdout
                .contains("@global: no tensor-core kernel takes head dim 8")
            && out
                .stderr
                .contains("has no attention that tensor-core kernels take"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert!(!never.exists());

    // Flags of the other kind of tuning are refused, and those of preparing a run when
    // recording one.
    for (args, error) in [
        (
            &["tune", "--record", run_str, "--seq-len", "64"][..],
            "cannot be used with",
        ),
        (
            &["tune", "examples/zebra_tiny.zb", "--mma", "wgmma"][..],
            "--mma is a setting of a GPU's tuning run",
        ),
        (
            &["tune", "examples/zebra_tiny.zb", "--target", "sm_90"][..],
            "name a new one with -o DIR",
        ),
        (
            &[
                "tune",
                "examples/zebra_tiny.zb",
                "--target",
                "sm_80",
                "--mma",
                "wgmma",
                "-o",
                "x",
            ][..],
            "--mma wgmma is sm_90's warpgroup instruction",
        ),
        (
            &[
                "tune",
                "examples/zebra_tiny.zb",
                "--target",
                "sm_90",
                "--block-q",
                "32",
                "-o",
                "x",
            ][..],
            "take 64 or 128 queries per tile",
        ),
    ] {
        let out = zebra(args);
        assert!(
            !out.ok && out.stderr.contains(error),
            "{args:?}: {}",
            out.stderr
        );
    }
}
