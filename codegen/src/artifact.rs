//! Building a compiled artifact: a directory holding `plan.json` and `kernels.so`. Kernel
//! objects are cached by content (the kernel's MLIR, the target and the LLVM version), so
//! rebuilding an unchanged model only links, an unchanged set of kernels not even that, and
//! any change to the kernel generator misses the cache by construction.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zebra_ir::Graph;

use crate::CodegenError;
use crate::backend::{CpuTarget, Mlir, Output, link_shared, llvm_compile};
use crate::kernels::attention_mma::TensorCores;
use crate::kernels::fnv1a;
use crate::mlir::module;
use crate::plan::{PlanMode, PlanOptions, Planned, plan};

/// Where compiled kernels are kept between builds.
#[derive(Clone, Debug)]
pub struct Cache {
    pub dir: PathBuf,
}

impl Cache {
    /// `$ZEBRA_CACHE_DIR`, else `$XDG_CACHE_HOME/zebra`, else `~/.cache/zebra`.
    pub fn default_location() -> Option<Cache> {
        let dir = std::env::var_os("ZEBRA_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("zebra")))
            .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/zebra")))?;
        Some(Cache { dir })
    }
}

/// How to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The longest sequence the artifact will run.
    pub max_seq_len: usize,
    pub cache: Option<Cache>,
    /// Whole sequences, or prefill and decode for generation.
    pub mode: crate::plan::PlanMode,
}

/// What a build did.
#[derive(Clone, Debug, Default)]
pub struct BuildReport {
    pub kernels: usize,
    /// Kernels compiled now; the others came from the cache.
    pub compiled: usize,
    pub target: String,
    pub codegen: Duration,
    pub link: Duration,
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), CodegenError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| CodegenError::Io(format!("cannot create {}: {e}", parent.display())))?;
    }
    zebra_ir::weights::write_atomically(path, bytes)
        .map_err(|e| CodegenError::Io(format!("cannot write {}: {e}", path.display())))
}

/// The MLIR module of all kernels of a plan.
pub fn kernels_mlir(planned: &Planned, vector: usize) -> String {
    let functions: Vec<String> = planned.kernels.iter().map(|k| k.mlir(vector)).collect();
    module(&functions)
}

/// Plans a graph for this machine.
pub fn plan_for_host(
    graph: &Graph,
    max_seq_len: usize,
    mode: PlanMode,
    options: PlanOptions,
) -> Result<(Planned, CpuTarget), CodegenError> {
    let target = CpuTarget::host()?;
    let planned = crate::plan::plan_with(
        graph,
        &target.describe(),
        target.vector,
        max_seq_len,
        mode,
        options,
    )?;
    Ok((planned, target))
}

