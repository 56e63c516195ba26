fn main() {
    let path = std::env::args().nth(1).unwrap();
    let source = std::fs::read_to_string(&path).unwrap();
    let checked = zebra_frontend::check_source(&source);
    let spec = checked.program.model(None).unwrap();
    let graph = zebra_frontend::lower::lower(spec).unwrap();
    let t = std::time::Instant::now();
    let opt = zebra_passes::optimize(&graph, &zebra_passes::Options::default()).unwrap();
    eprintln!(
        "optimized in {:?}; segments {} distinct {}",
        t.elapsed(),
        opt.segments,
        opt.distinct
    );
    for (name, d) in &opt.timings {
        eprintln!("  {name}: {d:?}");
    }
    for (place, reports) in &opt.reports {
        for r in reports {
            eprintln!(
                "  {place} {}: {} iters, {} nodes, {}, {:?}",
                r.name, r.iterations, r.nodes, r.stop, r.applied
            );
        }
    }
    print!("{}", zebra_ir::print_graph(&opt.graph));
    for u in zebra_passes::diagnose::unfused_attention(&opt.graph) {
        eprintln!("unfused: {:?}", u);
    }
}
