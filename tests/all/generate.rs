//! Generation: decoding with the KV caches the compiler derives from each mask gives the
//! logits of a full forward pass over the whole prefix, for every program whose attention
//! can be decoded, far past the window (rings wrap several times) and with sinks; masks a
//! cache cannot serve are refused with a reason.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn, s};
use zebra_codegen::artifact::{BuildOptions, Cache, build};
use zebra_codegen::plan::PlanMode;
use zebra_ir::Graph;
use zebra_passes::{Options, optimize};
use zebra_runtime::{CpuModel, Tensor};

use crate::common::{assert_close, cache_dir, check_ok, lower, programs, relative, shrink};

const TOLERANCE: f64 = 1e-4;

fn build_mode(graph: &Graph, dir: &Path, mode: PlanMode) -> Result<(), String> {
    let options = BuildOptions {
        mode,
        max_seq_len: 512,
        cache: Some(Cache { dir: cache_dir() }),
    };
    build(graph, dir, &options)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn tokens(batch: usize, seq: usize, vocab: usize, seed: u64) -> ArrayD<i64> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    ArrayD::from_shape_fn(IxDyn(&[batch, seq]), |_| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % vocab as u64) as i64
    })
}

fn run(model: &mut CpuModel, tokens: &ArrayD<i64>) -> BTreeMap<String, ArrayD<f32>> {
    let inputs = BTreeMap::from([("tokens".to_string(), Tensor::I64(tokens.clone()))]);
    model.run(&inputs).unwrap_or_else(|e| panic!("{e}"))
}

/// Programs (by file or model name) a KV cache cannot serve, and why.
const REFUSED: &[(&str, &str)] = &[
    ("bidirectional_local", "causal"),
    ("document", "side inputs"),
    ("modernbert", "causal"),
    ("sides_and_heads", "side inputs"),
    ("encoder_model", "causal"),
];

#[test]
fn decoding_with_the_kv_cache_matches_a_full_forward() {
    let out = tempfile::tempdir().expect("temporary directory");
    let mut decoded = 0;
    for path in programs() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let tiny = shrink(spec);
            let graph = optimize(&lower(&tiny), &Options::default())
                .unwrap_or_else(|e| panic!("{e}"))
                .graph;
            let what = format!("{} ({})", relative(&path), spec.name);
            let prefill_dir = out.path().join(format!("{}-prefill", spec.name));
            let decode_dir = out.path().join(format!("{}-decode", spec.name));
            let forward_dir = out.path().join(format!("{}-forward", spec.name));
            let built = build_mode(&graph, &prefill_dir, PlanMode::Prefill)
                .and_then(|_| build_mode(&graph, &decode_dir, PlanMode::Decode))
                .and_then(|_| build_mode(&graph, &forward_dir, PlanMode::Forward));
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            if let Some((_, reason)) = REFUSED
                .iter()
                .find(|(name, _)| *name == stem || *name == spec.name)
            {
                let error = built.expect_err(&format!("{what}: generation should be refused"));
                assert!(error.contains(reason), "{what}: unclear refusal: {error}");
                continue;
            }
            built.unwrap_or_else(|e| panic!("{what}: {e}"));
            let weights = zebra_frontend::init::random_weights(&tiny, 5);
            let dirs = [&*prefill_dir, &*decode_dir, &*forward_dir];
            // Long enough for a window of 16 (32 in zebra_tiny) to wrap several times.
            let total = if tiny.layers.len() > 8 { 40 } else { 110 };
            decode_like_a_full_forward(&what, dirs, &weights, tiny.vocab, total);
            decoded += 1;
        }
    }
    assert!(decoded >= 10, "only {decoded} programs decoded");
}

