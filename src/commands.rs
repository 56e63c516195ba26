//! The subcommands of `zebra`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};
use ndarray::{ArrayD, Axis, IxDyn};
use zebra_codegen::backend::Output;
use zebra_frontend::{Checked, ModelSpec, check_source, diag};
use zebra_ir::{Graph, Loc, Op, Value, Weights, npy};
use zebra_passes::Target;

use crate::Emit;

/// An error whose diagnostics were already printed.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("errors were reported")
    }
}

impl std::error::Error for Reported {}

/// Refuses `positions` past the sequence length the kernels address, before anything is
/// compiled, allocated or written; `what` says where the length came from.
pub fn check_positions(what: &str, positions: usize) -> Result<()> {
    let max = zebra_codegen::vexpr::MAX_SEQ_LEN as usize;
    if positions > max {
        bail!("{what} is {positions} positions, more than the {max} Zebra's kernels address");
    }
    Ok(())
}

/// Refuses weights that lack a tensor of the model or hold one of another shape, before
/// anything is compiled (the executors check again as they load them). Tensors the model
/// does not read are named in a warning: a checkpoint with biases or QK-norm scales that the
/// source leaves out would otherwise compute something else without a word.
pub fn check_weights(spec: &ModelSpec, weights: &Weights) -> Result<()> {
    let specs = spec.weight_specs();
    if let Some(warning) =
        weights.unread_warning(&spec.name, |name| specs.iter().any(|w| w.name == name))
    {
        eprintln!("{warning}");
    }
    for w in specs {
        match weights.get(&w.name) {
            None => bail!(
                "weight `{}` is missing (expected shape {:?})",
                w.name,
                w.shape
            ),
            Some(t) if t.shape() != w.shape.as_slice() => bail!(
                "weight `{}` has shape {:?}, expected {:?}",
                w.name,
                t.shape(),
                w.shape
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Refuses to go on where `bytes` (for `what`) are more than the memory left.
pub fn check_memory(what: &str, bytes: u64) -> Result<()> {
    use zebra_runtime::memory::{human, short_of};
    if let Some(available) = short_of(bytes) {
        bail!(
            "{what} need {} of memory, and {} is available",
            human(bytes),
            human(available)
        );
    }
    Ok(())
}

/// Colour for a terminal that wants it; plain text for pipes, files and `NO_COLOR`.
fn color_choice() -> ColorChoice {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        ColorChoice::Auto
    } else {
        ColorChoice::Never
    }
}

/// Reads and checks a source file, printing its diagnostics. Fails if any is an error.
fn load(path: &Path) -> Result<(String, Checked)> {
    let source =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let checked = check_source(&source);
    if !checked.diagnostics.is_empty() {
        let mut stderr = StandardStream::stderr(color_choice());
        diag::emit(
            &mut stderr,
            &path.display().to_string(),
            &source,
            &checked.diagnostics,
        );
    }
    if checked.has_errors() {
        let count = checked.diagnostics.iter().filter(|d| d.is_error()).count();
        let plural = if count == 1 { "" } else { "s" };
        eprintln!("{}: {count} error{plural}", path.display());
        return Err(Reported.into());
    }
    Ok((source, checked))
}

fn model<'c>(checked: &'c Checked, name: Option<&str>) -> Result<&'c ModelSpec> {
    checked.program.model(name).map_err(|e| anyhow!(e))
}

fn lower(spec: &ModelSpec) -> Result<Graph> {
    let graph = zebra_frontend::lower::lower(spec)?;
    zebra_ir::verify(&graph)
        .map_err(|e| anyhow!("internal error: the lowered graph is invalid: {e}"))?;
    Ok(graph)
}

fn write_output(output: Option<&Path>, text: &str) -> Result<()> {
    match output {
        Some(path) => zebra_ir::weights::write_atomically(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display())),
        None => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`zebra compile ... | head`) is not an error worth reporting.
            let _ = stdout.write_all(text.as_bytes());
            Ok(())
        }
    }
}

fn describe(spec: &ModelSpec) -> String {
    let mut kinds = Vec::new();
    for (i, kind) in spec.kinds.iter().enumerate() {
        let count = spec.layers.iter().filter(|&&k| k == i).count();
        kinds.push(format!("{count} x {}", kind.label));
    }
    // What the attention's projections add: biases, QK-norm.
    let mut extras = String::new();
    let biased: Vec<&str> = zebra_frontend::spec::Biases::NAMES
        .into_iter()
        .filter(|p| spec.biases.has(p))
        .collect();
    if !biased.is_empty() {
        extras.push_str(&format!(", biases on {}", biased.join(", ")));
    }
    if spec.qk_norm.is_some() {
        extras.push_str(", QK-norm");
    }
    format!(
        "model `{}`: {} layers ({}), dim {}, {} heads / {} KV heads of dim {}{extras}, vocab {}, {:.2}M parameters",
        spec.name,
        spec.layers.len(),
        kinds.join(", "),
        spec.dim,
        spec.n_heads,
        spec.n_kv_heads,
        spec.head_dim,
        spec.vocab,
        spec.parameter_count() as f64 / 1e6
    )
}

