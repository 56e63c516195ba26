//! `zebra generate` and `zebra eval`: a trained model (a run directory, or safetensors
//! weights with the model's source) used through its compiled kernels. Generation prefills
//! the prompt with the fused attention, then decodes token by token against KV caches that
//! hold only what each layer's mask can still see.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{ArrayD, IxDyn};
use zebra_codegen::plan::PlanMode;
use zebra_frontend::ModelSpec;
use zebra_ir::{Graph, Weights};
use zebra_runtime::checkpoint;
use zebra_runtime::data::{Batch, Recall, Source, Text};
use zebra_runtime::generate::{GenerationStats, Generator};
use zebra_runtime::sample::{Sampler, Sampling};
use zebra_runtime::{Executor, Tensor};

use crate::device::{Device, DeviceArgs};
use crate::text::Codec;
use crate::train::{graph_and_hash, spec_from_source};

/// A model to use: its spec, weights, and where they came from.
pub struct Loaded {
    pub spec: ModelSpec,
    pub weights: Weights,
    pub optimized: Graph,
    /// The training run's sequence length, when known.
    pub trained_seq_len: Option<usize>,
    pub recall_pairs: Option<usize>,
    /// The tokenizer the run's text was encoded with.
    pub tokenizer: Option<PathBuf>,
}

impl Loaded {
    /// How text becomes this model's tokens: the tokenizer given, else the run's, else the
    /// model folder's `tokenizer.json`, else bytes.
    pub fn codec(&self, explicit: Option<&Path>, source: &Path) -> Result<Codec> {
        Codec::find(
            explicit.or(self.tokenizer.as_deref()),
            Some(source),
            self.spec.vocab,
        )
        .with_context(|| format!("model `{}`", self.spec.name))
    }
}

/// Reads a run directory (its model and current checkpoint), or weights with `--model-file`.
pub fn load(
    source: &Path,
    model_file: Option<&Path>,
    model: Option<&str>,
    device: &Device,
) -> Result<Loaded> {
    let (spec, weights, seq_len, pairs, tokenizer) = if is_run(source) {
        let meta = checkpoint::meta(source)?;
        let file = source.join("model.zb");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let spec = spec_from_source(
            &text,
            &file,
            Some(&meta.config.model),
            meta.config.every_layer.as_deref(),
        )?;
        let (_, hash) = graph_and_hash(&spec)?;
        let ckpt = checkpoint::load(source, &hash)?;
        let pairs = meta.config.data.strip_prefix("recall").map(|rest| {
            rest.trim_start_matches(':')
                .parse()
                .unwrap_or(Recall::DEFAULT_PAIRS)
        });
        let tokenizer = meta.config.tokenizer.as_ref().map(PathBuf::from);
        (
            spec,
            ckpt.weights,
            Some(meta.config.seq_len),
            pairs,
            tokenizer,
        )
    } else {
        if !source.exists() {
            bail!(
                "{} does not exist: give a run directory (from zebra train), a safetensors \
                 file or a model folder",
                source.display()
            );
        }
        if source.extension().is_some_and(|e| e == "zb") {
            bail!(
                "{} is a model's source, not its weights: give a run directory (from zebra \
                 train) or a safetensors file, with this file as --model-file",
                source.display()
            );
        }
        let file = model_file.ok_or_else(|| {
            anyhow!(
                "{} holds only weights: give the model's source too, with --model-file FILE.zb",
                source.display()
            )
        })?;
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let spec = spec_from_source(&text, file, model, None)?;
        (spec, Weights::load(source)?, None, None, None)
    };
    crate::commands::check_weights(&spec, &weights)?;
    let graph = zebra_frontend::lower::lower(&spec)?;
    let optimized = zebra_passes::optimize(&graph, &device.optimizer_options())?.graph;
    Ok(Loaded {
        spec,
        weights,
        optimized,
        trained_seq_len: seq_len,
        recall_pairs: pairs,
        tokenizer,
    })
}

/// Whether `source` is a run directory (from `zebra train`) rather than weights: a folder
/// with a checkpoint, or with no weights (so that the error names the missing checkpoint).
pub fn is_run(source: &Path) -> bool {
    source.is_dir() && (source.join("checkpoint.json").exists() || !Weights::in_folder(source))
}

