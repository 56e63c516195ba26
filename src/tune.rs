//! `zebra tune` and the tuning database.
//!
//! `zebra tune FILE.zb` times each distinct attention of a model, compiled with every pair of
//! candidate tile sizes, on random inputs on this machine; checks each against the target's
//! default tiles; and records the fastest in the tuning database, a JSON file
//! (`$ZEBRA_TUNING_DB`, else `tuning.json` in the kernel cache's directory). Compiling for
//! the CPU then reads the database's entries for this machine: an attention computing the
//! same thing (mask, score modifier, side inputs, heads, KV heads, head dim) gets the tiles
//! recorded for it, whatever model or layer it is in. A GPU's tensor-core kernels are tuned
//! through a tuning run timed on the GPU's machine ([`gpu`]); compiling for its target reads
//! the entries of that GPU ([`mma_choice`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use zebra_ir::op::{AttentionKernel, Op};
use zebra_ir::types::{DType, Dim, TensorType};
use zebra_ir::{Graph, Node, Weights};
use zebra_passes::{AttentionKey, Blocks, Target, TileTable};
use zebra_runtime::{CpuModel, Tensor};

pub mod gpu;

/// The environment variable naming the tuning database; empty: no database.
pub const DB_ENV: &str = "ZEBRA_TUNING_DB";

/// The version of the database's format this build reads and writes.
const VERSION: u32 = 1;

/// One tuned attention: the tiles measured fastest for it on one kind of machine.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The target compiled for (`cpu`).
    pub target: String,
    /// The machine measured on (see [`host_machine`]): entries apply only on its kind.
    pub machine: String,
    pub mask: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sides: Vec<String>,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub block_q: u64,
    pub block_k: u64,
    /// On a GPU, the tensor-core kernel's product instruction (`sync`, `wgmma`, `wgmma-vt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mma: Option<String>,
    /// The sequence length, threads (0 on a GPU) and median time of the measurement.
    pub seq_len: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub threads: usize,
    pub time_ms: f64,
    /// The target's default tiles' median time in the same run (none: they failed there).
    pub default_time_ms: Option<f64>,
    /// Whether the times are of the forward and backward passes (for training), not the
    /// forward pass alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backward: bool,
}

