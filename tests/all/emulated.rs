//! The tensor-core kernels, run on the CPU by the warp emulator (`zebra_codegen::emulate`):
//! the very kernels the GPU runs, with `mma.sync`, `ldmatrix`, `cp.async`, shuffles and
//! barriers emulated, checked against the f64 reference on every machine, GPU or not.

use zebra_codegen::emulate::EmulatedAttention;
use zebra_codegen::kernels::attention_mma::{Half, MmaChoice, MmaSettings, MmaTiles, Product};
use zebra_codegen::ptx::{GpuTarget, mma_attentions};
use zebra_ir::op::AttentionKernel;
use zebra_passes::{Options, optimize};
use zebra_runtime::attention_check::AttentionCase;

use crate::common::{check_ok, lower, relative, root, tiny_graph};

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
    every_attention_in_the_emulator(80, MmaSettings::default());
}

/// The same on sm_90's `wgmma` (one warpgroup of 64 query rows per block, operands read from
/// shared memory through matrix descriptors, V transposed in shared memory).
#[test]
fn every_attention_on_wgmma_matches_the_reference_in_the_emulator() {
    every_attention_in_the_emulator(
        90,
        MmaSettings {
            product: Some(Product::Wgmma),
            ..MmaSettings::default()
        },
    );
}

