//! `zebra-run`: runs compiled artifacts without the compiler. It links neither MLIR nor LLVM
//! (a few megabytes), so it is what goes to a machine that has no Rust toolchain: compile
//! there with `zebra compile FILE.zb --emit artifact [--for generate|train] -o DIR`, copy DIR
//! and this binary, and run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use ndarray::{ArrayD, Axis};
use zebra_ir::{Weights, npy};
use zebra_runtime::cuda::CudaModel;
use zebra_runtime::data::{Recall, Source, Text};
use zebra_runtime::generate::Generator;
use zebra_runtime::optim::{AdamW, AdamWConfig};
use zebra_runtime::sample::{Sampler, Sampling};
use zebra_runtime::train::Trainer;
use zebra_runtime::{Artifact, CpuModel, Executor, Tensor};

#[derive(Parser)]
#[command(
    name = "zebra-run",
    version,
    about = "Runs compiled Zebra artifacts (no compiler needed)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe an artifact: its model, target, kernels, inputs and outputs.
    Info { artifact: PathBuf },
    /// A forward pass: token ids in (.npy, [B, T] or [T]), outputs out (.npy, the first
    /// output, `logits`, unless --name picks another).
    Forward {
        artifact: PathBuf,
        #[arg(long, required_unless_present = "random_weights")]
        weights: Option<PathBuf>,
        /// Deterministic random weights of the plan's shapes instead of --weights (norm gains
        /// 1, the rest of standard deviation 0.02), for benchmarks of large models.
        #[arg(long, conflicts_with = "weights")]
        random_weights: Option<u64>,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 0, value_parser = zebra_runtime::parse_threads)]
        threads: usize,
        /// `cpu`, or `cuda` for an artifact compiled with --target sm_80 or sm_90.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Timed passes after the first (which loads kernels and warms caches); the median is
        /// reported. 0: time the first pass.
        #[arg(long, default_value_t = 0)]
        repeat: usize,
        /// Also print the timing as a JSON line on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Decode given tokens (teacher-forced) with an artifact built with `--for generate`: the
    /// first --prompt-len tokens are prefilled, the rest decoded one by one; writes the
    /// logits of every decode step, `[steps, vocab]` (a check of the KV-cache path).
    Decode {
        artifact: PathBuf,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long)]
        prompt_len: usize,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 0, value_parser = zebra_runtime::parse_threads)]
        threads: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Compare two .npy arrays: the largest difference, relative to the largest value of the
    /// second; fails above --tolerance. Two .safetensors files: every tensor so (the same
    /// names and shapes), the worst one reported.
    Diff {
        a: PathBuf,
        b: PathBuf,
        #[arg(long, allow_negative_numbers = true, default_value_t = 1e-4)]
        tolerance: f64,
    },
    /// Generate text from an artifact built with `--for generate`, streaming it.
    Generate {
        artifact: PathBuf,
        #[arg(long, required_unless_present = "random_weights")]
        weights: Option<PathBuf>,
        /// Deterministic random weights of the plan's shapes instead of --weights, for
        /// benchmarks of decoding with large models.
        #[arg(long, conflicts_with = "weights")]
        random_weights: Option<u64>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 0, value_parser = zebra_runtime::parse_threads)]
        threads: usize,
        /// `cpu`, or `cuda` for an artifact compiled with --target sm_80 or sm_90.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Training steps with an artifact built with `--for train`: one JSON line per step; the
    /// trained weights are written to --out.
    Train {
        artifact: PathBuf,
        #[arg(long, required_unless_present = "random_weights")]
        weights: Option<PathBuf>,
        /// Deterministic random weights of the plan's shapes instead of --weights, for
        /// benchmarks of large models.
        #[arg(long, conflicts_with = "weights")]
        random_weights: Option<u64>,
        /// A text file or folder; without it, the built-in recall task.
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value_t = Recall::DEFAULT_PAIRS)]
        pairs: usize,
        #[arg(long, default_value_t = 10)]
        steps: u64,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0, value_parser = zebra_runtime::parse_threads)]
        threads: usize,
        /// `cpu`, or `cuda` for an artifact compiled with --target sm_80 or sm_90.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Run the tensor-core attention kernels of an artifact built with `zebra compile --for
    /// attention --target sm_80|sm_90 --emit artifact` on random 16-bit inputs: one JSON line
    /// per kernel with its median time, TFLOP/s over the visible score elements, and the
    /// check of sampled output rows against an f64 reference. Fails if a check fails.
    Attention {
        artifact: PathBuf,
        /// The sequence length of the random inputs.
        #[arg(long, default_value_t = 4096, value_parser = zebra_runtime::parse_positive)]
        seq_len: usize,
        /// Their batch size.
        #[arg(long, default_value_t = 1, value_parser = zebra_runtime::parse_positive)]
        batch: usize,
        /// Timed runs per kernel (the median is reported).
        #[arg(long, default_value_t = 20, value_parser = zebra_runtime::parse_positive)]
        repeats: usize,
        /// Output rows checked against the reference (0: none).
        #[arg(long, default_value_t = 64)]
        check_rows: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write q, k, v and out (f32 .npy) under DIR/{kernel}/ for other tools to compare.
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
    },
    /// Time and check every candidate of a tuning run that `zebra tune FILE --target sm_90 -o
    /// DIR` prepared, each in a process of its own (a kernel that hangs or crashes costs its
    /// candidate only), and write DIR/results.json for `zebra tune --record DIR`.
    Tune {
        run: PathBuf,
        /// The sequence length of the random inputs (default: the one `zebra tune` was given).
        #[arg(long, value_parser = zebra_runtime::parse_positive)]
        seq_len: Option<usize>,
        /// Their batch size.
        #[arg(long, default_value_t = 1, value_parser = zebra_runtime::parse_positive)]
        batch: usize,
        /// Timed runs per candidate, the median counts (default: as `zebra tune` was given).
        #[arg(long, value_parser = zebra_runtime::parse_positive)]
        repeats: Option<usize>,
        /// Output rows checked against the reference.
        #[arg(long, default_value_t = 16, value_parser = zebra_runtime::parse_positive)]
        check_rows: usize,
        /// Seconds a candidate may take before it counts as hung and is stopped.
        #[arg(long, default_value_t = 60, value_parser = zebra_runtime::parse_positive)]
        timeout: usize,
    },
}