/// Prefills a prompt (at least 5 tokens, and as many as the caches need), then decodes the
/// rest of `total` tokens of 2 batch rows one at a time: the prefill's logits and every
/// step's are a full forward's over the whole prefix. Returns the decode model.
fn decode_like_a_full_forward(
    what: &str,
    [prefill_dir, decode_dir, forward_dir]: [&Path; 3],
    weights: &zebra_ir::Weights,
    vocab: usize,
    total: usize,
) -> CpuModel {
    let mut prefill = CpuModel::load(prefill_dir, weights, 2).unwrap();
    let mut decode = CpuModel::load(decode_dir, weights, 2).unwrap();
    let mut forward = CpuModel::load(forward_dir, weights, 2).unwrap();
    let min_prompt = decode
        .plan()
        .caches
        .iter()
        .map(|c| c.min_prompt)
        .max()
        .unwrap_or(0);
    let all = tokens(2, total, vocab, 7);
    let full = run(&mut forward, &all)["logits"].mapv(f64::from);
    let prompt = min_prompt.max(5);
    let first = all.slice(s![.., ..prompt]).to_owned().into_dyn();
    let outputs = run(&mut prefill, &first);
    // The prefill's logits: the last prompt position's only.
    let last = full
        .slice(s![.., prompt - 1..prompt, ..])
        .to_owned()
        .into_dyn();
    let prefilled = outputs["logits"].mapv(f64::from);
    assert_close(&prefilled, &last, TOLERANCE, &format!("{what}: prefill"));
    decode
        .start_decode(&outputs)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    for t in prompt..total {
        let next = all.slice(s![.., t..t + 1]).to_owned().into_dyn();
        let step = decode
            .decode(&next)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let actual = step["logits"].mapv(f64::from);
        let expected = full.slice(s![.., t..t + 1, ..]).to_owned().into_dyn();
        assert_close(&actual, &expected, TOLERANCE, &format!("{what} at {t}"));
    }
    assert_eq!(decode.cached_tokens(), total);
    decode
}

/// Builds the prefill, decode and forward plans of the first model in `source` (at full
/// size) into `out`.
fn build_all_modes(source: &str, out: &Path) -> zebra_frontend::ModelSpec {
    let checked = zebra_frontend::check_source(source);
    assert!(!checked.has_errors(), "{:?}", checked.diagnostics);
    let spec = checked.program.models[0].clone();
    let graph = optimize(&lower(&spec), &Options::default()).unwrap().graph;
    for (dir, mode) in [
        ("p", PlanMode::Prefill),
        ("d", PlanMode::Decode),
        ("f", PlanMode::Forward),
    ] {
        build_mode(&graph, &out.join(dir), mode).unwrap_or_else(|e| panic!("{e}"));
    }
    spec
}

/// KV heads whose query heads see different keys get caches of their own: in
/// `kv_heads_apart.zb` the retrieval heads' KV heads 0 and 2 keep every key, KV head 1 four
/// sinks and a ring of 8, and decoding far past the ring still gives a full forward's
/// logits; the caches hold 2/3 of full attention's bytes and a twelfth of the rest's.
#[test]
fn kv_heads_that_keep_different_keys_get_caches_of_their_own() {
    let out = tempfile::tempdir().expect("temporary directory");
    let path = crate::common::root().join("tests/fixtures/ok/kv_heads_apart.zb");
    let source = std::fs::read_to_string(&path).unwrap();
    let spec = build_all_modes(&source, out.path());
    let dirs = ["p", "d", "f"].map(|d| out.path().join(d));
    let weights = zebra_frontend::init::random_weights(&spec, 3);
    let total = 60;
    let decode = decode_like_a_full_forward(
        "kv_heads_apart",
        [&*dirs[0], &*dirs[1], &*dirs[2]],
        &weights,
        spec.vocab,
        total,
    );
    let caches: Vec<_> = decode
        .plan()
        .caches
        .iter()
        .map(|c| (c.layer, c.kv_heads_held.clone(), c.sinks, c.ring))
        .collect();
    assert_eq!(
        caches,
        [
            (Some(0), vec![0, 2], 0, None),
            (Some(0), vec![1], 4, Some(8)),
            (Some(1), vec![0, 2], 0, None),
            (Some(1), vec![1], 4, Some(8)),
        ]
    );
    // The prefill outputs each layer's keys and values once, for both of its caches.
    let prefill = CpuModel::load(&dirs[0], &weights, 1).unwrap();
    let outputs: Vec<&str> = prefill
        .plan()
        .outputs
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| name.starts_with("cache:"))
        .collect();
    assert_eq!(
        outputs,
        ["cache:0:k", "cache:0:v", "cache:2:k", "cache:2:v"]
    );
    let (held, full) = decode.cache_bytes();
    let expected = (2.0 + 12.0 / total as f64) / 3.0;
    let fraction = held as f64 / full as f64;
    assert!(
        (fraction - expected).abs() < 1e-9,
        "{fraction} vs {expected}"
    );
}

