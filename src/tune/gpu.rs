//! Tuning the tensor-core attention kernels of a GPU target. The compiler and the GPU are
//! often on different machines (the GPU's has no toolchain), so a tuning run has three steps,
//! which `zebra tune FILE --target sm_90 -o DIR` chains when this machine has the GPU:
//!
//! 1. here: each distinct attention of the model compiled with every candidate setting of its
//!    kernel (product instruction, queries and keys per tile), one attention artifact per
//!    candidate under `DIR`, listed in `DIR/tune.json`;
//! 2. on the GPU: `zebra-run tune DIR` times and checks each, writing `DIR/results.json`;
//! 3. here: `zebra tune --record DIR` records, per attention, the fastest candidate that passed
//!    its check in the tuning database, for that GPU (by its driver's name), when it beats the
//!    default settings by the margin. Compiling for the target then reads them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use zebra_codegen::kernels::attention_mma::{Half, MmaSettings, MmaTiles, Product};
use zebra_codegen::ptx::GpuTarget;
use zebra_passes::{AttentionKey, Blocks, Target};
use zebra_runtime::tuning::{
    TUNE_FORMAT, TuneCandidate, TuneManifest, TuneResults, TunedAttention,
};

use super::{Database, Entry, MARGIN};

/// What `zebra tune FILE --target sm_80|sm_90` was asked.
pub struct GpuTuneArgs<'a> {
    pub file: &'a Path,
    pub model: Option<&'a str>,
    pub target: Target,
    pub half: Half,
    /// The product instructions to try (`wgmma` on sm_90 only).
    pub products: Vec<Product>,
    pub block_q: Vec<usize>,
    pub block_k: Vec<usize>,
    /// Where the candidates go.
    pub out: &'a Path,
    /// For the GPU run (here, when this machine has the GPU; else `zebra-run tune`'s
    /// defaults).
    pub seq_len: usize,
    pub repeats: usize,
    pub db: Option<PathBuf>,
}

/// Compiles the candidates of every distinct attention into `args.out`; then, when this
/// machine has a GPU and `zebra-run` beside this program, runs them and records the results.
pub fn tune(args: &GpuTuneArgs) -> Result<()> {
    let gpu = GpuTarget::from_name(args.target.name())
        .ok_or_else(|| anyhow!("internal error: {} is not a GPU target", args.target))?;
    if let Some(product) = args.products.iter().find(|p| p.is_wgmma())
        && gpu.sm < 90
    {
        bail!(
            "--mma {} is sm_90's warpgroup instruction: use it with --target sm_90",
            product.name()
        );
    }
    // With the GPU here, the run is recorded at once: `zebra-run`, and the database's path
    // settled (and the file read) before the long part. Without, this only prepares.
    let local = match std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("zebra-run"))
        .filter(|run| run.exists() && zebra_runtime::cuda::driver_present())
    {
        Some(run) => {
            let db_path = super::database_path(args.db.as_deref())?;
            Database::open(&db_path)?;
            Some((run, db_path))
        }
        None => None,
    };
    if std::fs::read_dir(args.out).is_ok_and(|mut entries| entries.next().is_some()) {
        bail!(
            "{} is not empty: name a new directory for the tuning run",
            args.out.display()
        );
    }
    let kernels = super::distinct_attentions(args.file, args.model, args.target)?;
    // The attentions a tensor-core kernel takes, with the head dim's default tiles.
    let tunable: Vec<_> = kernels
        .values()
        .filter_map(|(name, kernel)| {
            let d = kernel.head_dim as usize;
            let base = MmaTiles::for_head_dim(d, gpu.sm);
            if base.is_none() {
                println!(
                    "@{name}: no tensor-core kernel takes head dim {d} (a multiple of 16 up to \
                     256): not tuned"
                );
            }
            Some((name, kernel, base?))
        })
        .collect();
    if tunable.is_empty() {
        bail!(
            "{} has no attention that tensor-core kernels take (`zebra compile --emit opt` \
             shows the fused attentions)",
            args.file.display()
        );
    }
    std::fs::create_dir_all(args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut manifest = TuneManifest {
        format: TUNE_FORMAT,
        target: args.target.name().into(),
        dtype: args.half.name().into(),
        source: args.file.display().to_string(),
        seq_len: args.seq_len,
        repeats: args.repeats,
        attentions: Vec::new(),
        candidates: Vec::new(),
    };
    for (name, kernel, base) in tunable {
        let index = manifest.attentions.len();
        let key = AttentionKey::of(kernel);
        manifest.attentions.push(TunedAttention {
            name: name.clone(),
            mask: key.mask,
            score: key.score,
            sides: key.sides,
            heads: key.heads,
            kv_heads: key.kv_heads,
            head_dim: key.head_dim,
        });
        let (block_q, block_k) = args.target.attention_blocks();
        let alone = super::attention_graph(kernel, Blocks { block_q, block_k }, false)?;
        let mut built: Vec<MmaTiles> = Vec::new();
        for settings in candidates(args) {
            let Ok(tiles) = base.checked_with(&settings) else {
                continue;
            };
            if built.contains(&tiles) {
                continue;
            }
            let dir = format!(
                "a{index}-{}-{}x{}",
                tiles.product.name(),
                tiles.block_q,
                tiles.block_k
            );
            zebra_codegen::artifact::build_gpu_attention(
                &alone,
                &args.out.join(&dir),
                gpu,
                args.half,
                settings,
            )
            .with_context(|| format!("compiling @{name} as {dir}"))?;
            manifest.candidates.push(TuneCandidate {
                dir,
                attention: index,
                mma: tiles.product.name().into(),
                block_q: tiles.block_q,
                block_k: tiles.block_k,
                default: built.is_empty(),
            });
            built.push(tiles);
        }
        println!(
            "@{name}: {} candidates ({})",
            built.len(),
            AttentionKey::of(kernel)
        );
    }
    let text = serde_json::to_string_pretty(&manifest)? + "\n";
    std::fs::write(args.out.join("tune.json"), text)
        .with_context(|| format!("cannot write {}", args.out.join("tune.json").display()))?;
    println!(
        "wrote {} candidates in {}",
        manifest.candidates.len(),
        args.out.display()
    );
    match local {
        Some((run, db_path)) => {
            let status = std::process::Command::new(&run)
                .arg("tune")
                .arg(args.out)
                .status()
                .with_context(|| format!("cannot run {}", run.display()))?;
            if !status.success() && !args.out.join("results.json").exists() {
                bail!("{} tune {} failed", run.display(), args.out.display());
            }
            record(args.out, Some(&db_path))
        }
        None => {
            println!(
                "no GPU here: copy {dir} and zebra-run to the GPU's machine and run `zebra-run \
                 tune {dir}` there; bring {dir}/results.json back and run `zebra tune --record \
                 {dir}`",
                dir = args.out.display()
            );
            Ok(())
        }
    }
}