pub fn check(path: &Path) -> Result<()> {
    let (_, checked) = load(path)?;
    if checked.program.models.is_empty() {
        println!("{}: ok (no models)", path.display());
    }
    for spec in &checked.program.models {
        println!("{}: ok: {}", path.display(), describe(spec));
    }
    Ok(())
}

pub struct CompileArgs<'a> {
    pub purpose: crate::Purpose,
    pub dtype: Option<crate::Dtype>,
    pub mma: zebra_codegen::kernels::attention_mma::MmaSettings,
    pub file: &'a Path,
    pub emit: Emit,
    pub output: Option<&'a Path>,
    pub model: Option<&'a str>,
    pub target: Target,
    pub print_after: Option<&'a str>,
    pub timings: bool,
    pub explain: Option<&'a str>,
    pub max_seq_len: usize,
}

fn is_ir_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "zir")
}

/// Reads the input (a .zb source or .zir IR text) and gives its source and unoptimized
/// graph. For IR text, masks, score modifiers, comparisons and products get their line in
/// the file as their source position, so that warnings point into the file compiled.
/// Reads a .zb file (checked, its model lowered) or a graph in the IR's text form (.zir).
pub fn load_graph(
    path: &Path,
    model_name: Option<&str>,
    timings: &mut Vec<(String, Duration)>,
) -> Result<(String, Graph)> {
    if is_ir_file(path) {
        let start = Instant::now();
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (mut graph, lines) = zebra_ir::parse::parse_graph_lines(&source)
            .map_err(|e| anyhow!("{}:{}: {}", path.display(), e.line, e.message))?;
        for (id, line) in lines {
            let node = graph.node_mut(id);
            let locatable = matches!(
                node.op,
                Op::Mask { .. } | Op::ScoreMod { .. } | Op::Compare(_) | Op::MatMul
            );
            if locatable {
                node.loc = Some(Loc {
                    line: line as u32,
                    col: 3,
                });
            }
        }
        zebra_ir::verify(&graph).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        timings.push(("parse".into(), start.elapsed()));
        return Ok((source, graph));
    }
    let start = Instant::now();
    let (source, checked) = load(path)?;
    timings.push(("check".into(), start.elapsed()));
    let start = Instant::now();
    let graph = lower(model(&checked, model_name)?)?;
    timings.push(("lower".into(), start.elapsed()));
    Ok((source, graph))
}

/// The byte range of a `line:col` position to the end of its line.
fn span_of(source: &str, loc: Loc) -> diag::Span {
    let line_start: usize = source
        .split_inclusive('\n')
        .take(loc.line.saturating_sub(1) as usize)
        .map(str::len)
        .sum();
    let line = source[line_start.min(source.len())..]
        .lines()
        .next()
        .unwrap_or("");
    let start = line_start
        + line
            .char_indices()
            .nth(loc.col.saturating_sub(1) as usize)
            .map_or(0, |(i, _)| i);
    let end = line_start + line.trim_end().len();
    diag::Span::new(start.min(end), end.max(start))
}

/// Warns about every attention the optimizer could not fuse, at its source.
fn warn_unfused(path: &Path, source: &str, graph: &Graph) {
    let unfused = zebra_passes::diagnose::unfused_attention(graph);
    if unfused.is_empty() {
        return;
    }
    let mut diagnostics = Vec::new();
    for u in &unfused {
        let message = format!("attention not fused: {}", u.reason);
        match graph.node(u.node).loc {
            Some(loc) => diagnostics.push(
                diag::Diagnostic::warning(span_of(source, loc), message)
                    .label("this attention runs unfused: its [T, T] scores are materialized"),
            ),
            None => eprintln!("warning: {message}"),
        }
    }
    let mut stderr = StandardStream::stderr(color_choice());
    diag::emit(
        &mut stderr,
        &path.display().to_string(),
        source,
        &diagnostics,
    );
}

