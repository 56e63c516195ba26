//! The optimizer end to end: every program's optimized IR (snapshotted, one fused attention
//! per layer), the interpreter agreeing on the graph before and after optimization, rows
//! with every key masked, warnings for attention that cannot be fused, and the command line.

use std::collections::BTreeMap;

use zebra_ir::{Graph, Op, interp};
use zebra_passes::{Options, Target, optimize};

use crate::common::{
    assert_close, check_ok, lower, programs, random_inputs, relative, root, shrink,
};
use crate::snapshots::snapshot_name;

fn optimized(graph: &Graph) -> Graph {
    let result = optimize(graph, &Options::default()).unwrap_or_else(|e| panic!("{e}"));
    zebra_ir::verify(&result.graph).unwrap_or_else(|e| panic!("{e}"));
    result.graph
}

/// The logits of the reference interpreter running fused attentions tile by tile, as their
/// schedules visit them.
fn tiled_logits(
    graph: &Graph,
    inputs: &BTreeMap<String, zebra_ir::Value>,
    weights: &zebra_ir::Weights,
) -> ndarray::ArrayD<f64> {
    let options = interp::Options {
        tiled_attention: true,
    };
    let out = interp::interpret_with(graph, inputs, weights, options).unwrap_or_else(|e| {
        panic!("{e}");
    });
    out["logits"].as_float().unwrap().clone()
}