/// The candidate settings: the target's defaults first, then every combination asked for.
fn candidates(args: &GpuTuneArgs) -> Vec<MmaSettings> {
    let mut all = vec![MmaSettings::default()];
    for &product in &args.products {
        for &block_q in &args.block_q {
            for &block_k in &args.block_k {
                all.push(MmaSettings {
                    product: Some(product),
                    block_q: Some(block_q),
                    block_k: Some(block_k),
                    stages: None,
                });
            }
        }
    }
    all
}

/// `zebra tune --record DIR`: the fastest candidate of each attention that passed its check,
/// into the tuning database, where it beats the defaults by the margin (or the defaults
/// failed their check).
pub fn record(dir: &Path, db: Option<&Path>) -> Result<()> {
    let manifest = TuneManifest::load(dir)?;
    let results = TuneResults::load(dir, &manifest)?;
    let db_path = super::database_path(db)?;
    let mut db = Database::open(&db_path)?;
    let run_of = |candidate: &TuneCandidate| results.runs.iter().find(|r| r.dir == candidate.dir);
    if results.runs.len() < manifest.candidates.len() {
        println!(
            "note: results for {} of the {} candidates (the run on the GPU was cut short)",
            results.runs.len(),
            manifest.candidates.len()
        );
    }
    let mut recorded = 0;
    for (i, attention) in manifest.attentions.iter().enumerate() {
        let candidates: Vec<&TuneCandidate> = manifest
            .candidates
            .iter()
            .filter(|c| c.attention == i)
            .collect();
        let passed = |c: &&&TuneCandidate| {
            run_of(c).is_some_and(|r| r.ok && r.time_ms.is_some_and(|t| t.is_finite() && t > 0.0))
        };
        let time = |c: &TuneCandidate| run_of(c).and_then(|r| r.time_ms).unwrap_or(f64::INFINITY);
        let default = candidates.iter().find(|c| c.default).copied();
        let default_time = default.filter(|c| passed(&c)).map(time);
        let Some(best) = candidates
            .iter()
            .filter(passed)
            .min_by(|a, b| time(a).total_cmp(&time(b)))
            .copied()
        else {
            println!(
                "@{}: no candidate ran and passed its check on {}: nothing recorded",
                attention.name, results.device
            );
            continue;
        };
        let best_time = time(best);
        let describe = |c: &TuneCandidate| format!("{} {}x{}", c.mma, c.block_q, c.block_k);
        match default_time {
            Some(default_time) if best.default || best_time > default_time * (1.0 - MARGIN) => {
                println!(
                    "@{}: the defaults ({}, {default_time:.3} ms) stay: no candidate was {:.0}% \
                     faster",
                    attention.name,
                    default.map(describe).unwrap_or_default(),
                    MARGIN * 100.0
                );
                continue;
            }
            Some(default_time) => println!(
                "@{}: {} ({best_time:.3} ms, {:.2}x the defaults' speed) recorded",
                attention.name,
                describe(best),
                default_time / best_time
            ),
            None => println!(
                "@{}: {} ({best_time:.3} ms) recorded: the defaults failed or did not run on {}",
                attention.name,
                describe(best),
                results.device
            ),
        }
        db.record(Entry {
            target: manifest.target.clone(),
            machine: results.device.clone(),
            mask: attention.mask.clone(),
            score: attention.score.clone(),
            sides: attention.sides.clone(),
            heads: attention.heads,
            kv_heads: attention.kv_heads,
            head_dim: attention.head_dim,
            block_q: best.block_q as u64,
            block_k: best.block_k as u64,
            mma: Some(best.mma.clone()),
            seq_len: results.seq_len,
            threads: 0,
            time_ms: best_time,
            default_time_ms: default_time,
            backward: false,
        });
        recorded += 1;
    }
    db.save()?;
    println!(
        "recorded {recorded} attention{} for {} ({}) in {}",
        if recorded == 1 { "" } else { "s" },
        results.device,
        manifest.target,
        db_path.display()
    );
    Ok(())
}