impl Entry {
    fn key(&self) -> AttentionKey {
        AttentionKey {
            mask: self.mask.clone(),
            score: self.score.clone(),
            sides: self.sides.clone(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    fn blocks(&self) -> Blocks {
        Blocks {
            block_q: self.block_q,
            block_k: self.block_k,
        }
    }

    /// What was measured, in words: `at T = 4096: 1.234 ms, 1.25x the default tiles' speed`.
    fn measured(&self) -> String {
        let against = match self.default_time_ms {
            Some(default) => format!("{:.2}x the default tiles' speed", default / self.time_ms),
            None => "the default tiles failed their check".into(),
        };
        format!("at T = {}: {:.3} ms, {against}", self.seq_len, self.time_ms)
    }

    fn same_place(&self, other: &Entry) -> bool {
        self.target == other.target && self.machine == other.machine && self.key() == other.key()
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize)]
struct DbFile {
    version: u32,
    entries: Vec<Entry>,
}

/// The tuning database: a JSON file of [`Entry`]s.
#[derive(Debug)]
pub struct Database {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

impl Database {
    /// Where the database is: `$ZEBRA_TUNING_DB` (`None` when it is set but empty), else
    /// `tuning.json` in the kernel cache's directory.
    pub fn location() -> Option<PathBuf> {
        match std::env::var_os(DB_ENV) {
            Some(path) if path.is_empty() => None,
            Some(path) => Some(PathBuf::from(path)),
            None => zebra_codegen::artifact::Cache::default_location()
                .map(|cache| cache.dir.join("tuning.json")),
        }
    }

    /// Reads the database at `path`; a file that does not exist is an empty database.
    pub fn open(path: &Path) -> Result<Database> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Database {
                    path: path.to_path_buf(),
                    entries: Vec::new(),
                });
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot read the tuning database {}", path.display())
                });
            }
        };
        let file: DbFile = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "the tuning database {} is not valid ({e}); move it away or delete it, then \
                 tune again",
                path.display()
            )
        })?;
        if file.version != VERSION {
            bail!(
                "the tuning database {} has version {}; this zebra reads version {VERSION}: \
                 move it away or delete it, then tune again",
                path.display(),
                file.version
            );
        }
        if let Some((i, entry)) = file
            .entries
            .iter()
            .enumerate()
            .find(|(_, e)| !(1..=1024).contains(&e.block_q) || !(1..=1024).contains(&e.block_k))
        {
            bail!(
                "the tuning database {} is not valid (entry {i}, mask `{}`: tiles {} are not \
                 from 1 to 1024 each); move it away or delete it, then tune again",
                path.display(),
                entry.mask,
                entry.blocks()
            );
        }
        Ok(Database {
            path: path.to_path_buf(),
            entries: file.entries,
        })
    }

    /// The tiles this database chose for compiling for `target` on this machine.
    pub fn tiles(&self, target: Target) -> TileTable {
        TileTable::new(self.here(target).map(|e| (e.key(), e.blocks())))
    }

    /// The entry for what `kernel` computes, compiled for `target` on this machine.
    pub fn entry(&self, target: Target, kernel: &AttentionKernel) -> Option<&Entry> {
        let key = AttentionKey::of(kernel);
        self.here(target).find(|e| e.key() == key)
    }

    /// The entries for compiling for `target` on this machine.
    fn here(&self, target: Target) -> impl Iterator<Item = &Entry> {
        let machine = host_machine();
        self.entries
            .iter()
            .filter(move |e| e.target == target.name() && e.machine == machine)
    }

    /// Adds `entry`, replacing the one for the same attention, target and machine.
    pub fn record(&mut self, entry: Entry) {
        match self.entries.iter_mut().find(|e| e.same_place(&entry)) {
            Some(old) => *old = entry,
            None => self.entries.push(entry),
        }
    }

    /// Writes the database atomically: a temporary file beside it, renamed into place.
    pub fn save(&self) -> Result<()> {
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let file = DbFile {
            version: VERSION,
            entries: self.entries.clone(),
        };
        let text = serde_json::to_string_pretty(&file)? + "\n";
        zebra_ir::weights::write_atomically(&self.path, text.as_bytes())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The kind of machine tiles are measured on: the architecture and the widest vector unit
/// the CPU kernels are compiled for.
pub fn host_machine() -> String {
    #[cfg(target_arch = "x86_64")]
    let vectors = if std::arch::is_x86_feature_detected!("avx512f") {
        "avx512f"
    } else if std::arch::is_x86_feature_detected!("avx2") {
        "avx2"
    } else {
        "sse2"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let vectors = "";
    format!("{} {vectors}", std::env::consts::ARCH)
        .trim_end()
        .to_string()
}

/// The database compiling reads, once per process: `None` when there is none. An unreadable
/// one is reported (once) and ignored, so that compiling never fails for it.
fn default_database() -> Option<&'static Database> {
    static DATABASE: OnceLock<Option<Database>> = OnceLock::new();
    DATABASE
        .get_or_init(|| {
            let path = Database::location()?;
            match Database::open(&path) {
                Ok(db) => Some(db),
                Err(e) => {
                    eprintln!("warning: {e:#}; compiling with the default tile sizes");
                    None
                }
            }
        })
        .as_ref()
}

/// The optimizer's options for compiling for `target`: for the CPU with the tuning
/// database's tiles for this machine (`zebra tune` measures the CPU's kernels only).
pub fn options(target: Target) -> zebra_passes::Options {
    let tiles = match (target, default_database()) {
        (Target::Cpu, Some(db)) => db.tiles(target),
        _ => TileTable::default(),
    };
    zebra_passes::Options {
        target,
        tiles,
        ..zebra_passes::Options::default()
    }
}

/// For `zebra compile`: a note per attention whose tiles came from the tuning database.
pub fn notes(graph: &Graph, target: Target) -> Vec<String> {
    let Some(db) = default_database().filter(|_| target == Target::Cpu) else {
        return Vec::new();
    };
    zebra_ir::print::kernel_table(graph)
        .into_iter()
        .filter_map(|(name, kernel)| {
            let entry = db.entry(target, &kernel)?;
            ((entry.block_q, entry.block_k) == (kernel.block_q, kernel.block_k)).then(|| {
                format!(
                    "note: @{name}: tiles {} from the tuning database {} ({})",
                    entry.blocks(),
                    db.path.display(),
                    entry.measured()
                )
            })
        })
        .collect()
}

/// The environment variable naming the GPU whose tuned settings compiling for a GPU target
/// uses, as its driver names it (`NVIDIA H100 80GB HBM3`); needed only when the database has
/// entries of several GPUs and this machine has none of them.
pub const GPU_ENV: &str = "ZEBRA_TUNING_GPU";

/// The GPU whose entries compiling for `target` uses: `$ZEBRA_TUNING_GPU`, else this
/// machine's GPU 0 when it has one, else the one GPU the database has entries of for
/// `target`. Several and none chosen: a warning (once), and none.
fn tuned_gpu(db: &Database, target: Target) -> Option<String> {
    static WARNED: OnceLock<()> = OnceLock::new();
    if let Some(name) = std::env::var_os(GPU_ENV).filter(|n| !n.is_empty()) {
        return Some(name.to_string_lossy().into_owned());
    }
    // Asked of the driver once per process (it opens a context).
    static HERE: OnceLock<Option<String>> = OnceLock::new();
    let here = HERE.get_or_init(|| {
        zebra_runtime::cuda::driver_present()
            .then(zebra_runtime::cuda::device_name)
            .and_then(Result::ok)
    });
    if let Some(name) = here {
        return Some(name.clone());
    }
    let mut gpus: Vec<&str> = db
        .entries
        .iter()
        .filter(|e| e.target == target.name())
        .map(|e| e.machine.as_str())
        .collect();
    gpus.sort_unstable();
    gpus.dedup();
    match gpus.as_slice() {
        [] => None,
        [gpu] => Some(gpu.to_string()),
        several => {
            WARNED.get_or_init(|| {
                eprintln!(
                    "warning: the tuning database {} has settings for {target} on several GPUs \
                     ({}): set {GPU_ENV} to the one to compile for; compiling with the default \
                     settings",
                    db.path.display(),
                    several.join(", ")
                );
            });
            None
        }
    }
}

/// The settings of the tensor-core attention kernels of `graph` for a GPU target: `all` (the
/// command line's) where it set any, else the tuning database's for the GPU [`tuned_gpu`]
/// picks; with a note per attention that gets tuned settings. An entry the kernels would not
/// take (a database edited by hand, or from another version) is warned about and skipped.
pub fn mma_choice(
    target: Target,
    all: zebra_codegen::kernels::attention_mma::MmaSettings,
    graph: &Graph,
) -> (
    zebra_codegen::kernels::attention_mma::MmaChoice,
    Vec<String>,
) {
    use zebra_codegen::kernels::attention_mma::{MmaChoice, MmaSettings, MmaTiles, Product};
    let mut choice = MmaChoice::from(all);
    let mut notes = Vec::new();
    let (Some(db), Some(gpu)) = (
        default_database(),
        zebra_codegen::ptx::GpuTarget::from_name(target.name()),
    ) else {
        return (choice, notes);
    };
    if all != MmaSettings::default() {
        return (choice, notes);
    }
    let Some(machine) = tuned_gpu(db, target) else {
        return (choice, notes);
    };
    for (name, kernel) in zebra_ir::print::kernel_table(graph) {
        let key = AttentionKey::of(&kernel);
        let Some(entry) = db
            .entries
            .iter()
            .find(|e| e.target == target.name() && e.machine == machine && e.key() == key)
        else {
            continue;
        };
        let settings = MmaSettings {
            product: entry.mma.as_deref().and_then(Product::from_name),
            block_q: Some(entry.block_q as usize),
            block_k: Some(entry.block_k as usize),
            stages: None,
        };
        let taken = settings.product.is_some()
            && (!settings.product.is_some_and(Product::is_wgmma) || gpu.sm >= 90)
            && MmaTiles::for_head_dim(kernel.head_dim as usize, gpu.sm)
                .is_some_and(|tiles| tiles.checked_with(&settings).is_ok());
        if !taken {
            eprintln!(
                "warning: the tuning database {} has settings for @{name} that its kernel does \
                 not take ({} {}); compiling it with the defaults",
                db.path.display(),
                entry.mma.as_deref().unwrap_or("no product"),
                entry.blocks()
            );
            continue;
        }
        notes.push(format!(
            "note: @{name}: {} {} from the tuning database {} ({machine}, {})",
            entry.mma.as_deref().unwrap_or_default(),
            entry.blocks(),
            db.path.display(),
            entry.measured()
        ));
        choice.tuned.insert(key, settings);
    }
    (choice, notes)
}

/// What `zebra tune` was asked.
pub struct TuneArgs<'a> {
    pub file: &'a Path,
    pub model: Option<&'a str>,
    pub seq_len: usize,
    pub threads: usize,
    pub repeats: usize,
    pub block_q: Vec<u64>,
    pub block_k: Vec<u64>,
    /// Time the backward pass too (`dq`, `dk`, `dv`), as training runs it.
    pub backward: bool,
    /// The database to write (default: [`Database::location`]).
    pub db: Option<PathBuf>,
    pub json: bool,
}

