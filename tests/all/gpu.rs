//! The GPU lowering without a GPU: every program's kernels compile to PTX for sm_80 and
//! sm_90, with an entry per kernel taking what the plan launches it with; GPU artifacts
//! round-trip and broken ones are refused; without a driver the CUDA runtime says so. With
//! `ZEBRA_GPU_TESTS=1` and a GPU, zebra_tiny runs and trains on it and matches the CPU.

use std::collections::BTreeMap;

use zebra_codegen::artifact::{BuildOptions, build_gpu};
use zebra_codegen::kernels::attention_mma::{Half, TensorCores};
use zebra_codegen::plan::PlanMode;
use zebra_codegen::ptx::{GpuTarget, entries_of, entry};
use zebra_passes::{Options, optimize};
use zebra_runtime::cuda::{CudaModel, driver_present};
use zebra_runtime::{CpuModel, Tensor};

use crate::common::{check_ok, lower, programs, relative, root, shrink, tiny_graph};

/// The most local memory a thread may have on sm_80 and sm_90.
const MAX_LOCAL_BYTES: usize = 512 * 1024;

#[test]
fn every_program_compiles_to_ptx_for_sm80_and_sm90() {
    let out = tempfile::tempdir().unwrap();
    for path in programs() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let graph = optimize(&lower(&shrink(spec)), &Options::default())
                .unwrap()
                .graph;
            for sm in ["sm_80", "sm_90"] {
                let target = GpuTarget::from_name(sm).unwrap();
                let dir = out.path().join(format!("{}-{sm}", spec.name));
                let options = BuildOptions {
                    mode: PlanMode::Forward,
                    max_seq_len: 1024,
                    cache: None,
                };
                let what = format!("{} ({}) for {sm}", relative(&path), spec.name);
                // sm_80 in f32; sm_90 with the projections on tensor cores in bf16.
                let half = (sm == "sm_90").then_some(Half::Bf16);
                build_gpu(&graph, &dir, &options, target, half.map(Into::into))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
                assert!(ptx.contains(&format!(".target {sm}")), "{what}");
                assert!(
                    !ptx.contains(".extern .func"),
                    "{what}: calls outside the module"
                );
                let plan = zebra_runtime::Artifact::load(&dir).unwrap().plan;
                let entries = entries_of(&ptx);
                for kernel in &plan.kernels {
                    let name = entry(&kernel.symbol);
                    let found = entries
                        .iter()
                        .find(|e| e.name == name)
                        .unwrap_or_else(|| panic!("{what}: no entry {name}"));
                    // (buffers, dims, programs), as the runtime launches every entry.
                    assert_eq!(found.params.len(), 3, "{what}: {name}: {:?}", found.params);
                    assert!(found.params.iter().all(|p| p.starts_with(".u64")), "{what}");
                    assert!(
                        found.local_bytes <= MAX_LOCAL_BYTES,
                        "{what}: {name} needs {} bytes of local memory",
                        found.local_bytes
                    );
                    let Some(launch) = &kernel.tensor_cores else {
                        continue;
                    };
                    let found = entries
                        .iter()
                        .find(|e| e.name == launch.entry)
                        .unwrap_or_else(|| panic!("{what}: no entry {}", launch.entry));
                    // (buffers, dims), on the blocks the plan says.
                    assert_eq!(found.params.len(), 2, "{what}: {:?}", found.params);
                    assert_eq!(found.local_bytes, 0, "{what}: {} spilled", launch.entry);
                    assert!(
                        launch.shared_bytes
                            <= zebra_codegen::kernels::attention_mma::MmaTiles::shared_limit(90),
                        "{what}: {launch:?}"
                    );
                    assert_eq!((launch.threads, launch.dtype.as_str()), (128, "bf16"));
                }
                let tensor_cores = plan
                    .kernels
                    .iter()
                    .filter(|k| k.tensor_cores.is_some())
                    .count();
                // Every model has projections; in f32 none is on tensor cores.
                if half.is_some() && !plan.kernels.is_empty() {
                    assert!(tensor_cores > 0, "{what}: no tensor-core projection");
                    assert!(
                        ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16"),
                        "{what}"
                    );
                } else {
                    assert_eq!(tensor_cores, 0, "{what}");
                }
                assert_eq!(entries.len(), plan.kernels.len() + tensor_cores, "{what}");
            }
        }
    }
}

