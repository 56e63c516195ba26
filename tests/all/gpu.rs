//! The GPU lowering without a GPU: every program's kernels compile to PTX for sm_80 and
//! sm_90, with an entry per kernel taking what the plan launches it with; GPU artifacts
//! round-trip and broken ones are refused; without a driver the CUDA runtime says so. With
//! `ZEBRA_GPU_TESTS=1` and a GPU, zebra_tiny runs on it and matches the CPU.

use std::collections::BTreeMap;

use zebra_codegen::artifact::{BuildOptions, build_gpu};
use zebra_codegen::plan::PlanMode;
use zebra_codegen::ptx::{GpuTarget, entries_of, entry};
use zebra_passes::{Options, optimize};
use zebra_runtime::cuda::{CudaModel, driver_present};
use zebra_runtime::{CpuModel, Tensor};

use crate::common::{check_ok, lower, programs, relative, root, shrink};

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
                build_gpu(&graph, &dir, &options, target).unwrap_or_else(|e| panic!("{what}: {e}"));
                let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
                assert!(ptx.contains(&format!(".target {sm}")), "{what}");
                assert!(!ptx.contains(".extern"), "{what}: calls outside the module");
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
                }
                assert_eq!(entries.len(), plan.kernels.len(), "{what}");
            }
        }
    }
}

/// The training step and the generation plans of zebra_tiny compile for the GPU too (their
/// kernels use more math: sin and cos in RoPE's gradient, logarithms in the loss).
#[test]
fn training_and_generation_plans_compile_to_ptx() {
    let out = tempfile::tempdir().unwrap();
    let (_, checked) = check_ok(&root().join("examples/zebra_tiny.zb"));
    let graph = optimize(&lower(&checked.program.models[0]), &Options::default())
        .unwrap()
        .graph;
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
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
        assert!(!ptx.contains(".extern"), "{name}: calls outside the module");
        assert!(ptx.contains("sin.approx") || name != "train", "{name}");
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

/// Opt-in (ZEBRA_GPU_TESTS=1): zebra_tiny on the GPU gives the CPU's logits.
#[test]
fn zebra_tiny_on_the_gpu_matches_the_cpu() {
    if std::env::var_os("ZEBRA_GPU_TESTS").is_none() {
        eprintln!("skipped: set ZEBRA_GPU_TESTS=1 to run the GPU tests");
        return;
    }
    if !driver_present() {
        eprintln!("skipped: no CUDA driver on this machine");
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
    let tokens = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[2, 150]), |i| {
        ((i[0] * 31 + i[1] * 7) % 256) as i64
    });
    let inputs = BTreeMap::from([("tokens".to_string(), Tensor::I64(tokens))]);
    let mut gpu = CudaModel::load(&gpu_dir, &weights).unwrap();
    let mut cpu = CpuModel::load(&cpu_dir, &weights, 2).unwrap();
    let a = gpu.run(&inputs).unwrap()["logits"].mapv(f64::from);
    let b = cpu.run(&inputs).unwrap()["logits"].mapv(f64::from);
    crate::common::assert_close(&a, &b, 1e-4, "zebra_tiny on the GPU");
}