fn every_attention_in_the_emulator(sm: u32, settings: MmaSettings) {
    let mut seen: Vec<AttentionKernel> = Vec::new();
    for path in crate::common::examples() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let graph = optimize(&lower(spec), &Options::default()).unwrap().graph;
            for (kernel, tiles) in mma_attentions(&graph, GpuTarget { sm }).unwrap() {
                let mut kernel = two_heads(&kernel);
                let tiles = tiles.with(&settings);
                kernel.block_q = tiles.block_q as u64;
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
    let graph = tiny_graph();
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
    let cases: [(u64, MmaSettings, Half, (usize, usize)); 9] = [
        (64, MmaSettings::default(), Half::Bf16, (1, 1)),
        (64, MmaSettings::default(), Half::F16, (1, 77)),
        (128, MmaSettings::default(), Half::Bf16, (1, 200)),
        (256, MmaSettings::default(), Half::Bf16, (1, 100)),
        (
            32,
            MmaSettings {
                stages: Some(2),
                ..MmaSettings::default()
            },
            Half::Bf16,
            (2, 300),
        ),
        (
            16,
            MmaSettings {
                stages: Some(2),
                block_k: Some(16),
                ..MmaSettings::default()
            },
            Half::F16,
            (1, 150),
        ),
        (
            16,
            MmaSettings {
                block_k: Some(128),
                ..MmaSettings::default()
            },
            Half::Bf16,
            (1, 300),
        ),
        (
            64,
            MmaSettings {
                block_q: Some(64),
                ..MmaSettings::default()
            },
            Half::Bf16,
            (1, 150),
        ),
        (
            128,
            MmaSettings {
                block_q: Some(64),
                block_k: Some(32),
                ..MmaSettings::default()
            },
            Half::Bf16,
            (1, 100),
        ),
    ];
    for (d, settings, half, shape) in cases {
        for (kernel, _) in &kernels {
            let (mut kernel, tiles) = with_dim(kernel, d);
            let tiles = tiles.with(&settings);
            kernel.block_q = tiles.block_q as u64;
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

/// Lazy rescaling, where rows' maxima keep rising: scores that grow with the key (a bias of
/// 0.07 per key: about 6.5 in base 2 per tile of 64, so that some tiles move the maximum and
/// others keep the old one with probabilities up to 2^8) and scores spread wide (scale 4),
/// on `mma.sync` and on `wgmma`. A kernel that kept stale maxima without rescaling O fails.
#[test]
fn lazy_rescaling_in_the_emulator() {
    let graph = tiny_graph();
    let kernels = mma_attentions(&graph, GpuTarget { sm: 90 }).unwrap();
    let global = &kernels[0].0;
    assert!(global.mask.sees_no_later_key());
    let d = 64;
    let rising = AttentionKernel {
        head_dim: d,
        scale: 1.0 / (d as f64).sqrt(),
        score: Some(zebra_ir::expr::parse_expr("score + 0.07 * (k - q)").unwrap()),
        ..two_heads(global)
    };
    let spread = AttentionKernel {
        head_dim: d,
        scale: 4.0,
        ..two_heads(global)
    };
    for settings in [
        MmaSettings::default(),
        MmaSettings {
            product: Some(Product::Wgmma),
            ..MmaSettings::default()
        },
    ] {
        for kernel in [&rising, &spread] {
            let tiles = MmaTiles::for_head_dim(d as usize, 90)
                .unwrap()
                .with(&settings);
            let kernel = AttentionKernel {
                block_q: tiles.block_q as u64,
                block_k: tiles.block_k as u64,
                ..kernel.clone()
            };
            let error = emulated_error(&kernel, tiles, Half::Bf16, (1, 400));
            assert!(
                error <= 1.0,
                "{settings:?}, score {:?}, scale {}: error {error}",
                kernel.score.as_ref().map(ToString::to_string),
                kernel.scale
            );
        }
    }
}

/// The `wgmma` attention, with V read in place and transposed first, with one and two
/// warpgroups, at the head dims and key tiles it takes (16 to 256; 16 to 128 keys), in
/// bf16 and f16, at T = 1, inside one tile and past several, with GQA.
#[test]
fn wgmma_variants_in_the_emulator() {
    let graph = tiny_graph();
    let kernels = mma_attentions(&graph, GpuTarget { sm: 90 }).unwrap();
    // (head dim, keys and queries per tile, type, (batch, T))
    type Case = (u64, (Option<usize>, Option<usize>), Half, (usize, usize));
    let cases: [Case; 7] = [
        (16, (Some(16), None), Half::Bf16, (1, 1)),
        (64, (None, Some(64)), Half::F16, (1, 77)),
        (128, (Some(128), None), Half::Bf16, (1, 200)),
        (256, (None, None), Half::Bf16, (1, 100)),
        (32, (Some(64), None), Half::Bf16, (2, 300)),
        (32, (Some(32), Some(64)), Half::Bf16, (1, 150)),
        // The benchmark's head dim on 64 x 32 tiles (three blocks a multiprocessor).
        (128, (Some(32), Some(64)), Half::Bf16, (1, 130)),
    ];
    for ((d, (block_k, block_q), half, shape), product) in cases
        .into_iter()
        .flat_map(|c| [(c, Product::Wgmma), (c, Product::WgmmaTransposedV)])
    {
        for (kernel, _) in &kernels {
            let mut kernel = AttentionKernel {
                head_dim: d,
                scale: 1.0 / (d as f64).sqrt(),
                ..two_heads(kernel)
            };
            let tiles = MmaTiles::for_head_dim(d as usize, 90)
                .unwrap()
                .with(&MmaSettings {
                    block_k,
                    block_q,
                    product: Some(product),
                    ..MmaSettings::default()
                });
            assert_eq!(
                tiles.block_q,
                if d <= 128 { block_q.unwrap_or(128) } else { 64 }
            );
            kernel.block_q = tiles.block_q as u64;
            kernel.block_k = tiles.block_k as u64;
            let error = emulated_error(&kernel, tiles, half, shape);
            assert!(
                error <= 1.0,
                "`{}` head dim {d}, {tiles:?}, {}, {shape:?}: error {error}",
                kernel.name,
                half.name()
            );
        }
    }
}

/// Every setting a GPU tuning run tries by default on sm_90 (`zebra tune --target sm_90`:
/// `mma.sync` and `wgmma`, 64 or 128 queries by 32, 64 or 128 keys per tile), at the
/// benchmark's head dim of 128, for a causal and a windowed attention, at a length past
/// one tile that is not a multiple of any: each matches the reference, so that a tuning run
/// on a GPU spends its time on speed, not on kernels that were never right.
#[test]
fn every_gpu_tuning_candidate_matches_the_reference_in_the_emulator() {
    let graph = tiny_graph();
    let kernels = mma_attentions(&graph, GpuTarget { sm: 90 }).unwrap();
    let base = MmaTiles::for_head_dim(128, 90).unwrap();
    let mut tried = Vec::new();
    for product in [Product::Sync, Product::Wgmma] {
        for block_q in [64, 128] {
            for block_k in [32, 64, 128] {
                let settings = MmaSettings {
                    product: Some(product),
                    block_q: Some(block_q),
                    block_k: Some(block_k),
                    stages: None,
                };
                let tiles = base
                    .checked_with(&settings)
                    .unwrap_or_else(|e| panic!("{settings:?}: {e}"));
                tried.push(tiles);
                for (kernel, _) in &kernels {
                    let kernel = AttentionKernel {
                        head_dim: 128,
                        scale: 1.0 / 128f64.sqrt(),
                        block_q: tiles.block_q as u64,
                        block_k: tiles.block_k as u64,
                        ..two_heads(kernel)
                    };
                    let error = emulated_error(&kernel, tiles, Half::Bf16, (1, 200));
                    assert!(
                        error <= 1.0,
                        "`{}` {} {block_q}x{block_k}: error {error}",
                        kernel.name,
                        product.name()
                    );
                }
            }
        }
    }
    tried.dedup();
    assert_eq!(tried.len(), 12, "{tried:?}");
}

/// The emulator holds `wgmma` kernels to the rules of the asynchronous proxy: without the
/// `fence.proxy.async` after the copies into shared memory, the products' reads are
/// reported; without the last wait, the products left in flight are. (A copy landing on
/// an operand of a product in flight is reported too: the kernel's two V buffers came of
/// it.)
#[test]
fn the_emulator_finds_a_missing_wgmma_fence_or_wait() {
    use zebra_codegen::emulate::EmulatedAttention;
    use zebra_codegen::kernels::attention_mma::{AttentionIo, attention_mma};
    use zebra_codegen::kernels::warp::Lowering;

    let graph = tiny_graph();
    let (kernel, tiles) = mma_attentions(&graph, GpuTarget { sm: 90 })
        .unwrap()
        .remove(0);
    let tiles = tiles.with(&MmaSettings {
        product: Some(Product::Wgmma),
        ..MmaSettings::default()
    });
    let kernel = AttentionKernel {
        block_q: tiles.block_q as u64,
        ..two_heads(&kernel)
    };
    let function = attention_mma(
        "wg",
        &kernel,
        Half::Bf16,
        tiles,
        Lowering::Emulated,
        AttentionIo::Half,
    );
    let run = |text: &str| -> Result<(), String> {
        let emulated = EmulatedAttention::from_function(text, "wg", &kernel, tiles)
            .map_err(|e| e.to_string())?;
        let case = AttentionCase::new(&emulated.entry, "bf16", 1, 100, 7).unwrap();
        let mut out = vec![0u16; emulated.entry.heads * 100 * emulated.entry.head_dim];
        emulated
            .run(
                [&case.q, &case.k, &case.v],
                &mut out,
                &case.word_buffers(),
                case.dims(),
            )
            .map_err(|e| e.to_string())
    };
    run(&function).unwrap();
    let fence = "func.call @zebra_emu_fence_proxy_async() : () -> ()";
    // Before the first scores, in the loop, before the last product.
    assert_eq!(function.matches(fence).count(), 3);
    let error = run(&function.replace(fence, "")).unwrap_err();
    assert!(
        error.contains("wgmma") && error.contains("no fence.proxy.async"),
        "{error}"
    );
    let wait = "func.call @zebra_emu_wgmma_wait(";
    let last = function.rfind(wait).unwrap();
    let end = last + function[last..].find('\n').unwrap();
    let error = run(&format!("{}{}", &function[..last], &function[end..])).unwrap_err();
    assert!(error.contains("never waited for"), "{error}");
}

/// f32 values at a 16-byte aligned address (the kernels read activations and weights with
/// 16-byte loads, as device memory allows).
#[repr(C, align(16))]
#[derive(Clone, Copy, Default)]
struct Aligned([f32; 4]);

fn aligned(values: &[f32]) -> Vec<Aligned> {
    let mut out = vec![Aligned::default(); values.len().div_ceil(4) + 16];
    for (i, v) in values.iter().enumerate() {
        out[i / 4].0[i % 4] = *v;
    }
    out
}

fn read(buffer: &[Aligned], n: usize) -> Vec<f32> {
    buffer.iter().flat_map(|a| a.0).take(n).collect()
}

/// A `heads_proj` of `heads` heads with the epilogue given.
fn heads(
    heads: usize,
    bias: bool,
    qk_norm: Option<f64>,
    rope: bool,
) -> zebra_codegen::kernels::projection_mma::ProjectionKind {
    zebra_codegen::kernels::projection_mma::ProjectionKind::Heads {
        heads,
        epilogue: zebra_codegen::kernels::gemm::HeadsEpilogue {
            bias,
            qk_norm,
            rope,
        },
    }
}

/// The tensor-core projections (`linear` with RMSNorm and a residual, `swiglu`,
/// `heads_proj` with a bias, QK-norm and RoPE) in the emulator against an f64 reference computed from the same
/// 16-bit-rounded operands: only f32 accumulation separates them. Shapes cover a row count,
/// `K` and `N` that are not multiples of the tiles, `K` not a multiple of 8 or 4, and more
/// columns than one tile.
#[test]
fn tensor_core_projections_in_the_emulator() {
    use rand::{Rng, SeedableRng};
    use zebra_codegen::emulate::compile_projection;
    use zebra_codegen::kernels::gemm::HeadsEpilogue;
    use zebra_codegen::kernels::projection_mma::{PANEL, ProjectionKind, ProjectionMma};
    use zebra_runtime::attention_check::{bf16_bits, bf16_value, f16_bits, f16_value};
    use zebra_runtime::plan::PackSpec;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let cases = [
        (
            ProjectionKind::Linear { residual: true },
            72,
            40,
            Some(1e-5),
            Half::Bf16,
        ),
        (
            ProjectionKind::Linear { residual: false },
            30,
            150,
            None,
            Half::F16,
        ),
        (ProjectionKind::SwiGlu, 64, 176, Some(1e-5), Half::Bf16),
        (ProjectionKind::SwiGlu, 36, 48, None, Half::Bf16),
        (heads(3, false, None, true), 64, 16, Some(1e-5), Half::Bf16),
        (heads(2, false, None, true), 40, 32, None, Half::F16),
        (heads(2, false, None, false), 64, 48, Some(1e-6), Half::Bf16),
        // Qwen2's bias, and Qwen3's QK-norm (with and without a bias, RoPE and the norm).
        (heads(2, true, None, true), 64, 32, Some(1e-5), Half::Bf16),
        (
            heads(3, true, Some(1e-6), true),
            48,
            64,
            Some(1e-5),
            Half::Bf16,
        ),
        (heads(2, false, Some(1e-5), false), 40, 16, None, Half::F16),
    ];
    let (batch, seq) = (2usize, 75usize);
    let m = batch * seq;
    for (kind, k, n, norm_eps, half) in cases {
        let p = ProjectionMma {
            kind,
            k,
            n,
            norm_eps,
        };
        let what = format!("{p:?} {}", half.name());
        let round = |x: f32| -> f64 {
            f64::from(match half {
                Half::Bf16 => bf16_value(bf16_bits(x)),
                Half::F16 => f16_value(f16_bits(x)),
            })
        };
        let mut random = |len: usize| -> Vec<f32> {
            (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
        };
        let (heads, epilogue) = match kind {
            ProjectionKind::Heads { heads, epilogue } => (heads, epilogue),
            _ => (1, HeadsEpilogue::default()),
        };
        let rope = epilogue.rope;
        let total_n = heads * n;
        let x = random(m * k);
        let gain: Vec<f32> = random(k).iter().map(|g| 1.0 + 0.5 * g).collect();
        let weights: Vec<Vec<f32>> = (0..if kind == ProjectionKind::SwiGlu { 2 } else { 1 })
            .map(|_| random(total_n * k))
            .collect();
        let spec = PackSpec {
            weight: 0,
            norm: norm_eps.map(|_| 0),
            transposed: false,
            n: total_n,
            k,
            group: n,
            nr: PANEL,
            bf16: false,
        };
        let packed: Vec<Vec<f32>> = weights
            .iter()
            .map(|w| zebra_runtime::pack::pack(w, norm_eps.map(|_| gain.as_slice()), &spec))
            .collect();
        let residual = random(m * n);
        let bias = random(total_n);
        let qk_gain: Vec<f32> = random(n).iter().map(|g| 1.0 + 0.5 * g).collect();
        let (cos, sin) = (random(seq * n / 2), random(seq * n / 2));
        let out_len = m * total_n;

        let kernel =
            compile_projection("projection", &p, half).unwrap_or_else(|e| panic!("{what}: {e}"));
        let x_buf = aligned(&x);
        let packed_bufs: Vec<Vec<Aligned>> = packed.iter().map(|w| aligned(w)).collect();
        let res_buf = aligned(&residual);
        let (bias_buf, qk_buf) = (aligned(&bias), aligned(&qk_gain));
        let (cos_buf, sin_buf) = (aligned(&cos), aligned(&sin));
        let mut out_buf = aligned(&vec![f32::NAN; out_len]);
        let mut buffers: Vec<u64> = vec![x_buf.as_ptr() as u64];
        buffers.extend(packed_bufs.iter().map(|w| w.as_ptr() as u64));
        if kind == (ProjectionKind::Linear { residual: true }) {
            buffers.push(res_buf.as_ptr() as u64);
        }
        if epilogue.bias {
            buffers.push(bias_buf.as_ptr() as u64);
        }
        if epilogue.qk_norm.is_some() {
            buffers.push(qk_buf.as_ptr() as u64);
        }
        if rope {
            buffers.push(cos_buf.as_ptr() as u64);
            buffers.push(sin_buf.as_ptr() as u64);
        }
        buffers.push(out_buf.as_mut_ptr() as u64);
        let dims = [batch as i64, seq as i64, 0, 0];
        kernel
            .launch(
                (m.div_ceil(p.block_m()), p.column_blocks()),
                &buffers,
                &dims,
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let out = read(&out_buf, out_len);

        // The reference: packed column `col` of group `g` is at panel g * ceil(n / 8) + col / 8.
        let packed_at = |w: &[f32], col: usize, kk: usize| -> f64 {
            let (g, c) = (col / n, col % n);
            let panel = g * n.div_ceil(PANEL) + c / PANEL;
            round(w[(panel * k + kk) * PANEL + c % PANEL])
        };
        let mut worst = 0.0f64;
        for row in 0..m {
            let xs = &x[row * k..(row + 1) * k];
            let inverse = match norm_eps {
                Some(eps) => {
                    let ms: f64 = xs.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / k as f64;
                    1.0 / (ms + eps).sqrt()
                }
                None => 1.0,
            };
            let dot = |w: &[f32], col: usize| -> (f64, f64) {
                let (mut s, mut a) = (0.0, 0.0);
                for (kk, xv) in xs.iter().enumerate() {
                    let term = round(*xv) * packed_at(w, col, kk);
                    s += term;
                    a += term.abs();
                }
                (s * inverse, a * inverse)
            };
            let (bi, ti) = (row / seq, row % seq);
            for col in 0..total_n {
                let (want, scale, got) = match kind {
                    ProjectionKind::Linear { residual: with } => {
                        let (s, a) = dot(&packed[0], col);
                        let r = if with {
                            f64::from(residual[row * n + col])
                        } else {
                            0.0
                        };
                        (s + r, a + r.abs(), out[row * n + col])
                    }
                    ProjectionKind::SwiGlu => {
                        let (gs, ga) = dot(&packed[0], col);
                        let (us, ua) = dot(&packed[1], col);
                        let silu = gs / (1.0 + (-gs).exp());
                        (silu * us, ga * ua + ga + ua, out[row * n + col])
                    }
                    ProjectionKind::Heads { .. } => {
                        let (h, d) = (col / n, col % n);
                        let at = ((bi * heads + h) * seq + ti) * n + d;
                        // The head's values before RoPE, with their magnitudes.
                        let mut head: Vec<(f64, f64)> = (0..n)
                            .map(|dd| {
                                let (s, a) = dot(&packed[0], h * n + dd);
                                match epilogue.bias {
                                    true => {
                                        let b = f64::from(bias[h * n + dd]);
                                        (s + b, a + b.abs())
                                    }
                                    false => (s, a),
                                }
                            })
                            .collect();
                        if let Some(eps) = epilogue.qk_norm {
                            let ms = head.iter().map(|(v, _)| v * v).sum::<f64>() / n as f64;
                            let r = 1.0 / (ms + eps).sqrt();
                            for (dd, (v, a)) in head.iter_mut().enumerate() {
                                let g = f64::from(qk_gain[dd]);
                                *v *= r * g;
                                *a *= r * g.abs();
                            }
                        }
                        if rope {
                            let half_d = n / 2;
                            let j = d % half_d;
                            let (c, s) = (
                                f64::from(cos[ti * half_d + j]),
                                f64::from(sin[ti * half_d + j]),
                            );
                            let ((x1, a1), (x2, a2)) = (head[j], head[j + half_d]);
                            let want = if d < half_d {
                                x1 * c - x2 * s
                            } else {
                                x2 * c + x1 * s
                            };
                            (want, a1 + a2, out[at])
                        } else {
                            (head[d].0, head[d].1, out[at])
                        }
                    }
                };
                let error = (f64::from(got) - want).abs() / (1e-4 * scale + 1e-6);
                assert!(
                    error <= 1.0,
                    "{what}: row {row} column {col}: {got} against {want} (scale {scale})"
                );
                worst = worst.max(error);
            }
        }
        assert!(worst > 0.0, "{what}: suspiciously exact");
    }
}

/// A model's forward pass on the CPU with every kernel its GPU plan runs on tensor cores in
/// bf16 (projections, `pack_kv`'s stand-in, the attention) replaced by that kernel in the
/// emulator, launched as the CUDA runtime launches it: its logits are the f32 plan's within
/// bf16 rounding. This checks what the GPU plan relies on: which kernels may switch (every
/// reader of a 16-bit buffer is a tensor-core kernel), the buffer order, the weight packing,
/// the schedule's tiles and the launch grids. Returns the kinds of kernels substituted.
fn forward_on_tensor_cores_in_the_emulator(
    path: &std::path::Path,
    seq: usize,
) -> Vec<&'static str> {
    on_tensor_cores_in_the_emulator(path, seq, false)
}

/// A graph's plan for `mode` (retiled for the tensor-core attention, 4-lane vectors so that
/// the weights are packed as on the GPU) loaded twice for the CPU: as compiled, and with every
/// kernel the bf16 GPU plan runs on tensor cores replaced by that kernel in the emulator,
/// launched as the CUDA runtime launches it (the forward attentions' kernels with the settings
/// `choice` gives them). Also returns the kinds of kernels replaced.
fn models_on_tensor_cores(
    graph: &zebra_ir::Graph,
    mode: zebra_codegen::plan::PlanMode,
    dir: &std::path::Path,
    weights: &zebra_ir::Weights,
    choice: &MmaChoice,
) -> (
    zebra_runtime::CpuModel,
    zebra_runtime::CpuModel,
    Vec<&'static str>,
) {
    use zebra_codegen::kernels::tensor_core::{retile, select};
    let graph = retile(graph, 90, choice);
    models_with_gpu_kernels(&graph, mode, dir, weights, &|planned| {
        select(planned, 90, choice)
    })
}

/// As [`models_on_tensor_cores`], with the kernels `selected` picks (by kernel index) in the
/// emulator, for a graph as it is.
fn models_with_gpu_kernels(
    graph: &zebra_ir::Graph,
    mode: zebra_codegen::plan::PlanMode,
    dir: &std::path::Path,
    weights: &zebra_ir::Weights,
    selected: &dyn Fn(
        &zebra_codegen::plan::Planned,
    ) -> Vec<(usize, zebra_codegen::kernels::tensor_core::TensorCoreKernel)>,
) -> (
    zebra_runtime::CpuModel,
    zebra_runtime::CpuModel,
    Vec<&'static str>,
) {
    use zebra_codegen::artifact::{BuildOptions, build_with_vector};
    use zebra_codegen::emulate::EmulatedKernel;
    use zebra_codegen::kernels::attention_mma_grad::GradKernel;
    use zebra_codegen::kernels::tensor_core::TensorCoreKernel;
    use zebra_codegen::kernels::warp::Lowering;
    use zebra_runtime::CpuModel;

    let options = BuildOptions {
        mode,
        max_seq_len: 256,
        cache: None,
    };
    let vector = zebra_codegen::ptx::GPU_VECTOR;
    build_with_vector(graph, dir, &options, Some(vector)).unwrap();
    let planned = zebra_codegen::plan::plan(graph, "emulated", vector, 256, mode).unwrap();
    let cpu = CpuModel::load(dir, weights, 2).unwrap();
    let mut emulated = CpuModel::load(dir, weights, 2).unwrap();
    assert_eq!(planned.plan.kernels, cpu.plan().kernels);
    let mut kinds = Vec::new();
    for (i, kernel) in selected(&planned) {
        let name = format!("kernel{i}");
        let function = kernel.function(&name, Half::Bf16, Lowering::Emulated);
        let compiled =
            EmulatedKernel::compile(&function, &name, kernel.threads(), kernel.shared_bytes())
                .unwrap();
        let mut launches = vec![(compiled, kernel.grid())];
        // A second launch (the decode attention's combining), as the CUDA runtime makes it.
        if let Some(then) = kernel.then() {
            let then_name = format!("{name}{}", then.suffix);
            let compiled =
                EmulatedKernel::compile(&function, &then_name, then.threads, then.shared_bytes)
                    .unwrap();
            launches.push((compiled, then.grid));
        }
        emulated.substitute(
            i,
            Box::new(move |pointers, dims| {
                let buffers: Vec<u64> = pointers.iter().map(|p| *p as u64).collect();
                for (compiled, grid) in &launches {
                    let blocks = grid.blocks(dims[0] as usize, dims[1] as usize, dims[3] as usize);
                    compiled.launch(blocks, &buffers, &dims).unwrap();
                }
            }),
        );
        kinds.push(match kernel {
            TensorCoreKernel::Projection(_) => "projection",
            TensorCoreKernel::PackHalf { .. } => "pack",
            TensorCoreKernel::Attention { lse: false, .. } => "attention",
            TensorCoreKernel::Attention { lse: true, .. } => "attention_lse",
            TensorCoreKernel::AttentionGrad {
                which: GradKernel::Dq,
                ..
            } => "attention_dq",
            TensorCoreKernel::AttentionGrad { .. } => "attention_dkv",
            TensorCoreKernel::MatMul(_) => "matmul",
            TensorCoreKernel::Decode { .. } => "decode",
        });
    }
    (cpu, emulated, kinds)
}

/// As [`forward_on_tensor_cores_in_the_emulator`], for the forward pass or the training step
/// (whose outputs, the loss and every weight's gradient, are each compared).
fn on_tensor_cores_in_the_emulator(
    path: &std::path::Path,
    seq: usize,
    train: bool,
) -> Vec<&'static str> {
    let (_, checked) = check_ok(path);
    let spec = checked.program.models[0].clone();
    model_on_tensor_cores_in_the_emulator(&spec, &relative(path), seq, train, &MmaChoice::default())
}

/// As [`on_tensor_cores_in_the_emulator`], for a model (`label` names it in failures).
fn model_on_tensor_cores_in_the_emulator(
    spec: &zebra_frontend::ModelSpec,
    label: &str,
    seq: usize,
    train: bool,
    choice: &MmaChoice,
) -> Vec<&'static str> {
    let weights = zebra_frontend::init::random_weights(spec, 2);
    model_on_tensor_cores_with(spec, label, seq, train, choice, &weights)
}

/// As [`model_on_tensor_cores_in_the_emulator`], on the weights given.
fn model_on_tensor_cores_with(
    spec: &zebra_frontend::ModelSpec,
    label: &str,
    seq: usize,
    train: bool,
    choice: &MmaChoice,
    weights: &zebra_ir::Weights,
) -> Vec<&'static str> {
    use zebra_codegen::plan::PlanMode;

    let spec = spec.clone();
    let mut graph = optimize(&lower(&spec), &Options::default()).unwrap().graph;
    if train {
        let training = zebra_passes::autodiff::training_graph(&graph).unwrap();
        graph = optimize(&training, &Options::default()).unwrap().graph;
    }
    let out = tempfile::tempdir().unwrap();
    let (mut cpu, mut emulated, kinds) =
        models_on_tensor_cores(&graph, PlanMode::Forward, out.path(), weights, choice);
    // A second, shorter run in the memory the first left behind (runtimes reuse it without
    // clearing it): no kernel may read what it did not write in the same run.
    for seq in [seq, seq / 3 + 5] {
        let mut inputs = crate::codegen::tensors(&crate::common::random_inputs(&spec, 2, seq, 5));
        if train {
            let zebra_runtime::Tensor::I64(tokens) = &inputs["tokens"] else {
                unreachable!("token ids are integers")
            };
            let targets = tokens.mapv(|t| (t + 1) % spec.vocab as i64);
            inputs.insert("targets".into(), zebra_runtime::Tensor::I64(targets));
        }
        let a = emulated.run(&inputs).unwrap();
        let b = cpu.run(&inputs).unwrap();
        let mut differ = false;
        for (name, expected) in &b {
            let got = a[name].mapv(f64::from);
            let expected = expected.mapv(f64::from);
            let what = format!("{label} on tensor cores (bf16), T = {seq}: {name}");
            // A gradient through bf16 products is as close as the products are.
            crate::common::assert_close(&got, &expected, if train { 5e-2 } else { 2e-2 }, &what);
            differ |= got
                .iter()
                .zip(expected.iter())
                .any(|(x, y)| (x - y).abs() > 1e-6 * y.abs().max(1.0));
        }
        assert!(
            differ,
            "{label}, T = {seq}: the emulated kernels did not run"
        );
    }
    kinds
}

#[test]
fn zebra_tiny_on_tensor_cores_in_the_emulator() {
    let kinds =
        forward_on_tensor_cores_in_the_emulator(&root().join("examples/zebra_tiny.zb"), 150);
    for kind in ["projection", "pack", "attention"] {
        assert!(
            kinds.contains(&kind),
            "no {kind} on tensor cores: {kinds:?}"
        );
    }
    // Two attention kinds (global, local), one pack_kv.
    assert_eq!(kinds.iter().filter(|k| **k == "attention").count(), 2);
}

/// zebra_tiny's plans with their forward attentions on `wgmma` (`zebra compile --dtype bf16
/// --mma wgmma`): the forward pass (also with V transposed first, `--mma wgmma-vt`), and the
/// training step, whose forward attentions also write each row's log-sum-exp for the
/// backward (which stays on `mma.sync`).
#[test]
fn zebra_tiny_with_wgmma_attentions_in_the_emulator() {
    let (_, checked) = check_ok(&root().join("examples/zebra_tiny.zb"));
    let spec = &checked.program.models[0];
    let kinds = model_on_tensor_cores_in_the_emulator(
        spec,
        "zebra_tiny (wgmma)",
        150,
        false,
        &product(Product::Wgmma),
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "attention").count(),
        2,
        "{kinds:?}"
    );
    let kinds = model_on_tensor_cores_in_the_emulator(
        spec,
        "zebra_tiny (wgmma-vt)",
        100,
        false,
        &product(Product::WgmmaTransposedV),
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "attention").count(),
        2,
        "{kinds:?}"
    );
    let kinds = model_on_tensor_cores_in_the_emulator(
        spec,
        "zebra_tiny (wgmma)",
        70,
        true,
        &product(Product::Wgmma),
    );
    for kind in ["attention_lse", "attention_dq", "attention_dkv"] {
        assert!(
            kinds.contains(&kind),
            "no {kind} on tensor cores: {kinds:?}"
        );
    }
}