fn read_tokens(path: &Path) -> Result<ArrayD<i64>> {
    let tokens = npy::read_ints(path)?;
    let tokens = match tokens.ndim() {
        1 => tokens.insert_axis(Axis(0)),
        2 => tokens,
        n => bail!(
            "{}: the token array must be [B, T], found {n} dimensions",
            path.display()
        ),
    };
    if tokens.is_empty() {
        bail!("{}: the token array is empty", path.display());
    }
    Ok(tokens)
}

/// A plan loaded on `device` (`cpu` or `cuda`), and what to call the device.
fn executor(
    device: &str,
    artifact: &Path,
    weights: &Weights,
    threads: usize,
) -> Result<(Box<dyn Executor>, String)> {
    Ok(match device {
        "cpu" => (
            Box::new(CpuModel::load(artifact, weights, threads)?),
            "the CPU".into(),
        ),
        "cuda" => {
            let model = CudaModel::load(artifact, weights)?;
            let name = model.device.clone();
            (Box::new(model), name)
        }
        other => bail!("unknown device `{other}`: `cpu` or `cuda`"),
    })
}

/// The largest difference of two arrays of one shape, relative to the largest value of the
/// second, and absolute; a NaN anywhere counts as an infinite difference.
fn diff_arrays(x: &ArrayD<f64>, y: &ArrayD<f64>) -> Result<(f64, f64)> {
    if x.shape() != y.shape() {
        bail!("the shapes differ: {:?} and {:?}", x.shape(), y.shape());
    }
    // Relative to the reference's largest finite magnitude; a NaN anywhere, or an infinity
    // that the other array does not hold at the same place, is an infinite difference.
    let scale = y
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-30);
    let (mut worst, mut broken) = (0.0f64, false);
    for (p, q) in x.iter().zip(y) {
        if p.is_finite() && q.is_finite() {
            worst = worst.max((p - q).abs());
        } else if p.is_nan() || q.is_nan() || p != q {
            broken = true;
        }
    }
    Ok((if broken { f64::INFINITY } else { worst / scale }, worst))
}

/// [`diff_arrays`] for every tensor of two weight files (the same names and shapes): the
/// worst relative difference, its absolute difference and the tensor's name.
fn diff_weights(a: &Weights, b: &Weights) -> Result<(f64, f64, Option<String>)> {
    let names: Vec<&str> = a.names().collect();
    if names != b.names().collect::<Vec<_>>() {
        bail!("the files hold different tensors");
    }
    let mut worst = (0.0, 0.0, None);
    for name in names {
        let x = a.get(name).expect("listed").mapv(f64::from);
        let y = b.get(name).expect("listed").mapv(f64::from);
        let (relative, absolute) =
            diff_arrays(&x, &y).with_context(|| format!("tensor `{name}`"))?;
        if worst.2.is_none() || relative > worst.0 {
            worst = (relative, absolute, Some(name.to_string()));
        }
    }
    Ok(worst)
}