/// One candidate's measurement.
struct Measured {
    blocks: Blocks,
    time: f64,
    /// The largest difference from the default tiles' output, relative to its largest value.
    error: f64,
}

/// Outputs of tiles that compute the same attention differ by rounding only.
const TOLERANCE: f64 = 1e-4;

/// How much faster than the default tiles others must be to replace them.
const MARGIN: f64 = 0.03;

/// How much memory the candidates loaded at once may take, about.
const LOADED_BYTES: usize = 6 << 30;

/// About how much memory one loaded candidate takes: its inputs, outputs and the backward's
/// log-sum-exp, f32, four times over for the scratch of its kernels (measured: about 500 MB
/// for 8 heads of 64 at T = 8192 with the backward, against 270 MB of these tensors).
fn footprint(kernel: &AttentionKernel, args: &TuneArgs) -> usize {
    let t = args.seq_len;
    let (h, kv, d) = (
        kernel.heads as usize,
        kernel.kv_heads as usize,
        kernel.head_dim as usize,
    );
    let (queries, keys) = (h * t * d, kv * t * d);
    // q, k, v, out; with the backward also dout, dq, dk, dv and the log-sum-exp.
    let floats = if args.backward {
        4 * queries + 4 * keys + h * t
    } else {
        2 * queries + 2 * keys
    };
    4 * 4 * floats + 8 * t * kernel.sides.len()
}

