//! The checks behind the cargo-fuzz targets in `fuzz/`: one function per target, each taking raw bytes.
//!
//! Each check panics when a property is broken (a panic in the code under test counts too), so
//! libFuzzer reports it as a crash and `tests/corpus.rs` replays every saved input on stable.
//! `fuzz/fuzz_targets/<name>.rs` is a one-line call into the function of the same name.

mod archive;
mod tree;
mod update;
mod wire;

pub mod seeds;

pub use archive::{LIMITS as ARCHIVE_LIMITS, archive_import};
pub use tree::tree_reader;
pub use update::update_apply;
pub use wire::{wire_hocus, wire_ywebsocket};

/// A check: panics when a property does not hold for the input.
pub type Check = fn(&[u8]);

/// Every fuzz target's name and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("wire_ywebsocket", wire_ywebsocket),
    ("wire_hocus", wire_hocus),
    ("update_apply", update_apply),
    ("tree_reader", tree_reader),
    ("archive_import", archive_import),
];
