//! Zebra's runtime: runs compiled artifacts (an execution plan and its kernels) on the CPU
//! and on NVIDIA GPUs, without linking MLIR or LLVM.