/// The database `zebra tune` writes: `db`, else [`Database::location`].
fn database_path(db: Option<&Path>) -> Result<PathBuf> {
    match db {
        Some(path) => Ok(path.to_path_buf()),
        None => Database::location().ok_or_else(|| {
            anyhow!("{DB_ENV} is set but empty (no tuning database): name one with --db FILE")
        }),
    }
}

/// The distinct attentions of the model in `file` optimized for `target`, each with the
/// name of the first layer kind that has it, by what they compute (with default tiles).
fn distinct_attentions(
    file: &Path,
    model: Option<&str>,
    target: Target,
) -> Result<BTreeMap<AttentionKey, (String, AttentionKernel)>> {
    let (_, graph) = crate::commands::load_graph(file, model, &mut Vec::new())?;
    let options = zebra_passes::Options {
        target,
        ..Default::default()
    };
    let optimized = zebra_passes::optimize(&graph, &options)?.graph;
    let mut kernels = BTreeMap::new();
    for (name, kernel) in zebra_ir::print::kernel_table(&optimized) {
        kernels
            .entry(AttentionKey::of(&kernel))
            .or_insert((name, kernel));
    }
    Ok(kernels)
}

pub fn tune(args: &TuneArgs) -> Result<()> {
    let path = database_path(args.db.as_deref())?;
    // Read it first: a database this cannot read is not overwritten.
    let mut db = Database::open(&path)?;
    let kernels = distinct_attentions(args.file, args.model, Target::Cpu)?;
    if kernels.is_empty() {
        bail!(
            "{} has no fused attention to tune (`zebra compile --emit opt` shows why)",
            args.file.display()
        );
    }
    let scratch = tempfile::Builder::new()
        .prefix("zebra-tune")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let mut chosen = Vec::new();
    for (name, kernel) in kernels.values() {
        chosen.push(tune_attention(name, kernel, args, scratch.path())?);
    }
    let count = chosen.len();
    for entry in chosen {
        db.record(entry);
    }
    db.save()?;
    if !args.json {
        println!(
            "recorded {count} attention{} in {} (compiling for the CPU on this machine reads it)",
            if count == 1 { "" } else { "s" },
            path.display()
        );
    }
    Ok(())
}

