//! `zebra bench`: times the compiled attention kernels and model forwards against naive
//! baselines in the same run, and prints one JSON object per benchmark.
//!
//! GFLOP/s count only the FLOPs of visible (unmasked) score elements, 4 * head_dim each (a
//! multiply-add for `q . k` and one for `p * v`), plus, for model forwards, 2 FLOPs per
//! weight per token for the projections.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use zebra_runtime::{CpuModel, Tensor};

/// The benchmarks, in the order they run.
pub const NAMES: [&str; 10] = [
    "attention-local",
    "attention-global",
    "attention-per-head",
    "forward-zebra",
    "forward-all-global",
    "compile-cold",
    "compile-warm",
    "train-zebra",
    "decode-zebra",
    "decode-all-global",
];

/// The benchmarks that run when none is named (the others take a length of their own).
const DEFAULT: [&str; 6] = [
    "attention-local",
    "attention-global",
    "forward-zebra",
    "forward-all-global",
    "compile-cold",
    "compile-warm",
];

pub struct BenchArgs<'a> {
    pub names: &'a [String],
    /// Sequences per training step.
    pub batch: usize,
    pub seq_len: usize,
    pub threads: usize,
    pub repeats: usize,
    pub json: bool,
    pub window: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub baseline: bool,
    /// Tile sizes to use instead of the target's.
    pub blocks: Option<(u64, u64)>,
    /// A Python with PyTorch: run `bench/torch_baseline.py` on the same shapes afterwards and
    /// print the ratios.
    pub torch: Option<PathBuf>,
    /// What was printed, for the comparison with PyTorch.
    pub records: std::cell::RefCell<Vec<serde_json::Map<String, serde_json::Value>>>,
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn emit(args: &BenchArgs, fields: &[(&str, serde_json::Value)]) {
    let object: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    print_record(args, &object);
    args.records.borrow_mut().push(object);
}

fn print_record(args: &BenchArgs, object: &serde_json::Map<String, serde_json::Value>) {
    if args.json {
        println!("{}", serde_json::Value::Object(object.clone()));
    } else {
        let parts: Vec<String> = object.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{}", parts.join("  "));
    }
}

