//! Compiles a .zir graph, runs it compiled and interpreted on random data, compares.
use std::collections::BTreeMap;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let seq: usize = std::env::args().nth(2).map_or(5, |s| s.parse().unwrap());
    let text = std::fs::read_to_string(&path).unwrap();
    let graph = zebra_ir::parse_graph(&text).unwrap();
    zebra_ir::verify(&graph).unwrap();
    let graph = if std::env::args().any(|a| a == "opt") {
        zebra_passes::optimize(&graph, &Default::default())
            .unwrap()
            .graph
    } else {
        graph
    };
    let dir = std::path::Path::new("/tmp/zir_art");
    let _ = std::fs::remove_dir_all(dir);
    zebra_codegen::artifact::build(
        &graph,
        dir,
        &zebra_codegen::artifact::BuildOptions {
            max_seq_len: 4096,
            cache: None,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut weights = zebra_ir::Weights::new();
    let mut state = 1u64;
    let mut rnd = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
    };
    for (name, id) in graph.weights() {
        let shape: Vec<usize> = graph
            .node(id)
            .ty
            .shape
            .iter()
            .map(|d| d.as_const().unwrap() as usize)
            .collect();
        weights.insert(
            name,
            ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&shape), |_| rnd() as f32),
        );
    }
    let bind = zebra_ir::Bindings { batch: 2, seq };
    let mut tensors = BTreeMap::new();
    let mut values = BTreeMap::new();
    for (name, id) in graph.inputs() {
        let ty = &graph.node(id).ty;
        let shape = zebra_ir::types::resolve_shape(&ty.shape, &bind);
        if ty.dtype == zebra_ir::DType::I64 {
            let a = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&shape), |_| {
                ((rnd() + 1.0) * 2.0) as i64
            });
            tensors.insert(name.clone(), zebra_runtime::Tensor::I64(a.clone()));
            values.insert(name, zebra_ir::Value::Int(a));
        } else {
            let a = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&shape), |_| rnd() as f32);
            tensors.insert(name.clone(), zebra_runtime::Tensor::F32(a.clone()));
            values.insert(name, zebra_ir::Value::Float(a.mapv(f64::from)));
        }
    }
    let mut model =
        zebra_runtime::CpuModel::load(dir, &weights, 2).unwrap_or_else(|e| panic!("{e}"));
    let out = model.run(&tensors).unwrap_or_else(|e| panic!("{e}"));
    let expected = zebra_ir::interpret(&graph, &values, &weights).unwrap();
    for (name, got) in &out {
        let want = expected[name].as_float().unwrap();
        let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let worst = got
            .iter()
            .zip(want.iter())
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        println!("{name}: max abs err {worst:e} (scale {scale:e})");
        if worst > 1e-3 * scale.max(1e-6) {
            println!("got  {:?}", got.iter().take(12).collect::<Vec<_>>());
            println!("want {:?}", want.iter().take(12).collect::<Vec<_>>());
        }
    }
}