/// The artifact of an optimized graph for one plan mode and device, in the cache.
pub fn artifact(
    graph: &Graph,
    max_seq_len: usize,
    mode: PlanMode,
    device: &Device,
) -> Result<PathBuf> {
    let cache = zebra_codegen::artifact::Cache::default_location()
        .ok_or_else(|| anyhow!("no cache directory: set ZEBRA_CACHE_DIR or HOME"))?;
    let key = zebra_codegen::kernels::fnv1a(
        format!(
            "{}\n{max_seq_len}\n{mode:?}\n{}",
            zebra_ir::print_graph(graph),
            device.key()
        )
        .as_bytes(),
    );
    let dir = cache.dir.join("artifacts").join(format!("{key:016x}"));
    let options = zebra_codegen::artifact::BuildOptions {
        mode,
        max_seq_len,
        cache: Some(cache),
    };
    device
        .build(graph, &dir, &options)
        .map_err(|e| anyhow!("cannot compile {}: {e}", graph.name))?;
    Ok(dir)
}

/// The prefill and decode models of a loaded model, for contexts up to `context`.
pub fn generation_models(
    loaded: &Loaded,
    context: usize,
    device: &Device,
) -> Result<(Box<dyn Executor>, Box<dyn Executor>)> {
    let prefill = artifact(&loaded.optimized, context, PlanMode::Prefill, device)?;
    let decode = artifact(&loaded.optimized, context, PlanMode::Decode, device)?;
    device.load_generation(&prefill, &decode, &loaded.weights)
}

fn tokens_tensor(tokens: &[i64], batch: usize) -> Tensor {
    let seq = tokens.len() / batch;
    Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[batch, seq]), tokens.to_vec()).expect("[B, T]"))
}

pub struct GenerateArgs<'a> {
    pub source: &'a Path,
    pub model_file: Option<&'a Path>,
    pub model: Option<&'a str>,
    pub prompt: &'a str,
    /// A Hugging Face tokenizer (default: the model folder's, else bytes).
    pub tokenizer: Option<&'a Path>,
    pub max_tokens: usize,
    pub context: Option<usize>,
    pub sampling: Sampling,
    pub seed: u64,
    pub stats: bool,
    pub threads: usize,
    pub device: &'a DeviceArgs,
}

/// `zebra generate`.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    args.sampling.check().map_err(|e| anyhow!(e))?;
    if args.prompt.is_empty() {
        bail!("the prompt is empty: give some text with --prompt");
    }
    if args.context == Some(0) {
        bail!("--context must be positive");
    }
    let device = Device::from_args(args.device, args.threads)?;
    let mut loaded = load(args.source, args.model_file, args.model, &device)?;
    let codec = loaded.codec(args.tokenizer, args.source)?;
    let prompt = codec.encode(args.prompt)?;
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let context = match args.context {
        Some(context) => {
            crate::commands::check_positions("--context", context)?;
            context
        }
        None => {
            let context = prompt.len().saturating_add(args.max_tokens);
            crate::commands::check_positions(
                &format!(
                    "a prompt of {} token{} and --max-tokens {}",
                    prompt.len(),
                    if prompt.len() == 1 { "" } else { "s" },
                    args.max_tokens
                ),
                context,
            )?;
            context
        }
    };
    if prompt.len() > context {
        bail!(
            "the prompt has {} tokens, more than the context of {context} (--context)",
            prompt.len()
        );
    }
    let compile_start = Instant::now();
    let (prefill, decode) = generation_models(&loaded, context, &device)?;
    // The executors hold what they read (packed); this copy is not needed any more.
    drop(std::mem::take(&mut loaded.weights));
    let compile = compile_start.elapsed();
    let mut generator = Generator::from_parts(prefill, decode)?;
    let min_prompt = generator.min_prompt();
    if prompt.len() < min_prompt {
        bail!(
            "the model's masks let the first {min_prompt} positions see later ones (a prefix): \
             the prompt must hold at least {min_prompt} tokens, it has {}",
            prompt.len()
        );
    }
    let mut sampler = Sampler::new(args.sampling, args.seed);
    let mut out = std::io::stdout().lock();
    out.write_all(args.prompt.as_bytes())?;
    out.flush()?;
    let mut stream = codec.stream(&prompt)?;
    let stats = generator.generate(&prompt, args.max_tokens, &mut sampler, |token| {
        if codec.ends(token) {
            return Ok(std::ops::ControlFlow::Break(()));
        }
        let text = stream.push(token).map_err(std::io::Error::other)?;
        out.write_all(&text)?;
        out.flush()?;
        Ok(std::ops::ControlFlow::Continue(()))
    })?;
    out.write_all(b"\n")?;
    out.flush()?;
    if stats.ended {
        eprintln!(
            "stopped at the end-of-sequence token, after {} token{}",
            stats.generated,
            if stats.generated == 1 { "" } else { "s" }
        );
    } else if stats.generated < args.max_tokens {
        eprintln!(
            "stopped after {} tokens: the context of {context} is full (--context)",
            stats.generated
        );
    }
    if args.stats {
        eprintln!(
            "model           {} ({} layers)",
            loaded.spec.name,
            loaded.spec.layers.len()
        );
        eprintln!("device          {}", device.describe());
        eprintln!("compile         {:.2} s", compile.as_secs_f64());
        print_stats(&stats, generator.decode.as_ref());
    }
    Ok(())
}

