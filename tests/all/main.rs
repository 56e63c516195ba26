//! Zebra's integration tests, in one binary so that MLIR and LLVM are linked once.

mod cli;
mod common;
mod diagnostics;
mod golden;
mod interpreter;
mod reference_model;
mod roundtrip;
mod snapshots;
mod toolchain;
mod verifier;
