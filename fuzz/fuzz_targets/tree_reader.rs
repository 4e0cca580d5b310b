//! cargo-fuzz target `tree_reader`: feeds arbitrary bytes to `fuzz_checks::tree_reader`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::tree_reader(data));