fn load_weights(path: &Path) -> Result<Weights> {
    Weights::load(path).with_context(|| format!("cannot load the weights {}", path.display()))
}

/// The weights from `--weights FILE` (with a warning naming the tensors the artifact's plan
/// does not read), or `--random-weights SEED` of the artifact's shapes.
fn weights_of(path: Option<&Path>, seed: Option<u64>, artifact: &Path) -> Result<Weights> {
    match (path, seed) {
        (Some(path), _) => {
            let weights = load_weights(path)?;
            let plan = Artifact::load(artifact)?.plan;
            let reads = |name: &str| plan.weights.iter().any(|w| w.name == name);
            if let Some(warning) = weights.unread_warning(&plan.name, reads) {
                eprintln!("{warning}");
            }
            Ok(weights)
        }
        (None, Some(seed)) => Ok(zebra_runtime::artifact::random_weights(
            &Artifact::load(artifact)?.plan,
            seed,
        )?),
        (None, None) => bail!("give the weights: --weights FILE or --random-weights SEED"),
    }
}

fn info(dir: &Path, out: &mut dyn Write) -> Result<()> {
    let parts: Vec<PathBuf> = if dir.join("prefill").is_dir() {
        vec![dir.join("prefill"), dir.join("decode")]
    } else {
        vec![dir.to_path_buf()]
    };
    for part in parts {
        let plan = Artifact::load(&part)?.plan;
        writeln!(out, "{}", part.display())?;
        writeln!(out, "  model      {}", plan.name)?;
        writeln!(out, "  target     {}", plan.target)?;
        writeln!(out, "  kernels    {}", plan.kernels.len())?;
        // Kernels with a GPU-shaped version: on tensor cores (a 16-bit type), or in f32 (the
        // decode steps' attention).
        for (label, f32_kernels) in [("tensor", false), ("gpu", true)] {
            let shaped: Vec<(&str, &str)> = plan
                .kernels
                .iter()
                .filter_map(|k| Some((k.symbol.as_str(), k.tensor_cores.as_ref()?.dtype.as_str())))
                .filter(|(_, dtype)| (*dtype == "f32") == f32_kernels)
                .collect();
            let Some((_, dtype)) = shaped.first() else {
                continue;
            };
            // Kinds of kernels, from their symbols (`zebra_attention_dq_<hash>`).
            let mut kinds: Vec<&str> = Vec::new();
            for (symbol, _) in &shaped {
                let symbol = symbol.strip_prefix("zebra_").unwrap_or(symbol);
                let kind = symbol.rsplit_once('_').map_or(symbol, |(kind, _)| kind);
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
            let what = if f32_kernels {
                "GPU-shaped"
            } else {
                "on tensor cores"
            };
            writeln!(
                out,
                "  {label:<10} {} kernels {what} ({dtype}): {}",
                shaped.len(),
                kinds.join(", ")
            )?;
        }
        if plan.packed.iter().any(|p| p.bf16) {
            writeln!(out, "  weights    the projections' in bf16")?;
        }
        writeln!(out, "  max T      {}", plan.max_seq_len)?;
        let inputs: Vec<&str> = plan.inputs.iter().map(|i| i.name.as_str()).collect();
        writeln!(out, "  inputs     {}", inputs.join(", "))?;
        let outputs: Vec<&str> = plan
            .outputs
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !n.starts_with("cache:"))
            .collect();
        let shown = if outputs.len() > 6 {
            format!(
                "{}, ... ({} in all)",
                outputs[..6].join(", "),
                outputs.len()
            )
        } else {
            outputs.join(", ")
        };
        writeln!(out, "  outputs    {shown}")?;
        if !plan.caches.is_empty() {
            let caches: Vec<String> = plan
                .caches
                .iter()
                .map(|c| match c.ring {
                    None => "all".to_string(),
                    Some(r) if c.sinks > 0 => format!("{}+{r}", c.sinks),
                    Some(r) => r.to_string(),
                })
                .collect();
            writeln!(out, "  KV caches  {}", caches.join(" "))?;
        }
        if let Some(optimizer) = &plan.optimizer {
            let parameters: usize = optimizer
                .params
                .iter()
                .map(|p| plan.weights[p.weight].len())
                .sum();
            let packed = optimizer.update.len() - optimizer.params.len();
            writeln!(
                out,
                "  optimizer  AdamW over {} weights ({parameters} parameters), then {packed} packed weights again",
                optimizer.params.len()
            )?;
        }
    }
    Ok(())
}