/// Settings with every attention's products on `product`, as `--mma` gives them.
fn product(product: Product) -> MmaChoice {
    MmaSettings {
        product: Some(product),
        ..MmaSettings::default()
    }
    .into()
}

/// zebra_tiny's plans with the settings a tuning database recorded for each attention (here
/// the global one on `wgmma` with 64-query tiles, the local one on `mma.sync` with 64 x 32
/// tiles, neither the defaults): each attention's schedule is built for its own tiles, and
/// the forward pass and the training step (whose backward keeps the head dim's tiles) give
/// the f32 plans' results.
#[test]
fn zebra_tiny_with_tuned_attention_settings_in_the_emulator() {
    let (_, checked) = check_ok(&root().join("examples/zebra_tiny.zb"));
    let spec = &checked.program.models[0];
    let graph = optimize(&lower(spec), &Options::default()).unwrap().graph;
    let mut choice = MmaChoice::default();
    let mut keys = Vec::new();
    for (name, kernel) in zebra_ir::print::kernel_table(&graph) {
        let (product, block_q, block_k) = match name.as_str() {
            "global" => (Product::Wgmma, 64, 64),
            _ => (Product::Sync, 64, 32),
        };
        let settings = MmaSettings {
            product: Some(product),
            block_q: Some(block_q),
            block_k: Some(block_k),
            stages: None,
        };
        choice
            .tuned
            .insert(zebra_passes::AttentionKey::of(&kernel), settings);
        keys.push((name, (block_q as u64, block_k as u64)));
    }
    assert_eq!(keys.len(), 2, "{keys:?}");
    let retiled = zebra_codegen::kernels::tensor_core::retile(&graph, 90, &choice);
    for (name, kernel) in zebra_ir::print::kernel_table(&retiled) {
        let (_, blocks) = keys.iter().find(|(n, _)| *n == name).unwrap();
        assert_eq!((kernel.block_q, kernel.block_k), *blocks, "@{name}");
    }
    let kinds =
        model_on_tensor_cores_in_the_emulator(spec, "zebra_tiny (tuned)", 150, false, &choice);
    assert_eq!(
        kinds.iter().filter(|k| **k == "attention").count(),
        2,
        "{kinds:?}"
    );
    let kinds =
        model_on_tensor_cores_in_the_emulator(spec, "zebra_tiny (tuned)", 70, true, &choice);
    for kind in ["attention_lse", "attention_dq", "attention_dkv"] {
        assert!(
            kinds.contains(&kind),
            "no {kind} on tensor cores: {kinds:?}"
        );
    }
}

