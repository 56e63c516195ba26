//! The `zebra` command line: check, compile, init and run models written in the Zebra DSL.

mod bench;
mod commands;
mod device;
mod import;
mod infer;
mod text;
mod train;
mod tune;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// The longest sequence a compiled artifact runs unless told otherwise.
pub const DEFAULT_MAX_SEQ_LEN: usize = 32768;

#[derive(Parser)]
#[command(
    name = "zebra",
    version,
    about = "A compiler and runtime for transformer attention variants"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What `zebra compile` stops after and prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Emit {
    /// The syntax tree.
    Ast,
    /// The graph IR in its text form.
    Ir,
    /// The graph IR as Graphviz DOT.
    Dot,
    /// The optimized graph IR: fused attention with tile schedules, fused projections.
    Opt,
    /// The kernels in MLIR, as built (verified).
    Mlir,
    /// The kernels in LLVM IR, optimized for this CPU.
    Llvm,
    /// The kernels in this CPU's assembly.
    Asm,
    /// The kernels in PTX (with --target sm_80 or sm_90).
    Ptx,
    /// A compiled artifact directory (`plan.json`, `kernels.so`) at `-o DIR`.
    Artifact,
}

/// What `zebra compile --emit artifact` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Purpose {
    Forward,
    Generate,
    Train,
    /// The model's distinct attentions alone, as tensor-core kernels with 16-bit inputs
    /// (`attention.json` and `kernels.ptx`; with --target sm_80 or sm_90), for `zebra-run
    /// attention`.
    Attention,
}

