//! A self-test of the code-generation toolchain: MLIR builds, verifies, lowers and runs a
//! function through its JIT, and LLVM creates target machines for the host CPU and for
//! NVIDIA's PTX. `zebra toolchain` prints the result; the tests run it in CI.

use inkwell::OptimizationLevel;
use inkwell::targets::{
    CodeModel, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple,
};
use melior::dialect::DialectRegistry;
use melior::ir::Module;
use melior::ir::operation::OperationLike;
use melior::utility::{register_all_dialects, register_all_llvm_translations};
use melior::{Context, ExecutionEngine, pass};

/// What the toolchain self-test found.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolchainReport {
    /// `fma(2, 3, 4)` computed by MLIR-generated, JIT-compiled code (expected 10).
    pub mlir_jit_result: f32,
    /// The host's LLVM target triple.
    pub host_triple: String,
    /// The host CPU LLVM tunes for.
    pub host_cpu: String,
    /// The description of the NVPTX target.
    pub nvptx_target: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    #[error("MLIR: {0}")]
    Mlir(String),
    #[error("LLVM: {0}")]
    Llvm(String),
}

/// A context with every MLIR dialect and LLVM translation registered.
pub fn mlir_context() -> Context {
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let context = Context::new();
    context.append_dialect_registry(&registry);
    context.load_all_available_dialects();
    register_all_llvm_translations(&context);
    context
}

const PROBE: &str = r#"
module {
  func.func @fma(%a: f32, %b: f32, %c: f32) -> f32 attributes { llvm.emit_c_interface } {
    %p = arith.mulf %a, %b : f32
    %s = arith.addf %p, %c : f32
    return %s : f32
  }
}
"#;

/// Runs the self-test.
pub fn self_test() -> Result<ToolchainReport, ToolchainError> {
    let context = mlir_context();
    let mut module = Module::parse(&context, PROBE)
        .ok_or_else(|| ToolchainError::Mlir("the probe module does not parse".into()))?;
    if !module.as_operation().verify() {
        return Err(ToolchainError::Mlir(
            "the probe module does not verify".into(),
        ));
    }
    let manager = pass::PassManager::new(&context);
    manager.add_pass(pass::conversion::create_to_llvm());
    manager
        .run(&mut module)
        .map_err(|e| ToolchainError::Mlir(format!("lowering to the LLVM dialect failed: {e}")))?;
    let engine = ExecutionEngine::new(&module, 2, &[], false, false);
    let (mut a, mut b, mut c, mut result) = (2.0f32, 3.0f32, 4.0f32, 0.0f32);
    // SAFETY: `fma` takes three f32 arguments and returns one f32, matching the pointers.
    unsafe {
        engine.invoke_packed(
            "fma",
            &mut [
                &mut a as *mut f32 as *mut (),
                &mut b as *mut f32 as *mut (),
                &mut c as *mut f32 as *mut (),
                &mut result as *mut f32 as *mut (),
            ],
        )
    }
    .map_err(|e| ToolchainError::Mlir(format!("the JIT could not run the probe: {e}")))?;

    Target::initialize_native(&InitializationConfig::default()).map_err(ToolchainError::Llvm)?;
    Target::initialize_nvptx(&InitializationConfig::default());
    let host_triple = TargetMachine::get_default_triple();
    let host_cpu = TargetMachine::get_host_cpu_name().to_string();
    let host =
        Target::from_triple(&host_triple).map_err(|e| ToolchainError::Llvm(e.to_string()))?;
    host.create_target_machine(
        &host_triple,
        &host_cpu,
        &TargetMachine::get_host_cpu_features().to_string(),
        OptimizationLevel::Default,
        RelocMode::PIC,
        CodeModel::Default,
    )
    .ok_or_else(|| ToolchainError::Llvm("no target machine for the host".into()))?;
    let ptx_triple = TargetTriple::create("nvptx64-nvidia-cuda");
    let nvptx =
        Target::from_triple(&ptx_triple).map_err(|e| ToolchainError::Llvm(e.to_string()))?;
    nvptx
        .create_target_machine(
            &ptx_triple,
            "sm_80",
            "+ptx80",
            OptimizationLevel::Default,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| ToolchainError::Llvm("no target machine for sm_80".into()))?;
    Ok(ToolchainReport {
        mlir_jit_result: result,
        host_triple: host_triple.as_str().to_string_lossy().into_owned(),
        host_cpu,
        nvptx_target: nvptx.get_description().to_string_lossy().into_owned(),
    })
}