/// A mask that keeps only the first keys (sinks, no window) keeps them and a slot for the
/// newest key, which its decode step writes before it attends.
/// After a long prompt, a global layer's cache is shared out over several programs per
/// (batch row, KV head), whose shares a second launch combines: the steps still give a full
/// forward pass's logits, on either side of the length from which the cache is shared out.
#[test]
fn long_caches_shared_out_over_programs_decode_like_a_full_forward() {
    let source = "
        attention global causal { mask = k <= q }
        attention local(window: int = 8) causal { mask = k <= q && q - k < window }
        model long_cache {
            vocab = 32
            dim = 32
            heads = 2
            kv_heads = 1
            ffn = swiglu(hidden = 32)
            norm = rmsnorm(eps = 1e-5)
            rope = rope(base = 10000.0)
            embeddings = tied
            layers = [global, local]
        }";
    let checked = zebra_frontend::check_source(source);
    assert!(!checked.has_errors(), "{:?}", checked.diagnostics);
    let spec = checked.program.models[0].clone();
    let graph = optimize(&lower(&spec), &Options::default()).unwrap().graph;
    let out = tempfile::tempdir().expect("temporary directory");
    let dir = |mode: &str| out.path().join(mode);
    for (name, mode) in [
        ("p", PlanMode::Prefill),
        ("d", PlanMode::Decode),
        ("f", PlanMode::Forward),
    ] {
        let options = BuildOptions {
            mode,
            max_seq_len: 4200,
            cache: Some(Cache { dir: cache_dir() }),
        };
        build(&graph, &dir(name), &options).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut weights = zebra_frontend::init::random_weights(&spec, 3);
    // Sharp scores, so that every share of the cache matters: with the small random weights
    // a query would spread over thousands of keys almost evenly.
    let q = "model.layers.0.self_attn.q_proj.weight";
    weights
        .get_mut(q)
        .unwrap_or_else(|| panic!("no {q}"))
        .mapv_inplace(|x| x * 40.0);
    let mut prefill = CpuModel::load(&dir("p"), &weights, 2).unwrap();
    let mut decode = CpuModel::load(&dir("d"), &weights, 2).unwrap();
    let mut forward = CpuModel::load(&dir("f"), &weights, 2).unwrap();
    let (prompt, total) = (4090, 4104);
    let all = tokens(2, total, spec.vocab, 11);
    let full = run(&mut forward, &all)["logits"].mapv(f64::from);
    let outputs = run(
        &mut prefill,
        &all.slice(s![.., ..prompt]).to_owned().into_dyn(),
    );
    decode.start_decode(&outputs).unwrap();
    let mut shared = Vec::new();
    for t in prompt..total {
        shared.push(decode.cache_shares_next(2));
        let next = all.slice(s![.., t..t + 1]).to_owned().into_dyn();
        let step = decode.decode(&next).unwrap_or_else(|e| panic!("{e}"));
        let expected = full.slice(s![.., t..t + 1, ..]).to_owned().into_dyn();
        let what = format!(
            "step at {t}, the cache shared over {}",
            shared[shared.len() - 1]
        );
        assert_close(&step["logits"].mapv(f64::from), &expected, TOLERANCE, &what);
    }
    // Two (batch row, KV head) pairs on two threads: four programs each from 4096 slots.
    assert_eq!(shared[..5], [1; 5]);
    assert!(shared[6..].iter().all(|&n| n == 4), "{shared:?}");
}

#[test]
fn a_cache_of_sinks_alone_decodes_like_a_full_forward() {
    let out = tempfile::tempdir().expect("temporary directory");
    let source = "attention first_keys bidirectional {
    mask = k <= q && k < 4
}

model sinks_only {
    vocab      = 64
    dim        = 32
    heads      = 2
    kv_heads   = 1
    ffn        = swiglu(hidden = 48)
    norm       = rmsnorm(eps = 1e-5)
    rope       = rope(base = 10000.0)
    embeddings = tied
    layers     = 2 * first_keys
}
";
    let spec = build_all_modes(source, out.path());
    let dirs = ["p", "d", "f"].map(|d| out.path().join(d));
    let weights = zebra_frontend::init::random_weights(&spec, 3);
    let decode = decode_like_a_full_forward(
        "sinks only",
        [&*dirs[0], &*dirs[1], &*dirs[2]],
        &weights,
        spec.vocab,
        30,
    );
    let kept: Vec<_> = decode
        .plan()
        .caches
        .iter()
        .map(|c| (c.sinks, c.ring))
        .collect();
    assert_eq!(kept, [(4, Some(1)), (4, Some(1))]);
}