/// Runs a command, writing its results to `out` (standard output for the binary).
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<()> {
    match cli.command {
        Command::Info { artifact } => info(&artifact, out),
        Command::Attention {
            artifact,
            seq_len,
            batch,
            repeats,
            check_rows,
            seed,
            save,
        } => {
            let options = zebra_runtime::cuda_attention::AttentionOptions {
                seq_len,
                batch,
                repeats,
                check_rows,
                seed,
                save,
            };
            let runs = zebra_runtime::cuda_attention::run_attention(&artifact, &options)?;
            let mut failed = Vec::new();
            for run in &runs {
                writeln!(out, "{}", serde_json::to_string(run)?)?;
                if !run.ok {
                    failed.push(run.name.clone());
                }
            }
            if !failed.is_empty() {
                bail!(
                    "the GPU's output differs from the reference beyond the tolerance for {}",
                    failed.join(", ")
                );
            }
            Ok(())
        }
        Command::Tune {
            run,
            seq_len,
            batch,
            repeats,
            check_rows,
            timeout,
        } => tune(
            &run,
            &TuneOptions {
                seq_len,
                batch,
                repeats,
                check_rows,
                timeout: std::time::Duration::from_secs(timeout as u64),
            },
            out,
        ),
        Command::Forward {
            artifact,
            weights,
            random_weights,
            tokens,
            output,
            name,
            threads,
            device,
            repeat,
            json,
        } => {
            let weights = weights_of(weights.as_deref(), random_weights, &artifact)?;
            let tokens = read_tokens(&tokens)?;
            let shape = tokens.shape().to_vec();
            let mut inputs = BTreeMap::new();
            inputs.insert("tokens".to_string(), Tensor::I64(tokens));
            let (mut model, on) = executor(&device, &artifact, &weights, threads)?;
            // The first pass, then `repeat` timed ones: their median (else the first's time).
            let start = Instant::now();
            let mut outputs = model.run(&inputs)?;
            let mut times = vec![start.elapsed()];
            if repeat > 0 {
                times.clear();
                for _ in 0..repeat {
                    let start = Instant::now();
                    outputs = model.run(&inputs)?;
                    times.push(start.elapsed());
                }
            }
            times.sort();
            let elapsed = times[times.len() / 2];
            let names: Vec<String> = model.plan().outputs.iter().map(|o| o.0.clone()).collect();
            if json {
                let tokens: usize = shape.iter().product();
                let seconds = elapsed.as_secs_f64();
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "artifact": artifact.display().to_string(),
                        "device": on,
                        "tokens_shape": shape,
                        "time_ms": seconds * 1e3,
                        "tokens_per_s": tokens as f64 / seconds.max(1e-12),
                        "timed_passes": repeat.max(1),
                    })
                )?;
            }
            let name = name.unwrap_or_else(|| names.first().cloned().unwrap_or("logits".into()));
            let value = outputs.remove(&name).ok_or_else(|| {
                anyhow!(
                    "the artifact has no output `{name}`; it has {}",
                    names.join(", ")
                )
            })?;
            npy::write(&output, &value)?;
            eprintln!(
                "wrote {} {:?} in {:.1} ms on {on}",
                output.display(),
                value.shape(),
                elapsed.as_secs_f64() * 1e3
            );
            Ok(())
        }
        Command::Decode {
            artifact,
            weights,
            tokens,
            prompt_len,
            output,
            threads,
            device,
        } => {
            let weights = load_weights(&weights)?;
            let mut generator = match device.as_str() {
                "cpu" => Generator::load(&artifact, &weights, threads)?,
                "cuda" => Generator::load_cuda(&artifact, &weights)?,
                other => bail!("unknown device `{other}`: `cpu` or `cuda`"),
            };
            let tokens = read_tokens(&tokens)?;
            let all: Vec<i64> = tokens
                .index_axis(ndarray::Axis(0), 0)
                .iter()
                .copied()
                .collect();
            if prompt_len == 0 || prompt_len >= all.len() {
                bail!(
                    "--prompt-len must be between 1 and the number of tokens less one ({})",
                    all.len() - 1
                );
            }
            let prompt =
                ndarray::Array2::from_shape_vec((1, prompt_len), all[..prompt_len].to_vec())?
                    .into_dyn();
            let inputs = BTreeMap::from([("tokens".to_string(), Tensor::I64(prompt))]);
            let outputs = generator.prefill.run(&inputs)?;
            generator.decode.start_decode(&outputs)?;
            let mut rows = Vec::new();
            for &token in &all[prompt_len..] {
                let step = generator
                    .decode
                    .decode(&ndarray::ArrayD::from_elem(ndarray::IxDyn(&[1, 1]), token))?;
                rows.extend(step["logits"].iter().copied());
            }
            let steps = all.len() - prompt_len;
            let vocab = rows.len() / steps;
            let logits = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[steps, vocab]), rows)?;
            npy::write(&output, &logits)?;
            Ok(())
        }
        Command::Diff { a, b, tolerance } => {
            if !(tolerance >= 0.0 && tolerance.is_finite()) {
                bail!("--tolerance must be 0 or a positive number, found {tolerance}");
            }
            let safetensors = |p: &Path| p.extension().is_some_and(|e| e == "safetensors");
            let (relative, worst, tensor) = if safetensors(&a) && safetensors(&b) {
                diff_weights(&load_weights(&a)?, &load_weights(&b)?)?
            } else {
                let (relative, worst) =
                    diff_arrays(&npy::read_floats(&a)?, &npy::read_floats(&b)?)?;
                (relative, worst, None)
            };
            let ok = relative.is_finite() && relative <= tolerance;
            let mut report = serde_json::json!({"max_abs_diff": worst, "relative": relative,
                "tolerance": tolerance, "ok": ok});
            if let Some(name) = &tensor {
                report["tensor"] = name.clone().into();
            }
            writeln!(out, "{report}")?;
            if !ok {
                bail!("the arrays differ by {relative:.3e} (relative), above {tolerance:e}");
            }
            Ok(())
        }
        Command::Generate {
            artifact,
            weights,
            random_weights,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            threads,
            device,
        } => {
            let sampling = Sampling {
                temperature,
                top_k,
                top_p,
            };
            sampling.check().map_err(|e| anyhow!(e))?;
            if !artifact.join("prefill").is_dir() {
                bail!(
                    "{} is not a generation artifact: build one with `zebra compile FILE.zb \
                     --emit artifact --for generate -o DIR`",
                    artifact.display()
                );
            }
            let weights = weights_of(
                weights.as_deref(),
                random_weights,
                &artifact.join("prefill"),
            )?;
            let mut generator = match device.as_str() {
                "cpu" => Generator::load(&artifact, &weights, threads)?,
                "cuda" => Generator::load_cuda(&artifact, &weights)?,
                other => bail!("unknown device `{other}`: `cpu` or `cuda`"),
            };
            let tokens = zebra_runtime::data::encode(&prompt);
            if tokens.is_empty() {
                bail!("the prompt is empty");
            }
            if tokens.len() < generator.min_prompt() {
                bail!(
                    "the prompt must hold at least {} tokens for this model's masks",
                    generator.min_prompt()
                );
            }
            out.write_all(prompt.as_bytes())?;
            let mut sampler = Sampler::new(sampling, seed);
            let stats = generator.generate(&tokens, max_tokens, &mut sampler, |t| {
                out.write_all(&[t as u8])?;
                out.flush()?;
                Ok(std::ops::ControlFlow::Continue(()))
            })?;
            writeln!(out)?;
            if !stats.ended && stats.generated < max_tokens {
                eprintln!(
                    "stopped after {} tokens: the artifact's context of {} positions is full \
                     (compile it with a larger --max-seq-len)",
                    stats.generated,
                    generator.context()
                );
            }
            eprintln!(
                "{} tokens, {:.1} tokens/s; KV cache {} bytes ({:.1}% of full attention's)",
                stats.generated,
                stats.generated.saturating_sub(1) as f64 / stats.decode.as_secs_f64().max(1e-9),
                stats.cache_bytes,
                100.0 * stats.cache_bytes as f64 / stats.full_cache_bytes.max(1) as f64
            );
            Ok(())
        }
        Command::Train {
            artifact,
            weights,
            random_weights,
            data,
            pairs,
            steps,
            seq_len,
            batch,
            lr,
            seed,
            out: out_path,
            threads,
            device,
        } => {
            if steps == 0 || seq_len == 0 || batch == 0 {
                bail!("--steps, --seq-len and --batch must be positive");
            }
            let config = AdamWConfig {
                lr,
                total_steps: steps,
                warmup_steps: (steps / 20).clamp(1, 200),
                ..AdamWConfig::default()
            };
            config.check().map_err(|e| anyhow!(e))?;
            let mut source: Box<dyn Source> = match &data {
                Some(path) => Box::new(Text::open(path, seed)?),
                None => Box::new(Recall::new(pairs, seed)?),
            };
            let first = source.next_batch(batch, seq_len)?;
            let weights = weights_of(weights.as_deref(), random_weights, &artifact)?;
            let (executor, _) = executor(&device, &artifact, &weights, threads)?;
            let mut trainer = Trainer::with_executor(executor, AdamW::default(), config)?;
            let mut pending = Some(first);
            for step in 1..=steps {
                let b = match pending.take() {
                    Some(b) => b,
                    None => source.next_batch(batch, seq_len)?,
                };
                let start = Instant::now();
                let report = trainer.step(&b)?;
                let seconds = start.elapsed().as_secs_f64();
                if !report.loss.is_finite() {
                    bail!("the loss diverged at step {step}; try a lower --lr");
                }
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"step": step, "loss": report.loss, "lr": report.lr,
                        "grad_norm": report.grad_norm,
                        "tokens_per_s": (b.batch * b.seq) as f64 / seconds})
                )?;
            }
            trainer.weights()?.save(&out_path)?;
            eprintln!("wrote {}", out_path.display());
            Ok(())
        }
    }
}