fn attention_kernels(graph: &Graph) -> Vec<String> {
    zebra_ir::print::kernel_table(graph)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// The optimized IR of every program, with its invariants checked first: one fused attention
/// per layer, no attention left unfused, no `[T, T]` tensor anywhere.
#[test]
fn optimized_ir_of_every_program() {
    for path in programs() {
        let (_, checked) = check_ok(&path);
        let mut text = String::new();
        for spec in &checked.program.models {
            let graph = optimized(&lower(spec));
            let mut per_layer = vec![0usize; spec.layers.len()];
            for id in graph.node_ids() {
                let node = graph.node(id);
                if matches!(node.op, Op::Attention(_)) {
                    per_layer[node.layer.expect("attention inside a layer") as usize] += 1;
                }
                let shape = &node.ty.shape;
                let square = shape.len() >= 2
                    && shape[shape.len() - 1] == zebra_ir::Dim::T
                    && shape[shape.len() - 2] == zebra_ir::Dim::T;
                assert!(
                    !square,
                    "{}: {} materializes a [T, T] tensor",
                    relative(&path),
                    node.op.name()
                );
            }
            assert!(
                per_layer.iter().all(|&n| n == 1),
                "{}: attention nodes per layer {per_layer:?}",
                relative(&path)
            );
            assert!(
                zebra_passes::diagnose::unfused_attention(&graph).is_empty(),
                "{}",
                relative(&path)
            );
            // As many kernels as attention kinds.
            assert_eq!(
                attention_kernels(&graph).len(),
                spec.kinds.len(),
                "{}",
                relative(&path)
            );
            text.push_str(&zebra_ir::print_graph(&graph));
        }
        insta::with_settings!({ description => relative(&path), omit_expression => true }, {
            insta::assert_snapshot!(snapshot_name("opt", &path), text);
        });
    }
}

#[test]
fn zebra_compiles_to_two_attention_kernels_at_any_depth() {
    for file in ["examples/zebra_tiny.zb", "examples/zebra_llama2_7b.zb"] {
        let spec = crate::common::model(&root().join(file));
        let graph = optimized(&lower(&spec));
        assert_eq!(attention_kernels(&graph), vec!["global", "local"], "{file}");
    }
}

/// The reference interpreter gives the same logits before and after optimization, for
/// every program (tiny versions of the large ones), at lengths around the tile size.
#[test]
fn optimization_preserves_every_program() {
    for path in programs() {
        let (_, checked) = check_ok(&path);
        for spec in &checked.program.models {
            let tiny = shrink(spec);
            let graph = lower(&tiny);
            let opt = optimized(&graph);
            let weights = zebra_frontend::init::random_weights(&tiny, 5);
            // 1, inside one tile, exactly a tile, and past tile boundaries; the deep models at
            // the two lengths that matter most, to keep the test quick.
            let lengths: &[usize] = if tiny.layers.len() > 8 {
                &[1, 70]
            } else {
                &[1, 13, 64, 70, 129]
            };
            for &seq in lengths {
                let inputs = random_inputs(&tiny, 2, seq, seq as u64);
                let expected = crate::common::logits(&graph, &inputs, &weights);
                let actual = crate::common::logits(&opt, &inputs, &weights);
                let what = format!("{} ({}) at T = {seq}", relative(&path), spec.name);
                assert_close(&actual, &expected, 1e-10, &what);
                assert_close(
                    &tiled_logits(&opt, &inputs, &weights),
                    &expected,
                    1e-10,
                    &format!("{what}, tiled"),
                );
            }
        }
    }
}

/// A query whose keys are all masked gets zeros from the fused attention, as from the
/// lowering's guarded softmax: no NaN anywhere.
#[test]
fn rows_with_every_key_masked_give_zeros() {
    let source = "attention strictly_past bidirectional {\n    mask = k < q\n}\nmodel m {\n    vocab  = 16\n    dim    = 16\n    heads  = 2\n    ffn    = swiglu(hidden = 16)\n    norm   = rmsnorm(eps = 1e-5)\n    rope   = rope(base = 10000.0)\n    layers = strictly_past\n}\n";
    let checked = zebra_frontend::check_source(source);
    assert!(!checked.has_errors(), "{:?}", checked.diagnostics);
    let spec = checked.program.model(None).unwrap();
    let graph = lower(spec);
    let opt = optimized(&graph);
    let weights = zebra_frontend::init::random_weights(spec, 1);
    let inputs = random_inputs(spec, 1, 9, 3);
    let expected = crate::common::logits(&graph, &inputs, &weights);
    assert!(expected.iter().all(|x| x.is_finite()));
    assert_close(
        &crate::common::logits(&opt, &inputs, &weights),
        &expected,
        1e-10,
        "guarded softmax vs fused",
    );

    // The attention output itself: query 0 sees nothing.
    let kernel = zebra_ir::op::AttentionKernel {
        name: "a".into(),
        mask: zebra_ir::expr::parse_expr("k < q").unwrap(),
        score: None,
        sides: vec![],
        scale: 1.0,
        heads: 1,
        kv_heads: 1,
        head_dim: 2,
        block_q: 2,
        block_k: 2,
        merge_heads: false,
        loc: None,
    };
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[1, 1, 5, 2]), |i| {
        (i[2] * 2 + i[3]) as f64 + 1.0
    });
    let ops = zebra_ir::attention::Operands {
        q: &x,
        k: &x,
        v: &x,
        sides: vec![],
    };
    for out in [
        zebra_ir::attention::dense(&kernel, &ops),
        zebra_ir::attention::tiled(&kernel, &ops),
    ] {
        assert_eq!(out[[0, 0, 0, 0]], 0.0);
        assert_eq!(out[[0, 0, 0, 1]], 0.0);
        assert!(out.iter().all(|v| v.is_finite()));
        // Query 1 sees only key 0.
        assert_eq!(out[[0, 0, 1, 0]], 1.0);
    }
}

#[test]
fn optimizing_for_gpus_picks_their_tile_sizes() {
    let spec = crate::common::model(&root().join("examples/zebra_tiny.zb"));
    let graph = lower(&spec);
    // On the CPU the local attention's window of 32 gets smaller tiles.
    for (target, global, local) in [
        (Target::Cpu, (64, 64), (32, 32)),
        (Target::Sm80, (128, 64), (128, 64)),
        (Target::Sm90, (128, 128), (128, 128)),
    ] {
        let opt = optimize(
            &graph,
            &Options {
                target,
                ..Options::default()
            },
        )
        .unwrap()
        .graph;
        for (name, kernel) in zebra_ir::print::kernel_table(&opt) {
            let blocks = if name == "local" { local } else { global };
            assert_eq!((kernel.block_q, kernel.block_k), blocks, "{target} @{name}");
        }
    }
}