/// Caches hold what the mask can see: a ring of the window for local layers, every key for
/// global ones; the Zebra layout holds `1/G + (1 - 1/G) W / T` of full attention's cache.
#[test]
fn kv_caches_hold_only_what_the_mask_can_see() {
    let out = tempfile::tempdir().expect("temporary directory");
    let path = crate::common::root().join("examples/zebra_tiny.zb");
    let (_, checked) = check_ok(&path);
    let spec = &checked.program.models[0];
    let graph = optimize(&lower(spec), &Options::default()).unwrap().graph;
    let (prefill_dir, decode_dir) = (out.path().join("p"), out.path().join("d"));
    build_mode(&graph, &prefill_dir, PlanMode::Prefill).unwrap();
    build_mode(&graph, &decode_dir, PlanMode::Decode).unwrap();
    let weights = zebra_frontend::init::random_weights(spec, 1);
    let mut prefill = CpuModel::load(&prefill_dir, &weights, 2).unwrap();
    let mut decode = CpuModel::load(&decode_dir, &weights, 2).unwrap();
    let rings: Vec<Option<usize>> = decode.plan().caches.iter().map(|c| c.ring).collect();
    assert_eq!(
        rings,
        [
            None,
            Some(32),
            Some(32),
            Some(32),
            None,
            Some(32),
            Some(32),
            Some(32)
        ]
    );
    let t = 256;
    let prompt = tokens(1, t, spec.vocab, 3);
    let outputs = run(&mut prefill, &prompt);
    decode.start_decode(&outputs).unwrap();
    let (held, full) = decode.cache_bytes();
    let (g, w) = (4.0, 32.0);
    let expected = 1.0 / g + (1.0 - 1.0 / g) * w / t as f64;
    let fraction = held as f64 / full as f64;
    assert!(
        (fraction - expected).abs() < 1e-9,
        "{fraction} vs {expected}"
    );
    // The logits of the last prompt token come with the prefill, and only they.
    assert_eq!(outputs["logits"].shape(), [1, 1, spec.vocab]);
}

