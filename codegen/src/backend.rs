//! From MLIR text to machine code: MLIR parses and verifies each kernel module and lowers it
//! to the LLVM dialect, which it translates to LLVM IR; LLVM (through inkwell) optimizes the
//! IR for the host CPU and emits object code (or assembly); the system C compiler links the
//! objects into the shared library the runtime loads.

use std::cell::RefCell;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;

use inkwell::OptimizationLevel;
use inkwell::context::Context as LlvmContext;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple,
};
use melior::Context;
use melior::ir::Module;
use melior::ir::operation::OperationLike;
use melior::pass::PassManager;

use crate::CodegenError;

/// The lowering from the kernels' dialects to the LLVM dialect.
pub const LOWERING: &str = "builtin.module(convert-scf-to-cf,arith-expand,convert-vector-to-llvm,convert-math-to-llvm,convert-math-to-libm,convert-arith-to-llvm,convert-func-to-llvm,convert-cf-to-llvm,reconcile-unrealized-casts)";

/// The CPU kernels are compiled for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuTarget {
    pub triple: String,
    pub cpu: String,
    pub features: String,
    /// The widest f32 vector: 16 with AVX-512, 8 with AVX, else 4.
    pub vector: usize,
}

impl CpuTarget {
    /// The machine this process runs on.
    pub fn host() -> Result<CpuTarget, CodegenError> {
        Target::initialize_native(&InitializationConfig::default()).map_err(CodegenError::Llvm)?;
        let features = TargetMachine::get_host_cpu_features().to_string();
        let has = |f: &str| features.split(',').any(|x| x == format!("+{f}"));
        let vector = if has("avx512f") {
            16
        } else if has("avx") {
            8
        } else {
            4
        };
        Ok(CpuTarget {
            triple: TargetMachine::get_default_triple()
                .as_str()
                .to_string_lossy()
                .into_owned(),
            cpu: TargetMachine::get_host_cpu_name().to_string(),
            features,
            vector,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} {} ({} x f32 vectors)",
            self.triple, self.cpu, self.vector
        )
    }
}

/// An MLIR context for kernels, collecting diagnostics.
pub struct Mlir {
    context: Context,
    diagnostics: Rc<RefCell<Vec<String>>>,
}

impl Mlir {
    pub fn new() -> Mlir {
        melior::utility::register_all_passes();
        let context = crate::toolchain::mlir_context();
        let diagnostics: Rc<RefCell<Vec<String>>> = Rc::default();
        let sink = diagnostics.clone();
        context.attach_diagnostic_handler(move |d| {
            sink.borrow_mut().push(d.to_string());
            true
        });
        Mlir {
            context,
            diagnostics,
        }
    }

    fn take_diagnostics(&self) -> String {
        std::mem::take(&mut *self.diagnostics.borrow_mut()).join("\n")
    }

    /// Parses and verifies a module; the error carries MLIR's diagnostics.
    pub fn verify(&self, text: &str) -> Result<(), CodegenError> {
        let module = Module::parse(&self.context, text).ok_or_else(|| {
            CodegenError::Mlir(format!(
                "the kernel module does not parse: {}",
                self.take_diagnostics()
            ))
        })?;
        if !module.as_operation().verify() {
            return Err(CodegenError::Mlir(format!(
                "the kernel module does not verify: {}",
                self.take_diagnostics()
            )));
        }
        Ok(())
    }

    /// Verifies a module, lowers it to the LLVM dialect and translates it to LLVM IR.
    pub fn to_llvm_ir(&self, text: &str) -> Result<String, CodegenError> {
        let module = self.lower(text)?;
        // SAFETY: the module is a verified LLVM-dialect module; the returned string is
        // malloc'ed by MLIR and freed below.
        unsafe {
            let raw = mlir_sys::mlirTranslateModuleToLLVMIRToString(module.as_operation().to_raw());
            if raw.is_null() {
                return Err(CodegenError::Mlir(format!(
                    "translation to LLVM IR failed: {}",
                    self.take_diagnostics()
                )));
            }
            let text = std::ffi::CStr::from_ptr(raw).to_string_lossy().into_owned();
            free(raw.cast());
            Ok(text)
        }
    }

