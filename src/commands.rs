//! The subcommands of `zebra`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};
use ndarray::{ArrayD, Axis, IxDyn};
use zebra_frontend::{Checked, ModelSpec, check_source, diag};
use zebra_ir::{Graph, Value, Weights, npy};

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

/// Reads and checks a source file, printing its diagnostics. Fails if any is an error.
fn load(path: &Path) -> Result<(String, Checked)> {
    let source =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let checked = check_source(&source);
    if !checked.diagnostics.is_empty() {
        let mut stderr = StandardStream::stderr(ColorChoice::Auto);
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
    format!(
        "model `{}`: {} layers ({}), dim {}, {} heads / {} KV heads of dim {}, vocab {}, {:.2}M parameters",
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

pub fn compile(path: &Path, emit: Emit, output: Option<&Path>, name: Option<&str>) -> Result<()> {
    let (source, checked) = load(path)?;
    let text = match emit {
        Emit::Ast => zebra_frontend::ast::dump(&checked.file, &source),
        Emit::Ir => zebra_ir::print_graph(&lower(model(&checked, name)?)?),
        Emit::Dot => zebra_ir::dot::to_dot(&lower(model(&checked, name)?)?),
    };
    write_output(output, &text)
}

pub fn init(path: &Path, seed: u64, output: &Path, name: Option<&str>) -> Result<()> {
    let (_, checked) = load(path)?;
    let spec = model(&checked, name)?;
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
    pub file: &'a Path,
    pub weights: &'a Path,
    pub tokens: &'a Path,
    pub output: &'a Path,
    pub sides: &'a [String],
    pub model: Option<&'a str>,
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
    let (_, checked) = load(args.file)?;
    let spec = model(&checked, args.model)?;
    let graph = lower(spec)?;
    let weights = Weights::load(args.weights)?;
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
    let start = Instant::now();
    let outputs = zebra_ir::interpret(&graph, &inputs, &weights)?;
    let elapsed = start.elapsed();
    let logits = outputs
        .get("logits")
        .and_then(Value::as_float)
        .ok_or_else(|| anyhow!("internal error: the graph has no float `logits` output"))?;
    let logits32: ArrayD<f32> = logits.mapv(|x| x as f32);
    npy::write(args.output, &logits32)?;
    report(spec, logits, batch, seq, elapsed.as_secs_f64(), args.output);
    Ok(())
}

fn report(
    spec: &ModelSpec,
    logits: &ArrayD<f64>,
    batch: usize,
    seq: usize,
    seconds: f64,
    output: &Path,
) {
    let count = logits.len() as f64;
    let mean = logits.sum() / count;
    let std = (logits.mapv(|x| (x - mean) * (x - mean)).sum() / count).sqrt();
    let finite = logits.iter().all(|x| x.is_finite());
    println!("{}", describe(spec));
    println!("ran {batch} x {seq} tokens through the reference interpreter in {seconds:.3} s");
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

pub fn encode(text: &str, output: &Path) -> Result<()> {
    let ids: Vec<i64> = text.bytes().map(i64::from).collect();
    if ids.is_empty() {
        bail!("the text is empty");
    }
    let array = ArrayD::from_shape_vec(IxDyn(&[1, ids.len()]), ids)?;
    npy::write(output, &array)?;
    println!("wrote {} byte tokens to {}", array.len(), output.display());
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
