//! Waiting for a condition with a deadline, never for a fixed time: a test that waits names what
//! it waits for, and fails with that name (and whatever explains it) when time runs out.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How long a test waits for anything that should happen at once on an idle machine: far above
/// what a loaded 2-core machine needs, far below the kill timeout in `.config/nextest.toml`.
pub const WAIT: Duration = Duration::from_secs(20);

/// How often a condition is looked at again.
const TICK: Duration = Duration::from_millis(10);

/// Polls `cond` until it holds; panics naming `what` after [`WAIT`].
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    poll(what, WAIT, || std::future::ready(cond().then_some(())), String::new).await;
}

/// [`until`] for a condition that has to await something (a metric over HTTP, a query).
pub async fn until_async<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    poll(
        what,
        WAIT,
        || {
            let holds = cond();
            async move { holds.await.then_some(()) }
        },
        String::new,
    )
    .await;
}

/// Polls `probe` until it yields a value, and returns it; after `within`, panics naming `what`
/// followed by `explain()` (logs, the last state seen).
pub async fn poll<T, F: Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> F,
    explain: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}\n{}", explain());
        tokio::time::sleep(TICK).await;
    }
}