pub fn compile(args: &CompileArgs) -> Result<()> {
    let mut timings: Vec<(String, Duration)> = Vec::new();
    if args.emit == Emit::Ast {
        if is_ir_file(args.file) {
            bail!(
                "{} is IR text; --emit ast needs a .zb source",
                args.file.display()
            );
        }
        let (source, checked) = load(args.file)?;
        return write_output(
            args.output,
            &zebra_frontend::ast::dump(&checked.file, &source),
        );
    }
    if let Some(stage) = args.print_after
        && !zebra_passes::pipeline::STAGES.contains(&stage)
    {
        bail!(
            "unknown stage `{stage}` for --print-after; the stages are {}",
            zebra_passes::pipeline::STAGES.join(", ")
        );
    }
    let kernels = matches!(
        args.emit,
        Emit::Mlir | Emit::Llvm | Emit::Asm | Emit::Ptx | Emit::Artifact
    );
    let attention_only = args.purpose == crate::Purpose::Attention;
    if args.purpose != crate::Purpose::Forward && args.emit != Emit::Artifact && !attention_only {
        bail!("--for says what an artifact is for: use it with --emit artifact -o DIR");
    }
    if attention_only
        && !(matches!(args.target, Target::Sm80 | Target::Sm90)
            && matches!(
                args.emit,
                Emit::Mlir | Emit::Llvm | Emit::Ptx | Emit::Artifact
            ))
    {
        bail!(
            "--for attention builds tensor-core kernels: use it with --target sm_80 or sm_90 \
             and --emit mlir, llvm, ptx or artifact"
        );
    }
    let model_mma = zebra_codegen::kernels::attention_mma::MmaSettings {
        product: None,
        ..args.mma
    };
    if model_mma != Default::default() && !attention_only {
        bail!(
            "--stages, --block-k and --block-q are settings of tensor-core attention kernels \
             built alone: use them with --for attention"
        );
    }
    let gpu = match args.target {
        Target::Cpu => None,
        Target::Sm80 => zebra_codegen::ptx::GpuTarget::from_name("sm_80"),
        Target::Sm90 => zebra_codegen::ptx::GpuTarget::from_name("sm_90"),
    };
    use zebra_codegen::kernels::attention_mma::Half;
    let sixteen = |dtype: crate::Dtype| match dtype {
        crate::Dtype::F32 => None,
        crate::Dtype::Bf16 => Some(Half::Bf16),
        crate::Dtype::F16 => Some(Half::F16),
    };
    // The attention kernels' 16-bit type, the model kernels' tensor-core type (none: f32),
    // and on the CPU whether --dtype bf16 packs the projections' weights in bf16.
    let (half, tensor_cores, bf16_weights) = match (args.dtype, attention_only) {
        (Some(crate::Dtype::F32), true) => bail!(
            "--for attention builds tensor-core kernels, whose inputs are bf16 or f16, not f32"
        ),
        (dtype, true) => (dtype.and_then(sixteen).unwrap_or(Half::Bf16), None, false),
        (Some(crate::Dtype::F16), false) if gpu.is_none() => bail!(
            "--dtype f16 runs projections on a GPU's tensor cores: use it with --target sm_80 \
             or sm_90 (on the CPU, --dtype bf16 keeps the projections' weights in bf16)"
        ),
        (Some(crate::Dtype::Bf16), false) if gpu.is_none() => (Half::Bf16, None, true),
        (dtype, false) => (Half::Bf16, dtype.and_then(sixteen), false),
    };
    let cpu_plan = zebra_codegen::plan::PlanOptions { bf16_weights };
    // A model plan's attentions on tensor cores: on mma.sync, or on the instruction --mma
    // names (which needs the tensor cores of --dtype bf16 or f16, and wgmma sm_90).
    let tensor_cores = match (args.mma.product.filter(|_| !attention_only), tensor_cores) {
        (Some(product), None) => bail!(
            "--mma {} chooses the tensor-core instruction of a model's attentions: use it with \
             --dtype bf16 or f16 and --target sm_80 or sm_90 (or with --for attention)",
            product.name()
        ),
        (Some(product), Some(_)) if product.is_wgmma() && args.target != Target::Sm90 => bail!(
            "--mma {} is sm_90's warpgroup instruction: use it with --target sm_90",
            product.name()
        ),
        (product, Some(half)) => Some(zebra_codegen::kernels::attention_mma::TensorCores {
            half,
            attention: zebra_codegen::kernels::attention_mma::MmaSettings {
                product,
                ..Default::default()
            }
            .into(),
        }),
        (None, None) => None,
    };
    if gpu.is_some() && args.emit == Emit::Asm {
        bail!(
            "--emit asm is the CPU's assembly; for {} use --emit ptx",
            args.target
        );
    }
    if gpu.is_none() && args.emit == Emit::Ptx {
        bail!("--emit ptx needs an NVIDIA target: --target sm_80 or --target sm_90");
    }
    let (source, graph) = load_graph(args.file, args.model, &mut timings)?;
    let optimize =
        kernels || args.emit == Emit::Opt || args.print_after.is_some() || args.explain.is_some();
    if !optimize {
        let text = match args.emit {
            Emit::Dot => zebra_ir::dot::to_dot(&graph),
            _ => zebra_ir::print_graph(&graph),
        };
        print_timings(args.file, args.timings, &timings);
        return write_output(args.output, &text);
    }
    let options = zebra_passes::Options {
        explain: args.explain.is_some(),
        keep_stages: args.print_after.is_some(),
        ..crate::tune::options(args.target)
    };
    let mut optimized = zebra_passes::optimize(&graph, &options)?;
    timings.extend(optimized.timings.iter().cloned());
    warn_unfused(args.file, &source, &optimized.graph);
    for note in crate::tune::notes(&optimized.graph, args.target) {
        eprintln!("{note}");
    }
    if let Some(node) = args.explain {
        explain(&mut optimized, node)?;
    }
    let shown = match args.print_after {
        Some(stage) => optimized
            .stages
            .iter()
            .find(|(name, _)| name == stage)
            .map(|(_, g)| g)
            .ok_or_else(|| anyhow!("internal error: stage `{stage}` was not kept"))?,
        None => &optimized.graph,
    };
    // The attentions' tensor-core settings, where the command line does not set them: the
    // tuning database's for this GPU.
    let mut tensor_cores = tensor_cores;
    let mut mma = zebra_codegen::kernels::attention_mma::MmaChoice::from(args.mma);
    if attention_only || tensor_cores.is_some() {
        let all = tensor_cores.as_ref().map_or(args.mma, |c| c.attention.all);
        let (choice, notes) = crate::tune::mma_choice(args.target, all, &optimized.graph);
        for note in notes {
            eprintln!("{note}");
        }
        match &mut tensor_cores {
            Some(cores) => cores.attention = choice,
            None => mma = choice,
        }
    }
    let start = Instant::now();
    let text = match (args.emit, gpu) {
        (Emit::Mlir | Emit::Llvm | Emit::Ptx, Some(target)) if attention_only => {
            zebra_codegen::artifact::emit_gpu_attention(
                &optimized.graph,
                target,
                half,
                mma,
                match args.emit {
                    Emit::Mlir => None,
                    Emit::Llvm => Some(zebra_codegen::ptx::GpuOutput::OptimizedIr),
                    _ => Some(zebra_codegen::ptx::GpuOutput::Ptx),
                },
            )?
        }
        (Emit::Mlir | Emit::Llvm | Emit::Ptx, Some(target)) => zebra_codegen::artifact::emit_gpu(
            &optimized.graph,
            args.max_seq_len,
            target,
            if args.emit == Emit::Llvm {
                zebra_codegen::ptx::GpuOutput::OptimizedIr
            } else {
                zebra_codegen::ptx::GpuOutput::Ptx
            },
            args.emit == Emit::Mlir,
            tensor_cores,
        )?,
        (Emit::Dot, _) => zebra_ir::dot::to_dot(shown),
        (Emit::Mlir, None) => zebra_codegen::artifact::emit(
            &optimized.graph,
            args.max_seq_len,
            Output::Object,
            true,
            cpu_plan,
        )?,
        (Emit::Llvm, None) => zebra_codegen::artifact::emit(
            &optimized.graph,
            args.max_seq_len,
            Output::OptimizedIr,
            false,
            cpu_plan,
        )?,
        (Emit::Asm, _) => zebra_codegen::artifact::emit(
            &optimized.graph,
            args.max_seq_len,
            Output::Assembly,
            false,
            cpu_plan,
        )?,
        (Emit::Artifact, _) => {
            let dir = args
                .output
                .ok_or_else(|| anyhow!("--emit artifact needs the directory to write: -o DIR"))?;
            if let (true, Some(target)) = (attention_only, gpu) {
                let start = Instant::now();
                let n = zebra_codegen::artifact::build_gpu_attention(
                    &optimized.graph,
                    dir,
                    target,
                    half,
                    mma,
                )?;
                timings.push(("codegen".into(), start.elapsed()));
                print_timings(args.file, args.timings, &timings);
                println!(
                    "wrote {} ({n} tensor-core attention kernels for {}, {})",
                    dir.display(),
                    target.describe(),
                    half.name()
                );
                return Ok(());
            }
            let report = match args.purpose {
                crate::Purpose::Attention => bail!("--for attention needs --target sm_80 or sm_90"),
                crate::Purpose::Forward => build_for(
                    &optimized.graph,
                    dir,
                    (args.max_seq_len, Default::default()),
                    gpu,
                    tensor_cores,
                    cpu_plan,
                )?,
                crate::Purpose::Generate => {
                    let mut total = zebra_codegen::artifact::BuildReport::default();
                    for (sub, mode) in [
                        ("prefill", zebra_codegen::plan::PlanMode::Prefill),
                        ("decode", zebra_codegen::plan::PlanMode::Decode),
                    ] {
                        let report = build_for(
                            &optimized.graph,
                            &dir.join(sub),
                            (args.max_seq_len, mode),
                            gpu,
                            tensor_cores.clone(),
                            cpu_plan,
                        )?;
                        total.kernels += report.kernels;
                        total.compiled += report.compiled;
                        total.codegen += report.codegen;
                        total.link += report.link;
                        total.target = report.target;
                    }
                    let decode = zebra_runtime::artifact::Artifact::load(&dir.join("decode"))?;
                    println!("KV caches of the decode plan:");
                    for line in crate::infer::cache_lines(&decode.plan.caches) {
                        println!("  {line}");
                    }
                    total
                }
                crate::Purpose::Train => {
                    let train = zebra_passes::autodiff::training_graph(&optimized.graph)?;
                    let train =
                        zebra_passes::optimize(&train, &zebra_passes::Options::default())?.graph;
                    build_for(
                        &train,
                        dir,
                        (args.max_seq_len, Default::default()),
                        gpu,
                        tensor_cores,
                        cpu_plan,
                    )?
                }
            };
            timings.push(("codegen".into(), report.codegen));
            timings.push(("link".into(), report.link));
            print_timings(args.file, args.timings, &timings);
            println!(
                "wrote {} ({} kernels for {}, {} compiled now, {} from the cache)",
                dir.display(),
                report.kernels,
                report.target,
                report.compiled,
                report.kernels - report.compiled
            );
            return Ok(());
        }
        _ => zebra_ir::print_graph(shown),
    };
    if kernels {
        timings.push(("codegen".into(), start.elapsed()));
    }
    print_timings(args.file, args.timings, &timings);
    write_output(args.output, &text)
}