/// Measures the candidate tiles of one attention (`@name`), prints them, and returns the
/// entry of the fastest (or the default's).
fn tune_attention(
    name: &str,
    kernel: &AttentionKernel,
    args: &TuneArgs,
    scratch: &Path,
) -> Result<Entry> {
    let target = Target::Cpu;
    if !args.json {
        println!(
            "@{name}: {} at T = {}{}",
            AttentionKey::of(kernel),
            args.seq_len,
            if args.backward {
                ", forward and backward"
            } else {
                ""
            }
        );
    }
    // The default tiles first: the others are checked against them.
    let defaults = zebra_passes::tiles::default_blocks(target, &kernel.mask, kernel.heads as usize);
    let mut candidates = vec![defaults];
    for &block_q in &args.block_q {
        for &block_k in &args.block_k {
            let blocks = Blocks { block_q, block_k };
            if !candidates.contains(&blocks) {
                candidates.push(blocks);
            }
        }
    }
    // As many candidates loaded at once (and timed in turns) as fit in the memory budget.
    let at_once = (LOADED_BYTES / footprint(kernel, args)).max(1);
    let mut runs = Vec::with_capacity(candidates.len());
    let mut threads = 0;
    for group in candidates.chunks(at_once) {
        let mut loaded = Vec::with_capacity(group.len());
        for &blocks in group {
            let dir = scratch.join(format!("{name}-{blocks}"));
            loaded.push(load_attention(kernel, blocks, args, &dir)?);
        }
        threads = loaded[0].0.threads();
        runs.extend(time_round_robin(&mut loaded, args.repeats)?);
    }
    let mut measured: Vec<Measured> = Vec::new();
    let reference = &runs[0].1;
    for (&blocks, (time, outputs)) in candidates.iter().zip(&runs) {
        let time = *time;
        let error = reference
            .iter()
            .map(|(name, expected)| {
                outputs
                    .get(name)
                    .map_or(f64::INFINITY, |out| relative_difference(out, expected))
            })
            .fold(0.0, f64::max);
        let ok = error <= TOLERANCE;
        if args.json {
            let line = serde_json::json!({
                "attention": name, "block_q": blocks.block_q, "block_k": blocks.block_k,
                "seq_len": args.seq_len, "threads": threads, "backward": args.backward,
                "time_ms": time * 1e3, "relative_error": error, "ok": ok,
            });
            println!("{line}");
        } else {
            let verdict = if ok {
                String::new()
            } else {
                format!("  wrong: differs from the default tiles by {error:.1e}; not used")
            };
            println!(
                "  {:>9} {:>10.3} ms{verdict}",
                blocks.to_string(),
                time * 1e3
            );
        }
        if ok {
            measured.push(Measured {
                blocks,
                time,
                error,
            });
        }
    }
    // Other tiles replace the default only when clearly faster: within 3% is noise.
    let default_time = measured[0].time;
    let best = measured
        .iter()
        .filter(|m| m.time < default_time * (1.0 - MARGIN))
        .min_by(|a, b| a.time.total_cmp(&b.time))
        .unwrap_or(&measured[0]);
    if !args.json {
        println!(
            "  best: {} ({:.2}x the default {}; largest difference {:.1e})",
            best.blocks,
            default_time / best.time,
            defaults,
            best.error
        );
    }
    let key = AttentionKey::of(kernel);
    Ok(Entry {
        target: target.name().into(),
        machine: host_machine(),
        mask: key.mask,
        score: key.score,
        sides: key.sides,
        heads: key.heads,
        kv_heads: key.kv_heads,
        head_dim: key.head_dim,
        block_q: best.blocks.block_q,
        block_k: best.blocks.block_k,
        seq_len: args.seq_len,
        threads,
        time_ms: best.time * 1e3,
        default_time_ms: Some(default_time * 1e3),
        mma: None,
        backward: args.backward,
    })
}