/// The kernels as MLIR, optimized LLVM IR or assembly, for `zebra compile --emit`.
pub fn emit(
    graph: &Graph,
    max_seq_len: usize,
    what: Output,
    mlir_only: bool,
    options: PlanOptions,
) -> Result<String, CodegenError> {
    let (planned, target) = plan_for_host(graph, max_seq_len, PlanMode::Forward, options)?;
    let text = kernels_mlir(&planned, target.vector);
    let mlir = Mlir::new();
    mlir.verify(&text)?;
    if mlir_only {
        return Ok(text);
    }
    let ir = mlir.to_llvm_ir(&text)?;
    let out = llvm_compile(&ir, &target, what)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Compiles a graph into an artifact directory.
pub fn build(
    graph: &Graph,
    out_dir: &Path,
    options: &BuildOptions,
) -> Result<BuildReport, CodegenError> {
    build_with_vector(graph, out_dir, options, None)
}

/// As [`build`], with the kernels generated for `vector` f32 lanes (at most the host's
/// widest) instead of the host's widest. With the GPU's width, [`crate::ptx::GPU_VECTOR`],
/// the weights are packed as on the GPU, so that the warp emulator's tensor-core kernels can
/// stand in for the projections ([`zebra_runtime::CpuModel::substitute`]).
pub fn build_with_vector(
    graph: &Graph,
    out_dir: &Path,
    options: &BuildOptions,
    vector: Option<usize>,
) -> Result<BuildReport, CodegenError> {
    build_cpu(graph, out_dir, options, vector, PlanOptions::default())
}

/// As [`build_with_vector`], with the plan's `plan_options` (bf16 weights).
pub fn build_cpu(
    graph: &Graph,
    out_dir: &Path,
    options: &BuildOptions,
    vector: Option<usize>,
    plan_options: PlanOptions,
) -> Result<BuildReport, CodegenError> {
    let start = Instant::now();
    let mut target = CpuTarget::host()?;
    if let Some(vector) = vector {
        target.vector = vector.clamp(1, target.vector);
    }
    let planned = crate::plan::plan_with(
        graph,
        &target.describe(),
        target.vector,
        options.max_seq_len,
        options.mode,
        plan_options,
    )?;
    let cache_dir = match &options.cache {
        Some(cache) => cache.dir.clone(),
        None => out_dir.join(".objects"),
    };
    let mut mlir: Option<Mlir> = None;
    let mut objects = Vec::new();
    let mut compiled = 0;
    let target_key = format!(
        "{} {} {} llvm {:?} O3",
        target.triple,
        target.cpu,
        target.features,
        inkwell::support::get_llvm_version()
    );
    for spec in &planned.kernels {
        let text = module(&[spec.mlir(target.vector)]);
        let key = fnv1a(format!("{text}\n{target_key}").as_bytes());
        let object = cache_dir.join(format!("{key:016x}.o"));
        if !object.exists() {
            let mlir = mlir.get_or_insert_with(Mlir::new);
            let ir = mlir
                .to_llvm_ir(&text)
                .map_err(|e| e.context(&spec.symbol(target.vector)))?;
            let code = llvm_compile(&ir, &target, Output::Object)?;
            write(&object, &code)?;
            compiled += 1;
        }
        objects.push((key, object));
    }
    let codegen = start.elapsed();
    let start = Instant::now();
    let library_key = fnv1a(
        objects
            .iter()
            .map(|(k, _)| format!("{k:016x}"))
            .collect::<Vec<_>>()
            .join(",")
            .as_bytes(),
    );
    let library = cache_dir.join(format!("{library_key:016x}.so"));
    if !library.exists() {
        let paths: Vec<&Path> = objects.iter().map(|(_, p)| p.as_path()).collect();
        std::fs::create_dir_all(&cache_dir)
            .map_err(|e| CodegenError::Io(format!("cannot create {}: {e}", cache_dir.display())))?;
        link_shared(&paths, &library)?;
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| CodegenError::Io(format!("cannot create {}: {e}", out_dir.display())))?;
    let bytes = std::fs::read(&library)
        .map_err(|e| CodegenError::Io(format!("cannot read {}: {e}", library.display())))?;
    write(&out_dir.join(&planned.plan.library), &bytes)?;
    let mut plan = planned.plan;
    plan.library_hash = format!("{:016x}", fnv1a(&bytes));
    let json = serde_json::to_string_pretty(&plan).map_err(|e| CodegenError::Io(e.to_string()))?;
    write(&out_dir.join("plan.json"), json.as_bytes())?;
    Ok(BuildReport {
        kernels: planned.kernels.len(),
        compiled,
        target: target.describe(),
        codegen,
        link: start.elapsed(),
    })
}

/// Plans a graph for an NVIDIA GPU and lowers its kernels to LLVM IR for it.
fn gpu_ir(
    graph: &Graph,
    max_seq_len: usize,
    mode: crate::plan::PlanMode,
    target: crate::ptx::GpuTarget,
    cores: Option<TensorCores>,
) -> Result<(Planned, String), CodegenError> {
    if let Some(cores) = &cores {
        require_wgmma_choice(&cores.attention, target)?;
    }
    let retiled;
    let graph = match &cores {
        Some(cores) => {
            retiled = crate::kernels::tensor_core::retile(graph, target.sm, &cores.attention);
            &retiled
        }
        None => graph,
    };
    let mut planned = plan(
        graph,
        &target.describe(),
        crate::ptx::GPU_VECTOR,
        max_seq_len,
        mode,
    )?;
    let ir = crate::ptx::gpu_llvm_ir(&mut planned, cores, target.sm, &Mlir::new())?;
    Ok((planned, ir))
}

/// An error unless `target` runs attention products on `product` (`wgmma` needs sm_90).
fn require_wgmma_target(
    product: crate::kernels::attention_mma::Product,
    target: crate::ptx::GpuTarget,
) -> Result<(), CodegenError> {
    if product.is_wgmma() && target.sm < 90 {
        return Err(CodegenError::Io(format!(
            "wgmma attention kernels run on sm_90, not {}",
            target.name()
        )));
    }
    Ok(())
}

/// [`require_wgmma_target`] for every attention's product in `choice`.
fn require_wgmma_choice(
    choice: &crate::kernels::attention_mma::MmaChoice,
    target: crate::ptx::GpuTarget,
) -> Result<(), CodegenError> {
    if choice.uses_wgmma() {
        require_wgmma_target(crate::kernels::attention_mma::Product::Wgmma, target)?;
    }
    Ok(())
}

/// The kernels for a GPU as MLIR, optimized LLVM IR or PTX, for `zebra compile --emit`.
pub fn emit_gpu(
    graph: &Graph,
    max_seq_len: usize,
    target: crate::ptx::GpuTarget,
    what: crate::ptx::GpuOutput,
    mlir_only: bool,
    cores: Option<TensorCores>,
) -> Result<String, CodegenError> {
    if mlir_only {
        if let Some(cores) = &cores {
            require_wgmma_choice(&cores.attention, target)?;
        }
        let retiled = cores
            .as_ref()
            .map(|cores| crate::kernels::tensor_core::retile(graph, target.sm, &cores.attention));
        let mut planned = plan(
            retiled.as_ref().unwrap_or(graph),
            &target.describe(),
            crate::ptx::GPU_VECTOR,
            max_seq_len,
            PlanMode::Forward,
        )?;
        let (text, _) = crate::ptx::gpu_mlir(&mut planned, cores, target.sm);
        Mlir::new().verify(&text)?;
        return Ok(text);
    }
    let (_, ir) = gpu_ir(graph, max_seq_len, PlanMode::Forward, target, cores)?;
    crate::ptx::compile(&ir, target, what)
}

/// Compiles a graph into a GPU artifact directory: `plan.json` and `kernels.ptx`. With
/// `cores`, the projections and attentions run on tensor cores, their operands rounded to
/// its 16-bit type (with `wgmma` attentions the PTX, and the plan's target, are sm_90a).
pub fn build_gpu(
    graph: &Graph,
    out_dir: &Path,
    options: &BuildOptions,
    target: crate::ptx::GpuTarget,
    cores: Option<TensorCores>,
) -> Result<BuildReport, CodegenError> {
    let start = Instant::now();
    let (planned, ir) = gpu_ir(graph, options.max_seq_len, options.mode, target, cores)?;
    let ptx = crate::ptx::compile(&ir, target, crate::ptx::GpuOutput::Ptx)?;
    let codegen = start.elapsed();
    let mut plan = planned.plan;
    // The PTX's architecture (sm_90a with wgmma attentions).
    plan.target = format!("nvptx64-nvidia-cuda {}", crate::ptx::arch(&ir, target));
    plan.library = "kernels.ptx".into();
    plan.library_hash = format!("{:016x}", fnv1a(ptx.as_bytes()));
    write(&out_dir.join(&plan.library), ptx.as_bytes())?;
    let json = serde_json::to_string_pretty(&plan).map_err(|e| CodegenError::Io(e.to_string()))?;
    write(&out_dir.join("plan.json"), json.as_bytes())?;
    Ok(BuildReport {
        kernels: planned.kernels.len(),
        compiled: planned.kernels.len(),
        target: plan.target,
        codegen,
        link: Duration::ZERO,
    })
}

/// The tensor-core attention kernels of a graph for a GPU, as MLIR, optimized LLVM IR or
/// PTX (`zebra compile --for attention --emit ...`).
pub fn emit_gpu_attention(
    graph: &Graph,
    target: crate::ptx::GpuTarget,
    half: crate::kernels::attention_mma::Half,
    settings: impl Into<crate::kernels::attention_mma::MmaChoice>,
    what: Option<crate::ptx::GpuOutput>,
) -> Result<String, CodegenError> {
    let kernels = named_mma_attentions(graph, target, half, settings)?;
    let Some(what) = what else {
        let functions: Vec<String> = kernels
            .iter()
            .map(|(symbol, kernel, tiles)| {
                crate::kernels::attention_mma::attention_mma(
                    symbol,
                    kernel,
                    half,
                    *tiles,
                    crate::kernels::warp::Lowering::Ptx,
                    crate::kernels::attention_mma::AttentionIo::Half,
                )
            })
            .collect();
        let text = crate::mlir::module(&functions);
        Mlir::new().verify(&text)?;
        return Ok(text);
    };
    let ir = crate::ptx::mma_llvm_ir(&kernels, half, &Mlir::new())?;
    crate::ptx::compile(&ir, target, what)
}

/// The tensor-core attentions of a graph with their symbols; `settings` override the
/// target's choices (for all attentions, or those tuned for some).
#[allow(clippy::type_complexity)]
pub fn named_mma_attentions(
    graph: &Graph,
    target: crate::ptx::GpuTarget,
    half: crate::kernels::attention_mma::Half,
    settings: impl Into<crate::kernels::attention_mma::MmaChoice>,
) -> Result<
    Vec<(
        String,
        zebra_ir::op::AttentionKernel,
        crate::kernels::attention_mma::MmaTiles,
    )>,
    CodegenError,
> {
    let choice = settings.into();
    let kernels = crate::ptx::mma_attentions(graph, target)?;
    if kernels.is_empty() {
        return Err(CodegenError::Io(
            "the graph has no fused attention to compile for tensor cores".into(),
        ));
    }
    kernels
        .into_iter()
        .map(|(mut kernel, tiles)| {
            let (settings, _) = choice.settings(&kernel);
            if let Some(product) = settings.product {
                require_wgmma_target(product, target)?;
            }
            let tiles = tiles.checked_with(&settings).map_err(|reason| {
                CodegenError::Io(format!("attention `{}`: {reason}", kernel.name))
            })?;
            kernel.block_k = tiles.block_k as u64;
            Ok((
                crate::ptx::mma_symbol(&kernel, tiles, half, target),
                kernel,
                tiles,
            ))
        })
        .collect()
}

/// The description of a tensor-core attention kernel that the runtime launches and checks.
pub fn attention_entry(
    symbol: &str,
    kernel: &zebra_ir::op::AttentionKernel,
    tiles: crate::kernels::attention_mma::MmaTiles,
) -> zebra_runtime::artifact::AttentionEntry {
    zebra_runtime::artifact::AttentionEntry {
        name: kernel.name.clone(),
        entry: format!("{symbol}_mma"),
        heads: kernel.heads as usize,
        kv_heads: kernel.kv_heads as usize,
        head_dim: tiles.head_dim,
        block_q: tiles.block_q,
        block_k: tiles.block_k,
        threads: tiles.threads(),
        shared_bytes: tiles.shared_bytes(),
        scale: kernel.scale,
        mask: kernel.mask.to_string(),
        score: kernel.score.as_ref().map(|s| s.to_string()),
        sides: kernel.sides.clone(),
    }
}

/// Compiles the tensor-core attention kernels of a graph into an artifact directory:
/// `attention.json` and `kernels.ptx`. Returns the number of kernels.
pub fn build_gpu_attention(
    graph: &Graph,
    out_dir: &Path,
    target: crate::ptx::GpuTarget,
    half: crate::kernels::attention_mma::Half,
    settings: impl Into<crate::kernels::attention_mma::MmaChoice>,
) -> Result<usize, CodegenError> {
    let kernels = named_mma_attentions(graph, target, half, settings)?;
    let ir = crate::ptx::mma_llvm_ir(&kernels, half, &Mlir::new())?;
    let ptx = crate::ptx::compile(&ir, target, crate::ptx::GpuOutput::Ptx)?;
    let artifact = zebra_runtime::artifact::AttentionArtifact {
        format: zebra_runtime::artifact::ATTENTION_FORMAT,
        // sm_90a with wgmma kernels, as the PTX.
        target: crate::ptx::arch(&ir, target),
        dtype: half.name().into(),
        library: "kernels.ptx".into(),
        library_hash: format!("{:016x}", fnv1a(ptx.as_bytes())),
        kernels: kernels
            .iter()
            .map(|(symbol, kernel, tiles)| attention_entry(symbol, kernel, *tiles))
            .collect(),
    };
    write(&out_dir.join("kernels.ptx"), ptx.as_bytes())?;
    let json =
        serde_json::to_string_pretty(&artifact).map_err(|e| CodegenError::Io(e.to_string()))?;
    write(&out_dir.join("attention.json"), json.as_bytes())?;
    Ok(kernels.len())
}
