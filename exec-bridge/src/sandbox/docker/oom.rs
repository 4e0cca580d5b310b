//! Docker's `oom` events for a container, which turn a cgroup OOM kill into a memory verdict.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::EventsOptionsBuilder;
use futures_util::StreamExt;
use tokio::sync::oneshot;

/// Resolves once Docker reports an `oom` event for `container` at or after `since`.
pub(super) struct OomWatch {
    pub(super) seen: oneshot::Receiver<()>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

pub(super) fn watch_oom(docker: Docker, container: String, since: Duration) -> OomWatch {
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let filters = HashMap::from([("container", vec![container.as_str()]), ("event", vec!["oom"])]);
        let options = EventsOptionsBuilder::new().since(&since.as_secs().to_string()).filters(&filters).build();
        let mut events = docker.events(Some(options));
        let since_nanos = i64::try_from(since.as_nanos()).unwrap_or(i64::MAX);
        while let Some(Ok(event)) = events.next().await {
            if event.time_nano.unwrap_or(i64::MAX) >= since_nanos {
                let _ = tx.send(());
                return;
            }
        }
    });
    OomWatch { seen: rx, task }
}