/// The largest absolute difference of `actual` from `expected`, relative to the largest
/// magnitude of `expected`.
fn relative_difference(actual: &ArrayD<f32>, expected: &ArrayD<f32>) -> f64 {
    let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
    let worst = actual
        .iter()
        .zip(expected)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs() as f64));
    if actual.shape() != expected.shape() || !worst.is_finite() {
        return f64::INFINITY;
    }
    worst / scale.max(f64::MIN_POSITIVE)
}

/// A graph of `kernel` alone at `blocks`: inputs `q`, `k`, `v` and its side inputs, output
/// `out`; with `backward`, also input `dout` (the gradient of `out`) and outputs `dq`, `dk`
/// and `dv`, through the fused backward that training uses.
pub fn attention_graph(kernel: &AttentionKernel, blocks: Blocks, backward: bool) -> Result<Graph> {
    let kernel = AttentionKernel {
        block_q: blocks.block_q,
        block_k: blocks.block_k,
        merge_heads: false,
        ..kernel.clone()
    };
    let mut graph = Graph::new(kernel.name.clone());
    let input = |graph: &mut Graph, name: &str, ty: TensorType| {
        graph.add(
            Node {
                op: Op::Input { name: name.into() },
                ty,
                layer: None,
                loc: None,
            },
            &[],
        )
    };
    let heads = |h: u64| {
        TensorType::f32(vec![
            Dim::B,
            Dim::Const(h),
            Dim::T,
            Dim::Const(kernel.head_dim),
        ])
    };
    let mut operands = vec![
        input(&mut graph, "q", heads(kernel.heads)),
        input(&mut graph, "k", heads(kernel.kv_heads)),
        input(&mut graph, "v", heads(kernel.kv_heads)),
    ];
    for side in &kernel.sides {
        let values = input(
            &mut graph,
            side,
            TensorType::new(DType::I64, vec![Dim::B, Dim::T]),
        );
        operands.push(values);
        for block in [blocks.block_q, blocks.block_k] {
            let ranges = graph
                .add_inferred(Op::TileRanges { block }, &[values], None)
                .map_err(|e| anyhow!("internal error: {e}"))?;
            operands.push(ranges);
        }
    }
    let out = graph
        .add_inferred(Op::Attention(Box::new(kernel)), &operands, None)
        .map_err(|e| anyhow!("internal error: {e}"))?;
    graph.add_output("out", out);
    if backward {
        let ty = graph.node(out).ty.clone();
        let dout = input(&mut graph, "dout", ty);
        let adjoints = zebra_passes::autodiff::gradients(&mut graph, [(out, dout)].into())
            .map_err(|e| anyhow!("internal error: {e}"))?;
        for (name, of) in ["dq", "dk", "dv"].into_iter().zip(&operands) {
            let grad = adjoints
                .get(of)
                .ok_or_else(|| anyhow!("internal error: no gradient of `{}`", &name[1..]))?;
            graph.add_output(name, *grad);
        }
    }
    zebra_ir::verify(&graph).map_err(|e| anyhow!("internal error: {e}"))?;
    Ok(graph)
}