/// The prefill and decode plans of a model read the same weights, packed alike: loaded as a
/// pair they share one copy, and decode as if each had its own.
#[test]
fn prefill_and_decode_plans_share_one_copy_of_the_weights() {
    let out = tempfile::tempdir().expect("temporary directory");
    let path = crate::common::root().join("examples/zebra_tiny.zb");
    let (_, checked) = check_ok(&path);
    let spec = &checked.program.models[0];
    let graph = optimize(&lower(spec), &Options::default()).unwrap().graph;
    let (p, d) = (out.path().join("p"), out.path().join("d"));
    build_mode(&graph, &p, PlanMode::Prefill).unwrap();
    build_mode(&graph, &d, PlanMode::Decode).unwrap();
    let weights = zebra_frontend::init::random_weights(spec, 4);
    let (mut prefill, mut decode) = CpuModel::load_pair(&p, &d, &weights, 2).unwrap();
    let (raw, packed) = decode.plan().weights_in(prefill.plan());
    assert_eq!(raw.len(), decode.plan().weights.len());
    assert!(raw.iter().all(Option::is_some), "{raw:?}");
    assert!(
        !packed.is_empty() && packed.iter().all(Option::is_some),
        "{packed:?}"
    );
    for (i, j) in raw.iter().enumerate() {
        let j = j.unwrap();
        assert_eq!(decode.plan().weights[i], prefill.plan().weights[j]);
    }
    // Only the embedding table is read as it is; every projection only packed, so the
    // executors hold no unpacked copy of them.
    for plan in [prefill.plan(), decode.plan()] {
        let raw: Vec<&str> = plan
            .weights
            .iter()
            .zip(plan.raw_weights_read())
            .filter(|(_, read)| *read)
            .map(|(w, _)| w.name.as_str())
            .collect();
        assert_eq!(raw, ["model.embed_tokens.weight"]);
    }

    let mut alone = CpuModel::load(&d, &weights, 2).unwrap();
    let prompt = tokens(1, 40, spec.vocab, 5);
    let outputs = run(&mut prefill, &prompt);
    decode.start_decode(&outputs).unwrap();
    alone.start_decode(&outputs).unwrap();
    for step in 0..20 {
        let token = tokens(1, 1, spec.vocab, 100 + step);
        let shared = decode.decode(&token).unwrap();
        let own = alone.decode(&token).unwrap();
        assert_eq!(shared["logits"], own["logits"], "step {step}");
    }

    // Weights that do not fit the plans are refused, and name what is wrong.
    let mut wrong = weights.clone();
    let name = prefill.plan().weights[0].name.clone();
    wrong.insert(name.clone(), ArrayD::zeros(IxDyn(&[3])));
    let error = CpuModel::load_pair(&p, &d, &wrong, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains(&name), "{error}");
}

#[test]
fn decoding_past_the_compiled_context_is_refused() {
    let out = tempfile::tempdir().expect("temporary directory");
    let path = crate::common::root().join("examples/attention/sliding_window.zb");
    let (_, checked) = check_ok(&path);
    let spec = shrink(&checked.program.models[0]);
    let graph = optimize(&lower(&spec), &Options::default()).unwrap().graph;
    let options = |mode| BuildOptions {
        mode,
        max_seq_len: 12,
        cache: Some(Cache { dir: cache_dir() }),
    };
    let (p, d) = (out.path().join("p"), out.path().join("d"));
    build(&graph, &p, &options(PlanMode::Prefill)).unwrap();
    build(&graph, &d, &options(PlanMode::Decode)).unwrap();
    let weights = zebra_frontend::init::random_weights(&spec, 1);
    let mut prefill = CpuModel::load(&p, &weights, 1).unwrap();
    let mut decode = CpuModel::load(&d, &weights, 1).unwrap();
    let error = decode.decode(&tokens(1, 1, spec.vocab, 1)).unwrap_err();
    assert!(error.to_string().contains("prefill"), "{error}");
    let outputs = run(&mut prefill, &tokens(1, 10, spec.vocab, 1));
    decode.start_decode(&outputs).unwrap();
    decode.decode(&tokens(1, 1, spec.vocab, 2)).unwrap();
    decode.decode(&tokens(1, 1, spec.vocab, 3)).unwrap();
    let error = decode.decode(&tokens(1, 1, spec.vocab, 4)).unwrap_err();
    assert!(error.to_string().contains("above the 12"), "{error}");
    let error = decode.decode(&tokens(2, 1, spec.vocab, 4)).unwrap_err();
    assert!(error.to_string().contains("[1, 1]"), "{error}");
}

