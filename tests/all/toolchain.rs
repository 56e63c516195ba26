//! MLIR and LLVM are both linked into this binary and work: an MLIR module is built, lowered
//! and run by the JIT, and LLVM has target machines for the host and for PTX.

#[test]
fn mlir_jit_and_llvm_targets_work_in_one_binary() {
    let report = zebra_codegen::toolchain::self_test().expect("the toolchain works");
    assert_eq!(report.mlir_jit_result, 10.0);
    assert!(
        report.host_triple.starts_with("x86_64") || report.host_triple.starts_with("aarch64"),
        "{report:?}"
    );
    assert!(report.nvptx_target.contains("PTX"), "{report:?}");
}
