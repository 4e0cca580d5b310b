//! cargo-fuzz target `archive_import`: feeds arbitrary bytes to `fuzz_checks::archive_import`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::archive_import(data));