fn print_timings(file: &Path, enabled: bool, timings: &[(String, Duration)]) {
    if !enabled {
        return;
    }
    let total: Duration = timings.iter().map(|(_, d)| *d).sum();
    eprintln!("timings ({}):", file.display());
    for (name, d) in timings {
        eprintln!("  {name:<12} {:>9.3} ms", d.as_secs_f64() * 1e3);
    }
    eprintln!("  {:<12} {:>9.3} ms", "total", total.as_secs_f64() * 1e3);
}

/// Compiles an optimized graph into an artifact directory, with the kernel cache.
pub fn build_artifact_at(
    graph: &Graph,
    dir: &Path,
    max_seq_len: usize,
) -> Result<zebra_codegen::artifact::BuildReport> {
    build_for(
        graph,
        dir,
        (max_seq_len, Default::default()),
        None,
        None,
        Default::default(),
    )
}

/// Builds an artifact for the CPU, or for a GPU (`plan.json` and `kernels.ptx`).
fn build_for(
    graph: &Graph,
    dir: &Path,
    (max_seq_len, mode): (usize, zebra_codegen::plan::PlanMode),
    gpu: Option<zebra_codegen::ptx::GpuTarget>,
    tensor_cores: Option<zebra_codegen::kernels::attention_mma::TensorCores>,
    cpu_plan: zebra_codegen::plan::PlanOptions,
) -> Result<zebra_codegen::artifact::BuildReport> {
    match gpu {
        None => {
            let options = zebra_codegen::artifact::BuildOptions {
                mode,
                max_seq_len,
                cache: zebra_codegen::artifact::Cache::default_location(),
            };
            Ok(zebra_codegen::artifact::build_cpu(
                graph, dir, &options, None, cpu_plan,
            )?)
        }
        Some(target) => {
            let options = zebra_codegen::artifact::BuildOptions {
                mode,
                max_seq_len,
                cache: None,
            };
            Ok(zebra_codegen::artifact::build_gpu(
                graph,
                dir,
                &options,
                target,
                tensor_cores,
            )?)
        }
    }
}