/// The training step and the generation plans of zebra_tiny compile for the GPU too (their
/// kernels use more math: sin and cos in RoPE's gradient, logarithms in the loss).
#[test]
fn training_and_generation_plans_compile_to_ptx() {
    let out = tempfile::tempdir().unwrap();
    let graph = tiny_graph();
    let train = zebra_passes::autodiff::training_graph(&graph).unwrap();
    let train = optimize(&train, &Options::default()).unwrap().graph;
    for (name, graph, mode) in [
        ("train", &train, PlanMode::Forward),
        ("prefill", &graph, PlanMode::Prefill),
        ("decode", &graph, PlanMode::Decode),
    ] {
        let dir = out.path().join(name);
        let options = BuildOptions {
            mode,
            max_seq_len: 256,
            cache: None,
        };
        build_gpu(
            graph,
            &dir,
            &options,
            GpuTarget::from_name("sm_90").unwrap(),
            Some(Half::Bf16.into()),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
        assert!(
            !ptx.contains(".extern .func"),
            "{name}: calls outside the module"
        );
        assert!(ptx.contains("sin.approx") || name != "train", "{name}");
        // The training step's optimizer runs on the GPU: an entry for each of its kernels.
        let plan = zebra_runtime::Artifact::load(&dir).unwrap().plan;
        let Some(optimizer) = &plan.optimizer else {
            assert_ne!(name, "train", "the training plan has no optimizer");
            continue;
        };
        let entries = entries_of(&ptx);
        for step in optimizer.norm.iter().chain(&optimizer.update) {
            let zebra_runtime::plan::Step::Kernel { kernel, .. } = step else {
                panic!("an optimizer step that is not a kernel");
            };
            let symbol = &plan.kernels[*kernel].symbol;
            let found = entries
                .iter()
                .find(|e| e.name == entry(symbol))
                .unwrap_or_else(|| panic!("no entry for {symbol}"));
            assert_eq!(found.params.len(), 3, "{symbol}: {:?}", found.params);
        }
        assert!(optimizer.update.len() > optimizer.norm.len(), "no packing");
    }
}

fn tiny_gpu_artifact(dir: &std::path::Path) -> (zebra_ir::Weights, zebra_frontend::ModelSpec) {
    let (_, checked) = check_ok(&root().join("examples/zebra_tiny.zb"));
    let spec = checked.program.models[0].clone();
    let graph = optimize(&lower(&spec), &Options::default()).unwrap().graph;
    let options = BuildOptions {
        mode: PlanMode::Forward,
        max_seq_len: 256,
        cache: None,
    };
    build_gpu(
        &graph,
        dir,
        &options,
        GpuTarget::from_name("sm_90").unwrap(),
        None,
    )
    .unwrap();
    (zebra_frontend::init::random_weights(&spec, 2), spec)
}

#[test]
fn gpu_artifacts_round_trip_and_broken_ones_are_refused() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("gpu");
    let (weights, _) = tiny_gpu_artifact(&dir);
    let plan = zebra_runtime::Artifact::load(&dir).unwrap().plan;
    assert_eq!(plan.library, "kernels.ptx");
    assert!(plan.target.contains("sm_90"), "{}", plan.target);

    // The CPU executor refuses a GPU artifact, and says what to do.
    let error = CpuModel::load(&dir, &weights, 1).err().unwrap().to_string();
    assert!(error.contains("--device cuda"), "{error}");

    // PTX that is not the plan's is refused before the driver is asked.
    let ptx = dir.join("kernels.ptx");
    let text = std::fs::read_to_string(&ptx).unwrap();
    std::fs::write(&ptx, &text[..text.len() / 2]).unwrap();
    let error = CudaModel::load(&dir, &weights).err().unwrap().to_string();
    assert!(
        error.contains("not the PTX this plan was built with"),
        "{error}"
    );
    std::fs::remove_file(&ptx).unwrap();
    let error = CudaModel::load(&dir, &weights).err().unwrap().to_string();
    assert!(error.contains("kernels.ptx"), "{error}");
    std::fs::write(&ptx, &text).unwrap();

    if driver_present() {
        eprintln!("a CUDA driver is present: the no-driver message is not checked here");
    } else {
        let error = CudaModel::load(&dir, &weights).err().unwrap().to_string();
        assert!(error.contains("no NVIDIA driver was found"), "{error}");
    }
}

/// Whether the opt-in GPU tests run: asked for (`ZEBRA_GPU_TESTS=1`) on a machine with a
/// CUDA driver; else says why they skip.
fn gpu_tests_enabled() -> bool {
    if std::env::var_os("ZEBRA_GPU_TESTS").is_none() {
        eprintln!("skipped: set ZEBRA_GPU_TESTS=1 to run the GPU tests");
        return false;
    }
    if !driver_present() {
        eprintln!("skipped: no CUDA driver on this machine");
        return false;
    }
    true
}