/// What `zebra-run tune` was asked (the sequence length and repeats: else the run's own).
pub struct TuneOptions {
    pub seq_len: Option<usize>,
    pub batch: usize,
    pub repeats: Option<usize>,
    pub check_rows: usize,
    pub timeout: std::time::Duration,
}

/// Runs every candidate of the tuning run in `dir` through `zebra-run attention`, one process
/// each, and writes `dir/results.json`. Fails when no candidate of some attention passed.
pub fn tune(dir: &Path, options: &TuneOptions, out: &mut dyn Write) -> Result<()> {
    use zebra_runtime::tuning::{TUNE_FORMAT, TuneManifest, TuneResults};
    let manifest = TuneManifest::load(dir)?;
    if !zebra_runtime::cuda::driver_present() {
        bail!(
            "no NVIDIA driver was found (libcuda.so cannot be loaded): tuning times the \
             kernels on the GPU; run this on the GPU machine"
        );
    }
    let device = zebra_runtime::cuda::device_name()?;
    let seq_len = options.seq_len.unwrap_or(manifest.seq_len);
    let repeats = options.repeats.unwrap_or(manifest.repeats);
    let exe = std::env::current_exe().context("cannot find this program to run candidates")?;
    let mut results = TuneResults {
        format: TUNE_FORMAT,
        device,
        seq_len,
        batch: options.batch,
        runs: Vec::new(),
    };
    let path = dir.join("results.json");
    // Written after every candidate, so that a run cut short keeps what it measured.
    let mut save = |runs: &[zebra_runtime::tuning::TuneRun]| -> Result<()> {
        results.runs = runs.to_vec();
        results
            .save(dir)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    let runs = run_candidates(
        &manifest,
        |candidate| {
            let mut command = std::process::Command::new(&exe);
            command
                .arg("attention")
                .arg(dir.join(&candidate.dir))
                .args(["--seq-len", &seq_len.to_string()])
                .args(["--batch", &options.batch.to_string()])
                .args(["--repeats", &repeats.to_string()])
                .args(["--check-rows", &options.check_rows.to_string()]);
            run_with_timeout(command, options.timeout)
        },
        &mut save,
        out,
    )?;
    writeln!(
        out,
        "wrote {}; record it with `zebra tune --record {}`",
        dir.join("results.json").display(),
        dir.display()
    )?;
    let failed: Vec<&str> = manifest
        .attentions
        .iter()
        .enumerate()
        .filter(|&(i, _)| {
            !manifest
                .candidates
                .iter()
                .zip(&runs)
                .any(|(c, r)| c.attention == i && r.ok)
        })
        .map(|(_, a)| a.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "no candidate of {} ran and passed its check",
            failed.join(", ")
        );
    }
    Ok(())
}