/// The type GPU kernels compute in: f32 throughout, or tensor cores with operands rounded to
/// bf16 or f16 (accumulating in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Check a .zb file and report every problem in it.
    Check { file: PathBuf },
    /// Compile a .zb file (or a graph in the IR's text form, .zir) and print the chosen stage.
    Compile {
        file: PathBuf,
        /// The stage to print.
        #[arg(long, value_enum, default_value = "ir")]
        emit: Emit,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The model to compile, when the file defines several.
        #[arg(long)]
        model: Option<String>,
        /// The machine to optimize for: cpu, sm_80 or sm_90.
        #[arg(long, default_value = "cpu")]
        target: zebra_passes::Target,
        /// Print the IR after this optimizer stage instead: lower, algebra, recognize,
        /// attention, epilogue or opt.
        #[arg(long, value_name = "STAGE")]
        print_after: Option<String>,
        /// Print how long each stage took (to standard error).
        #[arg(long)]
        timings: bool,
        /// Print which rewrite rules produced a node of the optimized IR, named as it prints
        /// (`%12`), to standard error.
        #[arg(long, value_name = "NODE")]
        explain: Option<String>,
        /// The longest sequence a compiled artifact will run.
        #[arg(long, default_value_t = DEFAULT_MAX_SEQ_LEN, value_parser = zebra_runtime::parse_positive)]
        max_seq_len: usize,
        /// What an artifact is for: a forward pass, generation (`prefill/` and `decode/`,
        /// with KV caches), training (the training step: loss and gradients), or the
        /// attentions alone as tensor-core kernels (also with --emit ptx, mlir or llvm).
        #[arg(long = "for", value_enum, default_value = "forward")]
        purpose: Purpose,
        /// What GPU kernels compute in. A model's artifact: f32 (the default), or bf16 or f16
        /// for projections on tensor cores. --for attention: bf16 (the default) or f16. For
        /// the CPU: bf16 keeps the projections' weights in bf16 (not --for train).
        #[arg(long, value_enum)]
        dtype: Option<Dtype>,
        /// K/V pipeline stages of tensor-core attention kernels, 1 or 2 (--for attention;
        /// default 1).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
        stages: Option<u8>,
        /// Keys per tile of tensor-core attention kernels (--for attention; default: 64 for
        /// head dims up to 128, else 32).
        #[arg(long, value_parser = ["16", "32", "64", "128"])]
        block_k: Option<String>,
        /// Queries per tile of attention kernels, 64 or 128 (--for attention; default: 128 for
        /// head dims up to 128, else 64; with wgmma, one or two warpgroups).
        #[arg(long, value_parser = ["64", "128"])]
        block_q: Option<String>,
        /// The tensor-core instruction of attention kernels (--for attention, or a model's
        /// forward attentions with --dtype bf16|f16): sync (`mma.sync`, the default), or
        /// wgmma (sm_90's warpgroup products, --target sm_90, PTX for sm_90a; wgmma-vt: with
        /// V transposed in shared memory first).
        #[arg(long, value_parser = ["sync", "wgmma", "wgmma-vt"])]
        mma: Option<String>,
    },
    /// Time each distinct attention of a model with candidate tile sizes (random inputs,
    /// checked against the default tiles) and record the fastest in the tuning database,
    /// which compiling for the same target and machine then reads. The CPU is timed here; a
    /// GPU's candidates (--target sm_80|sm_90 -o DIR) are timed by `zebra-run tune DIR` on
    /// the GPU's machine and recorded with `zebra tune --record DIR`.
    Tune(TuneCli),
    /// Write a model's source (.zb) from a Hugging Face configuration of the Llama family
    /// (Llama, Mistral, Ministral, SmolLM3), to run its checkpoint (--weights FOLDER) or, with --zebra, to
    /// rearrange its layers into Zebra's groups and continue training it (--init-from).
    Import {
        /// A Hugging Face model folder, or its config.json.
        path: PathBuf,
        /// The source to write (default: print it).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The model's name (default: from the folder's).
        #[arg(long)]
        name: Option<String>,
        /// Zebra's layout: groups of G layers, one global, the others a causal window of W
        /// keys (the query included; the authors' `window_size = B` is W = B + 1).
        #[arg(long, value_name = "G:W", value_parser = import::parse_zebra)]
        zebra: Option<(usize, usize)>,
        /// With --zebra: the global layer last in each group (Gemma 3's), not first.
        #[arg(long, requires = "zebra")]
        global_last: bool,
    },
    /// Write deterministic random weights for a model (safetensors, Hugging Face names).
    Init {
        /// The model (.zb).
        file: PathBuf,
        /// The seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The safetensors file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Which model of the source file, when it defines several.
        #[arg(long)]
        model: Option<String>,
    },
    /// Run a model on token ids and write its logits.
    Run {
        file: PathBuf,
        /// Weights: a safetensors file, or a model folder or index of a checkpoint in shards
        /// (Hugging Face's model.safetensors.index.json).
        #[arg(long)]
        weights: PathBuf,
        /// Token ids: an int32 or int64 .npy array of shape `[B, T]` (or `[T]`).
        #[arg(long)]
        tokens: PathBuf,
        /// Where to write the logits: a float32 .npy array of shape [B, T, vocab].
        #[arg(long)]
        output: PathBuf,
        /// A side input as NAME=FILE.npy (int32 or int64, the shape of the tokens).
        #[arg(long = "side", value_name = "NAME=FILE")]
        sides: Vec<String>,
        /// Which model of the source file, when it defines several.
        #[arg(long)]
        model: Option<String>,
        /// Run the reference interpreter (f64) instead of the compiled kernels.
        #[arg(long)]
        interpret: bool,
        /// Threads for the compiled kernels (default: one per core).
        #[arg(long, default_value_t = 0, value_parser = zebra_runtime::parse_threads)]
        threads: usize,
        /// The longest sequence the compiled artifact will run.
        #[arg(long, default_value_t = DEFAULT_MAX_SEQ_LEN, value_parser = zebra_runtime::parse_positive)]
        max_seq_len: usize,
        #[command(flatten)]
        device: device::DeviceArgs,
    },
    /// Time the compiled kernels against naive baselines; one JSON object per benchmark with
    /// --json. Benchmarks: attention-local, attention-global, forward-zebra,
    /// forward-all-global, compile-cold, compile-warm (all when none is named), and
    /// attention-per-head (windows of W, W/2, W/4 and W/8 keys by head), train-zebra
    /// (training steps of zebra_tiny), decode-zebra and decode-all-global (decoding after a
    /// prompt of --seq-len tokens).
    Bench {
        names: Vec<String>,
        /// The sequence length.
        #[arg(long, default_value_t = 8192, value_parser = zebra_runtime::parse_positive)]
        seq_len: usize,
        /// Threads (default: one per core).
        #[arg(long, default_value_t = 0, value_parser = zebra_runtime::parse_threads)]
        threads: usize,
        /// Timed runs per benchmark (the median is reported).
        #[arg(long, default_value_t = 5, value_parser = zebra_runtime::parse_positive)]
        repeats: usize,
        /// The local attention's window (attention-per-head: the widest).
        #[arg(long, default_value_t = 512, value_parser = zebra_runtime::parse_positive)]
        window: usize,
        /// Attention heads of the attention benchmarks.
        #[arg(long, default_value_t = 8, value_parser = zebra_runtime::parse_positive)]
        heads: usize,
        /// Their head dimension.
        #[arg(long, default_value_t = 64, value_parser = zebra_runtime::parse_positive)]
        head_dim: usize,
        /// Sequences per training step (train-zebra).
        #[arg(long, default_value_t = 4, value_parser = zebra_runtime::parse_positive)]
        batch: usize,
        /// Skip the naive baselines (they take seconds at long lengths).
        #[arg(long)]
        no_baseline: bool,
        /// Attention tile sizes as BQxBK (default: the target's).
        #[arg(long, value_parser = parse_blocks)]
        blocks: Option<(u64, u64)>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// A Python that has PyTorch: run bench/torch_baseline.py on the same shapes right
        /// after, and print the speedups.
        #[arg(long, value_name = "PYTHON")]
        torch: Option<PathBuf>,
    },
    /// Train a model: on text (--data FILE|DIR, bytes as tokens) or the built-in associative
    /// recall task (--task recall, the default). Writes checkpoints, metrics and a loss curve
    /// to --out RUN_DIR; Ctrl-C saves a checkpoint; --resume RUN_DIR continues exactly.
    Train(train::TrainArgs),
    /// Generate text from a trained model, streaming tokens as they come: the prompt is
    /// prefilled with the fused attention, then tokens are decoded one by one against KV
    /// caches that keep only what each layer's mask can still see.
    Generate {
        /// A run directory (from zebra train), or weights with --model-file: a safetensors
        /// file, or a model folder or index of a checkpoint in shards.
        source: PathBuf,
        /// The text to continue (bytes as tokens, or the tokenizer's).
        #[arg(long)]
        prompt: String,
        /// A Hugging Face tokenizer.json (default: the one in SOURCE when it is a model
        /// folder; else bytes as tokens). Generation stops at the end-of-sequence token of
        /// the config.json or generation_config.json beside it.
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
        /// How many tokens to generate.
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        /// 0 picks the most likely token every time.
        #[arg(long, allow_negative_numbers = true, default_value_t = 0.8)]
        temperature: f64,
        /// Sample from the K most likely tokens only (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sample from the most likely tokens up to this total probability (1: all).
        #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
        top_p: f64,
        /// The seed of the sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The longest context (prompt and generated tokens; default: their sum).
        #[arg(long)]
        context: Option<usize>,
        /// Print timings and the KV cache held against full attention's, to stderr.
        #[arg(long)]
        stats: bool,
        /// The model's source, when SOURCE is a weights file.
        #[arg(long, value_name = "FILE.zb")]
        model_file: Option<PathBuf>,
        /// Which model of the source file, when it defines several.
        #[arg(long)]
        model: Option<String>,
        /// Threads (default: one per core).
        #[arg(long, default_value_t = 0, value_parser = zebra_runtime::parse_threads)]
        threads: usize,
        #[command(flatten)]
        device: device::DeviceArgs,
    },
    /// Evaluate trained models: perplexity on text at each context length (--data), or the
    /// recall task's accuracy by distance between key and query (--task recall). Several
    /// runs are shown side by side.
    Eval {
        /// Run directories (from zebra train), or weights (safetensors files, model folders)
        /// with --model-file.
        #[arg(required = true)]
        sources: Vec<PathBuf>,
        /// A text file, or a folder of them: perplexity.
        #[arg(long)]
        data: Option<PathBuf>,
        /// A Hugging Face tokenizer.json to encode --data with (default: each run's, or the
        /// model folder's; else bytes as tokens).
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
        /// A built-in task instead of --data: `recall`.
        #[arg(long)]
        task: Option<String>,
        /// Context lengths (default: the run's sequence length).
        #[arg(long, num_args = 1..)]
        context: Vec<usize>,
        /// Key-value pairs per recall sequence (default: the run's).
        #[arg(long)]
        pairs: Option<usize>,
        /// Sequences (recall) or text windows per context length.
        #[arg(long, default_value_t = 64)]
        samples: usize,
        /// Sequences per forward pass.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// The seed of the recall sequences (held out from training's by default).
        #[arg(long, default_value_t = 1_000_003)]
        seed: u64,
        /// One JSON object per context length.
        #[arg(long)]
        json: bool,
        /// The model's source, when the sources are weights files.
        #[arg(long, value_name = "FILE.zb")]
        model_file: Option<PathBuf>,
        /// Which model of the source file, when it defines several.
        #[arg(long)]
        model: Option<String>,
        /// Threads (default: one per core).
        #[arg(long, default_value_t = 0, value_parser = zebra_runtime::parse_threads)]
        threads: usize,
        #[command(flatten)]
        device: device::DeviceArgs,
    },
    /// Run a model's tensor-core attention kernels (as `--for attention` builds them) in the
    /// warp emulator on this CPU, on random inputs, and check sampled rows against an f64
    /// reference: a new attention variant's GPU kernel checked without a GPU. One JSON line
    /// per kernel; fails if any check fails.
    Emulate {
        /// The model (.zb).
        file: PathBuf,
        /// Which model of the source file, when it defines several.
        #[arg(long)]
        model: Option<String>,
        /// The sequence length of the random inputs.
        #[arg(long, default_value_t = 200)]
        seq_len: usize,
        /// The batch size of the random inputs.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Output rows checked against the reference (the first and last among them).
        #[arg(long, default_value_t = 32)]
        rows: usize,
        /// The kernels' 16-bit input type.
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: Dtype,
        /// sm_80 or sm_90.
        #[arg(long, default_value = "sm_90")]
        target: zebra_passes::Target,
        /// The seed of the random inputs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The tensor-core instruction: sync (`mma.sync`), wgmma or wgmma-vt (sm_90).
        #[arg(long, value_parser = ["sync", "wgmma", "wgmma-vt"], default_value = "sync")]
        mma: String,
        /// Keys per tile (default: the target's choice).
        #[arg(long, value_parser = ["16", "32", "64", "128"])]
        block_k: Option<String>,
    },
    /// Check that MLIR and LLVM work here: JIT a small MLIR function, create CPU and PTX targets.
    Toolchain,
    /// Encode text as byte-level token ids (vocabulary 256) into an int64 .npy file [1, T].
    Encode {
        /// The text.
        text: String,
        /// The .npy file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// A Hugging Face tokenizer.json to encode with (default: bytes as tokens).
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
    },
}

