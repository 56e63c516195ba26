//! PTX for NVIDIA GPUs from the same kernels as the CPU: the second lowering of the one
//! kernel generator. Every kernel is a grid of independent programs; here each program is
//! one GPU thread. An entry `{symbol}_grid(buffers, dims, programs)` per kernel computes its
//! program from the block and thread indices and runs the kernel's body for it. MLIR lowers
//! the kernels to LLVM IR as for the CPU; LLVM's NVPTX backend emits the PTX.
//!
//! This is the portable baseline every op gets: correct for every kernel, and a tiling that
//! suits a CPU core, not a GPU's warps. The fused attention and the projections are the
//! kernels that later get GPU-shaped versions (warps sharing a tile, tensor cores).
//!
//! Math: NVPTX has no lowering for `llvm.exp`, `llvm.log` and `llvm.log2`, nor a libm for
//! `tanhf`; they become the PTX approximations `ex2.approx` and `lg2.approx` (about 2 ulp)
//! with the change of base folded in.

use inkwell::OptimizationLevel;
use inkwell::context::Context as LlvmContext;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetTriple,
};

use crate::CodegenError;
use crate::kernels::attention_mma::{
    AttentionIo, Half, MAX_HEAD_DIM, MmaTiles, TensorCores, attention_mma, entry_ir,
};
use crate::kernels::tensor_core::{self, TensorCoreKernel};
use crate::kernels::warp::Lowering;
use crate::plan::Planned;

/// The f32 vector width GPU kernels are generated for (the widest load a thread issues).
pub const GPU_VECTOR: usize = 4;

/// Threads per block of every launch.
pub const THREADS_PER_BLOCK: u32 = 64;

/// An NVIDIA GPU architecture: `sm_80` (A100) or `sm_90` (H100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuTarget {
    pub sm: u32,
}

impl GpuTarget {
    pub fn from_name(name: &str) -> Option<GpuTarget> {
        match name {
            "sm_80" => Some(GpuTarget { sm: 80 }),
            "sm_90" => Some(GpuTarget { sm: 90 }),
            _ => None,
        }
    }

    pub fn name(&self) -> String {
        format!("sm_{}", self.sm)
    }

    pub fn describe(&self) -> String {
        format!("nvptx64-nvidia-cuda {}", self.name())
    }
}

/// The GPU entry of a kernel.
pub fn entry(symbol: &str) -> String {
    format!("{symbol}_grid")
}