/// Runs each candidate of `manifest` through `run` (its standard output, or why it failed),
/// printing a line per candidate and handing the runs so far to `save` after each. A candidate that hung (`run` stopped it) skips the later
/// candidates of its product instruction: a hang is most likely a bug of that instruction's
/// kernel, and each would cost the whole time limit.
fn run_candidates(
    manifest: &zebra_runtime::tuning::TuneManifest,
    mut run: impl FnMut(&zebra_runtime::tuning::TuneCandidate) -> Result<String, String>,
    save: &mut dyn FnMut(&[zebra_runtime::tuning::TuneRun]) -> Result<()>,
    out: &mut dyn Write,
) -> Result<Vec<zebra_runtime::tuning::TuneRun>> {
    use zebra_runtime::tuning::TuneRun;
    let failed = |dir: &str, error: String| TuneRun {
        dir: dir.to_string(),
        time_ms: None,
        worst_error: None,
        ok: false,
        error: Some(error),
    };
    let mut runs = Vec::new();
    let mut hung: Vec<&str> = Vec::new();
    for (i, candidate) in manifest.candidates.iter().enumerate() {
        let attention = &manifest.attentions[candidate.attention];
        let result = if hung.contains(&candidate.mma.as_str()) {
            failed(
                &candidate.dir,
                format!("skipped: an earlier {} candidate hung", candidate.mma),
            )
        } else {
            match run(candidate) {
                Ok(stdout) => candidate_run(&candidate.dir, &stdout),
                Err(error) => {
                    if error.starts_with(STOPPED) {
                        hung.push(&candidate.mma);
                    }
                    failed(&candidate.dir, error)
                }
            }
        };
        let how = match (&result.time_ms, &result.error) {
            (Some(time), None) => format!(
                "{time:.3} ms, error {:.3} of the tolerance",
                result.worst_error.unwrap_or(0.0)
            ),
            (Some(time), Some(error)) => format!("{time:.3} ms, {error}"),
            (None, error) => error.clone().unwrap_or_default(),
        };
        writeln!(
            out,
            "[{}/{}] @{} {} {}x{}{}: {how}",
            i + 1,
            manifest.candidates.len(),
            attention.name,
            candidate.mma,
            candidate.block_q,
            candidate.block_k,
            if candidate.default { " (default)" } else { "" },
        )?;
        runs.push(result);
        save(&runs)?;
    }
    Ok(runs)
}