fn explain(optimized: &mut zebra_passes::Optimized, node: &str) -> Result<()> {
    let names = zebra_ir::print::node_names(&optimized.graph);
    let id = names
        .iter()
        .find(|(_, n)| n.as_str() == node)
        .map(|(id, _)| *id)
        .ok_or_else(|| {
            anyhow!("--explain: the optimized IR has no node `{node}` (nodes are named like %12)")
        })?;
    let op = optimized.graph.node(id).op.name();
    let Some(explanation) = optimized.explain(id) else {
        eprintln!("{node} ({op}) is outside the optimized segments");
        return Ok(());
    };
    if explanation.proof.is_empty() {
        eprintln!("{node} ({op}) is as the lowering wrote it: no rule rewrote it");
    } else {
        eprintln!(
            "{node} ({op}) was rewritten by: {}",
            explanation.proof.join(", ")
        );
    }
    eprintln!(
        "rules that fired in its segment's template ({}):",
        explanation.segment
    );
    for (stage, fired) in &explanation.fired {
        if !fired.is_empty() {
            let list: Vec<String> = fired
                .iter()
                .map(|(rule, n)| format!("{rule} x{n}"))
                .collect();
            eprintln!("  {stage:<10} {}", list.join(", "));
        }
    }
    Ok(())
}