/// zebra_tiny's training step with its projections and the backward's products of
/// activations on tensor cores: the loss and every gradient are the f32 step's within bf16
/// rounding.
#[test]
fn zebra_tiny_training_step_on_tensor_cores_in_the_emulator() {
    let kinds = on_tensor_cores_in_the_emulator(&root().join("examples/zebra_tiny.zb"), 70, true);
    for kind in [
        "matmul",
        "projection",
        "pack",
        "attention_lse",
        "attention_dq",
        "attention_dkv",
    ] {
        assert!(
            kinds.contains(&kind),
            "no {kind} on tensor cores: {kinds:?}"
        );
    }
}

/// The training step of attentions that the backward must get right beyond zebra_tiny's
/// windows, with its forward and backward attention on tensor cores: a score modifier's
/// derivative (soft-capping), a per-head bias (ALiBi, GQA: the `dK`/`dV` kernel walks every
/// head of its KV head's group), a side input with a schedule per batch row (document
/// masking) and a schedule per head (per-head windows: the `dK`/`dV` kernel reads each
/// head's columns), at a length past one query tile.
#[test]
fn attention_backward_on_tensor_cores_in_the_emulator() {
    for name in ["softcap", "alibi", "document", "per_head"] {
        let path = root().join(format!("examples/attention/{name}.zb"));
        let kinds = on_tensor_cores_in_the_emulator(&path, 150, true);
        for kind in ["attention_lse", "attention_dq", "attention_dkv"] {
            assert!(kinds.contains(&kind), "{name}: no {kind}: {kinds:?}");
        }
    }
}