    /// Parses and verifies a module and lowers it to the LLVM dialect.
    pub fn lower(&self, text: &str) -> Result<Module<'_>, CodegenError> {
        let mut module = Module::parse(&self.context, text).ok_or_else(|| {
            CodegenError::Mlir(format!(
                "the kernel module does not parse: {}",
                self.take_diagnostics()
            ))
        })?;
        if !module.as_operation().verify() {
            return Err(CodegenError::Mlir(format!(
                "the kernel module does not verify: {}",
                self.take_diagnostics()
            )));
        }
        let manager = PassManager::new(&self.context);
        melior::utility::parse_pass_pipeline(manager.as_operation_pass_manager(), LOWERING)
            .map_err(|e| CodegenError::Mlir(format!("the lowering pipeline: {e}")))?;
        manager.run(&mut module).map_err(|e| {
            CodegenError::Mlir(format!(
                "lowering to the LLVM dialect failed: {e}: {}",
                self.take_diagnostics()
            ))
        })?;
        Ok(module)
    }
}

impl Default for Mlir {
    fn default() -> Mlir {
        Mlir::new()
    }
}

unsafe extern "C" {
    fn free(pointer: *mut std::ffi::c_void);
}

/// What LLVM produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Object,
    Assembly,
    /// The optimized LLVM IR.
    OptimizedIr,
}

/// Optimizes LLVM IR at O3 for the target and emits it.
pub fn llvm_compile(ir: &str, target: &CpuTarget, output: Output) -> Result<Vec<u8>, CodegenError> {
    Target::initialize_native(&InitializationConfig::default()).map_err(CodegenError::Llvm)?;
    let context = LlvmContext::create();
    let buffer = MemoryBuffer::create_from_memory_range_copy(ir.as_bytes(), "kernel");
    let module = context
        .create_module_from_ir(buffer)
        .map_err(|e| CodegenError::Llvm(format!("LLVM cannot read the kernel's IR: {e}")))?;
    let triple = TargetTriple::create(&target.triple);
    let llvm_target =
        Target::from_triple(&triple).map_err(|e| CodegenError::Llvm(e.to_string()))?;
    let machine = llvm_target
        .create_target_machine(
            &triple,
            &target.cpu,
            &target.features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| {
            CodegenError::Llvm(format!("no target machine for {}", target.describe()))
        })?;
    module.set_triple(&triple);
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    module
        .run_passes("default<O3>", &machine, PassBuilderOptions::create())
        .map_err(|e| CodegenError::Llvm(format!("optimization failed: {e}")))?;
    match output {
        Output::OptimizedIr => Ok(module.print_to_string().to_bytes().to_vec()),
        Output::Object | Output::Assembly => {
            let kind = if output == Output::Object {
                FileType::Object
            } else {
                FileType::Assembly
            };
            let code = machine
                .write_to_memory_buffer(&module, kind)
                .map_err(|e| CodegenError::Llvm(format!("code generation failed: {e}")))?;
            Ok(code.as_slice().to_vec())
        }
    }
}

/// Links object files into a shared library with the system C compiler.
pub fn link_shared(objects: &[&Path], out: &Path) -> Result<(), CodegenError> {
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = out.with_extension(format!("so.tmp{}-{n}", std::process::id()));
    let result = Command::new(&compiler)
        .arg("-shared")
        .arg("-o")
        .arg(&temp)
        .args(objects)
        .arg("-lm")
        .output()
        .map_err(|e| {
            CodegenError::Link(format!("cannot run `{compiler}` to link the kernels: {e}"))
        })?;
    if !result.status.success() {
        return Err(CodegenError::Link(format!(
            "`{compiler} -shared` failed: {}",
            String::from_utf8_lossy(&result.stderr)
        )));
    }
    std::fs::rename(&temp, out)
        .map_err(|e| CodegenError::Io(format!("cannot write {}: {e}", out.display())))
}