pub fn init(path: &Path, seed: u64, output: &Path, name: Option<&str>) -> Result<()> {
    let (_, checked) = load(path)?;
    let spec = model(&checked, name)?;
    // The tensors, their bytes and the file's encoding of them: 12 bytes a parameter.
    check_memory(
        &format!(
            "the {} parameters of `{}`, drawn and written in f32,",
            spec.parameter_count(),
            spec.name
        ),
        (spec.parameter_count() as u64).saturating_mul(12),
    )?;
    let weights = zebra_frontend::init::random_weights(spec, seed);
    weights.save(output)?;
    println!(
        "wrote {} tensors ({:.2}M parameters, seed {seed}) to {}",
        weights.len(),
        spec.parameter_count() as f64 / 1e6,
        output.display()
    );
    Ok(())
}

pub struct RunArgs<'a> {
    pub interpret: bool,
    pub threads: usize,
    pub max_seq_len: usize,
    pub file: &'a Path,
    pub weights: &'a Path,
    pub tokens: &'a Path,
    pub output: &'a Path,
    pub sides: &'a [String],
    pub model: Option<&'a str>,
    pub device: &'a crate::device::DeviceArgs,
}

/// Reads token ids as `[B, T]`; a 1-D array is one sequence.
fn read_tokens(path: &Path, what: &str) -> Result<ArrayD<i64>> {
    let tokens = npy::read_ints(path)?;
    let tokens = match tokens.ndim() {
        1 => tokens.insert_axis(Axis(0)),
        2 => tokens,
        n => bail!(
            "{}: {what} must be a [B, T] array, found {n} dimensions {:?}",
            path.display(),
            tokens.shape()
        ),
    };
    if tokens.is_empty() {
        bail!(
            "{}: {what} is empty (shape {:?})",
            path.display(),
            tokens.shape()
        );
    }
    Ok(tokens)
}