/// Head dim 256 (Gemma 2's soft-capped local and global layers, shrunk but for the head
/// dim): the backward's dK/dV kernel splits the head dims between two warps per 16 keys.
#[test]
fn attention_backward_at_head_dim_256_on_tensor_cores_in_the_emulator() {
    let (_, checked) = check_ok(&root().join("examples/models/gemma2.zb"));
    let mut spec = checked.program.models[0].clone();
    spec.vocab = 48;
    spec.dim = 32;
    spec.n_heads = 2;
    spec.n_kv_heads = 1;
    spec.ffn_hidden = 32;
    spec.layers.truncate(2);
    assert_eq!(spec.head_dim, 256);
    let kinds = model_on_tensor_cores_in_the_emulator(
        &spec,
        "gemma2 (head dim 256)",
        90,
        true,
        &MmaChoice::default(),
    );
    for kind in ["attention_lse", "attention_dq", "attention_dkv"] {
        assert!(kinds.contains(&kind), "no {kind}: {kinds:?}");
    }
}

/// Qwen3's projections (QK-norm, biases on all four) on tensor cores, forward and training
/// step, with a head dim of 16 (so that `heads_proj` runs there too) and random biases and
/// QK-norm scales (zeros and ones, as `zebra init` draws them, would hide a bias or a scale
/// read from the wrong buffer).
#[test]
fn biases_and_qk_norm_on_tensor_cores_in_the_emulator() {
    use rand::{Rng, SeedableRng};
    let (_, checked) = check_ok(&root().join("tests/fixtures/golden/qwen3.zb"));
    let mut spec = checked.program.models[0].clone();
    spec.head_dim = 16;
    let mut weights = zebra_frontend::init::random_weights(&spec, 2);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let names: Vec<String> = weights
        .names()
        .filter(|n| n.ends_with(".bias") || n.contains("_norm."))
        .map(String::from)
        .collect();
    assert_eq!(names.len(), 12, "{names:?}");
    for name in names {
        let offset = if name.ends_with(".bias") { 0.0 } else { 1.0 };
        weights
            .get_mut(&name)
            .unwrap()
            .mapv_inplace(|_| offset + rng.random::<f32>() - 0.5);
    }
    // Values and outputs of the attention large enough for the logits to depend on where
    // each query looks (`zebra init`'s scale leaves them nearly independent of Q and K).
    for name in ["v_proj.weight", "o_proj.weight"] {
        for layer in 0..2 {
            let name = format!("model.layers.{layer}.self_attn.{name}");
            weights.get_mut(&name).unwrap().mapv_inplace(|w| 25.0 * w);
        }
    }
    let choice = MmaChoice::default();
    let kinds = model_on_tensor_cores_with(&spec, "qwen3", 90, false, &choice, &weights);
    // Per layer: Q, K and V (`heads_proj`), SwiGLU and the down projection; the LM head.
    let projections = kinds.iter().filter(|k| **k == "projection").count();
    assert!(projections >= 6, "{kinds:?}");
    model_on_tensor_cores_with(&spec, "qwen3 (training)", 40, true, &choice, &weights);
}