/// Opt-in (ZEBRA_GPU_TESTS=1): zebra_tiny on the GPU gives the CPU's logits.
#[test]
fn zebra_tiny_on_the_gpu_matches_the_cpu() {
    if !gpu_tests_enabled() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let gpu_dir = out.path().join("gpu");
    let (weights, spec) = tiny_gpu_artifact(&gpu_dir);
    let cpu_dir = out.path().join("cpu");
    let graph = optimize(&lower(&spec), &Options::default()).unwrap().graph;
    zebra_codegen::artifact::build(
        &graph,
        &cpu_dir,
        &BuildOptions {
            mode: PlanMode::Forward,
            max_seq_len: 256,
            cache: None,
        },
    )
    .unwrap();
    let mut gpu = CudaModel::load(&gpu_dir, &weights).unwrap();
    let mut cpu = CpuModel::load(&cpu_dir, &weights, 2).unwrap();
    // Device memory is kept from run to run and grown when a run needs more: shapes that
    // grow, shrink and come back.
    for (batch, seq) in [(2, 150), (1, 17), (2, 256), (1, 1), (2, 150)] {
        let tokens = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[batch, seq]), |i| {
            ((i[0] * 31 + i[1] * 7 + seq) % 256) as i64
        });
        let inputs = BTreeMap::from([("tokens".to_string(), Tensor::I64(tokens))]);
        let a = gpu.run(&inputs).unwrap()["logits"].mapv(f64::from);
        let b = cpu.run(&inputs).unwrap()["logits"].mapv(f64::from);
        let what = format!("zebra_tiny on the GPU, B = {batch}, T = {seq}");
        crate::common::assert_close(&a, &b, 1e-4, &what);
    }
}

/// Opt-in (ZEBRA_GPU_TESTS=1): training steps of zebra_tiny on the GPU, the optimizer's
/// kernels included, follow the CPU's: the same losses and gradient norms, and the same
/// weights at the end within f32 rounding.
#[test]
fn zebra_tiny_training_on_the_gpu_follows_the_cpu() {
    use zebra_runtime::optim::{AdamW, AdamWConfig};
    use zebra_runtime::train::Trainer;
    if !gpu_tests_enabled() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let (_, checked) = check_ok(&root().join("examples/zebra_tiny.zb"));
    let spec = checked.program.models[0].clone();
    let graph = optimize(&lower(&spec), &Options::default()).unwrap().graph;
    let train = zebra_passes::autodiff::training_graph(&graph).unwrap();
    let train = optimize(&train, &Options::default()).unwrap().graph;
    let options = BuildOptions {
        mode: PlanMode::Forward,
        max_seq_len: 64,
        cache: None,
    };
    let (gpu_dir, cpu_dir) = (out.path().join("gpu"), out.path().join("cpu"));
    let sm90 = GpuTarget::from_name("sm_90").unwrap();
    build_gpu(&train, &gpu_dir, &options, sm90, None).unwrap();
    zebra_codegen::artifact::build(&train, &cpu_dir, &options).unwrap();
    let weights = zebra_frontend::init::random_weights(&spec, 4);
    let config = AdamWConfig {
        lr: 3e-3,
        warmup_steps: 1,
        total_steps: 4,
        ..AdamWConfig::default()
    };
    let gpu = Box::new(CudaModel::load(&gpu_dir, &weights).unwrap());
    let mut on_gpu = Trainer::with_executor(gpu, AdamW::default(), config.clone()).unwrap();
    let mut on_cpu = Trainer::new(&cpu_dir, &weights, AdamW::default(), config, 2).unwrap();
    for step in 0..4 {
        let (b, t) = (2, 64);
        let mut batch = zebra_runtime::data::Batch::with_capacity(b, t).unwrap();
        batch.tokens = (0..b * t).map(|i| ((i * 37 + step) % 256) as i64).collect();
        batch.targets = (0..b * t).map(|i| ((i * 11 + step) % 256) as i64).collect();
        batch.documents = vec![0; b * t];
        let (g, c) = (on_gpu.step(&batch).unwrap(), on_cpu.step(&batch).unwrap());
        assert!(
            (g.loss - c.loss).abs() <= 1e-4 * c.loss.abs(),
            "step {step}: {g:?} {c:?}"
        );
        let norms = (g.grad_norm - c.grad_norm).abs();
        assert!(norms <= 1e-3 * c.grad_norm, "step {step}: {g:?} {c:?}");
    }
    let (g, c) = (on_gpu.weights().unwrap(), on_cpu.weights().unwrap());
    for (name, expected) in c.iter() {
        let got = g.get(name).unwrap();
        let worst = got
            .iter()
            .zip(expected.iter())
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 3e-5, "`{name}`: max |gpu - cpu| = {worst:e}");
    }
}