/// Reads `64x64`.
fn parse_blocks(text: &str) -> Result<(u64, u64), String> {
    let (q, k) = text
        .split_once('x')
        .ok_or_else(|| format!("expected BQxBK such as 64x64, found `{text}`"))?;
    let parse = |s: &str| {
        s.parse::<u64>()
            .ok()
            .filter(|v| *v > 0 && *v <= 1024 && v.is_multiple_of(8))
    };
    match (parse(q), parse(k)) {
        (Some(q), Some(k)) => Ok((q, k)),
        _ => Err(format!(
            "tile sizes are multiples of 8 up to 1024, found `{text}`"
        )),
    }
}

#[derive(clap::Args)]
struct TuneCli {
    /// The model (.zb or .zir).
    #[arg(required_unless_present = "record")]
    file: Option<PathBuf>,
    /// Which model of the source file, when it defines several.
    #[arg(long)]
    model: Option<String>,
    /// What to tune for: cpu (timed here), or sm_80 or sm_90 (the tensor-core attention
    /// kernels, compiled here into -o DIR and timed on the GPU by `zebra-run tune DIR`;
    /// here at once when this machine has the GPU).
    #[arg(long, default_value = "cpu")]
    target: zebra_passes::Target,
    /// The sequence length to time at.
    #[arg(long, default_value_t = 4096, value_parser = zebra_runtime::parse_positive)]
    seq_len: usize,
    /// Threads (default: one per core).
    #[arg(long, default_value_t = 0, value_parser = zebra_runtime::parse_threads)]
    threads: usize,
    /// Timed runs per candidate (the median counts; default 5 on the CPU, 20 on a GPU).
    #[arg(long, value_parser = zebra_runtime::parse_positive)]
    repeats: Option<usize>,
    /// Queries per tile to try (the CPU: multiples of 8 up to 1024, default 32,64,128;
    /// a GPU: 64 or 128, default both).
    #[arg(long, value_parser = tune::parse_sizes)]
    block_q: Option<tune::Sizes>,
    /// Keys per tile to try (the CPU: multiples of 8 up to 1024; a GPU: multiples of 16 up
    /// to 128; default 32,64,128).
    #[arg(long, value_parser = tune::parse_sizes)]
    block_k: Option<tune::Sizes>,
    /// A GPU's product instructions to try: sync, wgmma, wgmma-vt (default: sync, and
    /// wgmma on sm_90).
    #[arg(long, value_delimiter = ',', value_parser = ["sync", "wgmma", "wgmma-vt"])]
    mma: Vec<String>,
    /// A GPU's 16-bit input type: bf16 (the default) or f16.
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Where a GPU tuning run's candidates go (a new or empty directory).
    #[arg(short, long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Record a GPU tuning run whose results.json came back from `zebra-run tune DIR`.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "file", "model", "target", "seq_len", "threads", "repeats", "block_q", "block_k", "mma",
        "dtype", "output", "backward", "json",
    ])]
    record: Option<PathBuf>,
    /// Time the backward pass too, as a training step runs it (the tiles serve both; the
    /// CPU only).
    #[arg(long)]
    backward: bool,
    /// The tuning database to update (default: $ZEBRA_TUNING_DB, else tuning.json in
    /// the kernel cache's directory).
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
    /// One JSON object per candidate (the CPU only).
    #[arg(long)]
    json: bool,
}