/// Document masking reads a side input: the tensor-core attention reads the document ids
/// and a schedule per batch row.
#[test]
fn document_masking_on_tensor_cores_in_the_emulator() {
    let kinds = forward_on_tensor_cores_in_the_emulator(
        &root().join("examples/attention/document.zb"),
        140,
    );
    assert!(kinds.contains(&"attention"), "{kinds:?}");
}

/// The tensor-core product of activations (the backward's `dx = dy w` and `dw = x^T dy`) in
/// the emulator against an f64 reference on the same 16-bit operands, for every combination
/// of transposed and shared operands, with sizes that are constants, `T`, or `B`, none of
/// them multiples of the tiles.
#[test]
fn tensor_core_matmul_in_the_emulator() {
    use rand::{Rng, SeedableRng};
    use zebra_codegen::emulate::EmulatedKernel;
    use zebra_codegen::kernels::attention_mma::THREADS;
    use zebra_codegen::kernels::matmul::MatMulShape;
    use zebra_codegen::kernels::tensor_core::TensorCoreKernel;
    use zebra_codegen::kernels::warp::Lowering;
    use zebra_ir::types::{Dim, Sym};
    use zebra_runtime::attention_check::{bf16_bits, bf16_value};

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let (batch, seq) = (2usize, 75usize);
    let t = Dim::Sym(Sym::Seq);
    let cases = [
        // dx = dy w: [B, T, K] by a shared [K, N].
        (t, Dim::Const(72), Dim::Const(40), false, false, true, false),
        // dw = x^T dy: reduces over T.
        (Dim::Const(48), t, Dim::Const(70), true, false, true, true),
        // Both transposed, both batched, N = T.
        (Dim::Const(33), Dim::Const(20), t, true, true, true, true),
        // A shared, B transposed.
        (t, Dim::Const(64), Dim::Const(136), false, true, false, true),
    ];
    for (m, k, n, a_t, b_t, a_batched, b_batched) in cases {
        let shape = MatMulShape {
            batch: vec![Dim::Sym(Sym::Batch)],
            m,
            k,
            n,
            a_t,
            b_t,
            a_batched,
            b_batched,
        };
        let what = shape.describe();
        let size = |d: Dim| match d {
            Dim::Const(c) => c as usize,
            _ => seq,
        };
        let (mm, kk, nn) = (size(m), size(k), size(n));
        let mut random = |len: usize| -> Vec<f32> {
            (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
        };
        let a = random(if a_batched { batch } else { 1 } * mm * kk);
        let b = random(if b_batched { batch } else { 1 } * kk * nn);
        let kernel = TensorCoreKernel::MatMul(shape.clone());
        let function = kernel.function("matmul", Half::Bf16, Lowering::Emulated);
        let compiled =
            EmulatedKernel::compile(&function, "matmul", THREADS, kernel.shared_bytes()).unwrap();
        let (a_buf, b_buf) = (aligned(&a), aligned(&b));
        let mut c_buf = aligned(&vec![f32::NAN; batch * mm * nn]);
        let buffers = [
            a_buf.as_ptr() as u64,
            b_buf.as_ptr() as u64,
            c_buf.as_mut_ptr() as u64,
        ];
        let dims = [batch as i64, seq as i64, 0, 0];
        compiled
            .launch(kernel.grid().blocks(batch, seq, 0), &buffers, &dims)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let c = read(&c_buf, batch * mm * nn);
        let round = |x: f32| f64::from(bf16_value(bf16_bits(x)));
        for bi in 0..batch {
            let (ab, bb) = (
                if a_batched { bi * mm * kk } else { 0 },
                if b_batched { bi * kk * nn } else { 0 },
            );
            for i in 0..mm {
                for j in 0..nn {
                    let (mut want, mut scale) = (0.0, 0.0);
                    for l in 0..kk {
                        let x = a[ab + if a_t { l * mm + i } else { i * kk + l }];
                        let y = b[bb + if b_t { j * kk + l } else { l * nn + j }];
                        let term = round(x) * round(y);
                        want += term;
                        scale += term.abs();
                    }
                    let got = f64::from(c[(bi * mm + i) * nn + j]);
                    assert!(
                        (got - want).abs() <= 1e-4 * scale + 1e-6,
                        "{what}: [{bi}, {i}, {j}]: {got} against {want}"
                    );
                }
            }
        }
    }
}

/// The emulator reports races on shared memory: the projection kernel with either of the
/// barriers around its copy of a slice into shared memory removed fails to run, naming the
/// race (a read of what another thread wrote, or a write over what another read, with no
/// barrier between); with both it runs.
#[test]
fn the_emulator_finds_a_missing_barrier() {
    use zebra_codegen::emulate::EmulatedKernel;
    use zebra_codegen::kernels::attention_mma::THREADS;
    use zebra_codegen::kernels::projection_mma::{ProjectionKind, ProjectionMma};
    use zebra_codegen::kernels::tensor_core::TensorCoreKernel;
    use zebra_codegen::kernels::warp::Lowering;

    let p = ProjectionMma {
        kind: ProjectionKind::Linear { residual: false },
        k: 96,
        n: 64,
        norm_eps: None,
    };
    let kernel = TensorCoreKernel::Projection(p);
    let function = kernel.function("proj", Half::Bf16, Lowering::Emulated);
    let barrier = "func.call @zebra_emu_barrier() : () -> ()";
    assert_eq!(function.matches(barrier).count(), 2, "{function}");
    let (m, k, n) = (200, p.k, p.n);
    let x = aligned(&vec![0.5; m * k]);
    let w = aligned(&vec![0.25; n * k]);
    let mut out = aligned(&vec![0.0; m * n]);
    let buffers = [
        x.as_ptr() as u64,
        w.as_ptr() as u64,
        out.as_mut_ptr() as u64,
    ];
    let dims = [1, m as i64, 0, 0];
    let run = |text: &str| {
        let compiled = EmulatedKernel::compile(text, "proj", THREADS, p.shared_bytes()).unwrap();
        compiled.launch(kernel.grid().blocks(1, m, 0), &buffers, &dims)
    };
    run(&function).unwrap();
    // Which side of a race a thread reaches first depends on the scheduler: either is named.
    for (which, says) in [(0, "shared memory"), (1, "shared memory")] {
        let at = function.match_indices(barrier).nth(which).unwrap().0;
        let broken = format!("{}{}", &function[..at], &function[at + barrier.len()..]);
        let error = run(&broken).unwrap_err().to_string();
        assert!(
            error.contains(says) && error.contains("no barrier between"),
            "barrier {which}: {error}"
        );
    }
}

/// zebra_tiny's generation plans in bf16 on tensor cores: the prefill (projections and the
/// attention) and then 40 decode steps (projections) against the KV caches, past several
/// wraps of the local layers' rings, give the f32 plans' logits at every step within bf16
/// rounding.
#[test]
fn zebra_tiny_decoding_on_tensor_cores_in_the_emulator() {
    use ndarray::s;
    use std::collections::BTreeMap;
    use zebra_codegen::plan::PlanMode;
    use zebra_runtime::Tensor;

    let (_, checked) = check_ok(&root().join("examples/zebra_tiny.zb"));
    let spec = checked.program.models[0].clone();
    let graph = optimize(&lower(&spec), &Options::default()).unwrap().graph;
    let weights = zebra_frontend::init::random_weights(&spec, 3);
    let out = tempfile::tempdir().unwrap();
    let (mut prefill, mut prefill_tc, kinds) = models_on_tensor_cores(
        &graph,
        PlanMode::Prefill,
        &out.path().join("p"),
        &weights,
        &MmaChoice::default(),
    );
    assert!(kinds.contains(&"attention"), "{kinds:?}");
    let (mut decode, mut decode_tc, kinds) = models_on_tensor_cores(
        &graph,
        PlanMode::Decode,
        &out.path().join("d"),
        &weights,
        &MmaChoice::default(),
    );
    assert!(kinds.contains(&"projection"), "{kinds:?}");
    assert!(kinds.contains(&"decode"), "{kinds:?}");
    let all = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[2, 110]), |i| {
        ((i[0] * 37 + i[1] * 11) % spec.vocab) as i64
    });
    let prompt = 70;
    let first = BTreeMap::from([(
        "tokens".to_string(),
        Tensor::I64(all.slice(s![.., ..prompt]).to_owned().into_dyn()),
    )]);
    decode.start_decode(&prefill.run(&first).unwrap()).unwrap();
    decode_tc
        .start_decode(&prefill_tc.run(&first).unwrap())
        .unwrap();
    for t in prompt..110 {
        let next = all.slice(s![.., t..t + 1]).to_owned().into_dyn();
        let want = decode.decode(&next).unwrap()["logits"].mapv(f64::from);
        let got = decode_tc.decode(&next).unwrap()["logits"].mapv(f64::from);
        crate::common::assert_close(&got, &want, 2e-2, &format!("decode step {t}"));
    }
}