/// A tile table (the tuning database's choices) sets the tiles of the attentions it names,
/// and only those, including the run-time block classification of side inputs; the result
/// computes the same.
#[test]
fn tuned_tile_sizes_apply_to_the_attentions_they_were_tuned_for() {
    use zebra_passes::{AttentionKey, Blocks, TileTable};
    let blocks = |block_q, block_k| Blocks { block_q, block_k };
    for (file, kind, tuned) in [
        ("examples/zebra_tiny.zb", "local", blocks(16, 32)),
        ("examples/attention/document.zb", "document", blocks(16, 8)),
    ] {
        let spec = crate::common::model(&root().join(file));
        let graph = lower(&spec);
        let defaults = attention_kernels(&optimized(&graph));
        let table = zebra_ir::print::kernel_table(&optimized(&graph))
            .into_iter()
            .filter(|(name, _)| name == kind)
            .map(|(_, kernel)| (AttentionKey::of(&kernel), tuned))
            .collect::<Vec<_>>();
        assert_eq!(table.len(), 1, "{file}: one `{kind}` kernel");
        let options = Options {
            tiles: TileTable::new(table),
            ..Options::default()
        };
        let opt = optimize(&graph, &options).unwrap().graph;
        let kernels = zebra_ir::print::kernel_table(&opt);
        assert_eq!(kernels.len(), defaults.len(), "{file}");
        for (name, kernel) in &kernels {
            let expected = if name == kind {
                tuned
            } else {
                zebra_passes::tiles::default_blocks(
                    Target::Cpu,
                    &kernel.mask,
                    kernel.heads as usize,
                )
            };
            assert_eq!(
                blocks(kernel.block_q, kernel.block_k),
                expected,
                "{file} @{name}"
            );
        }
        let text = zebra_ir::print_graph(&opt);
        if kind == "document" {
            for block in [16, 8] {
                assert!(
                    text.contains(&format!("tile_ranges(%1) {{block = {block}}}")),
                    "{text}"
                );
            }
        }
        let weights = zebra_frontend::init::random_weights(&spec, 2);
        for seq in [1, 13, 70] {
            let inputs = random_inputs(&spec, 2, seq, seq as u64);
            let expected = crate::common::logits(&graph, &inputs, &weights);
            let what = format!("{file} with @{kind} at {tuned}, T = {seq}");
            assert_close(
                &tiled_logits(&opt, &inputs, &weights),
                &expected,
                1e-10,
                &what,
            );
        }
    }
}

#[test]
fn optimization_is_deterministic() {
    let spec = crate::common::model(&root().join("examples/models/gemma3.zb"));
    let graph = lower(&spec);
    let first = zebra_ir::print_graph(&optimized(&graph));
    for _ in 0..3 {
        assert_eq!(zebra_ir::print_graph(&optimized(&graph)), first);
    }
}

