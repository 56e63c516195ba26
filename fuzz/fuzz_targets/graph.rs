//! Any text given to the IR's parser (`.zir` files) gives a graph or an error, never a panic;
//! a graph that parses prints to text that parses back to the same text, and the verifier
//! answers on it without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(graph) = zebra_ir::parse_graph(&text) {
        let _ = zebra_ir::verify(&graph);
        let printed = zebra_ir::print_graph(&graph);
        let again = zebra_ir::parse_graph(&printed).expect("printed IR parses");
        assert_eq!(zebra_ir::print_graph(&again), printed, "printing is stable");
    }
});