/// The decode step's GPU attention (blocks per batch row and KV head, each taking a share of
/// the cache, then a launch combining them; `select_decode`: in every GPU plan, f32
/// included) in the emulator with 32 threads a block, so chunks of 128 cache slots: after a
/// prompt, decode steps past several chunks of a global layer's cache and several wraps of
/// the rings give the portable kernel's logits at every step, for the Zebra layout, sinks
/// with a ring, chunked, ALiBi, soft-capping and KV heads with caches of their own (KV heads
/// 0 and 2 in one, 1 in another); with one split (several chunks a block) and with up to
/// three (two launched for this cache, one chunk each).
#[test]
fn decoding_on_the_gpu_decode_kernel_in_the_emulator() {
    for file in [
        "examples/zebra_tiny.zb",
        "examples/attention/sinks.zb",
        "examples/attention/chunked.zb",
        "examples/attention/alibi.zb",
        "examples/attention/softcap.zb",
        "tests/fixtures/ok/kv_heads_apart.zb",
    ] {
        let (source, _) = check_ok(&root().join(file));
        // Both ways for the Zebra layout; the others across blocks.
        let splits: &[usize] = if file.contains("zebra") {
            &[1, 3]
        } else {
            &[3]
        };
        for &splits in splits {
            let what = format!("{file}, {splits} splits");
            decode_kernel_matches_the_portable_one(&what, &source, 250, splits);
        }
    }
}