#[test]
fn optimized_ir_round_trips_through_its_text_form() {
    for file in [
        "examples/zebra_tiny.zb",
        "examples/attention/document.zb",
        "examples/attention/alibi.zb",
    ] {
        let spec = crate::common::model(&root().join(file));
        let opt = optimized(&lower(&spec));
        let text = zebra_ir::print_graph(&opt);
        let parsed = zebra_ir::parse_graph(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        zebra_ir::verify(&parsed).unwrap();
        assert_eq!(zebra_ir::print_graph(&parsed), text, "{file}");
        let weights = zebra_frontend::init::random_weights(&spec, 2);
        let inputs = random_inputs(&spec, 1, 20, 4);
        assert_close(
            &crate::common::logits(&parsed, &inputs, &weights),
            &crate::common::logits(&opt, &inputs, &weights),
            0.0,
            file,
        );
    }
}

fn zebra(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_zebra"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .env("ZEBRA_CACHE_DIR", crate::common::cache_dir())
        .output()
        .expect("zebra runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Attention that cannot be fused is compiled anyway, with a warning that points at its
/// source and says why.
#[test]
fn unfused_attention_is_explained() {
    let mut snapshots = BTreeMap::new();
    for path in zir_files() {
        let file = relative(&path);
        let (ok, stdout, stderr) = zebra(&["compile", &file, "--emit", "opt"]);
        assert!(ok, "{file}: {stderr}");
        let fused = stdout.contains("= attention(");
        let warned = stderr.contains("warning: attention not fused");
        assert_ne!(
            fused, warned,
            "{file}: fused {fused}, warned {warned}\n{stderr}"
        );
        if warned {
            snapshots.insert(file, stderr);
        }
    }
    assert!(snapshots.len() >= 2);
    for (file, stderr) in snapshots {
        let name = snapshot_name(
            "unfused",
            std::path::Path::new(&file.replace(".zir", ".zb")),
        );
        insta::with_settings!({ description => file.clone(), omit_expression => true }, {
            insta::assert_snapshot!(name, stderr);
        });
    }
}

fn zir_files() -> Vec<std::path::PathBuf> {
    let dir = root().join("tests/fixtures/zir");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/zir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "zir"))
        .collect();
    files.sort();
    files
}

#[test]
fn compile_prints_after_every_stage_with_timings() {
    for stage in zebra_passes::pipeline::STAGES {
        let (ok, stdout, stderr) = zebra(&[
            "compile",
            "examples/zebra_tiny.zb",
            "--print-after",
            stage,
            "--timings",
        ]);
        assert!(ok, "{stage}: {stderr}");
        assert!(stdout.starts_with("graph zebra_tiny {"), "{stage}");
        let has_attention = stdout.contains("= attention(");
        let fused_by_now = ["attention", "epilogue", "opt"].contains(&stage);
        assert_eq!(has_attention, fused_by_now, "{stage}");
        for timed in [
            "check",
            "lower",
            "share",
            "algebra",
            "attention",
            "extract",
            "total",
        ] {
            assert!(
                stderr.contains(&format!("  {timed}")),
                "{stage}: no {timed} timing in\n{stderr}"
            );
        }
    }
    let (ok, _, stderr) = zebra(&[
        "compile",
        "examples/zebra_tiny.zb",
        "--print-after",
        "fusion",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("unknown stage `fusion` for --print-after; the stages are lower, algebra"),
        "{stderr}"
    );
}

#[test]
fn compile_explains_which_rules_built_a_node() {
    let (_, stdout, _) = zebra(&["compile", "examples/zebra_tiny.zb", "--emit", "opt"]);
    let attention = stdout
        .lines()
        .find(|l| l.contains("= attention("))
        .and_then(|l| l.trim().split(' ').next())
        .expect("an attention node")
        .to_string();
    let (ok, _, stderr) = zebra(&[
        "compile",
        "examples/zebra_tiny.zb",
        "--emit",
        "opt",
        "--explain",
        &attention,
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{attention} (attention) was rewritten by: merge-heads"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("fuse-attention x1"), "{stderr}");
    assert!(stderr.contains("softmax-guarded x1"), "{stderr}");
    let (ok, _, stderr) = zebra(&[
        "compile",
        "examples/zebra_tiny.zb",
        "--emit",
        "opt",
        "--explain",
        "%9999",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("the optimized IR has no node `%9999`"),
        "{stderr}"
    );
}

#[test]
fn compile_targets_gpus() {
    let (ok, stdout, stderr) = zebra(&[
        "compile",
        "examples/zebra_tiny.zb",
        "--emit",
        "opt",
        "--target",
        "sm_90",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("block_q = 128, block_k = 128"), "{stdout}");
    let (ok, _, stderr) = zebra(&[
        "compile",
        "examples/zebra_tiny.zb",
        "--emit",
        "opt",
        "--target",
        "sm_70",
    ]);
    assert!(!ok);
    assert!(stderr.contains("unknown target `sm_70`"), "{stderr}");
}
