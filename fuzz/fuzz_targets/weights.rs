//! Any bytes given as a safetensors weights file or an .npy file give tensors or an error
//! that names the file, never a panic or an allocation the file's size does not justify.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.bin");
    let _ = zebra_ir::Weights::from_bytes(data, path);
    let _ = zebra_ir::npy::ints_from_bytes(data, path);
    let _ = zebra_ir::npy::floats_from_bytes(data, path);
});