/// As [`decoding_on_the_gpu_decode_kernel_in_the_emulator`], for the shapes that take the
/// kernel's other paths: four head dims a thread and several output units each (8 query
/// heads of 128 on one KV head), two head dims a thread with units left over (head dim 48),
/// one head dim a thread with most threads idle (head dim 20, no GQA).
#[test]
fn the_gpu_decode_kernel_takes_every_group_and_head_dim() {
    for (heads, kv_heads, head_dim) in [(8, 1, 128), (4, 2, 48), (3, 3, 20)] {
        let source = format!(
            "attention global causal {{
    mask = k <= q
}}

attention local(window: int = 40) causal {{
    mask = k <= q && q - k < window
}}

model shapes {{
    vocab      = 256
    dim        = {dim}
    heads      = {heads}
    kv_heads   = {kv_heads}
    ffn        = swiglu(hidden = 64)
    norm       = rmsnorm(eps = 1e-5)
    rope       = rope(base = 10000.0)
    embeddings = tied
    layers     = [global, local]
}}
",
            dim = heads * head_dim
        );
        let what = format!("{heads} heads of {head_dim} over {kv_heads} KV heads");
        decode_kernel_matches_the_portable_one(&what, &source, 170, 2);
    }
}

/// Prefills a prompt of the model in `source`, then decodes up to `end` tokens with the
/// portable decode attention and with the GPU one (32 threads a block, at most `splits`
/// blocks a cache) in the emulator; their logits agree at every step.
fn decode_kernel_matches_the_portable_one(what: &str, source: &str, end: usize, splits: usize) {
    use ndarray::s;
    use std::collections::BTreeMap;
    use zebra_codegen::kernels::tensor_core::{TensorCoreKernel, select_decode};
    use zebra_codegen::plan::PlanMode;
    use zebra_runtime::{CpuModel, Tensor};

    let thirty_two = |planned: &zebra_codegen::plan::Planned| {
        select_decode(planned)
            .into_iter()
            .map(|(i, kernel)| match kernel {
                TensorCoreKernel::Decode {
                    kernel,
                    cache,
                    slots,
                    ..
                } => (
                    i,
                    TensorCoreKernel::Decode {
                        kernel,
                        cache,
                        slots,
                        threads: 32,
                        splits,
                    },
                ),
                other => panic!("select_decode picked {other:?}"),
            })
            .collect()
    };
    let checked = zebra_frontend::check_source(source);
    assert!(!checked.has_errors(), "{what}: {:?}", checked.diagnostics);
    let spec = checked.program.models[0].clone();
    let graph = optimize(&lower(&spec), &Options::default()).unwrap().graph;
    let weights = zebra_frontend::init::random_weights(&spec, 5);
    let out = tempfile::tempdir().unwrap();
    let prefill_dir = out.path().join("p");
    zebra_codegen::artifact::build_with_vector(
        &graph,
        &prefill_dir,
        &zebra_codegen::artifact::BuildOptions {
            mode: PlanMode::Prefill,
            max_seq_len: 256,
            cache: None,
        },
        Some(zebra_codegen::ptx::GPU_VECTOR),
    )
    .unwrap();
    let mut prefill = CpuModel::load(&prefill_dir, &weights, 2).unwrap();
    let (mut decode, mut decode_gpu, kinds) = models_with_gpu_kernels(
        &graph,
        PlanMode::Decode,
        &out.path().join("d"),
        &weights,
        &thirty_two,
    );
    assert!(
        !kinds.is_empty() && kinds.iter().all(|k| *k == "decode"),
        "{what}: {kinds:?}"
    );
    let (batch, prompt) = (2, 30);
    let all = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[batch, end]), |i| {
        ((i[0] * 37 + i[1] * 11) % spec.vocab) as i64
    });
    let first = BTreeMap::from([(
        "tokens".to_string(),
        Tensor::I64(all.slice(s![.., ..prompt]).to_owned().into_dyn()),
    )]);
    let cached = prefill.run(&first).unwrap();
    decode.start_decode(&cached).unwrap();
    decode_gpu.start_decode(&cached).unwrap();
    for t in prompt..end {
        let next = all.slice(s![.., t..t + 1]).to_owned().into_dyn();
        let want = decode.decode(&next).unwrap()["logits"].mapv(f64::from);
        let got = decode_gpu.decode(&next).unwrap()["logits"].mapv(f64::from);
        crate::common::assert_close(&got, &want, 1e-5, &format!("{what}: decode step {t}"));
    }
}
