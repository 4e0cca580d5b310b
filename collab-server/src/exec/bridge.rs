//! The bridge peer of a project: it joins the project over this node's own sync endpoint and
//! mirrors its files into the workspace; and the run barrier that makes Run see the last
//! keystroke (the states of the project's documents as this node's rooms hold them).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use exec_bridge::mirror::Mirror;
use exec_bridge::peer::{self, BridgeConfig};
use exec_bridge::sandbox::Sandbox;
use exec_bridge::session::RunBarrier;
use sync_core::tree;
use sync_core::{DocName, Role};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use yrs::{ReadTxn, StateVector, Transact};

use super::{BRIDGE_NAME, BRIDGE_USER};
use crate::auth::{Identity, Keys};
use crate::project;
use crate::sync::rooms::Rooms;
use crate::tasks::Tasks;

/// The states of a project's documents as this node holds them.
pub(super) struct RoomsBarrier {
    pub(super) rooms: Rooms,
    pub(super) project: String,
}

#[async_trait::async_trait]
impl RunBarrier for RoomsBarrier {
    async fn states(&self) -> Vec<(String, StateVector)> {
        let mut states = Vec::new();
        let Ok(root_name) = DocName::parse(&self.project) else { return states };
        let Ok(root) = project::snapshot(&self.rooms, &root_name).await else { return states };
        let ids: Vec<String> = {
            let txn = root.transact();
            states.push((self.project.clone(), txn.state_vector()));
            tree::entries(&txn).into_iter().filter(|e| e.kind == tree::EntryKind::File).map(|e| e.id).collect()
        };
        for id in ids {
            let name = tree::file_doc_name(&self.project, &id);
            let Ok(doc_name) = DocName::parse(&name) else { continue };
            if let Ok(doc) = project::snapshot(&self.rooms, &doc_name).await {
                let sv = doc.transact().state_vector();
                states.push((name, sv));
            }
        }
        states
    }
}

/// The bridge peer of one project: mirrors its documents into the workspace, reconnecting with
/// the same mirror until stopped.
pub(super) struct BridgeLink {
    pub(super) server: String,
    pub(super) project: String,
    pub(super) keys: Keys,
    pub(super) workspace: PathBuf,
    pub(super) tasks: Tasks,
}

impl BridgeLink {
    pub(super) async fn run(
        self,
        mut prepare: mpsc::Receiver<peer::PrepareRequest>,
        stop: CancellationToken,
        sandbox: Arc<dyn Sandbox>,
    ) {
        let workspace = self.workspace.clone();
        let created = self.tasks.blocking("create workspace", move || std::fs::create_dir_all(&workspace)).await;
        if let Ok(Err(e)) = created {
            warn!(error = %e, workspace = %self.workspace.display(), "cannot create the workspace");
            return;
        }
        if created.is_err() {
            return;
        }
        // The warm start: the sandbox gets ready while the mirror writes the files.
        let workspace = self.workspace.clone();
        self.tasks.spawn("sandbox warm start", async move {
            if let Err(e) = sandbox.warm(&workspace).await {
                warn!(error = %e, "warming the sandbox failed; the first run will start it");
            }
        });
        let identity = Identity {
            user: BRIDGE_USER.to_owned(),
            name: BRIDGE_NAME.to_owned(),
            project: self.project.clone(),
            role: Role::Editor,
        };
        let mut mirror = Mirror::new();
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let token = match self.keys.sign_service(&identity, Duration::from_secs(24 * 3600)) {
                Ok(token) => token,
                Err(e) => {
                    warn!(error = %e, "cannot sign the bridge's token");
                    return;
                }
            };
            let mut config = BridgeConfig::new(&self.server, &self.project, &token, self.workspace.clone());
            config.display_name = BRIDGE_NAME.to_owned();
            match peer::run_serving(config, &mut mirror, stop.clone(), &mut prepare).await {
                Ok(()) => return,
                Err(e) => {
                    warn!(project = self.project, error = %e, retry_in = ?backoff, "bridge peer stopped; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