/// Every attention of every example compiles to tensor-core kernels for sm_80 and sm_90:
/// one entry per distinct attention taking (buffers, dims), built on `mma.sync`, `ldmatrix`
/// and `cp.async`, within the target's shared memory, with no local memory of LLVM's own,
/// and with the registers the kernel keeps live through its key loop under 255 (the
/// driver's count on an H100 is in the README: 255 for head dim 128, with 24 bytes spilled).
#[test]
fn every_attention_compiles_to_tensor_core_ptx() {
    use zebra_codegen::kernels::attention_mma::{Half, MmaSettings, MmaTiles};
    use zebra_runtime::artifact::AttentionArtifact;
    let out = tempfile::tempdir().unwrap();
    for path in crate::common::examples() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let graph = optimize(&lower(spec), &Options::default()).unwrap().graph;
            for (sm, half) in [(80, Half::Bf16), (90, Half::Bf16), (90, Half::F16)] {
                let target = GpuTarget { sm };
                let what = format!(
                    "{} ({}) for sm_{sm}, {}",
                    relative(&path),
                    spec.name,
                    half.name()
                );
                let dir = out
                    .path()
                    .join(format!("{}-{sm}-{}", spec.name, half.name()));
                zebra_codegen::artifact::build_gpu_attention(
                    &graph,
                    &dir,
                    target,
                    half,
                    MmaSettings::default(),
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                let (artifact, ptx) = AttentionArtifact::load(&dir).unwrap();
                assert!(ptx.contains(&format!(".target sm_{sm}")), "{what}");
                assert_eq!(artifact.dtype, half.name());
                let entries = entries_of(&ptx);
                assert_eq!(entries.len(), artifact.kernels.len(), "{what}");
                let mma = format!(
                    "mma.sync.aligned.m16n8k16.row.col.f32.{0}.{0}.f32",
                    half.name()
                );
                for kernel in &artifact.kernels {
                    let found = entries
                        .iter()
                        .find(|e| e.name == kernel.entry)
                        .unwrap_or_else(|| panic!("{what}: no entry {}", kernel.entry));
                    assert_eq!(found.params.len(), 2, "{what}: {:?}", found.params);
                    assert!(found.params.iter().all(|p| p.starts_with(".u64")), "{what}");
                    assert_eq!(found.local_bytes, 0, "{what}: LLVM spilled");
                    let tiles = MmaTiles::for_head_dim(kernel.head_dim, sm).unwrap();
                    assert_eq!(kernel.shared_bytes, tiles.shared_bytes(), "{what}");
                    assert!(kernel.shared_bytes <= MmaTiles::shared_limit(sm), "{what}");
                    assert!(tiles.live_registers() < 255, "{what}: {tiles:?}");
                    assert_eq!(kernel.threads, 128, "{what}");
                }
                for needed in [
                    mma.as_str(),
                    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                    "cp.async.cg.shared.global",
                    ".maxntid 128",
                ] {
                    assert!(ptx.contains(needed), "{what}: no {needed}");
                }
            }
        }
    }
}

/// The PTX of Zebra's two tensor-core attention kernels, the global (causal) and the local
/// (sliding window of 32) of zebra_tiny, for sm_90 in bf16: one snapshot each.
#[test]
fn ptx_of_the_zebra_attention_kernels() {
    use zebra_codegen::kernels::attention_mma::{Half, MmaSettings};
    let graph = tiny_graph();
    let ptx = zebra_codegen::artifact::emit_gpu_attention(
        &graph,
        GpuTarget { sm: 90 },
        Half::Bf16,
        MmaSettings::default(),
        Some(zebra_codegen::ptx::GpuOutput::Ptx),
    )
    .unwrap();
    for kind in ["global", "local"] {
        let start = ptx
            .find(&format!(".visible .entry zebra_attention_mma_{kind}_"))
            .unwrap_or_else(|| panic!("no {kind} entry"));
        let length = ptx[start..].find("\n}\n").expect("the entry ends") + 3;
        insta::assert_snapshot!(format!("ptx_zebra_{kind}"), &ptx[start..start + length]);
    }
}

/// In the `wgmma` kernels' loop the softmax of a tile runs while the previous tile's `O +=
/// P V` is on the tensor cores: the wait for the product comes after the softmax's
/// exponentials and before they are packed into P's registers (the product's A operand),
/// and sits behind a branch that keeps ptxas from moving it to the top of the softmax.
#[test]
fn wgmma_softmax_runs_beside_the_product() {
    use zebra_codegen::kernels::attention_mma::{Half, MmaSettings, Product};
    let ptx = zebra_codegen::artifact::emit_gpu_attention(
        &tiny_graph(),
        GpuTarget { sm: 90 },
        Half::Bf16,
        MmaSettings {
            product: Some(Product::Wgmma),
            ..MmaSettings::default()
        },
        Some(zebra_codegen::ptx::GpuOutput::Ptx),
    )
    .unwrap();
    let entries: Vec<&str> = ptx.split(".visible .entry ").skip(1).collect();
    assert_eq!(entries.len(), 2, "zebra_tiny's global and local attention");
    for entry in entries {
        let name = entry.split('(').next().unwrap_or_default();
        let pinned = entry
            .find("@p bra.uni")
            .unwrap_or_else(|| panic!("{name}: no pinned wait"));
        let wait = entry[pinned..]
            .find("wgmma.wait_group.sync.aligned 0;")
            .map(|at| pinned + at)
            .unwrap_or_else(|| panic!("{name}: the pinned block does not wait"));
        // The wait's basic block, from the label before it (the loop's blocks may be laid
        // out in any order).
        let block = entry[..pinned].rfind("\n$L").unwrap_or(0);
        let softmax = &entry[block..pinned];
        assert!(
            softmax.matches("ex2.approx").count() >= 16,
            "{name}: the exponentials are not before the wait"
        );
        assert!(
            !softmax.contains("cvt.rn.bf16x2"),
            "{name}: P is packed before the product is done"
        );
        let after = &entry[wait..];
        let next_block = after.find("\n$L").unwrap_or(after.len());
        assert!(
            after[..next_block].contains("cvt.rn.bf16x2"),
            "{name}: P is not packed after the wait"
        );
    }
}

