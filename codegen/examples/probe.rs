fn main() {
    let path = std::env::args().nth(1).unwrap();
    let source = std::fs::read_to_string(&path).unwrap();
    let checked = zebra_frontend::check_source(&source);
    let spec = checked.program.model(None).unwrap();
    let graph = zebra_frontend::lower::lower(spec).unwrap();
    let opt = zebra_passes::optimize(&graph, &zebra_passes::Options::default())
        .unwrap()
        .graph;
    let what = std::env::args().nth(2).unwrap_or_default();
    if what == "mlir" {
        print!(
            "{}",
            zebra_codegen::artifact::emit(&opt, 4096, zebra_codegen::backend::Output::Object, true)
                .unwrap()
        );
        return;
    }
    let t = std::time::Instant::now();
    let report = zebra_codegen::artifact::build(
        &opt,
        std::path::Path::new("/tmp/art"),
        &zebra_codegen::artifact::BuildOptions {
            max_seq_len: 4096,
            cache: None,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{report:?} in {:?}", t.elapsed());
    let weights = zebra_frontend::init::random_weights(spec, 1);
    let mut model = zebra_runtime::CpuModel::load(std::path::Path::new("/tmp/art"), &weights, 2)
        .unwrap_or_else(|e| panic!("{e}"));
    for seq in [1usize, 7, 64, 70, 130] {
        let tokens = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[2, seq]), |i| {
            ((i[0] * 31 + i[1] * 7) % spec.vocab) as i64
        });
        let mut inputs = std::collections::BTreeMap::new();
        inputs.insert("tokens".to_string(), tokens.clone());
        for side in &spec.side_inputs {
            inputs.insert(
                side.clone(),
                ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[2, seq]), |i| (i[1] / 5) as i64),
            );
        }
        let out = model.run(&inputs).unwrap_or_else(|e| panic!("{e}"));
        let logits = &out["logits"];
        let vin: std::collections::BTreeMap<String, zebra_ir::Value> = inputs
            .iter()
            .map(|(k, v)| (k.clone(), zebra_ir::Value::Int(v.clone())))
            .collect();
        let expected = zebra_ir::interpret(&graph, &vin, &weights).unwrap();
        let expected = expected["logits"].as_float().unwrap();
        let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let worst = logits
            .iter()
            .zip(expected.iter())
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "T={seq}: max abs err {worst:e}, relative {:e}",
            worst / scale
        );
    }
}
