//! cargo-fuzz target `wire_hocus`: feeds arbitrary bytes to `fuzz_checks::wire_hocus`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::wire_hocus(data));
