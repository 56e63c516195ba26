//! Zebra's kernel generator. MLIR (through melior) builds each kernel; LLVM (through inkwell)
//! turns it into native code for the CPU and PTX for NVIDIA GPUs.

pub mod toolchain;