/// The timings and the KV cache of a generation, to stderr.
pub fn print_stats(stats: &GenerationStats, decode: &dyn zebra_runtime::Executor) {
    let prefill = stats.prefill.as_secs_f64();
    let steps = stats.generated.saturating_sub(1).max(1);
    eprintln!(
        "prefill         {} tokens in {:.1} ms ({:.0} tokens/s)",
        stats.prompt_tokens,
        prefill * 1e3,
        stats.prompt_tokens as f64 / prefill
    );
    eprintln!(
        "decode          {} tokens in {:.1} ms ({:.1} tokens/s)",
        stats.generated,
        stats.decode.as_secs_f64() * 1e3,
        steps as f64 / stats.decode.as_secs_f64().max(1e-9)
    );
    eprintln!(
        "KV cache        {} held for {} tokens; full attention in every layer: {} ({:.1}%)",
        bytes(stats.cache_bytes),
        decode.cached_tokens(),
        bytes(stats.full_cache_bytes),
        100.0 * stats.cache_bytes as f64 / stats.full_cache_bytes.max(1) as f64
    );
    for line in cache_lines(&decode.plan().caches) {
        eprintln!("  {line}");
    }
}

/// One line per KV cache of a decode plan: its layer and what it keeps (and of which KV
/// heads, where a layer's KV heads keep different keys).
pub fn cache_lines(caches: &[zebra_runtime::plan::CacheSpec]) -> Vec<String> {
    caches
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut keeps = match c.ring {
                None => "every key".to_string(),
                Some(r) if c.sinks > 0 => format!("{} sinks + a ring of {r}", c.sinks),
                Some(r) => format!("a ring of {r}"),
            };
            if c.layer.is_some() && caches.iter().filter(|o| o.layer == c.layer).count() > 1 {
                let held: Vec<String> = c.kv_heads_held.iter().map(|h| h.to_string()).collect();
                keeps += &format!(" (KV heads {})", held.join(", "));
            }
            let layer = c.layer.map_or(i.to_string(), |l| l.to_string());
            format!("layer {layer:<3} {keeps}")
        })
        .collect()
}

fn bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

pub struct EvalArgs<'a> {
    pub sources: &'a [PathBuf],
    pub model_file: Option<&'a Path>,
    pub model: Option<&'a str>,
    pub data: Option<&'a Path>,
    /// A Hugging Face tokenizer for --data (default: each run's or model folder's).
    pub tokenizer: Option<&'a Path>,
    pub task: Option<&'a str>,
    pub contexts: &'a [usize],
    pub pairs: Option<usize>,
    /// Sequences (recall) or windows (text) per context length.
    pub samples: usize,
    pub batch: usize,
    pub seed: u64,
    pub json: bool,
    pub threads: usize,
    pub device: &'a DeviceArgs,
}

/// Cross-entropy of the scored targets of a batch, from `[B, T, V]` logits: summed loss,
/// count, and for recall, which queries were answered right.
fn score(logits: &ArrayD<f32>, batch: &Batch) -> (f64, usize, Vec<bool>) {
    let (t, v) = (logits.shape()[1], logits.shape()[2]);
    let flat = logits.as_slice().expect("contiguous logits");
    let (mut loss, mut count) = (0.0, 0);
    for (i, &target) in batch.targets.iter().enumerate() {
        if target < 0 {
            continue;
        }
        let row = &flat[i * v..(i + 1) * v];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
        loss += sum.ln() + f64::from(max) - f64::from(row[target as usize]);
        count += 1;
    }
    let right = batch
        .queries
        .iter()
        .map(|&(r, at, _)| {
            let row = &flat[(r * t + at) * v..(r * t + at + 1) * v];
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &x)| if x > b.1 { (i, x) } else { b },
                )
                .0;
            best as i64 == batch.targets[r * t + at]
        })
        .collect();
    (loss, count, right)
}

fn run_batch(model: &mut dyn Executor, batch: &Batch) -> Result<ArrayD<f32>> {
    let inputs = BTreeMap::from([(
        "tokens".to_string(),
        tokens_tensor(&batch.tokens, batch.batch),
    )]);
    let mut outputs = model.run(&inputs)?;
    Ok(outputs.remove("logits").expect("the model outputs logits"))
}

