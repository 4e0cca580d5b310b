//! One exec peer's socket: JSON messages in, the session's events out, every send with a
//! deadline; a peer that falls behind is disconnected and never holds back the others.

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
use crate::auth::Identity;

/// How long a close frame may take to leave before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one exec peer until it leaves, is too slow, or the server shuts down.
pub async fn serve_peer(socket: WebSocket, hub: Arc<ExecHub>, identity: Identity, shutdown: CancellationToken) {
    let (tx, mut rx) = socket.split();
    let mut tx = Outbox { sink: tx, timeout: hub.send_timeout };
    let (session, _guard) = match hub.join(&identity.project).await {
        Ok(joined) => joined,
        Err(e) => {
            let _ = tx.send(&ServerMsg::Error { message: e.to_string() }).await;
            let code = if matches!(e, ExecError::Disabled) { 1011 } else { 1013 };
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
    loop {
        tokio::select! {
            frame = rx.next() => {
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
                    return;
                }
            }
            event = events.recv() => match event {
                Ok(msg) => {
                    if tx.send(&msg).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    info!(user_id = identity.user, "exec peer too slow; disconnecting it");
                    let _ = tx.close(close_msg(1013, "too slow: reconnect for a fresh copy")).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = shutdown.cancelled() => {
                let _ = tx.close(close_msg(1001, "server shutting down")).await;
                return;
            }
            _ = session_closed.cancelled() => {
                let _ = tx.close(close_msg(1013, "this project's sandbox closed here; reconnect")).await;
                return;
            }
        }
    }
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
