//! Zebra's kernel generator. Every op of an optimized graph becomes a kernel written in MLIR
//! (`func`, `scf`, `arith`, `math`, `vector`, `llvm` pointers), specialized for its op,
//! attributes and constant sizes: a grid of independent programs that the runtime runs on
//! threads. MLIR lowers the kernels to LLVM IR; LLVM (through inkwell) optimizes them for the
//! host CPU and emits the object code of the artifact's kernel library.

pub mod artifact;
pub mod backend;
pub mod emulate;
pub mod kernels;
pub mod mlir;
pub mod plan;
pub mod ptx;
pub mod toolchain;
pub mod vexpr;

/// Why code generation failed.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("MLIR: {0}")]
    Mlir(String),
    #[error("LLVM: {0}")]
    Llvm(String),
    #[error("linking the kernel library: {0}")]
    Link(String),
    #[error("{0}")]
    Io(String),
    #[error("the CPU backend cannot compile this graph: {0}")]
    Unsupported(String),
}

impl CodegenError {
    /// Adds which kernel the error is about.
    pub fn context(self, kernel: &str) -> CodegenError {
        match self {
            CodegenError::Mlir(m) => CodegenError::Mlir(format!("kernel {kernel}: {m}")),
            CodegenError::Llvm(m) => CodegenError::Llvm(format!("kernel {kernel}: {m}")),
            other => other,
        }
    }
}