/// Distance buckets for recall accuracy: powers of two.
fn bucket(distance: usize) -> (usize, usize) {
    let mut lo = 1;
    while lo * 2 <= distance {
        lo *= 2;
    }
    (lo, lo * 2 - 1)
}

/// The recall accuracy of a model at one context length, overall and by distance bucket.
pub struct RecallScore {
    pub accuracy: f64,
    pub queries: usize,
    pub by_distance: Vec<((usize, usize), usize, usize)>,
}

/// Evaluates recall at `context` on `samples` sequences of a fixed held-out seed.
pub fn recall_accuracy(
    model: &mut dyn Executor,
    pairs: usize,
    context: usize,
    samples: usize,
    batch: usize,
    seed: u64,
) -> Result<RecallScore> {
    let mut source = Recall::new(pairs, seed)?;
    let mut buckets: BTreeMap<(usize, usize), (usize, usize)> = BTreeMap::new();
    let mut done = 0;
    while done < samples {
        let rows = batch.min(samples - done);
        let b = source.next_batch(rows, context)?;
        let logits = run_batch(model, &b)?;
        let (_, _, right) = score(&logits, &b);
        for (&(_, _, distance), ok) in b.queries.iter().zip(right) {
            let entry = buckets.entry(bucket(distance)).or_default();
            entry.0 += usize::from(ok);
            entry.1 += 1;
        }
        done += rows;
    }
    let (right, total) = buckets
        .values()
        .fold((0, 0), |(r, t), (br, bt)| (r + br, t + bt));
    Ok(RecallScore {
        accuracy: right as f64 / total.max(1) as f64,
        queries: total,
        by_distance: buckets.into_iter().map(|(k, (r, t))| (k, r, t)).collect(),
    })
}

/// `zebra eval`: one run, or several side by side (the same data for each).
pub fn eval(args: &EvalArgs) -> Result<()> {
    if args.samples == 0 || args.batch == 0 {
        bail!("--samples and --batch must be positive");
    }
    if args.contexts.contains(&0) {
        bail!("--context lengths must be positive");
    }
    for &context in args.contexts {
        crate::commands::check_positions("--context", context)?;
    }
    if let Some(pairs) = args.pairs {
        Recall::new(pairs, 0)?;
    }
    let data = match (args.data, args.task) {
        (Some(_), Some(_)) => bail!("give either --data PATH or --task recall, not both"),
        (Some(path), None) => {
            // Fail early, with the data's own message (each model encodes it again, with
            // its own tokenizer).
            Text::open(path, 0)?;
            Some(path)
        }
        (None, Some("recall")) => None,
        (None, Some(other)) => bail!("unknown task `{other}`; the built-in task is `recall`"),
        (None, None) => bail!("give --data PATH (perplexity) or --task recall (recall accuracy)"),
    };
    if args.sources.is_empty() {
        bail!("give at least one run directory or weights file");
    }
    let device = Device::from_args(args.device, args.threads)?;
    let mut columns = Vec::new();
    for source in args.sources {
        let mut loaded = load(source, args.model_file, args.model, &device)?;
        let text = match data {
            Some(path) => {
                let codec = loaded.codec(args.tokenizer, source)?;
                Some(Text::open_encoded(path, 0, |b| codec.encode_bytes(b))?)
            }
            None => None,
        };
        let contexts: Vec<usize> = if args.contexts.is_empty() {
            vec![loaded.trained_seq_len.unwrap_or(256)]
        } else {
            args.contexts.to_vec()
        };
        let longest = *contexts.iter().max().expect("at least one context");
        let dir = artifact(&loaded.optimized, longest, PlanMode::Forward, &device)?;
        let mut model = device.load(&dir, &loaded.weights)?;
        drop(std::mem::take(&mut loaded.weights));
        let name = loaded.spec.name.clone();
        let trained = if is_run(source) {
            checkpoint::meta(source).ok().map(|m| (m.elapsed, m.tokens))
        } else {
            None
        };
        let mut results = Vec::new();
        for &t in &contexts {
            let start = Instant::now();
            let result = match &text {
                Some(text) => {
                    let batches = text.windows(args.batch, t, args.samples)?;
                    let (mut loss, mut count) = (0.0, 0);
                    for b in &batches {
                        let logits = run_batch(model.as_mut(), b)?;
                        let (l, c, _) = score(&logits, b);
                        loss += l;
                        count += c;
                    }
                    let mean = loss / count.max(1) as f64;
                    Outcome::Perplexity {
                        tokens: count,
                        loss: mean,
                    }
                }
                None => {
                    let pairs = args
                        .pairs
                        .or(loaded.recall_pairs)
                        .unwrap_or(Recall::DEFAULT_PAIRS);
                    Outcome::Recall(recall_accuracy(
                        model.as_mut(),
                        pairs,
                        t,
                        args.samples,
                        args.batch,
                        args.seed,
                    )?)
                }
            };
            let seconds = start.elapsed().as_secs_f64();
            if args.json {
                println!("{}", result.json(&name, t, seconds));
            }
            results.push((t, result, seconds));
        }
        columns.push((name, trained, results));
    }
    if !args.json {
        print_table(&columns, args.data);
    }
    Ok(())
}