/// A candidate's result from what `zebra-run attention` printed: its one JSON line.
fn candidate_run(dir: &str, stdout: &str) -> zebra_runtime::tuning::TuneRun {
    let line = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("time_ms").is_some());
    let number = |value: &serde_json::Value, key: &str| value.get(key).and_then(|v| v.as_f64());
    match line {
        Some(value) => {
            let ok = value.get("ok").and_then(|v| v.as_bool()) == Some(true);
            zebra_runtime::tuning::TuneRun {
                dir: dir.to_string(),
                time_ms: number(&value, "time_ms"),
                worst_error: number(&value, "worst_error"),
                ok,
                error: (!ok).then(|| "the output differs from the reference".to_string()),
            }
        }
        None => zebra_runtime::tuning::TuneRun {
            dir: dir.to_string(),
            time_ms: None,
            worst_error: None,
            ok: false,
            error: Some("zebra-run attention printed no result".into()),
        },
    }
}

/// How [`run_with_timeout`]'s error for a process it stopped begins.
const STOPPED: &str = "stopped after";

/// Runs `command` to its end or until `timeout`, when it is killed; returns its standard
/// output, or why it failed (its last line of standard error, or the timeout).
fn run_with_timeout(
    mut command: std::process::Command,
    timeout: std::time::Duration,
) -> Result<String, String> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start a candidate: {e}"))?;
    let mut readers = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .map(|pipe| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    })
    .into_iter();
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for a candidate: {e}")),
        }
    };
    let Some(status) = status else {
        // Its pipes' readers are left to finish on their own: a process it started may hold
        // them open.
        return Err(format!("{STOPPED} {} s (hung?)", timeout.as_secs_f64()));
    };
    let mut read = || {
        readers
            .next()
            .and_then(|r| r.join().ok())
            .unwrap_or_default()
    };
    let (stdout, stderr) = (read(), read());
    if !status.success() && !stdout.contains("time_ms") {
        // A failed check exits non-zero but still prints its result; anything else says why.
        return Err(stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map_or_else(|| format!("exited with {status}"), |l| l.trim().to_string()));
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> std::process::Command {
        let mut command = std::process::Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn diff_finds_nans_and_stray_infinities() {
        let array =
            |v: &[f64]| ArrayD::from_shape_vec(ndarray::IxDyn(&[v.len()]), v.to_vec()).unwrap();
        let inf = f64::INFINITY;
        let (relative, worst) = diff_arrays(&array(&[1.0, 2.5]), &array(&[1.0, 2.0])).unwrap();
        assert_eq!((relative, worst), (0.25, 0.5));
        // Infinities at the same place are equal; the rest is compared to the finite values.
        let (relative, _) = diff_arrays(&array(&[inf, 0.0]), &array(&[inf, 4.0])).unwrap();
        assert_eq!(relative, 1.0);
        for (x, y) in [
            (array(&[f64::NAN, 1.0]), array(&[f64::NAN, 1.0])),
            (array(&[inf, 1.0]), array(&[1.0, 1.0])),
            (array(&[1.0, 1.0]), array(&[-inf, 1.0])),
            (array(&[inf]), array(&[-inf])),
        ] {
            assert_eq!(diff_arrays(&x, &y).unwrap().0, inf, "{x} {y}");
        }
        assert!(diff_arrays(&array(&[1.0]), &array(&[1.0, 2.0])).is_err());
    }

    #[test]
    fn a_candidate_that_hangs_is_stopped_and_one_that_fails_says_why() {
        let timeout = std::time::Duration::from_millis(300);
        let started = Instant::now();
        let error = run_with_timeout(shell("sleep 30"), timeout).unwrap_err();
        assert!(error.starts_with("stopped after 0.3 s"), "{error}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));

        let error = run_with_timeout(
            shell("echo 'error: the driver refused the PTX' >&2; exit 1"),
            timeout * 10,
        )
        .unwrap_err();
        assert_eq!(error, "error: the driver refused the PTX");

        // A failed check exits non-zero after printing its result: a run that did not pass.
        let stdout = run_with_timeout(
            shell(r#"echo '{"time_ms": 0.25, "worst_error": 4.5, "ok": false}'; exit 1"#),
            timeout * 10,
        )
        .unwrap();
        let run = candidate_run("a0-sync-128x64", &stdout);
        assert_eq!(
            (run.time_ms, run.worst_error, run.ok),
            (Some(0.25), Some(4.5), false)
        );
        assert!(run.error.is_some());

        let run = candidate_run(
            "a0-sync-64x64",
            "{\"time_ms\": 0.5, \"worst_error\": 0.1, \"ok\": true}\n",
        );
        assert_eq!(
            (run.time_ms, run.worst_error, run.ok, run.error),
            (Some(0.5), Some(0.1), true, None)
        );
        let run = candidate_run("a0-sync-64x64", "not json\n");
        assert!(!run.ok && run.time_ms.is_none());
    }

    #[test]
    fn a_hung_candidate_skips_the_later_ones_of_its_instruction() {
        use zebra_runtime::tuning::{TUNE_FORMAT, TuneCandidate, TuneManifest, TunedAttention};
        let candidate = |dir: &str, mma: &str, default: bool| TuneCandidate {
            dir: dir.into(),
            attention: 0,
            mma: mma.into(),
            block_q: 64,
            block_k: 64,
            default,
        };
        let manifest = TuneManifest {
            format: TUNE_FORMAT,
            target: "sm_90".into(),
            dtype: "bf16".into(),
            source: "model.zb".into(),
            seq_len: 4096,
            repeats: 20,
            attentions: vec![TunedAttention {
                name: "local".into(),
                mask: "k <= q && q - k < 32".into(),
                score: None,
                sides: vec![],
                heads: 4,
                kv_heads: 2,
                head_dim: 64,
            }],
            candidates: vec![
                candidate("a0-sync-128x64", "sync", true),
                candidate("a0-wgmma-64x64", "wgmma", false),
                candidate("a0-sync-64x64", "sync", false),
                candidate("a0-wgmma-64x32", "wgmma", false),
            ],
        };
        let mut ran = Vec::new();
        let mut out = Vec::new();
        let mut saved = Vec::new();
        let runs = run_candidates(
            &manifest,
            |c| {
                ran.push(c.dir.clone());
                match c.mma.as_str() {
                    "wgmma" => Err(format!("{STOPPED} 30 s (hung?)")),
                    _ => Ok("{\"time_ms\": 1.5, \"worst_error\": 0.1, \"ok\": true}".into()),
                }
            },
            &mut |runs| {
                saved.push(runs.len());
                Ok(())
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(ran, ["a0-sync-128x64", "a0-wgmma-64x64", "a0-sync-64x64"]);
        // The runs so far are saved after each candidate.
        assert_eq!(saved, [1, 2, 3, 4]);
        let oks: Vec<bool> = runs.iter().map(|r| r.ok).collect();
        assert_eq!(oks, [true, false, true, false]);
        assert_eq!(
            runs[3].error.as_deref(),
            Some("skipped: an earlier wgmma candidate hung")
        );
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("[1/4] @local sync 64x64 (default): 1.500 ms"),
            "{out}"
        );
    }
}
