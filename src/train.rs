//! `zebra train`: compiles a model's training step and trains it, with a progress bar, a
//! metrics log, a loss curve, checkpoints every K steps (and on Ctrl-C), and exact resumption.
//!
//! A run directory holds:
//!
//! ```text
//! model.zb             the model's source (the run does not depend on the original file)
//! checkpoint.json      the current checkpoint and the run's configuration
//! checkpoints/         weights (Hugging Face names) and optimizer state, per checkpoint
//! metrics.jsonl        one JSON object per step
//! loss.svg             the loss curve, written at the end
//! artifacts/train/     the compiled training step
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use zebra_frontend::ModelSpec;
use zebra_ir::{Graph, Weights};
use zebra_runtime::checkpoint::{self, CheckpointMeta, RunConfig};
use zebra_runtime::data::{Recall, Source, Text};
use zebra_runtime::optim::{AdamW, AdamWConfig};
use zebra_runtime::train::Trainer;

use crate::device::{Device, DeviceArgs};
use crate::text::Codec;

/// The settings `zebra train` takes; `None` means "the default" (or, resuming, "the run's").
#[derive(Debug, Default, clap::Args)]
pub struct TrainArgs {
    /// The model (.zb); not needed with --resume.
    pub file: Option<PathBuf>,
    /// The model to train, when the file defines several.
    #[arg(long)]
    pub model: Option<String>,
    /// A text file, or a folder of them (each file one document).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A Hugging Face tokenizer.json to encode --data with (default: the one in the model
    /// folder of --init-from, or the run's there; else bytes as tokens).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// A built-in task instead of --data: `recall`.
    #[arg(long)]
    pub task: Option<String>,
    /// Key-value pairs per sequence of the recall task (default 4).
    #[arg(long)]
    pub pairs: Option<usize>,
    /// Optimizer steps (default 1000).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Tokens per sequence (default 256).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per step (default 8).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate (default 1e-3).
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Linear warm-up steps (default: 5% of the steps, at most 200).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// The cosine decay's floor, as a fraction of the peak (default 0.1).
    #[arg(long, allow_negative_numbers = true)]
    pub min_lr_ratio: Option<f64>,
    /// AdamW's decoupled weight decay on matrices (default 0.1).
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Clip gradients to this global norm (default 1; 0 turns clipping off).
    #[arg(long, allow_negative_numbers = true)]
    pub clip: Option<f64>,
    /// The seed of the initial weights and the data (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Save a checkpoint every this many steps (default: every fifth of the run).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Give every layer this attention kind (e.g. `local`, `global`): the baselines.
    #[arg(long, value_name = "KIND")]
    pub every_layer: Option<String>,
    /// The run directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory where its last checkpoint stopped.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Start from these weights: a run directory's checkpoint, a safetensors file or a model
    /// folder (e.g. to continue at a longer --seq-len).
    #[arg(long, value_name = "RUN_DIR|WEIGHTS")]
    pub init_from: Option<PathBuf>,
    /// Threads (default: one per core).
    #[arg(long, default_value_t = 0, value_parser = zebra_runtime::parse_threads)]
    pub threads: usize,
    /// No progress bar or summary.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The error `zebra train` ends with after Ctrl-C (a checkpoint was saved).
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// A model's spec from its source, with `--every-layer` applied.
pub fn spec_from_source(
    source: &str,
    path: &Path,
    model: Option<&str>,
    every_layer: Option<&str>,
) -> Result<ModelSpec> {
    let checked = zebra_frontend::check_source(source);
    if checked.has_errors() {
        let text =
            zebra_frontend::render(&path.display().to_string(), source, &checked.diagnostics);
        bail!("{} has errors:\n{text}", path.display());
    }
    let spec = checked
        .program
        .model(model)
        .map_err(|e| anyhow!(e))?
        .clone();
    match every_layer {
        Some(kind) => spec.with_every_layer(kind).map_err(|e| anyhow!(e)),
        None => Ok(spec),
    }
}

/// The lowered graph of a model and the hash that identifies it.
pub fn graph_and_hash(spec: &ModelSpec) -> Result<(Graph, String)> {
    let graph = zebra_frontend::lower::lower(spec)?;
    zebra_ir::verify(&graph).map_err(|e| anyhow!("internal error: {e}"))?;
    let hash = format!(
        "{:016x}",
        zebra_codegen::kernels::fnv1a(zebra_ir::print_graph(&graph).as_bytes())
    );
    Ok((graph, hash))
}

/// Builds the training step of a forward graph into `dir`.
pub fn build_training_artifact(forward: &Graph, dir: &Path, max_seq_len: usize) -> Result<()> {
    build_training_artifact_on(
        forward,
        dir,
        max_seq_len,
        &Device::Cpu {
            threads: 0,
            bf16_weights: false,
        },
    )
}

/// As [`build_training_artifact`], for a device.
pub fn build_training_artifact_on(
    forward: &Graph,
    dir: &Path,
    max_seq_len: usize,
    device: &Device,
) -> Result<()> {
    let options = device.optimizer_options();
    let optimized = zebra_passes::optimize(forward, &options)?.graph;
    let train = zebra_passes::autodiff::training_graph(&optimized)?;
    let train = zebra_passes::optimize(&train, &options)?.graph;
    let options = zebra_codegen::artifact::BuildOptions {
        mode: zebra_codegen::plan::PlanMode::Forward,
        max_seq_len,
        cache: zebra_codegen::artifact::Cache::default_location(),
    };
    device.build(&train, dir, &options)
}

/// Weights to start from: a run directory's current checkpoint, a safetensors file or a
/// model folder (a sharded checkpoint).
pub fn weights_from(path: &Path) -> Result<Weights> {
    if crate::infer::is_run(path) {
        let meta = checkpoint::meta(path)?;
        let file = checkpoint::weights_path(path, &meta);
        return Ok(Weights::load(&file)?);
    }
    Ok(Weights::load(path)?)
}

fn data_source(config: &RunConfig) -> Result<Box<dyn Source>> {
    // The data stream has its own seed, derived from the run's.
    let seed = config.seed ^ 0x5eed_da7a;
    if config.data == "recall" {
        return Ok(Box::new(Recall::new(Recall::DEFAULT_PAIRS, seed)?));
    }
    if let Some(pairs) = config.data.strip_prefix("recall:") {
        let pairs: usize = pairs
            .parse()
            .map_err(|_| anyhow!("bad recall setting `{}`", config.data))?;
        return Ok(Box::new(Recall::new(pairs, seed)?));
    }
    let path = config
        .data
        .strip_prefix("text:")
        .ok_or_else(|| anyhow!("unknown data source `{}`", config.data))?;
    let codec = match &config.tokenizer {
        Some(tokenizer) => Codec::load(Path::new(tokenizer))?,
        None => Codec::Bytes,
    };
    let text = Text::open_encoded(Path::new(path), seed, |bytes| codec.encode_bytes(bytes))?;
    Ok(Box::new(text))
}

/// The tokenizer a run directory's text was encoded with.
pub fn run_tokenizer(path: &Path) -> Option<PathBuf> {
    let meta = checkpoint::meta(path).ok()?;
    meta.config.tokenizer.map(PathBuf::from)
}

/// Refuses flags that would change a run being resumed.
fn check_resume_flags(args: &TrainArgs) -> Result<()> {
    let given: Vec<&str> = [
        ("a model file", args.file.is_some()),
        ("--model", args.model.is_some()),
        ("--data", args.data.is_some()),
        ("--tokenizer", args.tokenizer.is_some()),
        ("--task", args.task.is_some()),
        ("--pairs", args.pairs.is_some()),
        ("--steps", args.steps.is_some()),
        ("--seq-len", args.seq_len.is_some()),
        ("--batch", args.batch.is_some()),
        ("--lr", args.lr.is_some()),
        ("--warmup", args.warmup.is_some()),
        ("--min-lr-ratio", args.min_lr_ratio.is_some()),
        ("--weight-decay", args.weight_decay.is_some()),
        ("--clip", args.clip.is_some()),
        ("--seed", args.seed.is_some()),
        ("--checkpoint-every", args.checkpoint_every.is_some()),
        ("--every-layer", args.every_layer.is_some()),
        ("--out", args.out.is_some()),
        ("--init-from", args.init_from.is_some()),
    ]
    .into_iter()
    .filter(|(_, g)| *g)
    .map(|(n, _)| n)
    .collect();
    if !given.is_empty() {
        bail!(
            "--resume continues a run exactly as it was set up; it takes no {} (to train further \
             with other settings, start a new run with --init-from RUN_DIR)",
            given.join(", ")
        );
    }
    Ok(())
}

/// Sets up a new run from the flags.
fn new_run(args: &TrainArgs) -> Result<(RunConfig, PathBuf, String)> {
    let file = args.file.as_ref().ok_or_else(|| {
        anyhow!("give a model file (zebra train MODEL.zb ...) or --resume RUN_DIR")
    })?;
    let out = args
        .out
        .clone()
        .ok_or_else(|| anyhow!("give --out RUN_DIR: where the run's checkpoints and logs go"))?;
    if out.join("checkpoint.json").exists() {
        bail!(
            "{} already holds a run; continue it with --resume {}, or choose another --out",
            out.display(),
            out.display()
        );
    }
    let source =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let data = match (&args.data, args.task.as_deref()) {
        (Some(_), Some(_)) => bail!("give either --data PATH or --task recall, not both"),
        (Some(path), None) => {
            let absolute = path.canonicalize().unwrap_or_else(|_| path.clone());
            format!("text:{}", absolute.display())
        }
        (None, Some("recall")) | (None, None) => match args.pairs {
            Some(p) if p == 0 || p > 26 => bail!("--pairs must be between 1 and 26, found {p}"),
            Some(p) => format!("recall:{p}"),
            None => "recall".into(),
        },
        (None, Some(other)) => bail!("unknown task `{other}`; the built-in task is `recall`"),
    };
    let steps = args.steps.unwrap_or(1000);
    let seq_len = args.seq_len.unwrap_or(256);
    let batch = args.batch.unwrap_or(8);
    if steps == 0 || seq_len == 0 || batch == 0 {
        bail!("--steps, --seq-len and --batch must be positive");
    }
    if args.checkpoint_every == Some(0) {
        bail!("--checkpoint-every must be positive (a checkpoint every N steps)");
    }
    crate::commands::check_positions("--seq-len", seq_len)?;
    let optimizer = AdamWConfig {
        lr: args.lr.unwrap_or(1e-3),
        min_lr_ratio: args.min_lr_ratio.unwrap_or(0.1),
        warmup_steps: args.warmup.unwrap_or((steps / 20).clamp(1, 200)),
        total_steps: steps,
        weight_decay: args.weight_decay.unwrap_or(0.1),
        clip_norm: args.clip.unwrap_or(1.0),
        ..AdamWConfig::default()
    };
    optimizer.check().map_err(|e| anyhow!(e))?;
    let base = spec_from_source(&source, file, args.model.as_deref(), None)?;
    let spec = spec_from_source(
        &source,
        file,
        args.model.as_deref(),
        args.every_layer.as_deref(),
    )?;
    let (_, hash) = graph_and_hash(&spec)?;
    let tokenizer = match &args.data {
        Some(path) => {
            let inherited = args
                .init_from
                .as_deref()
                .filter(|p| crate::infer::is_run(p))
                .and_then(run_tokenizer);
            let codec = Codec::find(
                args.tokenizer.as_deref().or(inherited.as_deref()),
                args.init_from.as_deref(),
                spec.vocab,
            )
            .with_context(|| format!("model `{}`", spec.name))?;
            // Fail early, with the data's own message.
            Text::open_encoded(path, 0, |bytes| codec.encode_bytes(bytes))?;
            codec.path().map(|p| {
                let absolute = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
                absolute.display().to_string()
            })
        }
        None if args.tokenizer.is_some() => {
            bail!("--tokenizer encodes --data; the recall task's tokens are its own")
        }
        None if spec.vocab < 256 => bail!(
            "model `{}` has a vocabulary of {}, too small for the recall task, whose tokens \
             are bytes (256)",
            spec.name,
            spec.vocab
        ),
        None => None,
    };
    let config = RunConfig {
        model_path: file.display().to_string(),
        model: base.name.clone(),
        config_hash: hash,
        data,
        seq_len,
        batch,
        steps,
        seed: args.seed.unwrap_or(0),
        optimizer,
        checkpoint_every: args.checkpoint_every.unwrap_or((steps / 5).max(1)),
        every_layer: args.every_layer.clone(),
        tokenizer,
    };
    Ok((config, out, source))
}

/// `zebra train`.
pub fn train(args: &TrainArgs) -> Result<()> {
    let (config, run_dir, source, resume) = match &args.resume {
        Some(dir) => {
            check_resume_flags(args)?;
            let meta = checkpoint::meta(dir)?;
            let source = std::fs::read_to_string(dir.join("model.zb"))
                .with_context(|| format!("cannot read {}", dir.join("model.zb").display()))?;
            (meta.config.clone(), dir.clone(), source, true)
        }
        None => {
            let (config, out, source) = new_run(args)?;
            (config, out, source, false)
        }
    };
    let model_file = run_dir.join("model.zb");
    let spec = spec_from_source(
        &source,
        &model_file,
        Some(&config.model),
        config.every_layer.as_deref(),
    )?;
    // At the least the weights, their gradients and AdamW's two moments, in f32.
    crate::commands::check_memory(
        &format!(
            "the {} parameters of `{}` in training (weights, gradients and two moments in f32)",
            spec.parameter_count(),
            spec.name
        ),
        (spec.parameter_count() as u64).saturating_mul(16),
    )?;
    let (forward, hash) = graph_and_hash(&spec)?;
    if hash != config.config_hash {
        bail!(
            "{} no longer matches the run's model (configuration {hash}, the run's is {})",
            model_file.display(),
            config.config_hash
        );
    }

    let device = Device::from_args(&args.device, args.threads)?;
    if let Device::Cpu {
        bf16_weights: true, ..
    } = device
    {
        bail!(
            "--dtype bf16 on the CPU keeps weights in bf16 for inference; training keeps them \
             in f32 (leave --dtype out)"
        );
    }
    // Load everything before writing anything.
    let (weights, optimizer, start, tokens0, elapsed0, data_state) = if resume {
        let ckpt = checkpoint::load(&run_dir, &hash)?;
        let CheckpointMeta {
            step,
            tokens,
            elapsed,
            data,
            ..
        } = ckpt.meta;
        (
            ckpt.weights,
            ckpt.optimizer,
            step,
            tokens,
            elapsed,
            Some(data),
        )
    } else {
        let weights = match &args.init_from {
            Some(from) => {
                let weights = weights_from(from)?;
                crate::commands::check_weights(&spec, &weights)?;
                weights
            }
            None => zebra_frontend::init::random_weights(&spec, config.seed),
        };
        (weights, AdamW::default(), 0, 0, 0.0, None)
    };
    let mut data = data_source(&config)?;
    if let Some(state) = &data_state {
        data.restore(state);
    }
    // The first batch checks the data against the sequence length before any file is written.
    let mut pending = if start < config.steps {
        Some(data.next_batch(config.batch, config.seq_len)?)
    } else {
        None
    };

    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    if !resume {
        zebra_ir::weights::write_atomically(&model_file, source.as_bytes())?;
    }
    let compile_start = Instant::now();
    let artifact = match device {
        Device::Cpu { .. } => run_dir.join("artifacts/train"),
        Device::Cuda { .. } => run_dir.join(format!("artifacts/train-{}", device.key())),
    };
    build_training_artifact_on(&forward, &artifact, config.seq_len, &device)?;
    let compile_time = compile_start.elapsed().as_secs_f64();
    let mut trainer = Trainer::with_executor(
        device.load(&artifact, &weights)?,
        optimizer,
        config.optimizer.clone(),
    )?;

    // Metrics: keep the lines of steps already done (a resumed run redoes the rest).
    let metrics_path = run_dir.join("metrics.jsonl");
    let kept: Vec<String> = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s <= start)
        })
        .map(str::to_string)
        .collect();
    let mut metrics = std::fs::File::create(&metrics_path)
        .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    for line in &kept {
        writeln!(metrics, "{line}")?;
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed (tests run several trainings): ignore that.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }

    let params = trainer.parameters();
    if !args.quiet {
        eprintln!(
            "training `{}` ({:.2}M parameters) on {}, {} steps of {} x {} tokens; compiled for {} in {compile_time:.1} s",
            spec.name,
            params as f64 / 1e6,
            data.describe(),
            config.steps,
            config.batch,
            config.seq_len,
            device.describe(),
        );
        if resume {
            eprintln!("resuming at step {start} of {}", config.steps);
        }
    }
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(config.steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ETA {eta}")
                .expect("a valid template"),
        );
        bar.set_position(start);
        bar
    };
    let mut tokens = tokens0;
    let run_start = Instant::now();
    let mut last_loss = f64::NAN;
    let mut step = start;
    let save = |trainer: &mut Trainer,
                data: &dyn Source,
                step: u64,
                tokens: u64,
                elapsed: f64,
                loss: f64|
     -> Result<()> {
        let meta = CheckpointMeta {
            format: checkpoint::CHECKPOINT_FORMAT,
            step,
            config: config.clone(),
            data: data.state(),
            tokens,
            elapsed,
            loss,
            folder: checkpoint::folder_of(step),
        };
        let (weights, optimizer) = (trainer.weights()?, trainer.optimizer_state()?);
        checkpoint::save(&run_dir, &meta, &weights, &optimizer)?;
        Ok(())
    };
    while step < config.steps {
        let batch = match pending.take() {
            Some(b) => b,
            None => data.next_batch(config.batch, config.seq_len)?,
        };
        let t0 = Instant::now();
        let report = trainer.step(&batch)?;
        let dt = t0.elapsed().as_secs_f64();
        step += 1;
        tokens += (batch.batch * batch.seq) as u64;
        let elapsed = elapsed0 + run_start.elapsed().as_secs_f64();
        if !report.loss.is_finite() || !report.grad_norm.is_finite() {
            bar.abandon();
            bail!(
                "the loss diverged at step {step} (loss {}, gradient norm {}); the last checkpoint \
                 is kept; try a lower --lr",
                report.loss,
                report.grad_norm
            );
        }
        last_loss = report.loss;
        let record = serde_json::json!({
            "step": step,
            "loss": report.loss,
            "lr": report.lr,
            "grad_norm": report.grad_norm,
            "tokens": tokens,
            "tokens_per_s": (batch.batch * batch.seq) as f64 / dt,
            "elapsed_s": elapsed,
        });
        writeln!(metrics, "{record}")?;
        bar.set_position(step);
        bar.set_message(format!(
            "loss {:.4}  {:.0} tok/s",
            report.loss,
            (batch.batch * batch.seq) as f64 / dt
        ));
        let stop = interrupted.load(Ordering::SeqCst);
        if step % config.checkpoint_every.max(1) == 0 || step == config.steps || stop {
            save(
                &mut trainer,
                data.as_ref(),
                step,
                tokens,
                elapsed,
                report.loss,
            )?;
        }
        if stop {
            bar.abandon();
            eprintln!(
                "interrupted at step {step}: checkpoint saved; continue with: zebra train --resume {}",
                run_dir.display()
            );
            return Err(Interrupted.into());
        }
    }
    bar.finish_and_clear();
    if start == config.steps && !args.quiet {
        eprintln!("the run is already complete ({} steps)", config.steps);
    }
    metrics.flush()?;
    let plot = run_dir.join("loss.svg");
    write_loss_plot(&metrics_path, &plot, &spec.name)?;
    let trained = run_start.elapsed().as_secs_f64();
    if !args.quiet && step > start {
        let new_tokens = tokens - tokens0;
        println!(
            "trained `{}` for {} steps ({} tokens) in {trained:.1} s: {:.0} tokens/s; final loss {last_loss:.4}",
            spec.name,
            step - start,
            new_tokens,
            new_tokens as f64 / trained,
        );
        println!(
            "checkpoint: {}   loss curve: {}   metrics: {}",
            run_dir.join(checkpoint::folder_of(step)).display(),
            plot.display(),
            metrics_path.display()
        );
    }
    Ok(())
}

/// Reads `metrics.jsonl` and writes the loss curve (a 20-step moving average over the raw
/// losses).
pub fn write_loss_plot(metrics: &Path, out: &Path, name: &str) -> Result<()> {
    let points: Vec<(f64, f64)> = std::fs::read_to_string(metrics)?
        .lines()
        .filter_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            Some((v.get("step")?.as_f64()?, v.get("loss")?.as_f64()?))
        })
        .collect();
    let window = 20;
    let smooth: Vec<(f64, f64)> = (0..points.len())
        .map(|i| {
            let from = i.saturating_sub(window - 1);
            let slice = &points[from..=i];
            (
                points[i].0,
                slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64,
            )
        })
        .collect();
    let svg = zebra_runtime::plot::line_plot(
        &format!("training loss: {name}"),
        "loss per scored token (nats)",
        &[("loss", &points), ("moving average", &smooth)],
    );
    zebra_ir::weights::write_atomically(out, svg.as_bytes())?;
    Ok(())
}