/// What one evaluation measured.
enum Outcome {
    Perplexity { tokens: usize, loss: f64 },
    Recall(RecallScore),
}

impl Outcome {
    fn json(&self, model: &str, context: usize, seconds: f64) -> serde_json::Value {
        match self {
            Outcome::Perplexity { tokens, loss } => serde_json::json!({
                "model": model, "context": context, "tokens": tokens, "loss": loss,
                "perplexity": loss.exp(), "seconds": seconds}),
            Outcome::Recall(r) => {
                let buckets: Vec<_> = r
                    .by_distance
                    .iter()
                    .map(|((lo, hi), right, n)| {
                        serde_json::json!({"distance": [lo, hi], "right": right, "queries": n,
                            "accuracy": *right as f64 / (*n).max(1) as f64})
                    })
                    .collect();
                serde_json::json!({"model": model, "context": context, "accuracy": r.accuracy,
                    "queries": r.queries, "by_distance": buckets, "seconds": seconds})
            }
        }
    }

    fn cell(&self) -> String {
        match self {
            Outcome::Perplexity { loss, .. } => format!("{:.3}", loss.exp()),
            Outcome::Recall(r) => format!("{:.1}%", 100.0 * r.accuracy),
        }
    }
}

type Column = (String, Option<(f64, u64)>, Vec<(usize, Outcome, f64)>);

/// The results as a table: a row per context length (and, for recall, per distance), a
/// column per model.
fn print_table(columns: &[Column], data: Option<&Path>) {
    let width = columns.iter().map(|c| c.0.len()).max().unwrap_or(8).max(10) + 2;
    let header: String = columns.iter().map(|c| format!("{:>width$}", c.0)).collect();
    let what = match data {
        Some(path) => format!("perplexity on {}", path.display()),
        None => "recall accuracy".into(),
    };
    println!("{what}");
    println!("{:<22}{header}", "context");
    let contexts: Vec<usize> = columns[0].2.iter().map(|r| r.0).collect();
    for (i, t) in contexts.iter().enumerate() {
        let cells: String = columns
            .iter()
            .map(|c| format!("{:>width$}", c.2.get(i).map_or("-".into(), |r| r.1.cell())))
            .collect();
        println!("{:<22}{cells}", t);
        if data.is_some() {
            continue;
        }
        // By distance between key and query.
        let mut buckets: Vec<(usize, usize)> = columns
            .iter()
            .filter_map(|c| match &c.2.get(i)?.1 {
                Outcome::Recall(r) => Some(r.by_distance.iter().map(|b| b.0).collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect();
        buckets.sort();
        buckets.dedup();
        for b in buckets {
            let cells: String = columns
                .iter()
                .map(|c| {
                    let cell = match c.2.get(i).map(|r| &r.1) {
                        Some(Outcome::Recall(r)) => r.by_distance.iter().find(|x| x.0 == b).map_or(
                            "-".into(),
                            |(_, right, n)| {
                                format!("{:.0}%", 100.0 * *right as f64 / (*n).max(1) as f64)
                            },
                        ),
                        _ => "-".into(),
                    };
                    format!("{cell:>width$}")
                })
                .collect();
            println!("{:<22}{cells}", format!("  distance {}-{}", b.0, b.1));
        }
    }
    if columns.iter().any(|c| c.1.is_some()) {
        let cells: String = columns
            .iter()
            .map(|c| {
                let cell = c.1.map_or("-".into(), |(s, _)| format!("{s:.0} s"));
                format!("{cell:>width$}")
            })
            .collect();
        println!("{:<22}{cells}", "training time");
    }
    let cells: String = columns
        .iter()
        .map(|c| {
            let total: f64 = c.2.iter().map(|r| r.2).sum();
            format!("{:>width$}", format!("{total:.1} s"))
        })
        .collect();
    println!("{:<22}{cells}", "evaluation time");
}