/// Tensor-core attention artifacts round-trip through their on-disk form; a missing, corrupt,
/// mismatched or other-format artifact is refused with a message that says which; and head
/// dims the kernel cannot take are refused when compiling, naming the attention.
#[test]
fn attention_artifacts_round_trip_and_broken_ones_are_refused() {
    use zebra_codegen::kernels::attention_mma::{Half, MmaSettings};
    use zebra_runtime::artifact::AttentionArtifact;
    let out = tempfile::tempdir().unwrap();
    let graph = tiny_graph();
    let dir = out.path().join("attention");
    let n = zebra_codegen::artifact::build_gpu_attention(
        &graph,
        &dir,
        GpuTarget { sm: 90 },
        Half::F16,
        MmaSettings {
            stages: Some(2),
            block_k: Some(32),
            ..MmaSettings::default()
        },
    )
    .unwrap();
    assert_eq!(n, 2, "zebra_tiny has a global and a local attention");
    let (artifact, _) = AttentionArtifact::load(&dir).unwrap();
    let names: Vec<&str> = artifact.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["global", "local"]);
    assert!(
        artifact
            .kernels
            .iter()
            .all(|k| k.block_k == 32 && k.heads == 4 && k.kv_heads == 2)
    );
    assert_eq!(artifact.kernels[1].mask, "k <= q && q - k < 32");
    let message = |dir: &std::path::Path| AttentionArtifact::load(dir).unwrap_err().to_string();

    // A model artifact, or none at all, is not an attention artifact.
    assert!(
        message(out.path()).contains("no attention.json"),
        "{}",
        message(out.path())
    );
    // The PTX edited after the fact.
    let ptx_path = dir.join("kernels.ptx");
    let ptx = std::fs::read_to_string(&ptx_path).unwrap();
    std::fs::write(&ptx_path, ptx.replace("mma.sync", "mma.sync ")).unwrap();
    assert!(
        message(&dir).contains("its hash differs"),
        "{}",
        message(&dir)
    );
    std::fs::remove_file(&ptx_path).unwrap();
    assert!(
        message(&dir).contains("cannot be read"),
        "{}",
        message(&dir)
    );
    std::fs::write(&ptx_path, &ptx).unwrap();
    // attention.json broken, or from another format version.
    let json_path = dir.join("attention.json");
    let json = std::fs::read_to_string(&json_path).unwrap();
    std::fs::write(&json_path, &json[..json.len() / 2]).unwrap();
    assert!(message(&dir).contains("is corrupt"), "{}", message(&dir));
    std::fs::write(&json_path, json.replace("\"format\": 1", "\"format\": 99")).unwrap();
    assert!(message(&dir).contains("format 99"), "{}", message(&dir));
    std::fs::write(&json_path, json.replace("\"heads\": 4", "\"heads\": 3")).unwrap();
    assert!(
        message(&dir).contains("impossible shapes"),
        "{}",
        message(&dir)
    );
    std::fs::write(&json_path, &json).unwrap();
    assert!(AttentionArtifact::load(&dir).is_ok());

    // Head dim 8 (64 / 8 heads): not a multiple of 16.
    let source = std::fs::read_to_string(root().join("examples/zebra_tiny.zb"))
        .unwrap()
        .replace("heads      = 4", "heads      = 8")
        .replace("kv_heads   = 2", "kv_heads   = 4");
    let checked = zebra_frontend::check_source(&source);
    assert!(!checked.has_errors(), "still a valid model");
    let graph = optimize(&lower(&checked.program.models[0]), &Options::default())
        .unwrap()
        .graph;
    let error = zebra_codegen::artifact::build_gpu_attention(
        &graph,
        &out.path().join("bad"),
        GpuTarget { sm: 90 },
        Half::Bf16,
        MmaSettings::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("attention `global`") && error.contains("not 8"),
        "{error}"
    );
}