/// Runs the PyTorch baselines on the same shapes, prints their records, then one record per
/// (Zebra benchmark, PyTorch implementation) pair with the speedup, and the fraction of the
/// machine's matmul rate each attention benchmark reaches.
fn compare_with_torch(args: &BenchArgs, python: &Path) -> Result<()> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/torch_baseline.py");
    if !script.exists() {
        bail!(
            "the PyTorch baseline script {} is missing",
            script.display()
        );
    }
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    let mut names: Vec<String> = args
        .records
        .borrow()
        .iter()
        .filter_map(|r| r.get("name")?.as_str().map(str::to_string))
        .filter(|n| n.starts_with("attention-") || n.starts_with("train-"))
        .collect();
    if names.iter().any(|n| n.starts_with("attention-")) {
        names.push("matmul".into());
    }
    if names.is_empty() {
        return Ok(());
    }
    let output = std::process::Command::new(python)
        .arg(&script)
        .args(&names)
        .args(["--seq-len", &args.seq_len.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--window", &args.window.to_string()])
        .args(["--heads", &args.heads.to_string()])
        .args(["--head-dim", &args.head_dim.to_string()])
        .args(["--repeats", &args.repeats.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .output()
        .map_err(|e| anyhow!("cannot run {}: {e}", python.display()))?;
    if !output.status.success() {
        bail!(
            "the PyTorch baseline failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let theirs: Vec<serde_json::Map<String, serde_json::Value>> =
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
    for record in &theirs {
        print_record(args, record);
    }
    let gflops = |r: &serde_json::Map<String, serde_json::Value>| {
        r.get("gflops").and_then(|g| g.as_f64()).unwrap_or(0.0)
    };
    let name = |r: &serde_json::Map<String, serde_json::Value>| {
        r.get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string()
    };
    let matmul = theirs.iter().find(|r| name(r) == "matmul").map(gflops);
    for ours in args.records.borrow().iter() {
        for other in theirs.iter().filter(|r| name(r) == name(ours)) {
            let implementation = other.get("impl").cloned().unwrap_or_default();
            let rate = |r: &serde_json::Map<String, serde_json::Value>| {
                r.get("tokens_per_s").and_then(|g| g.as_f64())
            };
            if let (Some(a), Some(b)) = (rate(ours), rate(other)) {
                let record: serde_json::Map<String, serde_json::Value> = [
                    ("name".to_string(), name(ours).into()),
                    ("compare".to_string(), "zebra vs torch".into()),
                    ("torch_impl".to_string(), implementation),
                    ("zebra_tokens_per_s".to_string(), a.into()),
                    ("torch_tokens_per_s".to_string(), b.into()),
                    ("speedup".to_string(), (a / b).into()),
                ]
                .into_iter()
                .collect();
                print_record(args, &record);
                continue;
            }
            let record: serde_json::Map<String, serde_json::Value> = [
                ("name".to_string(), name(ours).into()),
                ("compare".to_string(), "zebra vs torch".into()),
                ("torch_impl".to_string(), implementation),
                ("zebra_gflops".to_string(), gflops(ours).into()),
                ("torch_gflops".to_string(), gflops(other).into()),
                ("speedup".to_string(), (gflops(ours) / gflops(other)).into()),
            ]
            .into_iter()
            .collect();
            print_record(args, &record);
        }
        if let Some(matmul) = matmul.filter(|_| name(ours).starts_with("attention-")) {
            let record: serde_json::Map<String, serde_json::Value> = [
                ("name".to_string(), name(ours).into()),
                ("compare".to_string(), "zebra vs torch matmul rate".into()),
                ("zebra_gflops".to_string(), gflops(ours).into()),
                ("matmul_gflops".to_string(), matmul.into()),
                ("fraction".to_string(), (gflops(ours) / matmul).into()),
            ]
            .into_iter()
            .collect();
            print_record(args, &record);
        }
    }
    Ok(())
}

fn random(shape: &[usize], rng: &mut ChaCha8Rng) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |_| rng.random_range(-1.0f32..1.0))
}

/// The mask of `attention-per-head`: windows of `W`, `W / 2`, `W / 4` and `W / 8` keys by head
/// (`h % 4`), as models whose heads attend at different ranges have (DuoAttention, MoA).
fn per_head_windows(window: usize) -> String {
    let spans: Vec<String> = (0..4).map(|i| (window >> i).to_string()).collect();
    format!("k <= q && q - k < [{}][h % 4]", spans.join(", "))
}

/// [`visible`] summed over `heads` heads, each with its own mask where the mask reads `h`
/// (counted once per distinct mask).
fn visible_by_heads(mask: &zebra_ir::Expr, t: usize, heads: usize) -> u64 {
    zebra_ir::schedule::head_masks(mask, heads)
        .iter()
        .map(|(mask, of)| visible(mask, t) * of.len() as u64)
        .sum()
}

/// How many (query, key) pairs of a `t x t` attention the mask shows: whole 64 x 64 blocks
/// are classified by value-range analysis, and only the blocks it cannot decide are counted
/// pair by pair.
fn visible(mask: &zebra_ir::Expr, t: usize) -> u64 {
    struct At(i64, i64);
    impl zebra_ir::expr::Env for At {
        fn var(&self, v: zebra_ir::Var) -> zebra_ir::expr::Scalar {
            zebra_ir::expr::Scalar::Int(match v {
                zebra_ir::Var::Q => self.0,
                zebra_ir::Var::K => self.1,
                _ => 0,
            })
        }
        fn side(&self, _: &str, _: zebra_ir::Var) -> i64 {
            0
        }
    }
    const BLOCK: usize = 64;
    let blocks = t.div_ceil(BLOCK);
    (0..blocks)
        .into_par_iter()
        .map(|qb| {
            let (q0, q1) = (qb * BLOCK, ((qb + 1) * BLOCK).min(t));
            let mut count = 0u64;
            for kb in 0..blocks {
                let (k0, k1) = (kb * BLOCK, ((kb + 1) * BLOCK).min(t));
                let env = zebra_ir::interval::TileEnv {
                    q: (q0 as i64, q1 as i64 - 1),
                    k: (k0 as i64, k1 as i64 - 1),
                    heads: 1,
                    batch: 1,
                    sides: &[],
                };
                let range = zebra_ir::interval::range(mask, &env);
                if range.always() {
                    count += ((q1 - q0) * (k1 - k0)) as u64;
                } else if !range.never() {
                    for q in q0..q1 {
                        for k in k0..k1 {
                            count += u64::from(mask.eval(&At(q as i64, k as i64)).as_bool());
                        }
                    }
                }
            }
            count
        })
        .sum()
}

/// The naive baseline: dense attention, every score of every query evaluated and masked,
/// parallel over queries (what a framework does with a dense mask).
fn naive(
    q: &ArrayD<f32>,
    k: &ArrayD<f32>,
    v: &ArrayD<f32>,
    mask: &zebra_ir::Expr,
    scale: f32,
) -> ArrayD<f32> {
    let (heads, t, d) = (q.shape()[1], q.shape()[2], q.shape()[3]);
    let (qs, ks, vs) = (
        q.as_slice().expect("contiguous"),
        k.as_slice().expect("contiguous"),
        v.as_slice().expect("contiguous"),
    );
    let rows: Vec<Vec<f32>> = (0..heads * t)
        .into_par_iter()
        .map(|row| {
            let (h, i) = (row / t, row % t);
            let qrow = &qs[(h * t + i) * d..(h * t + i + 1) * d];
            let mut scores = vec![f32::NEG_INFINITY; t];
            for (j, s) in scores.iter_mut().enumerate() {
                struct At(i64, i64, i64);
                impl zebra_ir::expr::Env for At {
                    fn var(&self, v: zebra_ir::Var) -> zebra_ir::expr::Scalar {
                        zebra_ir::expr::Scalar::Int(match v {
                            zebra_ir::Var::Q => self.0,
                            zebra_ir::Var::K => self.1,
                            zebra_ir::Var::H => self.2,
                            _ => 0,
                        })
                    }
                    fn side(&self, _: &str, _: zebra_ir::Var) -> i64 {
                        0
                    }
                }
                if mask.eval(&At(i as i64, j as i64, h as i64)).as_bool() {
                    let krow = &ks[(h * t + j) * d..(h * t + j + 1) * d];
                    *s = qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f32>() * scale;
                }
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut out = vec![0.0f32; d];
            if max > f32::NEG_INFINITY {
                let mut total = 0.0;
                for (j, s) in scores.iter().enumerate() {
                    if *s > f32::NEG_INFINITY {
                        let p = (s - max).exp();
                        total += p;
                        let vrow = &vs[(h * t + j) * d..(h * t + j + 1) * d];
                        out.iter_mut().zip(vrow).for_each(|(o, x)| *o += p * x);
                    }
                }
                out.iter_mut().for_each(|o| *o /= total);
            }
            out
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(&[1, heads, t, d]), rows.concat()).expect("shape")
}

fn attention(args: &BenchArgs, name: &str, mask_text: &str, dir: &Path) -> Result<()> {
    let (t, h, d) = (args.seq_len, args.heads, args.head_dim);
    let max = zebra_frontend::check::MAX_HEAD_DIM;
    if d > max {
        bail!("--head-dim {d} is more than the {max} Zebra compiles");
    }
    let mask = zebra_ir::expr::parse_expr(mask_text).map_err(|e| anyhow!(e))?;
    let scale = 1.0 / (d as f64).sqrt();
    // The tiles: --blocks, else the tuning database's for this attention, else the target's.
    let defaults = zebra_passes::tiles::default_blocks(zebra_passes::Target::Cpu, &mask, h);
    let kernel = zebra_ir::op::AttentionKernel {
        name: name.replace('-', "_"),
        mask: mask.clone(),
        score: None,
        sides: vec![],
        scale,
        heads: h as u64,
        kv_heads: h as u64,
        head_dim: d as u64,
        block_q: defaults.block_q,
        block_k: defaults.block_k,
        merge_heads: false,
        loc: None,
    };
    let (bq, bk, tiles) = match args.blocks {
        Some((bq, bk)) => (bq, bk, "--blocks"),
        None => match crate::tune::options(zebra_passes::Target::Cpu)
            .tiles
            .get(&kernel)
        {
            Some(tuned) => (tuned.block_q, tuned.block_k, "tuning database"),
            None => (defaults.block_q, defaults.block_k, "default"),
        },
    };
    let blocks = zebra_passes::Blocks {
        block_q: bq,
        block_k: bk,
    };
    let graph = crate::tune::attention_graph(&kernel, blocks, false)?;
    // Q, K and V, their copies as inputs and in the executor's buffers, and the output.
    crate::commands::check_memory(
        &format!("{t} tokens of {h} heads of {d}: the inputs and output"),
        zebra_runtime::memory::product([h, t, d, 7 * 4]),
    )?;
    let artifact = dir.join(name);
    crate::commands::build_artifact_at(&graph, &artifact, t)?;
    let mut model = CpuModel::load(&artifact, &zebra_ir::Weights::new(), args.threads)?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (q, k, v) = (
        random(&[1, h, t, d], &mut rng),
        random(&[1, h, t, d], &mut rng),
        random(&[1, h, t, d], &mut rng),
    );
    let inputs: BTreeMap<String, Tensor> = [("q", &q), ("k", &k), ("v", &v)]
        .into_iter()
        .map(|(n, a)| (n.to_string(), Tensor::F32(a.clone())))
        .collect();
    model.run(&inputs)?; // warm-up: schedules, memory
    let mut times = Vec::new();
    let mut out = None;
    for _ in 0..args.repeats {
        let start = Instant::now();
        out = Some(model.run(&inputs)?);
        times.push(start.elapsed().as_secs_f64());
    }
    let time = median(times);
    let flops = visible_by_heads(&mask, t, h) as f64 * 4.0 * d as f64;
    let mut fields = vec![
        ("name", name.into()),
        ("seq_len", t.into()),
        ("threads", model.threads().into()),
        ("heads", h.into()),
        ("head_dim", d.into()),
        ("mask", mask_text.into()),
        ("block_q", bq.into()),
        ("block_k", bk.into()),
        ("tiles", tiles.into()),
        ("time_ms", (time * 1e3).into()),
        ("gflops", (flops / time / 1e9).into()),
    ];
    if args.baseline {
        let start = Instant::now();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(model.threads())
            .build()?;
        let expected = pool.install(|| naive(&q, &k, &v, &mask, scale as f32));
        let naive_time = start.elapsed().as_secs_f64();
        let got = &out.expect("ran at least once")["out"];
        let err = got
            .iter()
            .zip(expected.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        if err > 1e-3 {
            bail!("{name}: the compiled kernel differs from the naive baseline by {err}");
        }
        fields.push((
            "baseline",
            "naive dense-mask attention (Rust, same threads)".into(),
        ));
        fields.push(("baseline_ms", (naive_time * 1e3).into()));
        fields.push(("baseline_gflops", (flops / naive_time / 1e9).into()));
        fields.push(("speedup_vs_baseline", (naive_time / time).into()));
    }
    emit(args, &fields);
    Ok(())
}

/// zebra_tiny at a given layout: its own pattern, or every layer global.
fn zebra_tiny(all_global: bool) -> Result<(zebra_frontend::ModelSpec, PathBuf)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/zebra_tiny.zb");
    let source = std::fs::read_to_string(&path)?;
    let checked = zebra_frontend::check_source(&source);
    let mut spec = checked.program.model(None).map_err(|e| anyhow!(e))?.clone();
    if all_global {
        let global = spec
            .kinds
            .iter()
            .position(|k| k.attention == "global")
            .ok_or_else(|| anyhow!("zebra_tiny has no global kind"))?;
        spec.layers = vec![global; spec.layers.len()];
        spec.name = "zebra_tiny_all_global".into();
    }
    Ok((spec, path))
}

fn forward(args: &BenchArgs, name: &str, all_global: bool, dir: &Path) -> Result<()> {
    let (spec, _) = zebra_tiny(all_global)?;
    let graph = zebra_frontend::lower::lower(&spec)?;
    let options = crate::tune::options(zebra_passes::Target::Cpu);
    let optimized = zebra_passes::optimize(&graph, &options)?.graph;
    // The attention kernels whose tiles came from the tuning database, as `@name BQxBK`.
    let tuned: Vec<String> = zebra_ir::print::kernel_table(&optimized)
        .into_iter()
        .filter_map(|(name, kernel)| {
            let blocks = options.tiles.get(&kernel)?;
            Some(format!("@{name} {blocks}"))
        })
        .collect();
    let artifact = dir.join(name);
    crate::commands::build_artifact_at(&optimized, &artifact, args.seq_len)?;
    let weights = zebra_frontend::init::random_weights(&spec, 0);
    let mut model = CpuModel::load(&artifact, &weights, args.threads)?;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let t = args.seq_len;
    let tokens = ArrayD::from_shape_fn(IxDyn(&[1, t]), |_| rng.random_range(0..spec.vocab as i64));
    let inputs: BTreeMap<String, Tensor> = [("tokens".to_string(), Tensor::I64(tokens))].into();
    model.run(&inputs)?;
    let mut times = Vec::new();
    for _ in 0..args.repeats.min(5) {
        let start = Instant::now();
        model.run(&inputs)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let time = median(times);
    let flops = forward_flops(&spec, t);
    let layout: Vec<&str> = spec
        .layers
        .iter()
        .map(|&k| spec.kinds[k].label.as_str())
        .collect();
    emit(
        args,
        &[
            ("name", name.into()),
            ("seq_len", t.into()),
            ("threads", model.threads().into()),
            ("model", spec.name.clone().into()),
            ("layers", layout.join(",").into()),
            ("tuned_tiles", tuned.into()),
            ("time_ms", (time * 1e3).into()),
            ("gflops", (flops / time / 1e9).into()),
        ],
    );
    Ok(())
}

fn compile(args: &BenchArgs, name: &str, cold: bool, dir: &Path) -> Result<()> {
    let cache = dir.join(if cold { "cold-cache" } else { "warm-cache" });
    if cold {
        let _ = std::fs::remove_dir_all(&cache);
    }
    let (_, path) = zebra_tiny(false)?;
    let run = |out: &Path| -> Result<f64> {
        let start = Instant::now();
        let source = std::fs::read_to_string(&path)?;
        let checked = zebra_frontend::check_source(&source);
        let spec = checked.program.model(None).map_err(|e| anyhow!(e))?;
        let graph = zebra_passes::optimize(
            &zebra_frontend::lower::lower(spec)?,
            &zebra_passes::Options::default(),
        )?
        .graph;
        let options = zebra_codegen::artifact::BuildOptions {
            mode: Default::default(),
            max_seq_len: args.seq_len,
            cache: Some(zebra_codegen::artifact::Cache { dir: cache.clone() }),
        };
        zebra_codegen::artifact::build(&graph, out, &options)?;
        CpuModel::load(
            out,
            &zebra_frontend::init::random_weights(spec, 0),
            args.threads,
        )?;
        Ok(start.elapsed().as_secs_f64())
    };
    if !cold {
        run(&dir.join("compile-prime"))?;
    }
    let time = run(&dir.join(name))?;
    emit(
        args,
        &[
            ("name", name.into()),
            ("seq_len", args.seq_len.into()),
            ("threads", args.threads.into()),
            ("model", "zebra_tiny".into()),
            ("what", "source to loaded artifact".into()),
            ("time_ms", (time * 1e3).into()),
            ("gflops", 0.0.into()),
        ],
    );
    Ok(())
}

/// The FLOPs of one forward pass of `spec` over `t` tokens: 2 per weight per token, and
/// 4 * head_dim per visible score.
fn forward_flops(spec: &zebra_frontend::ModelSpec, t: usize) -> f64 {
    let mut flops = 2.0 * spec.parameter_count() as f64 * t as f64;
    for &kind in &spec.layers {
        flops += visible(&spec.kinds[kind].mask, t) as f64
            * spec.n_heads as f64
            * 4.0
            * spec.head_dim as f64;
    }
    flops
}

/// Training steps of zebra_tiny at `--seq-len` x `--batch` (the whole step: forward,
/// backward, AdamW), in tokens per second.
fn train(args: &BenchArgs, name: &str, dir: &Path) -> Result<()> {
    let (spec, _) = zebra_tiny(false)?;
    let graph = zebra_frontend::lower::lower(&spec)?;
    let artifact = dir.join(name);
    crate::train::build_training_artifact(&graph, &artifact, args.seq_len)?;
    let weights = zebra_frontend::init::random_weights(&spec, 0);
    let mut trainer = zebra_runtime::train::Trainer::new(
        &artifact,
        &weights,
        Default::default(),
        Default::default(),
        args.threads,
    )?;
    let (b, t) = (args.batch, args.seq_len);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let tokens: Vec<i64> = (0..b * (t + 1))
        .map(|_| rng.random_range(0..spec.vocab as i64))
        .collect();
    let mut batch = zebra_runtime::data::Batch::with_capacity(b, t)?;
    batch.documents = vec![0; b * t];
    for row in tokens.chunks(t + 1) {
        batch.tokens.extend_from_slice(&row[..t]);
        batch.targets.extend_from_slice(&row[1..]);
    }
    trainer.step(&batch)?;
    let mut times = Vec::new();
    for _ in 0..args.repeats.min(5) {
        let start = Instant::now();
        trainer.step(&batch)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let time = median(times);
    // Forward and backward: about three forwards.
    let flops = 3.0 * forward_flops(&spec, t) * b as f64;
    emit(
        args,
        &[
            ("name", name.into()),
            ("model", spec.name.clone().into()),
            ("seq_len", t.into()),
            ("batch", b.into()),
            ("threads", trainer_threads(args).into()),
            ("what", "training step: forward, backward, AdamW".into()),
            ("time_ms", (time * 1e3).into()),
            ("tokens_per_s", ((b * t) as f64 / time).into()),
            ("gflops", (flops / time / 1e9).into()),
        ],
    );
    Ok(())
}

fn trainer_threads(args: &BenchArgs) -> usize {
    if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    }
}

/// Decoding after a prompt of `--seq-len` tokens: tokens per second, and the KV cache held
/// against full attention's.
fn decode(args: &BenchArgs, name: &str, all_global: bool, dir: &Path) -> Result<()> {
    let (spec, _) = zebra_tiny(all_global)?;
    let graph = zebra_frontend::lower::lower(&spec)?;
    let optimized =
        zebra_passes::optimize(&graph, &crate::tune::options(zebra_passes::Target::Cpu))?.graph;
    let steps = 64;
    let t = args.seq_len;
    let context = t + steps + 1;
    let weights = zebra_frontend::init::random_weights(&spec, 0);
    let mut models = Vec::new();
    for mode in [
        zebra_codegen::plan::PlanMode::Prefill,
        zebra_codegen::plan::PlanMode::Decode,
    ] {
        let artifact = dir.join(format!("{name}-{mode:?}"));
        let options = zebra_codegen::artifact::BuildOptions {
            mode,
            max_seq_len: context,
            cache: zebra_codegen::artifact::Cache::default_location(),
        };
        zebra_codegen::artifact::build(&optimized, &artifact, &options)?;
        models.push(CpuModel::load(&artifact, &weights, args.threads)?);
    }
    let (mut prefill, mut decode) = (models.remove(0), models.remove(0));
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let tokens = ArrayD::from_shape_fn(IxDyn(&[1, t]), |_| rng.random_range(0..spec.vocab as i64));
    let inputs: BTreeMap<String, Tensor> = [("tokens".to_string(), Tensor::I64(tokens))].into();
    let outputs = prefill.run(&inputs)?;
    decode.start_decode(&outputs)?;
    let next = |rng: &mut ChaCha8Rng| {
        ArrayD::from_elem(IxDyn(&[1, 1]), rng.random_range(0..spec.vocab as i64))
    };
    decode.decode(&next(&mut rng))?;
    let start = Instant::now();
    for _ in 0..steps {
        decode.decode(&next(&mut rng))?;
    }
    let time = start.elapsed().as_secs_f64() / steps as f64;
    let (held, full) = decode.cache_bytes();
    let tokens_held = decode.cached_tokens();
    // What the Zebra layout predicts: 1/G + (1 - 1/G) W / T of full attention's cache.
    let g = spec.layers.len() as f64
        / spec
            .layers
            .iter()
            .filter(|&&k| spec.kinds[k].attention == "global")
            .count()
            .max(1) as f64;
    let window = decode
        .plan()
        .caches
        .iter()
        .filter_map(|c| c.ring)
        .max()
        .unwrap_or(0) as f64;
    let predicted = 1.0 / g + (1.0 - 1.0 / g) * window / tokens_held as f64;
    emit(
        args,
        &[
            ("name", name.into()),
            ("model", spec.name.clone().into()),
            ("seq_len", t.into()),
            ("threads", decode.threads().into()),
            (
                "what",
                format!("decode steps after a prompt of {t} tokens").into(),
            ),
            ("time_ms", (time * 1e3).into()),
            ("tokens_per_s", (1.0 / time).into()),
            (
                "gflops",
                (2.0 * spec.parameter_count() as f64 / time / 1e9).into(),
            ),
            ("kv_cache_bytes", held.into()),
            ("full_attention_kv_cache_bytes", full.into()),
            ("kv_cache_fraction", (held as f64 / full as f64).into()),
            ("predicted_fraction", predicted.into()),
        ],
    );
    Ok(())
}

/// With both decoding benchmarks run, the Zebra layout's speedup over all-global.
fn compare_decoding(args: &BenchArgs) {
    let records = args.records.borrow();
    let find = |n: &str| {
        records
            .iter()
            .find(|r| r.get("name").and_then(|v| v.as_str()) == Some(n))
            .and_then(|r| r.get("tokens_per_s")?.as_f64())
    };
    if let (Some(zebra), Some(global)) = (find("decode-zebra"), find("decode-all-global")) {
        let record: serde_json::Map<String, serde_json::Value> = [
            ("name".to_string(), "decode-zebra".into()),
            ("compare".to_string(), "zebra vs all-global layers".into()),
            ("seq_len".to_string(), args.seq_len.into()),
            ("zebra_tokens_per_s".to_string(), zebra.into()),
            ("all_global_tokens_per_s".to_string(), global.into()),
            ("speedup".to_string(), (zebra / global).into()),
        ]
        .into_iter()
        .collect();
        drop(records);
        print_record(args, &record);
    }
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    for name in args.names {
        if !NAMES.contains(&name.as_str()) {
            bail!(
                "unknown benchmark `{name}`; the benchmarks are {}",
                NAMES.join(", ")
            );
        }
    }
    if args.batch == 0 || args.seq_len == 0 {
        bail!("--batch and --seq-len must be positive");
    }
    let selected: Vec<&str> = if args.names.is_empty() {
        DEFAULT.to_vec()
    } else {
        args.names.iter().map(String::as_str).collect()
    };
    // ZEBRA_BENCH_DIR keeps the artifacts (for profilers, which need the libraries).
    let keep = std::env::var_os("ZEBRA_BENCH_DIR").map(PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("zebra-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        for name in selected {
            match name {
                "attention-local" => attention(
                    args,
                    name,
                    &format!("k <= q && q - k < {}", args.window),
                    &dir,
                )?,
                "attention-global" => attention(args, name, "k <= q", &dir)?,
                "attention-per-head" => {
                    attention(args, name, &per_head_windows(args.window), &dir)?
                }
                "forward-zebra" => forward(args, name, false, &dir)?,
                "forward-all-global" => forward(args, name, true, &dir)?,
                "compile-cold" => compile(args, name, true, &dir)?,
                "compile-warm" => compile(args, name, false, &dir)?,
                "train-zebra" => train(args, name, &dir)?,
                "decode-zebra" => decode(args, name, false, &dir)?,
                _ => decode(args, name, true, &dir)?,
            }
        }
        compare_decoding(args);
        if let Some(python) = &args.torch {
            compare_with_torch(args, python)?;
        }
        Ok(())
    })();
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
