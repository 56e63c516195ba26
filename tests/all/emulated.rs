//! The tensor-core kernels, run on the CPU by the warp emulator (`zebra_codegen::emulate`):
//! the very kernels the GPU runs, with `mma.sync`, `ldmatrix`, `cp.async`, shuffles and
//! barriers emulated, checked against the f64 reference on every machine, GPU or not.

use zebra_codegen::emulate::EmulatedAttention;
use zebra_codegen::kernels::attention_mma::{Half, MmaSettings, MmaTiles};
use zebra_codegen::ptx::{GpuTarget, mma_attentions};
use zebra_ir::op::AttentionKernel;
use zebra_passes::{Options, optimize};
use zebra_runtime::attention_check::AttentionCase;

use crate::common::{check_ok, lower, relative, root};

/// Runs one attention kernel in the emulator on random inputs; returns the output and the
/// case it ran on.
fn emulate(
    kernel: &AttentionKernel,
    tiles: MmaTiles,
    half: Half,
    (batch, seq): (usize, usize),
) -> (EmulatedAttention, AttentionCase, Vec<u16>) {
    let emulated = EmulatedAttention::compile("emulated", kernel, half, tiles)
        .unwrap_or_else(|e| panic!("{}: {e}", kernel.name));
    let entry = &emulated.entry;
    let case = AttentionCase::new(entry, half.name(), batch, seq, 7).unwrap();
    let mut out = vec![0u16; batch * entry.heads * seq * entry.head_dim];
    emulated
        .run(
            [&case.q, &case.k, &case.v],
            &mut out,
            &case.word_buffers(),
            case.dims(),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", kernel.name));
    (emulated, case, out)
}

/// The worst error of 48 sampled output rows against the f64 reference (at most 1 passes).
fn emulated_error(
    kernel: &AttentionKernel,
    tiles: MmaTiles,
    half: Half,
    shape: (usize, usize),
) -> f64 {
    let (emulated, case, out) = emulate(kernel, tiles, half, shape);
    case.worst_error(&emulated.entry, half.name(), &out, 48, 3)
}

/// The same attention with two heads (GQA kept where the model has it): enough to exercise
/// head indexing at a fraction of the emulator's time.
fn two_heads(kernel: &AttentionKernel) -> AttentionKernel {
    AttentionKernel {
        heads: 2,
        kv_heads: if kernel.kv_heads < kernel.heads { 1 } else { 2 },
        ..kernel.clone()
    }
}

/// Every distinct attention of every example (causal, sliding window, sinks, chunked,
/// dilated, prefix-LM, documents, ALiBi, soft-capping, bidirectional, GQA) runs on tensor
/// cores in the emulator and matches the reference, at a length that is not a multiple of
/// the tiles, with two batch rows (document masks get a schedule per row).
#[test]
fn every_attention_matches_the_reference_in_the_emulator() {
    let mut seen: Vec<AttentionKernel> = Vec::new();
    for path in crate::common::examples() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let graph = optimize(&lower(spec), &Options::default()).unwrap().graph;
            for (kernel, tiles) in mma_attentions(&graph, GpuTarget { sm: 80 }).unwrap() {
                let kernel = two_heads(&kernel);
                if seen.iter().any(|k| k.same_computation(&kernel)) {
                    continue;
                }
                let error = emulated_error(&kernel, tiles, Half::Bf16, (2, 150));
                assert!(
                    error <= 1.0,
                    "{} ({}), attention `{}` (mask {}, head dim {}): error {error}",
                    relative(&path),
                    spec.name,
                    kernel.name,
                    kernel.mask,
                    kernel.head_dim
                );
                seen.push(kernel);
            }
        }
    }
    assert!(seen.len() >= 10, "only {} distinct attentions", seen.len());
}

/// zebra_tiny's global and local attention at the head dims and settings the kernel takes
/// (one and two row blocks per warp, one and two K/V stages, every key-tile size), in bf16
/// and f16, at T = 1, at a length inside one tile and one past several; and the check
/// catches a kernel that computes another attention.
#[test]
fn tensor_core_variants_in_the_emulator() {
    let (_, checked) = check_ok(&root().join("examples/zebra_tiny.zb"));
    let graph = optimize(&lower(&checked.program.models[0]), &Options::default())
        .unwrap()
        .graph;
    let kernels = mma_attentions(&graph, GpuTarget { sm: 90 }).unwrap();
    assert_eq!(kernels.len(), 2);
    let with_dim = |kernel: &AttentionKernel, d: u64| -> (AttentionKernel, MmaTiles) {
        let kernel = AttentionKernel {
            head_dim: d,
            scale: 1.0 / (d as f64).sqrt(),
            ..two_heads(kernel)
        };
        (kernel, MmaTiles::for_head_dim(d as usize, 90).unwrap())
    };
    let cases: [(u64, MmaSettings, Half, (usize, usize)); 7] = [
        (64, MmaSettings::default(), Half::Bf16, (1, 1)),
        (64, MmaSettings::default(), Half::F16, (1, 77)),
        (128, MmaSettings::default(), Half::Bf16, (1, 200)),
        (256, MmaSettings::default(), Half::Bf16, (1, 100)),
        (
            32,
            MmaSettings {
                stages: Some(2),
                block_k: None,
            },
            Half::Bf16,
            (2, 300),
        ),
        (
            16,
            MmaSettings {
                stages: Some(2),
                block_k: Some(16),
            },
            Half::F16,
            (1, 150),
        ),
        (
            16,
            MmaSettings {
                stages: None,
                block_k: Some(128),
            },
            Half::Bf16,
            (1, 300),
        ),
    ];
    for (d, settings, half, shape) in cases {
        for (kernel, _) in &kernels {
            let (mut kernel, tiles) = with_dim(kernel, d);
            let tiles = tiles.with(&settings);
            kernel.block_k = tiles.block_k as u64;
            let error = emulated_error(&kernel, tiles, half, shape);
            assert!(
                error <= 1.0,
                "`{}` head dim {d}, {settings:?}, {}, {shape:?}: error {error}",
                kernel.name,
                half.name()
            );
        }
    }
    // The local kernel's output, checked as the global attention's (the same inputs), fails.
    let (global, _) = with_dim(&kernels[0].0, 32);
    let (local, tiles) = with_dim(&kernels[1].0, 32);
    assert!(global.mask.to_string() != local.mask.to_string());
    let (_, _, out) = emulate(&local, tiles, Half::Bf16, (1, 200));
    let global_entry = zebra_codegen::artifact::attention_entry("global", &global, tiles);
    let global_case = AttentionCase::new(&global_entry, "bf16", 1, 200, 7).unwrap();
    let error = global_case.worst_error(&global_entry, "bf16", &out, 48, 3);
    assert!(error > 1.0, "the check passed another attention: {error}");
}
