//! Zebra's integration tests, in one binary so that MLIR and LLVM are linked once.

mod autodiff;
mod cli;
mod codegen;
mod common;
mod diagnostics;
mod emulated;
mod generate;
mod golden;
mod gpu;
mod interpreter;
mod optimizer;
mod reference_model;
mod roundtrip;
mod schedule;
mod snapshots;
mod toolchain;
mod training;
mod verifier;