/// Replaces the math NVPTX cannot lower with PTX approximations, in LLVM IR text.
fn gpu_math(ir: &str) -> String {
    // Scalar replacements: the intrinsic or libm function, and its definition's name.
    const SCALAR: [(&str, &str); 6] = [
        ("@llvm.exp.f32(", "@zebra.gpu.exp("),
        ("@llvm.log.f32(", "@zebra.gpu.log("),
        ("@llvm.log2.f32(", "@zebra.gpu.log2("),
        ("@llvm.sin.f32(", "@zebra.gpu.sin("),
        ("@llvm.cos.f32(", "@zebra.gpu.cos("),
        ("@tanhf(", "@zebra.gpu.tanh("),
    ];
    const VECTOR: [&str; 5] = ["exp", "log", "log2", "sin", "cos"];
    let mut out = String::with_capacity(ir.len());
    let mut vector_widths: Vec<(String, usize)> = Vec::new();
    for line in ir.lines() {
        // Declared again below, for the definitions that use them.
        let redeclared = ["@llvm.roundeven.f32(", "@llvm.fma.f32("];
        if line.starts_with("declare")
            && (SCALAR.iter().any(|(from, _)| line.contains(from))
                || redeclared.iter().any(|f| line.contains(f))
                || VECTOR
                    .iter()
                    .any(|f| line.contains(&format!("@llvm.{f}.v"))))
        {
            continue;
        }
        if line.starts_with("target datalayout") || line.starts_with("target triple") {
            continue;
        }
        let mut line = line.to_string();
        for (from, to) in SCALAR {
            line = line.replace(from, to);
        }
        for func in VECTOR {
            let prefix = format!("@llvm.{func}.v");
            while let Some(at) = line.find(&prefix) {
                let rest = &line[at + prefix.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                let n: usize = digits.parse().unwrap_or(1);
                let old = format!("{prefix}{digits}f32(");
                let new = format!("@zebra.gpu.{func}.v{n}(");
                line = line.replacen(&old, &new, 1);
                if !vector_widths.contains(&(func.to_string(), n)) {
                    vector_widths.push((func.to_string(), n));
                }
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    // 0x3FF7154760000000 is log2(e) and 0x3FE62E4300000000 ln(2), as f32 values.
    out.push_str(
        "
declare float @llvm.nvvm.ex2.approx.f(float)
declare float @llvm.nvvm.lg2.approx.f(float)

define internal float @zebra.gpu.exp(float %x) alwaysinline {
  %y = fmul float %x, 0x3FF7154760000000
  %r = call float @llvm.nvvm.ex2.approx.f(float %y)
  ret float %r
}

define internal float @zebra.gpu.log2(float %x) alwaysinline {
  %r = call float @llvm.nvvm.lg2.approx.f(float %x)
  ret float %r
}

define internal float @zebra.gpu.log(float %x) alwaysinline {
  %l = call float @llvm.nvvm.lg2.approx.f(float %x)
  %r = fmul float %l, 0x3FE62E4300000000
  ret float %r
}

; sin and cos of the argument reduced to [-pi, pi] (2 pi in two parts, Cody and Waite),
; then the PTX approximations (absolute error about 2^-21 there).
declare float @llvm.nvvm.sin.approx.f(float)
declare float @llvm.nvvm.cos.approx.f(float)
declare float @llvm.roundeven.f32(float)
declare float @llvm.fma.f32(float, float, float)

define internal float @zebra.gpu.reduce(float %x) alwaysinline {
  %q = fmul float %x, 0x3FC45F3060000000
  %k = call float @llvm.roundeven.f32(float %q)
  %r1 = call float @llvm.fma.f32(float %k, float -6.28125, float %x)
  %r = call float @llvm.fma.f32(float %k, float 0xBF5FB54440000000, float %r1)
  ret float %r
}

define internal float @zebra.gpu.sin(float %x) alwaysinline {
  %r = call float @zebra.gpu.reduce(float %x)
  %s = call float @llvm.nvvm.sin.approx.f(float %r)
  ret float %s
}

define internal float @zebra.gpu.cos(float %x) alwaysinline {
  %r = call float @zebra.gpu.reduce(float %x)
  %c = call float @llvm.nvvm.cos.approx.f(float %r)
  ret float %c
}

; tanh(x) = 1 - 2 / (e^(2x) + 1): exact limits at both infinities.
define internal float @zebra.gpu.tanh(float %x) alwaysinline {
  %x2 = fadd float %x, %x
  %e = call float @zebra.gpu.exp(float %x2)
  %d = fadd float %e, 1.0
  %q = fdiv float 2.0, %d
  %r = fsub float 1.0, %q
  ret float %r
}
",
    );
    for (func, n) in vector_widths {
        let ty = format!("<{n} x float>");
        out.push_str(&format!(
            "\ndefine internal {ty} @zebra.gpu.{func}.v{n}({ty} %x) alwaysinline {{\n"
        ));
        let mut acc = "poison".to_string();
        for i in 0..n {
            out.push_str(&format!("  %a{i} = extractelement {ty} %x, i32 {i}\n"));
            out.push_str(&format!(
                "  %r{i} = call float @zebra.gpu.{func}(float %a{i})\n"
            ));
            out.push_str(&format!(
                "  %v{i} = insertelement {ty} {acc}, float %r{i}, i32 {i}\n"
            ));
            acc = format!("%v{i}");
        }
        out.push_str(&format!("  ret {ty} {acc}\n}}\n"));
    }
    out
}

/// The grid entries: program `blockIdx.x * blockDim.x + threadIdx.x` runs if it is below
/// `programs`.
fn entries(symbols: &[String]) -> String {
    let mut out = String::from(
        "
declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
",
    );
    for symbol in symbols {
        out.push_str(&format!(
            "
define ptx_kernel void @{entry}(ptr %buffers, ptr %dims, i64 %programs) {{
  %thread = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %block = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
  %width = call i32 @llvm.nvvm.read.ptx.sreg.ntid.x()
  %block64 = zext i32 %block to i64
  %width64 = zext i32 %width to i64
  %thread64 = zext i32 %thread to i64
  %first = mul i64 %block64, %width64
  %program = add i64 %first, %thread64
  %inside = icmp slt i64 %program, %programs
  br i1 %inside, label %run, label %done
run:
  %next = add i64 %program, 1
  call void @{symbol}(ptr %buffers, ptr %dims, i64 %program, i64 %next)
  br label %done
done:
  ret void
}}
",
            entry = entry(symbol)
        ));
    }
    out
}

/// The LLVM IR of a planned graph's kernels for the GPU (before optimization). With `cores`,
/// the projections and attentions also get tensor-core versions in its 16-bit type, which
/// the plan's kernels then name (`tensor_cores`) for the runtime to launch instead.
pub fn gpu_llvm_ir(
    planned: &mut Planned,
    cores: Option<TensorCores>,
    sm: u32,
    mlir: &crate::backend::Mlir,
) -> Result<String, CodegenError> {
    let (text, tensor_core) = gpu_mlir(planned, cores, sm);
    let ir = mlir.to_llvm_ir(&text)?;
    let symbols: Vec<String> = planned
        .plan
        .kernels
        .iter()
        .map(|k| k.symbol.clone())
        .collect();
    let mut out = gpu_math(&ir);
    for (name, kernel) in &tensor_core {
        // Inlined into its entry: no copy of its own.
        let mut functions = vec![name.clone()];
        functions.extend(kernel.then().map(|then| format!("{name}{}", then.suffix)));
        for function in functions {
            out = out.replacen(
                &format!("define void @{function}("),
                &format!("define internal void @{function}("),
                1,
            );
        }
    }
    out.push_str(&entries(&symbols));
    if !tensor_core.is_empty() {
        out.push_str(
            "declare i32 @llvm.nvvm.read.ptx.sreg.ctaid.y()\ndeclare i32 @llvm.nvvm.read.ptx.sreg.nctaid.x()\n",
        );
    }
    for (name, kernel) in &tensor_core {
        out.push_str(&kernel.entry_ir(name));
        if let Some(then) = kernel.then() {
            out.push_str(&then.entry_ir(name));
        }
    }
    Ok(out)
}

/// The MLIR module of a planned graph's kernels for the GPU, with the functions of the
/// kernels that run on tensor cores when `cores` is set (their names are returned; the
/// plan's kernels name their entries).
pub fn gpu_mlir(
    planned: &mut Planned,
    cores: Option<TensorCores>,
    sm: u32,
) -> (String, Vec<(String, TensorCoreKernel)>) {
    let mut text = crate::artifact::kernels_mlir(planned, GPU_VECTOR);
    let mut tensor_core = Vec::new();
    // Without a 16-bit type, the decode attentions still get their GPU kernel (f32).
    let (half, selected) = match cores {
        Some(TensorCores { half, attention }) => {
            (Some(half), tensor_core::select(planned, sm, &attention))
        }
        None => (None, tensor_core::select_decode(planned)),
    };
    for (i, kernel) in selected {
        let info = &mut planned.plan.kernels[i];
        let name = format!("{}_tc", info.symbol);
        let function = kernel.function(&name, half.unwrap_or(Half::Bf16), Lowering::Ptx);
        let end = text.rfind('}').expect("a module ends with a brace");
        text.insert_str(end, &function);
        let dtype = match (&kernel, half) {
            (TensorCoreKernel::Decode { .. }, _) | (_, None) => "f32",
            (_, Some(half)) => half.name(),
        };
        info.tensor_cores = Some(zebra_runtime::plan::TensorCoreLaunch {
            entry: format!("{name}_mma"),
            dtype: dtype.into(),
            grid: kernel.grid(),
            threads: kernel.threads(),
            shared_bytes: kernel.shared_bytes(),
            then: kernel.then().map(|then| {
                Box::new(zebra_runtime::plan::TensorCoreLaunch {
                    entry: format!("{name}{}_mma", then.suffix),
                    dtype: dtype.into(),
                    grid: then.grid,
                    threads: then.threads,
                    shared_bytes: then.shared_bytes,
                    then: None,
                })
            }),
        });
        tensor_core.push((name, kernel));
    }
    (text, tensor_core)
}

/// The tensor-core attention kernels of a graph, one per distinct attention (the first
/// occurrence's label), with the tiles each takes on `target`; an attention whose head
/// dimension the tensor-core kernel cannot take is an error that names it.
pub fn mma_attentions(
    graph: &zebra_ir::Graph,
    target: GpuTarget,
) -> Result<Vec<(zebra_ir::op::AttentionKernel, MmaTiles)>, CodegenError> {
    let mut out: Vec<(zebra_ir::op::AttentionKernel, MmaTiles)> = Vec::new();
    let Some(order) = graph.topo_order() else {
        return Err(CodegenError::Io("the graph has a cycle".into()));
    };
    for id in order {
        let zebra_ir::Op::Attention(kernel) = &graph.node(id).op else {
            continue;
        };
        let tiles = MmaTiles::for_head_dim(kernel.head_dim as usize, target.sm).ok_or_else(|| {
            CodegenError::Io(format!(
                "attention `{}`: the tensor-core kernel takes head dims that are multiples of 16 \
                 up to {MAX_HEAD_DIM}, not {}",
                kernel.name, kernel.head_dim
            ))
        })?;
        let mut kernel = (**kernel).clone();
        kernel.block_q = tiles.block_q as u64;
        kernel.block_k = tiles.block_k as u64;
        kernel.merge_heads = false;
        if out.iter().any(|(k, _)| k.same_computation(&kernel)) {
            continue;
        }
        out.push((kernel, tiles));
    }
    Ok(out)
}

/// The symbol of a tensor-core attention kernel.
pub fn mma_symbol(
    kernel: &zebra_ir::op::AttentionKernel,
    tiles: MmaTiles,
    half: Half,
    target: GpuTarget,
) -> String {
    let description = format!(
        "{:?} {:?} {:?} {} {} {} {} {} {:?} {} {}",
        tiles,
        kernel.mask.to_string(),
        kernel.score.as_ref().map(|s| s.to_string()),
        kernel.scale,
        kernel.heads,
        kernel.kv_heads,
        kernel.head_dim,
        kernel.block_k,
        kernel.sides,
        half.name(),
        target.name()
    );
    let label: String = kernel
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!(
        "zebra_attention_mma_{label}_{:016x}",
        crate::kernels::fnv1a(description.as_bytes())
    )
}

/// The LLVM IR of tensor-core attention kernels (before optimization): the MLIR functions
/// lowered as every kernel is, the GPU math, and one entry per kernel.
pub fn mma_llvm_ir(
    kernels: &[(String, zebra_ir::op::AttentionKernel, MmaTiles)],
    half: Half,
    mlir: &crate::backend::Mlir,
) -> Result<String, CodegenError> {
    let functions: Vec<String> = kernels
        .iter()
        .map(|(symbol, kernel, tiles)| {
            attention_mma(
                symbol,
                kernel,
                half,
                *tiles,
                Lowering::Ptx,
                AttentionIo::Half,
            )
        })
        .collect();
    let text = crate::mlir::module(&functions);
    let ir = mlir.to_llvm_ir(&text)?;
    let mut out = gpu_math(&ir);
    // Each function is inlined into its entry and needs no copy of its own.
    for (symbol, _, _) in kernels {
        out = out.replacen(
            &format!("define void @{symbol}("),
            &format!("define internal void @{symbol}("),
            1,
        );
    }
    out.push_str(
        "
declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()
declare i32 @llvm.nvvm.read.ptx.sreg.ctaid.y()
declare i32 @llvm.nvvm.read.ptx.sreg.nctaid.x()
",
    );
    for (symbol, _, tiles) in kernels {
        out.push_str(&entry_ir(symbol, tiles));
    }
    Ok(out)
}

/// What LLVM's NVPTX backend produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuOutput {
    /// The optimized LLVM IR.
    OptimizedIr,
    Ptx,
}

/// The architecture GPU LLVM IR compiles for on `target`: `wgmma` is an sm_90a instruction,
/// so PTX that uses it is for that architecture alone; other PTX is for the target.
pub fn arch(ir: &str, target: GpuTarget) -> String {
    if ir.contains("wgmma.") && target.sm == 90 {
        "sm_90a".to_string()
    } else {
        target.name()
    }
}

/// Optimizes GPU LLVM IR at O3 and emits PTX (or the optimized IR).
pub fn compile(ir: &str, target: GpuTarget, output: GpuOutput) -> Result<String, CodegenError> {
    let arch = arch(ir, target);
    Target::initialize_nvptx(&InitializationConfig::default());
    let context = LlvmContext::create();
    let buffer = MemoryBuffer::create_from_memory_range_copy(ir.as_bytes(), "kernels");
    let module = context
        .create_module_from_ir(buffer)
        .map_err(|e| CodegenError::Llvm(format!("LLVM cannot read the GPU kernels' IR: {e}")))?;
    let triple = TargetTriple::create("nvptx64-nvidia-cuda");
    let llvm_target =
        Target::from_triple(&triple).map_err(|e| CodegenError::Llvm(e.to_string()))?;
    let machine = llvm_target
        .create_target_machine(
            &triple,
            &arch,
            "+ptx80",
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| CodegenError::Llvm(format!("no target machine for {arch}")))?;
    module.set_triple(&triple);
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    module
        .verify()
        .map_err(|e| CodegenError::Llvm(format!("the GPU kernels' IR is invalid: {e}")))?;
    module
        .run_passes("default<O3>", &machine, PassBuilderOptions::create())
        .map_err(|e| CodegenError::Llvm(format!("optimization failed: {e}")))?;
    match output {
        GpuOutput::OptimizedIr => Ok(module.print_to_string().to_string()),
        GpuOutput::Ptx => {
            let code = machine
                .write_to_memory_buffer(&module, FileType::Assembly)
                .map_err(|e| CodegenError::Llvm(format!("PTX generation failed: {e}")))?;
            Ok(String::from_utf8_lossy(code.as_slice()).into_owned())
        }
    }
}

/// What the PTX says about one entry: its parameters and the local memory (the kernel's
/// stack: its scratch arrays and spills) each thread needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryInfo {
    pub name: String,
    pub params: Vec<String>,
    pub local_bytes: usize,
}

/// The entries of a PTX module, read from its text.
pub fn entries_of(ptx: &str) -> Vec<EntryInfo> {
    let mut out: Vec<EntryInfo> = Vec::new();
    let mut lines = ptx.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim().strip_prefix(".visible .entry ") else {
            continue;
        };
        let name = rest.trim_end_matches('(').trim().to_string();
        let mut params = Vec::new();
        for line in lines.by_ref() {
            let line = line.trim();
            if let Some(p) = line.strip_prefix(".param ") {
                params.push(p.trim_end_matches(',').to_string());
            }
            if line.starts_with(')') {
                break;
            }
        }
        let mut local = 0;
        for line in lines.by_ref() {
            let line = line.trim();
            if let Some(at) = line.find("__local_depot") {
                let digits: String = line[at..]
                    .chars()
                    .skip_while(|c| *c != '[')
                    .skip(1)
                    .take_while(char::is_ascii_digit)
                    .collect();
                local = local.max(digits.parse().unwrap_or(0));
            }
            if line.starts_with("ret;") || line == "}" {
                break;
            }
        }
        out.push(EntryInfo {
            name,
            params,
            local_bytes: local,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn math_becomes_ptx_approximations() {
        let ir = "declare float @llvm.exp.f32(float)\ndeclare <4 x float> @llvm.log.v4f32(<4 x float>)\n\
                  define float @f(float %x, <4 x float> %v) {\n  %a = call float @llvm.exp.f32(float %x)\n  \
                  %b = call <4 x float> @llvm.log.v4f32(<4 x float> %v)\n  %c = call float @tanhf(float %a)\n  ret float %c\n}\n";
        let out = gpu_math(ir);
        assert!(!out.contains("@llvm.exp.f32") && !out.contains("@llvm.log.v4f32"));
        assert!(!out.contains("declare float @tanhf"));
        assert!(out.contains("call float @zebra.gpu.exp(float %x)"));
        assert!(out.contains("define internal <4 x float> @zebra.gpu.log.v4("));
        assert!(out.contains("call float @zebra.gpu.tanh(float %a)"));
    }

    #[test]
    fn targets_are_named() {
        assert_eq!(GpuTarget::from_name("sm_90").map(|t| t.sm), Some(90));
        assert_eq!(GpuTarget::from_name("sm_75"), None);
    }
}