/// Without a driver, running tensor-core kernels says so; with ZEBRA_GPU_TESTS=1 and a GPU,
/// zebra_tiny's kernels match the f64 reference on sampled rows.
#[test]
fn tensor_core_attention_runs_or_says_why_not() {
    use zebra_codegen::kernels::attention_mma::{Half, MmaSettings};
    use zebra_runtime::cuda_attention::{AttentionOptions, run_attention};
    let out = tempfile::tempdir().unwrap();
    let graph = tiny_graph();
    zebra_codegen::artifact::build_gpu_attention(
        &graph,
        out.path(),
        GpuTarget { sm: 80 },
        Half::Bf16,
        MmaSettings::default(),
    )
    .unwrap();
    let options = AttentionOptions {
        seq_len: 300,
        batch: 2,
        repeats: 2,
        check_rows: 16,
        seed: 1,
        save: None,
    };
    if !driver_present() {
        let error = run_attention(out.path(), &options).unwrap_err().to_string();
        assert!(error.contains("no NVIDIA driver was found"), "{error}");
        return;
    }
    if std::env::var_os("ZEBRA_GPU_TESTS").is_none() {
        eprintln!("skipped: set ZEBRA_GPU_TESTS=1 to run the GPU tests");
        return;
    }
    for run in run_attention(out.path(), &options).unwrap() {
        assert!(run.ok, "{run:?}");
        assert_eq!(run.tiles_total, 3 * 5);
    }
}

/// NVIDIA's PTX assembler, where this machine has it (`scripts/ptxas.sh` fetches it into
/// target/ptxas; `ZEBRA_PTXAS` names another).
fn ptxas() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("ZEBRA_PTXAS") {
        return Some(path.into());
    }
    let local = root().join("target/ptxas/ptxas");
    local.exists().then_some(local)
}

/// What ptxas says of each entry: (name, registers, spill store bytes).
fn assemble(ptxas: &std::path::Path, ptx: &std::path::Path, sm: &str) -> Vec<(String, u32, u32)> {
    let out = std::process::Command::new(ptxas)
        .args([&format!("-arch={sm}"), "-v", "-o", "/dev/null"])
        .arg(ptx)
        .output()
        .expect("ptxas runs");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "ptxas refused {}:\n{text}",
        ptx.display()
    );
    // ptxas runs `wgmma`s one after the other when it cannot keep their accumulators in
    // place, and says so.
    assert!(
        !text.contains("serialized"),
        "ptxas serializes wgmma in {}:\n{text}",
        ptx.display()
    );
    let mut entries: Vec<(String, u32, u32)> = Vec::new();
    let number = |line: &str, before: &str| -> u32 {
        let at = line.find(before).expect("the field is there");
        line[..at]
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            entries.push((name, 0, 0));
        } else if line.contains("spill stores")
            && let Some(last) = entries.last_mut()
        {
            last.2 = number(line, "bytes spill stores");
        } else if line.contains("Used ")
            && line.contains(" registers")
            && let Some(last) = entries.last_mut()
        {
            last.1 = number(line, "registers");
        }
    }
    entries
}

