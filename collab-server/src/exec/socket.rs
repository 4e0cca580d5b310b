//! One exec peer's socket: JSON messages in, the session's events out, every send with a
//! deadline; a peer that falls behind is disconnected and never holds back the others. The
//! socket is pinged, closed when silent for the idle timeout, and held to its token's `exp`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use exec_bridge::protocol::{ClientMsg, ServerMsg};
use exec_bridge::session::Actor;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{ExecError, ExecHub};
use crate::auth::{Grant, Identity};
use crate::close;

/// How long a close frame may take to leave before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one exec peer until it leaves, is too slow or silent, its token expires, or the
/// server shuts down.
pub async fn serve_peer(socket: WebSocket, hub: Arc<ExecHub>, grant: Grant, shutdown: CancellationToken) {
    let (tx, mut rx) = socket.split();
    let mut tx = Outbox { sink: tx, timeout: hub.send_timeout };
    let identity = grant.identity.clone();
    let Some(_socket_guard) = hub.open_socket(&identity.user) else {
        info!(user_id = identity.user, "too many exec sockets for one user; refusing another");
        let _ = tx.send(&ServerMsg::Error { message: ExecError::TooManySockets.to_string() }).await;
        let _ = tx.close(close_msg(close::TRY_AGAIN_LATER, "too many exec connections; close one first")).await;
        return;
    };
    let (session, _guard) = match hub.join(&identity.project).await {
        Ok(joined) => joined,
        Err(e) => {
            let _ = tx.send(&ServerMsg::Error { message: e.to_string() }).await;
            let code = if matches!(e, ExecError::Disabled | ExecError::Workspace) {
                close::INTERNAL_ERROR
            } else {
                close::TRY_AGAIN_LATER
            };
            let _ = tx.close(close_msg(code, "exec unavailable here; try again")).await;
            return;
        }
    };
    let session_closed = session.closed();
    let actor = Actor { name: identity.name.clone(), role: identity.role };
    let (hello, mut events) = session.subscribe(identity.role);
    if tx.send(&hello).await.is_err() {
        return;
    }
    let deadline = grant.deadline();
    let expiry = tokio::time::sleep_until(deadline.unwrap_or_else(far_future));
    // Liveness as on the sync endpoints: a ping every interval, and a peer silent (no frame,
    // pongs included) for the idle timeout is closed, so half-open sockets do not stay forever.
    let idle_timeout = hub.idle_timeout;
    let mut ping = tokio::time::interval(hub.ping_interval.max(Duration::from_millis(10)));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut last_seen = tokio::time::Instant::now();
    let idle = tokio::time::sleep_until(last_seen + idle_timeout);
    tokio::pin!(expiry, idle);
    loop {
        tokio::select! {
            frame = rx.next() => {
                last_seen = tokio::time::Instant::now();
                if deadline.is_some_and(|d| d <= last_seen) {
                    // The timer has not fired yet; nothing is done for an expired token.
                    let _ = tx.close(close_msg(close::POLICY_VIOLATION, TOKEN_EXPIRED)).await;
                    return;
                }
                let reply = match frame {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientMsg>(&text) {
                        Ok(msg) => session.handle(&actor, msg).await.err().map(|r| r.0),
                        Err(e) => Some(format!("not a valid exec message: {e}")),
                    },
                    Some(Ok(Message::Binary(_))) => Some("exec messages are JSON text frames".to_owned()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                };
                if let Some(message) = reply
                    && tx.send(&ServerMsg::Error { message }).await.is_err()
                {
                    return too_slow(&mut tx, &identity).await;
                }
            }
            event = events.recv() => match event {
                Ok(msg) => {
                    if tx.send(&msg).await.is_err() {
                        return too_slow(&mut tx, &identity).await;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => return too_slow(&mut tx, &identity).await,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = ping.tick() => {
                if tx.ping().await.is_err() {
                    return too_slow(&mut tx, &identity).await;
                }
            }
            _ = &mut idle => {
                let due = last_seen + idle_timeout;
                if due > tokio::time::Instant::now() {
                    idle.as_mut().reset(due);
                } else {
                    info!(user_id = identity.user, "exec peer silent for the idle timeout; closing it");
                    let _ = tx.close(close_msg(close::GOING_AWAY, "no message from the client within the idle timeout")).await;
                    return;
                }
            }
            _ = &mut expiry, if deadline.is_some() => {
                info!(user_id = identity.user, "token expired; closing the exec connection");
                let _ = tx.close(close_msg(close::POLICY_VIOLATION, TOKEN_EXPIRED)).await;
                return;
            }
            _ = shutdown.cancelled() => {
                let _ = tx.close(close_msg(close::GOING_AWAY, "server shutting down")).await;
                return;
            }
            _ = session_closed.cancelled() => {
                let _ = tx.close(close_msg(close::TRY_AGAIN_LATER, "this project's sandbox closed here; reconnect")).await;
                return;
            }
        }
    }
}

const TOKEN_EXPIRED: &str = "token expired: reconnect with a new token";

/// A moment no connection lives to see, for a timer that is off.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// Ends a peer that cannot keep up: a 1013 close frame goes after what its socket already
/// holds, if the peer takes it within [`CLOSE_TIMEOUT`] (a frame whose send timed out is whole
/// in the socket's buffer, so a close frame can follow it).
async fn too_slow(tx: &mut Outbox, identity: &Identity) {
    info!(user_id = identity.user, "exec peer too slow; disconnecting it");
    let _ = tx.close(close_msg(close::TRY_AGAIN_LATER, "too slow: reconnect for a fresh copy")).await;
}

/// The sending half of a peer's socket, where every send has a deadline.
struct Outbox {
    sink: futures_util::stream::SplitSink<WebSocket, Message>,
    timeout: Duration,
}

impl Outbox {
    /// Sends one message; a peer that does not take it within the timeout fails the send.
    async fn send(&mut self, msg: &ServerMsg) -> Result<(), ()> {
        let text = serde_json::to_string(msg).map_err(|_| ())?;
        match tokio::time::timeout(self.timeout, self.sink.send(Message::Text(text.into()))).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Sends a ping; a peer whose socket does not take it within the timeout fails it.
    async fn ping(&mut self) -> Result<(), ()> {
        match tokio::time::timeout(self.timeout, self.sink.send(Message::Ping(Default::default()))).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Sends a close frame if the peer takes it soon; the socket is dropped after either way.
    async fn close(&mut self, frame: Message) -> Result<(), ()> {
        match tokio::time::timeout(CLOSE_TIMEOUT, self.sink.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }
}

fn close_msg(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}
