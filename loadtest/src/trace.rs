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

/// `(position, deleted characters, inserted text)`.
pub type Patch = (u32, u32, String);

#[derive(Debug, Deserialize)]
pub struct Txn {
    pub patches: Vec<Patch>,
}

/// A concurrent trace: each transaction applies on top of the merge of its parents.
#[derive(Debug, Deserialize)]
pub struct ConcurrentTrace {
    #[serde(rename = "endContent")]
    pub end_content: String,
    #[serde(rename = "numAgents")]
    pub num_agents: usize,
    pub txns: Vec<ConcurrentTxn>,
}

#[derive(Debug, Deserialize)]
pub struct ConcurrentTxn {
    /// Indices of earlier transactions.
    pub parents: Vec<usize>,
    pub agent: usize,
    pub patches: Vec<Patch>,
}

/// The traces folder: `COLLAB_TRACES_DIR`, or `shared/data/editing-traces` beside the checkout.
pub fn traces_dir() -> PathBuf {
    std::env::var_os("COLLAB_TRACES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/editing-traces"))
}

/// Loads `sequential/{name}.json.gz`.
pub fn load_sequential(name: &str) -> anyhow::Result<Trace> {
    load(&format!("sequential/{name}.json.gz"))
}

/// Loads `concurrent/{name}.json.gz`.
pub fn load_concurrent(name: &str) -> anyhow::Result<ConcurrentTrace> {
    load(&format!("concurrent/{name}.json.gz"))
}

fn load<T: serde::de::DeserializeOwned>(relative: &str) -> anyhow::Result<T> {
    let path = traces_dir().join(relative);
    let file = std::fs::File::open(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut json = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut json)?;
    serde_json::from_str(&json).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
