//! Helpers shared by the sandbox test files.
#![allow(dead_code)]

use std::sync::Arc;

use exec_bridge::sandbox::docker::{DockerSandbox, DockerSandboxConfig};

pub async fn docker_sandbox(config: DockerSandboxConfig) -> Arc<DockerSandbox> {
    let sandbox = match DockerSandbox::connect(config).await {
        Ok(sandbox) => sandbox,
        Err(err) => panic!(
            "the Docker sandbox tests need a running dockerd and the runtime image: {err}; run `cargo xtask test`, which starts dockerd and builds the image"
        ),
    };
    sandbox.prune_orphans().await.expect("pruning containers of gone workspaces");
    Arc::new(sandbox)
}

pub fn workspace_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write workspace file");
    }
    dir
}