pub fn run(args: &RunArgs) -> Result<()> {
    let device = crate::device::Device::from_args(args.device, args.threads)?;
    if args.interpret && matches!(device, crate::device::Device::Cuda { .. }) {
        bail!("--interpret runs the reference interpreter on the CPU: leave out --device cuda");
    }
    if args.interpret
        && let crate::device::Device::Cpu {
            bf16_weights: true, ..
        } = device
    {
        bail!("--interpret runs the reference interpreter in f64: leave out --dtype bf16");
    }
    let (_, checked) = load(args.file)?;
    let spec = model(&checked, args.model)?;
    let graph = lower(spec)?;
    let weights = Weights::load(args.weights)?;
    check_weights(spec, &weights)?;
    let tokens = read_tokens(args.tokens, "the token array")?;
    let mut inputs = BTreeMap::new();
    for side in args.sides {
        let (name, file) = side
            .split_once('=')
            .ok_or_else(|| anyhow!("--side takes NAME=FILE.npy, found `{side}`"))?;
        if !spec.side_inputs.iter().any(|s| s == name) {
            let reads = if spec.side_inputs.is_empty() {
                "it reads none".to_string()
            } else {
                format!("it reads {}", spec.side_inputs.join(", "))
            };
            bail!("model `{}` has no side input `{name}` ({reads})", spec.name);
        }
        let values = read_tokens(Path::new(file), &format!("side input `{name}`"))?;
        if values.shape() != tokens.shape() {
            bail!(
                "side input `{name}` has shape {:?}, but the tokens have shape {:?}",
                values.shape(),
                tokens.shape()
            );
        }
        inputs.insert(name.to_string(), Value::Int(values));
    }
    for name in &spec.side_inputs {
        if !inputs.contains_key(name) {
            bail!(
                "model `{}` reads the side input `{name}`; pass it with --side {name}=FILE.npy",
                spec.name
            );
        }
    }
    let (batch, seq) = (tokens.shape()[0], tokens.shape()[1]);
    inputs.insert("tokens".to_string(), Value::Int(tokens));
    let (logits, how, seconds) = if args.interpret {
        let start = Instant::now();
        let outputs = zebra_ir::interpret(&graph, &inputs, &weights)?;
        let logits = outputs
            .get("logits")
            .and_then(Value::as_float)
            .ok_or_else(|| anyhow!("internal error: the graph has no float `logits` output"))?
            .clone();
        (
            logits,
            "the reference interpreter".to_string(),
            start.elapsed().as_secs_f64(),
        )
    } else {
        let optimized = zebra_passes::optimize(&graph, &device.optimizer_options())?.graph;
        let (mut model, how): (Box<dyn zebra_runtime::Executor>, String) = match device {
            crate::device::Device::Cpu { bf16_weights, .. } => {
                let mode = zebra_codegen::plan::PlanMode::Forward;
                let dir = crate::infer::artifact(&optimized, args.max_seq_len, mode, &device)?;
                let model = zebra_runtime::CpuModel::load(&dir, &weights, args.threads)?;
                let bf16 = if bf16_weights { ", bf16 weights" } else { "" };
                let how = format!("the compiled kernels ({} threads{bf16})", model.threads());
                (Box::new(model), how)
            }
            crate::device::Device::Cuda { .. } => {
                let mode = zebra_codegen::plan::PlanMode::Forward;
                let dir = crate::infer::artifact(&optimized, args.max_seq_len, mode, &device)?;
                let model = zebra_runtime::cuda::CudaModel::load(&dir, &weights)?;
                let how = format!("the GPU's kernels ({}, {})", model.device, device.key());
                (Box::new(model), how)
            }
        };
        // The executor holds what it reads.
        drop(weights);
        let tensors: BTreeMap<String, zebra_runtime::Tensor> = inputs
            .iter()
            .map(|(name, value)| match value {
                Value::Int(a) => (name.clone(), zebra_runtime::Tensor::I64(a.clone())),
                other => (
                    name.clone(),
                    zebra_runtime::Tensor::F32(
                        other
                            .as_float()
                            .map(|a| a.mapv(|x| x as f32))
                            .unwrap_or_default(),
                    ),
                ),
            })
            .collect();
        let start = Instant::now();
        let outputs = model.run(&tensors)?;
        let seconds = start.elapsed().as_secs_f64();
        let logits = outputs
            .get("logits")
            .ok_or_else(|| anyhow!("internal error: the plan has no `logits` output"))?
            .mapv(f64::from);
        (logits, how, seconds)
    };
    let logits32: ArrayD<f32> = logits.mapv(|x| x as f32);
    npy::write(args.output, &logits32)?;
    report(spec, &logits, batch, seq, seconds, &how, args.output);
    Ok(())
}

fn report(
    spec: &ModelSpec,
    logits: &ArrayD<f64>,
    batch: usize,
    seq: usize,
    seconds: f64,
    how: &str,
    output: &Path,
) {
    let count = logits.len() as f64;
    let mean = logits.sum() / count;
    let std = (logits.mapv(|x| (x - mean) * (x - mean)).sum() / count).sqrt();
    let finite = logits.iter().all(|x| x.is_finite());
    println!("{}", describe(spec));
    println!("ran {batch} x {seq} tokens through {how} in {seconds:.3} s");
    println!(
        "logits f32[{batch}, {seq}, {}] -> {} (mean {mean:.4}, std {std:.4}, all finite: {finite})",
        spec.vocab,
        output.display()
    );
    let last = logits.index_axis(Axis(1), seq - 1);
    let row = last.index_axis(Axis(0), 0);
    let best =
        row.iter().enumerate().fold(
            (0, f64::NEG_INFINITY),
            |acc, (i, &x)| if x > acc.1 { (i, x) } else { acc },
        );
    println!(
        "most likely next token after sequence 0: {} (logit {:.4})",
        best.0, best.1
    );
}

