//! The concurrent trace's edits, made offline against their parents' versions, merge to the
//! trace's `endContent` before any server is involved.

use yrs::updates::decoder::Decode;
use yrs::{Doc, Transact, Update};

#[test]
fn concurrent_trace_updates_merge_to_end_content() {
    let trace = loadtest::trace::load_concurrent("friendsforever").unwrap();
    let updates = loadtest::replay::concurrent_updates(&trace).unwrap();
    assert_eq!(updates.len(), trace.txns.len());
    let doc = Doc::new();
    {
        let mut txn = doc.transact_mut();
        for edit in &updates {
            txn.apply_update(Update::decode_v1(&edit.update).unwrap()).unwrap();
        }
    }
    let text = loadtest::replay::text_of(&doc);
    let first_difference = text.chars().zip(trace.end_content.chars()).position(|(a, b)| a != b);
    assert!(
        text == trace.end_content,
        "lengths {} vs {}, first difference at {first_difference:?}",
        text.len(),
        trace.end_content.len()
    );
}