/// Where ptxas is present: every kernel of zebra_tiny's plans (forward in f32 and with
/// tensor cores in bf16 and f16, training, generation), of a decode plan with a cache per
/// kind of KV head, of the benchmark model in bf16, and
/// the tensor-core attention kernels of every example assemble for sm_80 and sm_90 (and
/// their `wgmma` versions for sm_90a, which ptxas does not serialize); the
/// tensor-core kernels fit the registers (at most 128 bytes spilled, as the attention kernels
/// with head dim 128, forward and backward, do a little).
#[test]
fn gpu_kernels_assemble_with_ptxas() {
    use zebra_codegen::kernels::attention_mma::{MmaSettings, Product};
    let Some(ptxas) = ptxas() else {
        eprintln!("skipped: no ptxas (run scripts/ptxas.sh, or set ZEBRA_PTXAS)");
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let tiny = tiny_graph();
    let train = zebra_passes::autodiff::training_graph(&tiny).unwrap();
    let train = optimize(&train, &Options::default()).unwrap().graph;
    let (_, checked) = check_ok(&root().join("bench/gpu_model.zb"));
    let bench = optimize(&lower(&checked.program.models[0]), &Options::default())
        .unwrap()
        .graph;
    // Its training step: the attention's backward on tensor cores at head dim 128; and
    // Gemma 2's, at head dim 256.
    let bench_train = zebra_passes::autodiff::training_graph(&bench).unwrap();
    let bench_train = optimize(&bench_train, &Options::default()).unwrap().graph;
    let (_, checked) = check_ok(&root().join("examples/models/gemma2.zb"));
    let gemma = optimize(&lower(&checked.program.models[0]), &Options::default())
        .unwrap()
        .graph;
    let gemma_train = zebra_passes::autodiff::training_graph(&gemma).unwrap();
    let gemma_train = optimize(&gemma_train, &Options::default()).unwrap().graph;
    // KV caches per kind of KV head (KV heads 0 and 2 in one).
    let (_, checked) = check_ok(&root().join("tests/fixtures/ok/kv_heads_apart.zb"));
    let apart = optimize(&lower(&checked.program.models[0]), &Options::default())
        .unwrap()
        .graph;
    let (mut checked_entries, mut most_registers) = (0, 0);
    for sm in ["sm_80", "sm_90"] {
        let target = GpuTarget::from_name(sm).unwrap();
        let mut dirs = Vec::new();
        let wgmma = Some(TensorCores {
            half: Half::Bf16,
            attention: MmaSettings {
                product: Some(Product::Wgmma),
                ..MmaSettings::default()
            }
            .into(),
        });
        let mut plans = vec![
            ("f32", &tiny, PlanMode::Forward, None),
            ("bf16", &tiny, PlanMode::Forward, Some(Half::Bf16)),
            ("f16", &tiny, PlanMode::Forward, Some(Half::F16)),
            ("train", &train, PlanMode::Forward, Some(Half::Bf16)),
            ("decode", &tiny, PlanMode::Decode, Some(Half::Bf16)),
            ("decode-apart", &apart, PlanMode::Decode, None),
            ("bench", &bench, PlanMode::Forward, Some(Half::Bf16)),
            (
                "bench-train",
                &bench_train,
                PlanMode::Forward,
                Some(Half::Bf16),
            ),
            (
                "gemma2-train",
                &gemma_train,
                PlanMode::Forward,
                Some(Half::Bf16),
            ),
        ]
        .into_iter()
        .map(|(name, graph, mode, half)| (name, graph, mode, half.map(TensorCores::from)))
        .collect::<Vec<_>>();
        if sm == "sm_90" {
            // Model plans with their forward attentions on wgmma (sm_90a PTX).
            plans.push(("bench-wgmma", &bench, PlanMode::Forward, wgmma.clone()));
            plans.push(("train-wgmma", &train, PlanMode::Forward, wgmma));
        }
        for (name, graph, mode, cores) in plans {
            let dir = out.path().join(format!("{name}-{sm}"));
            let options = BuildOptions {
                mode,
                max_seq_len: 4096,
                cache: None,
            };
            build_gpu(graph, &dir, &options, target, cores.clone()).unwrap();
            let plan = std::fs::read_to_string(dir.join("plan.json")).unwrap();
            let arch = if cores.as_ref().is_some_and(|c| c.attention.uses_wgmma()) {
                // The plan says what the PTX is for, and its attentions are on wgmma.
                assert!(plan.contains("sm_90a"), "{name}");
                let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
                assert!(ptx.contains("wgmma.mma_async"), "{name}");
                "sm_90a"
            } else {
                assert!(!plan.contains("sm_90a"), "{name}");
                sm
            };
            dirs.push((dir, arch));
        }
        for path in crate::common::examples() {
            let (_, checked) = check_ok(&path);
            let graph = optimize(&lower(&checked.program.models[0]), &Options::default())
                .unwrap()
                .graph;
            let dir = out
                .path()
                .join(format!("attention-{}-{sm}", checked.program.models[0].name));
            zebra_codegen::artifact::build_gpu_attention(
                &graph,
                &dir,
                target,
                Half::Bf16,
                MmaSettings::default(),
            )
            .unwrap();
            dirs.push((dir, sm));
            if sm == "sm_90" {
                // The wgmma kernels, for sm_90a, with both key tiles and both V layouts (beyond
                // head dim 128 they take 32 keys per tile at most: the target's choice).
                let wide = zebra_codegen::ptx::mma_attentions(&graph, target)
                    .unwrap()
                    .iter()
                    .any(|(kernel, _)| kernel.head_dim > 128);
                for (product, block_k) in [
                    (Product::Wgmma, Some(64)),
                    (Product::Wgmma, Some(128)),
                    (Product::WgmmaTransposedV, Some(64)),
                ] {
                    if wide && block_k == Some(128) {
                        continue;
                    }
                    let block_k = block_k.filter(|_| !wide);
                    let dir = out.path().join(format!(
                        "{product:?}-{block_k:?}-{}",
                        checked.program.models[0].name
                    ));
                    let settings = MmaSettings {
                        product: Some(product),
                        block_k,
                        ..MmaSettings::default()
                    };
                    zebra_codegen::artifact::build_gpu_attention(
                        &graph,
                        &dir,
                        target,
                        Half::Bf16,
                        settings,
                    )
                    .unwrap();
                    dirs.push((dir, "sm_90a"));
                }
            }
        }
        for (dir, arch) in dirs {
            for (entry, registers, spilled) in assemble(&ptxas, &dir.join("kernels.ptx"), arch) {
                assert!(registers <= 255, "{entry}: {registers} registers");
                if entry.ends_with("_mma") {
                    assert!(spilled <= 128, "{entry} ({arch}) spills {spilled} bytes");
                }
                checked_entries += 1;
                most_registers = most_registers.max(registers);
            }
        }
    }
    assert!(checked_entries > 100, "{checked_entries}");
    // The tensor-core kernels keep their accumulators in registers: ptxas's report was read.
    assert!(most_registers > 128, "{most_registers}");

    // The benchmark's attention kernels (head dim 128, 128 queries by 64 keys) run at the
    // edge of the registers: each K and V copy's addresses a constant apart, one register
    // for all, keep them there (16 bytes spilled for sm_90, 72 for sm_80: loop invariants
    // the copies reload; per-copy addresses spilled over 200).
    let (_, checked) = check_ok(&root().join("bench/gpu_attention.zb"));
    let graph = optimize(&lower(&checked.program.models[0]), &Options::default())
        .unwrap()
        .graph;
    for sm in ["sm_80", "sm_90"] {
        let dir = out.path().join(format!("bench-attention-{sm}"));
        zebra_codegen::artifact::build_gpu_attention(
            &graph,
            &dir,
            GpuTarget::from_name(sm).unwrap(),
            Half::Bf16,
            MmaSettings::default(),
        )
        .unwrap();
        let entries = assemble(&ptxas, &dir.join("kernels.ptx"), sm);
        assert_eq!(entries.len(), 2, "{entries:?}");
        let most = if sm == "sm_90" { 32 } else { 96 };
        for (entry, _, spilled) in entries {
            assert!(spilled <= most, "{entry} ({sm}) spills {spilled} bytes");
        }
    }
}

/// The GPU benchmark's summary (`bench/gpu_attention_summary.py`, which `gpu-attention.sh`
/// runs last) picks, per attention, the fastest variant whose check passed, never one that
/// failed it or did not run, and compares it with the PyTorch implementation its target
/// names.
#[test]
fn gpu_attention_summary_picks_the_fastest_correct_variant() {
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    if std::process::Command::new(&python)
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no python3 to run bench/gpu_attention_summary.py");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let zebra = dir.path().join("zebra.jsonl");
    let torch = dir.path().join("torch.jsonl");
    std::fs::write(
        &zebra,
        [
            r#"{"variant": "bench", "result": {"name": "global", "time_ms": 7.0, "ok": true}}"#,
            r#"{"variant": "bench", "result": {"name": "local", "time_ms": 1.1, "ok": true}}"#,
            r#"{"variant": "bench_wgmma", "result": {"name": "global", "time_ms": 5.0, "ok": true}}"#,
            r#"{"variant": "bench_wgmma", "result": {"name": "local", "time_ms": 0.5, "ok": false, "worst_error": 3.5}}"#,
            r#"{"variant": "bench_wgmma_vt", "result": {"message": "error: launch timed out"}}"#,
            r#"{"variant": "bench_wgmma_vt", "result": {"ok": false, "error": "zebra-run attention failed (exit 124)"}}"#,
            r#"{"variant": "bench_bq64", "result": {"name": "local", "time_ms": 1.0, "ok": true}}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    std::fs::write(
        &torch,
        [
            r#"{"name": "attention-global", "impl": "sdpa-flash", "time_ms": 6.0}"#,
            r#"{"name": "attention-global", "impl": "flex", "time_ms": 5.5}"#,
            r#"{"name": "attention-local", "impl": "flex", "time_ms": 0.9}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = std::process::Command::new(&python)
        .arg(root().join("bench/gpu_attention_summary.py"))
        .args([&zebra, &torch])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let global = &lines[0];
    assert_eq!(global["summary"], "attention-global");
    assert_eq!(global["best"], "bench_wgmma");
    assert_eq!(global["ratios"]["sdpa-flash"], 1.2);
    assert_eq!(global["met"], true);
    let local = &lines[1];
    assert_eq!(local["summary"], "attention-local");
    // bench_wgmma was faster but wrong.
    assert_eq!(local["best"], "bench_bq64");
    assert_eq!(local["ratios"]["flex"], 0.9);
    assert_eq!(local["met"], false);
    let variants = local["variants"].as_array().unwrap();
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["bench_bq64", "bench", "bench_wgmma", "bench_wgmma_vt"]
    );
    let why = variants[3]["why"].as_str().unwrap();
    assert!(
        why.contains("exit 124") && why.contains("launch timed out"),
        "{why}"
    );
    // A file it cannot read is named.
    let out = std::process::Command::new(&python)
        .arg(root().join("bench/gpu_attention_summary.py"))
        .args([&zebra, &dir.path().join("missing.jsonl")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.jsonl"));
}
