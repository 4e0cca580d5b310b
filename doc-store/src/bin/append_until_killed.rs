//! Test helper for the kill -9 durability test: appends to a SQLite store until killed,
//! printing `confirmed <i> <seq>` after each append that returned. Not part of the product.

use std::io::Write;
use std::path::Path;

use doc_store::{DocStore, SqliteStore};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: append_until_killed DB_PATH")?;
    let store = SqliteStore::open(Path::new(&path)).await?;
    let mut out = std::io::stdout().lock();
    for i in 0..1_000_000u64 {
        let seq = store.append("durable", &[format!("update {i}").into_bytes()]).await?;
        writeln!(out, "confirmed {i} {seq}")?;
        out.flush()?;
    }
    Ok(())
}