pub fn encode(text: &str, output: &Path, tokenizer: Option<&Path>) -> Result<()> {
    if text.is_empty() {
        bail!("the text is empty");
    }
    let (ids, what) = match tokenizer {
        Some(path) => (crate::text::Codec::load(path)?.encode(text)?, "tokens"),
        None => (crate::text::Codec::Bytes.encode(text)?, "byte tokens"),
    };
    let array = ArrayD::from_shape_vec(IxDyn(&[1, ids.len()]), ids)?;
    npy::write(output, &array)?;
    println!("wrote {} {what} to {}", array.len(), output.display());
    Ok(())
}

pub fn toolchain() -> Result<()> {
    let report = zebra_codegen::toolchain::self_test()?;
    println!(
        "MLIR: JIT-compiled fma(2, 3, 4) = {}",
        report.mlir_jit_result
    );
    println!("LLVM: host {} ({})", report.host_triple, report.host_cpu);
    println!("LLVM: {} target available", report.nvptx_target);
    if report.mlir_jit_result != 10.0 {
        bail!(
            "the MLIR JIT computed {} instead of 10",
            report.mlir_jit_result
        );
    }
    Ok(())
}

pub struct EmulateArgs<'a> {
    pub file: &'a Path,
    pub model: Option<&'a str>,
    pub seq_len: usize,
    pub batch: usize,
    pub rows: usize,
    pub dtype: crate::Dtype,
    pub target: Target,
    pub seed: u64,
    pub mma: zebra_codegen::kernels::attention_mma::MmaSettings,
}

/// `zebra emulate`: the tensor-core attention kernels of a model in the warp emulator.
pub fn emulate(args: &EmulateArgs) -> Result<()> {
    use zebra_codegen::kernels::attention_mma::Half;
    let half = match args.dtype {
        crate::Dtype::Bf16 => Half::Bf16,
        crate::Dtype::F16 => Half::F16,
        crate::Dtype::F32 => bail!("tensor-core kernels take bf16 or f16 inputs, not f32"),
    };
    let gpu = zebra_codegen::ptx::GpuTarget::from_name(args.target.name())
        .ok_or_else(|| anyhow!("--target is sm_80 or sm_90 for the emulator"))?;
    if args.seq_len == 0 || args.batch == 0 {
        bail!("--seq-len and --batch must be at least 1");
    }
    let mut timings = Vec::new();
    let (source, graph) = load_graph(args.file, args.model, &mut timings)?;
    let options = zebra_passes::Options {
        target: args.target,
        ..zebra_passes::Options::default()
    };
    let optimized = zebra_passes::optimize(&graph, &options)?;
    warn_unfused(args.file, &source, &optimized.graph);
    let (choice, notes) = crate::tune::mma_choice(args.target, args.mma, &optimized.graph);
    for note in notes {
        eprintln!("{note}");
    }
    let kernels =
        zebra_codegen::artifact::named_mma_attentions(&optimized.graph, gpu, half, choice)?;
    let mut failed = Vec::new();
    for (symbol, kernel, tiles) in &kernels {
        let start = Instant::now();
        let emulated =
            zebra_codegen::emulate::EmulatedAttention::compile(symbol, kernel, half, *tiles)?;
        let entry = &emulated.entry;
        let case = zebra_runtime::attention_check::AttentionCase::new(
            entry,
            half.name(),
            args.batch,
            args.seq_len,
            args.seed,
        )?;
        let mut out = vec![0u16; args.batch * entry.heads * args.seq_len * entry.head_dim];
        emulated.run(
            [&case.q, &case.k, &case.v],
            &mut out,
            &case.word_buffers(),
            case.dims(),
        )?;
        let worst = case.worst_error(entry, half.name(), &out, args.rows, args.seed);
        let (visited, total) = case.tiles(entry);
        let ok = worst <= 1.0;
        if !ok {
            failed.push(entry.name.clone());
        }
        println!(
            "{}",
            serde_json::json!({
                "name": entry.name,
                "mask": entry.mask,
                "score": entry.score,
                "dtype": half.name(),
                "target": gpu.name(),
                "heads": entry.heads,
                "kv_heads": entry.kv_heads,
                "head_dim": entry.head_dim,
                "block_q": entry.block_q,
                "block_k": entry.block_k,
                "shared_bytes": entry.shared_bytes,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "tiles_visited": visited,
                "tiles_total": total,
                "checked_rows": case.checked_rows(entry, args.rows),
                "worst_error": worst,
                "ok": ok,
                "emulated_ms": start.elapsed().as_secs_f64() * 1e3,
            })
        );
    }
    if !failed.is_empty() {
        bail!(
            "the tensor-core kernel of {} does not match the reference",
            failed.join(", ")
        );
    }
    Ok(())
}