/// The CPU's bf16 weights (`--dtype bf16`): the projections read their packed weights as
/// bf16, widened to f32. With weights that bf16 holds exactly (norm weights of 1, so that
/// packing folds nothing in), the bf16 plan computes what the f32 plan does; with any
/// weights it stays within bf16's rounding of the f32 logits without equalling them; its
/// prefill and decode steps agree with its forward pass; a training step is refused.
#[test]
fn bf16_weights_compute_with_the_weights_rounded() {
    use zebra_codegen::artifact::build_cpu;
    use zebra_codegen::plan::PlanOptions;
    use zebra_runtime::attention_check::{bf16_bits, bf16_value};

    let out = tempfile::tempdir().expect("temporary directory");
    let path = crate::common::root().join("examples/zebra_tiny.zb");
    let (_, checked) = check_ok(&path);
    let spec = &checked.program.models[0];
    let graph = optimize(&lower(spec), &Options::default()).unwrap().graph;
    let bf16 = PlanOptions { bf16_weights: true };
    let build_bf16 = |dir: &str, mode| {
        let options = BuildOptions {
            mode,
            max_seq_len: 512,
            cache: Some(Cache { dir: cache_dir() }),
        };
        build_cpu(&graph, &out.path().join(dir), &options, None, bf16).unwrap();
        out.path().join(dir)
    };
    let half = [
        build_bf16("p", PlanMode::Prefill),
        build_bf16("d", PlanMode::Decode),
        build_bf16("f", PlanMode::Forward),
    ];
    let full = out.path().join("f32");
    build_mode(&graph, &full, PlanMode::Forward).unwrap();
    let plan = CpuModel::load(&half[2], &zebra_frontend::init::random_weights(spec, 1), 1)
        .unwrap()
        .plan()
        .clone();
    assert!(!plan.packed.is_empty() && plan.packed.iter().all(|p| p.bf16));

    let weights = zebra_frontend::init::random_weights(spec, 8);
    let mut exact = zebra_ir::Weights::new();
    for (name, tensor) in weights.iter() {
        let rounded = if name.contains("norm") {
            tensor.mapv(|_| 1.0)
        } else {
            tensor.mapv(|x| bf16_value(bf16_bits(x)))
        };
        exact.insert(name, rounded);
    }
    let prompt = tokens(2, 70, spec.vocab, 4);
    let logits = |dir: &Path, weights: &zebra_ir::Weights| {
        let mut model = CpuModel::load(dir, weights, 2).unwrap();
        run(&mut model, &prompt)["logits"].mapv(f64::from)
    };
    assert_close(
        &logits(&half[2], &exact),
        &logits(&full, &exact),
        1e-5,
        "bf16 weights that bf16 holds exactly",
    );
    let (rounded, reference) = (logits(&half[2], &weights), logits(&full, &weights));
    let largest = reference.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let worst = rounded
        .iter()
        .zip(&reference)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst > 1e-6 * largest && worst < 2e-2 * largest,
        "bf16 weights: {worst} off, of logits up to {largest}"
    );

    let [p, d, f] = &half;
    decode_like_a_full_forward("bf16 weights", [p, d, f], &weights, spec.vocab, 60);

    let training = zebra_passes::autodiff::training_graph(&graph).unwrap();
    let training = optimize(&training, &Options::default()).unwrap().graph;
    let options = BuildOptions {
        mode: PlanMode::Forward,
        max_seq_len: 64,
        cache: Some(Cache { dir: cache_dir() }),
    };
    let error = build_cpu(&training, &out.path().join("t"), &options, None, bf16)
        .unwrap_err()
        .to_string();
    assert!(error.contains("inference"), "{error}");
}
