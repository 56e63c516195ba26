//! How long the optimizer takes on the Llama-2-7B-shaped Zebra model (32 layers) and on the
//! tiny one. Run with `cargo bench -p zebra-passes`.

use criterion::{Criterion, criterion_group, criterion_main};
use zebra_passes::{Options, optimize};

fn lowered(file: &str) -> zebra_ir::Graph {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(file);
    let source = std::fs::read_to_string(&path).expect("the example exists");
    let checked = zebra_frontend::check_source(&source);
    let spec = checked.program.model(None).expect("one model");
    zebra_frontend::lower::lower(spec).expect("it lowers")
}

fn bench(c: &mut Criterion) {
    for (name, file) in [
        (
            "optimize zebra_llama2_7b (32 layers)",
            "examples/zebra_llama2_7b.zb",
        ),
        ("optimize zebra_tiny", "examples/zebra_tiny.zb"),
    ] {
        let graph = lowered(file);
        c.bench_function(name, |b| {
            b.iter(|| optimize(&graph, &Options::default()).expect("it optimizes"))
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