/// A compiled candidate, loaded, with its inputs.
type Loaded = (CpuModel, BTreeMap<String, Tensor>);

/// A candidate's outputs, by name.
type Outputs = BTreeMap<String, ArrayD<f32>>;

/// Compiles `kernel` at `blocks` into `dir` and loads it with random inputs (the same for
/// every candidate; side inputs: eight equal segments, as document ids).
fn load_attention(
    kernel: &AttentionKernel,
    blocks: Blocks,
    args: &TuneArgs,
    dir: &Path,
) -> Result<Loaded> {
    let graph = attention_graph(kernel, blocks, args.backward)?;
    crate::commands::build_artifact_at(&graph, dir, args.seq_len)?;
    let model = CpuModel::load(dir, &Weights::new(), args.threads)?;
    let t = args.seq_len;
    let (h, kv, d) = (
        kernel.heads as usize,
        kernel.kv_heads as usize,
        kernel.head_dim as usize,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut random = |shape: &[usize]| {
        Tensor::F32(ArrayD::from_shape_fn(IxDyn(shape), |_| {
            rng.random_range(-1.0f32..1.0)
        }))
    };
    let mut inputs: BTreeMap<String, Tensor> = BTreeMap::new();
    inputs.insert("q".into(), random(&[1, h, t, d]));
    inputs.insert("k".into(), random(&[1, kv, t, d]));
    inputs.insert("v".into(), random(&[1, kv, t, d]));
    if args.backward {
        inputs.insert("dout".into(), random(&[1, h, t, d]));
    }
    let segment = t.div_ceil(8);
    for side in &kernel.sides {
        let ids = ArrayD::from_shape_fn(IxDyn(&[1, t]), |i| (i[1] / segment) as i64);
        inputs.insert(side.clone(), Tensor::I64(ids));
    }
    Ok((model, inputs))
}

/// Runs every candidate once (a warm-up: schedules, memory), then `repeats` rounds of one
/// run each, so that a slow spell of the machine falls on all of them alike; returns each
/// one's median time and outputs.
fn time_round_robin(loaded: &mut [Loaded], repeats: usize) -> Result<Vec<(f64, Outputs)>> {
    let mut outputs = Vec::with_capacity(loaded.len());
    for (model, inputs) in loaded.iter_mut() {
        outputs.push(model.run(inputs)?);
    }
    let mut times = vec![Vec::with_capacity(repeats); loaded.len()];
    for _ in 0..repeats {
        for ((model, inputs), times) in loaded.iter_mut().zip(&mut times) {
            let start = Instant::now();
            model.run(inputs)?;
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times
        .into_iter()
        .zip(outputs)
        .map(|(mut times, out)| {
            times.sort_by(f64::total_cmp);
            (times[times.len() / 2], out)
        })
        .collect())
}

/// Tile sizes to try.
#[derive(Clone, Debug)]
pub struct Sizes(pub Vec<u64>);

/// Parses a list of tile sizes, `32,64,128`.
pub fn parse_sizes(text: &str) -> Result<Sizes, String> {
    text.split(',')
        .map(|part| {
            let part = part.trim();
            match part.parse::<u64>() {
                Ok(n) if n > 0 && n <= 1024 && n.is_multiple_of(8) => Ok(n),
                _ => Err(format!(
                    "`{part}` is not a tile size: give multiples of 8 up to 1024, as 32,64,128"
                )),
            }
        })
        .collect::<Result<_, _>>()
        .map(Sizes)
}
