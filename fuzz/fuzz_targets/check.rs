//! Any input to the frontend gives a result or diagnostics, never a panic; every model that
//! checks lowers to a graph that verifies, and its diagnostics render.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let source = String::from_utf8_lossy(data);
    let checked = zebra_frontend::check_source(&source);
    let _ = zebra_frontend::render("fuzz.zb", &source, &checked.diagnostics);
    if !checked.has_errors() {
        for model in &checked.program.models {
            // Huge models lower fine but slowly; the fuzzer looks for crashes, not sizes.
            if model.layers.len() <= 64 {
                let graph = zebra_frontend::lower::lower(model).expect("a checked model lowers");
                zebra_ir::verify(&graph).expect("a lowered graph verifies");
            }
        }
    }
});
