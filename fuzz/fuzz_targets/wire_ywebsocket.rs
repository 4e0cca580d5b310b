//! cargo-fuzz target `wire_ywebsocket`: feeds arbitrary bytes to `fuzz_checks::wire_ywebsocket`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::wire_ywebsocket(data));
