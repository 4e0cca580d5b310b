//! `collab-bench load`: how fast a document holding a long real editing history loads from its
//! snapshot, and what applying edits costs one by one versus batched, on this machine.

use std::time::{Duration, Instant};

use anyhow::Context;
use loadtest::trace;
use sync_core::DocState;
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

const RUNS: usize = 21;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn per(d: Duration, n: usize) -> String {
    let ns = d.as_nanos() as f64 / n as f64;
    if ns >= 1000.0 { format!("{:.2} µs", ns / 1000.0) } else { format!("{ns:.1} ns") }
}

pub async fn load(database_urls: &[String]) -> anyhow::Result<()> {
    let trace = trace::load_sequential("automerge-paper").context("reading the automerge-paper trace")?;
    let ops: usize = trace.txns.iter().map(|t| t.patches.len()).sum();

    // One yrs transaction per recorded keystroke, as an editor makes them.
    let doc = Doc::new();
    let text = doc.get_or_insert_text("content");
    let mut updates = Vec::with_capacity(trace.txns.len());
    let started = Instant::now();
    for txn in &trace.txns {
        let mut t = doc.transact_mut();
        for (pos, del, ins) in &txn.patches {
            if *del > 0 {
                text.remove_range(&mut t, *pos, *del);
            }
            if !ins.is_empty() {
                text.insert(&mut t, *pos, ins);
            }
        }
        updates.push(t.encode_update_v1());
    }
    let per_keystroke = started.elapsed();
    anyhow::ensure!(text.get_string(&doc.transact()) == trace.end_content, "replay does not reach endContent");

    // The server's batched path: keystroke updates applied in transactions of up to 1024, the
    // largest batch a room takes from its inbox at once.
    let batched: Vec<Duration> = (0..5)
        .map(|_| {
            let fresh = Doc::new();
            let started = Instant::now();
            for chunk in updates.chunks(1024) {
                let mut t = fresh.transact_mut();
                for u in chunk {
                    let _ = t.apply_update(Update::decode_v1(u).expect("own update"));
                }
            }
            started.elapsed()
        })
        .collect();
    // Merging a batch of 1024 keystroke updates into one (what a batch relays).
    let merge_started = Instant::now();
    let mut merged_len = 0;
    for chunk in updates.chunks(1024) {
        merged_len += yrs::merge_updates_v1(chunk.iter().map(Vec::as_slice))?.len();
    }
    let merge = merge_started.elapsed();

    let snapshot = doc.transact().encode_state_as_update_v1(&StateVector::default());
    println!("## Loading a document with the automerge-paper history\n");
    println!(
        "Trace: {} keystroke transactions, {ops} patches, final text {} bytes.",
        trace.txns.len(),
        trace.end_content.len()
    );
    println!("Snapshot: {} bytes (keystroke updates merged per 1024: {merged_len} bytes).\n", snapshot.len());
    println!("| measure | value |\n|---|---|");
    println!(
        "| one yrs transaction per keystroke (typing the trace) | {} per keystroke |",
        per(per_keystroke, trace.txns.len())
    );
    println!(
        "| applying the {} keystroke updates 1024 per transaction, as a room batches (median of 5) | {} per update |",
        updates.len(),
        per(median(batched), updates.len())
    );
    println!(
        "| merging keystroke updates 1024 at a time (`merge_updates_v1`) | {} per update |",
        per(merge, updates.len())
    );

    let dir = tempfile::tempdir()?;
    let mut urls = vec![format!("sqlite://{}", dir.path().join("bench.sqlite3").display())];
    urls.extend(database_urls.iter().cloned());
    for url in urls {
        let store = doc_store::open_store(&url).await?;
        let name = format!("bench/paper-{}", std::process::id());
        store.delete(&name).await?;
        let seq = store.append(&name, std::slice::from_ref(&snapshot)).await?;
        store.compact(&name, &snapshot, seq).await?;
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let started = Instant::now();
            let stored = store.load(&name).await?;
            let parts = stored.snapshot.iter().chain(stored.updates.iter()).map(Vec::as_slice);
            let state = DocState::load(parts)?;
            times.push(started.elapsed());
            let loaded = state.doc().get_or_insert_text("content");
            anyhow::ensure!(loaded.get_string(&state.doc().transact()) == trace.end_content, "loaded text differs");
        }
        store.delete(&name).await?;
        let backend = url.split(':').next().unwrap_or("?");
        times.sort();
        println!(
            "| load from snapshot ({backend}), median of {RUNS} | {:.2} ms (min {:.2}, max {:.2}) |",
            median(times.clone()).as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3,
            times[RUNS - 1].as_secs_f64() * 1e3
        );
    }
    Ok(())
}
