//! Reading the recorded editing traces (`josephg/editing-traces`, CC BY 4.0).

use std::io::Read;
use std::path::PathBuf;

use serde::Deserialize;

/// A sequential trace: apply every patch of every transaction in order to get `end_content`.
#[derive(Debug, Deserialize)]
pub struct Trace {
    #[serde(rename = "endContent")]
    pub end_content: String,
    pub txns: Vec<Txn>,
}

#[derive(Debug, Deserialize)]
pub struct Txn {
    /// `(position, deleted characters, inserted text)`.
    pub patches: Vec<(u32, u32, String)>,
}

/// The traces folder: `COLLAB_TRACES_DIR`, or `shared/data/editing-traces` beside the checkout.
pub fn traces_dir() -> PathBuf {
    std::env::var_os("COLLAB_TRACES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/editing-traces"))
}

/// Loads `sequential/{name}.json.gz`.
pub fn load_sequential(name: &str) -> anyhow::Result<Trace> {
    let path = traces_dir().join("sequential").join(format!("{name}.json.gz"));
    let file = std::fs::File::open(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut json = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut json)?;
    Ok(serde_json::from_str(&json)?)
}
