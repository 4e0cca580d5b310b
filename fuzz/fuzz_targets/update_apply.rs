//! cargo-fuzz target `update_apply`: feeds arbitrary bytes to `fuzz_checks::update_apply`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::update_apply(data));