/// `zebra tune`: the CPU's tuning, a GPU's tuning run, or recording one's results.
fn tune_command(cli: TuneCli) -> anyhow::Result<()> {
    let TuneCli {
        file,
        model,
        target,
        seq_len,
        threads,
        repeats,
        block_q,
        block_k,
        mma,
        dtype,
        output,
        record,
        backward,
        db,
        json,
    } = cli;
    if let Some(dir) = record {
        return tune::gpu::record(&dir, db.as_deref());
    }
    let file = file.ok_or_else(|| anyhow::anyhow!("name the model to tune"))?;
    let sizes = |sizes: Option<tune::Sizes>, default: &[u64]| {
        sizes.map_or_else(|| default.to_vec(), |s| s.0)
    };
    if target == zebra_passes::Target::Cpu {
        let gpu_only = [
            (!mma.is_empty(), "--mma"),
            (dtype.is_some(), "--dtype"),
            (output.is_some(), "--output"),
        ];
        if let Some((_, flag)) = gpu_only.iter().find(|(set, _)| *set) {
            anyhow::bail!(
                "{flag} is a setting of a GPU's tuning run: use it with --target sm_80 \
                 or sm_90"
            );
        }
        return tune::tune(&tune::TuneArgs {
            file: &file,
            model: model.as_deref(),
            seq_len,
            threads,
            repeats: repeats.unwrap_or(5),
            block_q: sizes(block_q, &[32, 64, 128]),
            block_k: sizes(block_k, &[32, 64, 128]),
            backward,
            db,
            json,
        });
    }
    if backward || json {
        anyhow::bail!(
            "--backward and --json are settings of the CPU's tuning: a GPU's tunes the \
             forward attention kernels"
        );
    }
    use zebra_codegen::kernels::attention_mma::{Half, Product};
    let half = match dtype {
        None | Some(Dtype::Bf16) => Half::Bf16,
        Some(Dtype::F16) => Half::F16,
        Some(Dtype::F32) => anyhow::bail!("tensor-core kernels take bf16 or f16 inputs, not f32"),
    };
    let products: Vec<Product> = if mma.is_empty() {
        match target {
            zebra_passes::Target::Sm90 => vec![Product::Sync, Product::Wgmma],
            _ => vec![Product::Sync],
        }
    } else {
        mma.iter().filter_map(|m| Product::from_name(m)).collect()
    };
    let block_q = sizes(block_q, &[64, 128]);
    if let Some(q) = block_q.iter().find(|q| ![64, 128].contains(*q)) {
        anyhow::bail!("--block-q {q}: a GPU's attention kernels take 64 or 128 queries per tile");
    }
    let block_k = sizes(block_k, &[32, 64, 128]);
    if let Some(k) = block_k.iter().find(|k| !k.is_multiple_of(16) || **k > 128) {
        anyhow::bail!(
            "--block-k {k}: a GPU's attention kernels take 16, 32, 64 or 128 keys per tile"
        );
    }
    let output = output.ok_or_else(|| {
        anyhow::anyhow!(
            "a GPU's tuning run compiles its candidates into a directory: name a new \
             one with -o DIR"
        )
    })?;
    tune::gpu::tune(&tune::gpu::GpuTuneArgs {
        file: &file,
        model: model.as_deref(),
        target,
        half,
        products,
        block_q: block_q.iter().map(|&q| q as usize).collect(),
        block_k: block_k.iter().map(|&k| k as usize).collect(),
        out: &output,
        seq_len,
        repeats: repeats.unwrap_or(20),
        db,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { file } => commands::check(&file),
        Command::Compile {
            file,
            emit,
            output,
            model,
            target,
            print_after,
            timings,
            explain,
            max_seq_len,
            purpose,
            dtype,
            stages,
            block_k,
            block_q,
            mma,
        } => commands::compile(&commands::CompileArgs {
            purpose,
            dtype,
            mma: zebra_codegen::kernels::attention_mma::MmaSettings {
                stages: stages.map(usize::from),
                block_k: block_k.and_then(|k| k.parse().ok()),
                block_q: block_q.and_then(|q| q.parse().ok()),
                product: mma
                    .as_deref()
                    .and_then(zebra_codegen::kernels::attention_mma::Product::from_name),
            },
            file: &file,
            emit,
            output: output.as_deref(),
            model: model.as_deref(),
            target,
            print_after: print_after.as_deref(),
            timings,
            explain: explain.as_deref(),
            max_seq_len,
        }),
        Command::Init {
            file,
            seed,
            output,
            model,
        } => commands::init(&file, seed, &output, model.as_deref()),
        Command::Run {
            file,
            weights,
            tokens,
            output,
            sides,
            model,
            interpret,
            threads,
            max_seq_len,
            device,
        } => commands::run(&commands::RunArgs {
            file: &file,
            weights: &weights,
            tokens: &tokens,
            output: &output,
            sides: &sides,
            model: model.as_deref(),
            interpret,
            threads,
            max_seq_len,
            device: &device,
        }),
        Command::Encode {
            text,
            output,
            tokenizer,
        } => commands::encode(&text, &output, tokenizer.as_deref()),
        Command::Import {
            path,
            output,
            name,
            zebra,
            global_last,
        } => {
            let layout = match zebra {
                Some((group, window)) => import::Layout::Zebra {
                    group,
                    window,
                    global_last,
                },
                None => import::Layout::AsConfigured,
            };
            import::run(&path, output.as_deref(), name.as_deref(), layout)
        }
        Command::Toolchain => commands::toolchain(),
        Command::Emulate {
            file,
            model,
            seq_len,
            batch,
            rows,
            dtype,
            target,
            seed,
            mma,
            block_k,
        } => commands::emulate(&commands::EmulateArgs {
            file: &file,
            model: model.as_deref(),
            seq_len,
            batch,
            rows,
            dtype,
            target,
            seed,
            mma: zebra_codegen::kernels::attention_mma::MmaSettings {
                block_k: block_k.and_then(|k| k.parse().ok()),
                product: zebra_codegen::kernels::attention_mma::Product::from_name(&mma),
                ..Default::default()
            },
        }),
        Command::Generate {
            source,
            prompt,
            tokenizer,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            context,
            stats,
            model_file,
            model,
            threads,
            device,
        } => infer::generate(&infer::GenerateArgs {
            source: &source,
            model_file: model_file.as_deref(),
            model: model.as_deref(),
            prompt: &prompt,
            tokenizer: tokenizer.as_deref(),
            max_tokens,
            context,
            sampling: zebra_runtime::sample::Sampling {
                temperature,
                top_k,
                top_p,
            },
            seed,
            stats,
            threads,
            device: &device,
        }),
        Command::Eval {
            sources,
            data,
            tokenizer,
            task,
            context,
            pairs,
            samples,
            batch,
            seed,
            json,
            model_file,
            model,
            threads,
            device,
        } => infer::eval(&infer::EvalArgs {
            sources: &sources,
            model_file: model_file.as_deref(),
            model: model.as_deref(),
            data: data.as_deref(),
            tokenizer: tokenizer.as_deref(),
            task: task.as_deref(),
            contexts: &context,
            pairs,
            samples,
            batch,
            seed,
            json,
            threads,
            device: &device,
        }),
        Command::Train(args) => train::train(&args),
        Command::Tune(cli) => tune_command(cli),
        Command::Bench {
            names,
            seq_len,
            threads,
            repeats,
            window,
            heads,
            head_dim,
            batch,
            no_baseline,
            json,
            blocks,
            torch,
        } => bench::bench(&bench::BenchArgs {
            batch,
            names: &names,
            seq_len,
            threads,
            repeats: repeats.max(1),
            json,
            window,
            heads,
            head_dim,
            baseline: !no_baseline,
            blocks,
            torch,
            records: Default::default(),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<train::Interrupted>() => ExitCode::from(130),
        Err(err) => {
            if !err.is::<commands::Reported>() {
                eprintln!("error: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}
