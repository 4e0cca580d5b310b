//! A peer of the exec channel for tests: a raw WebSocket that records every message it gets.

use std::time::Duration;

use exec_bridge::protocol::{ClientMsg, ServerMsg};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::WAIT;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A peer of the exec channel that records everything it receives.
pub struct ExecPeer {
    pub socket: Socket,
    pub seen: Vec<ServerMsg>,
    /// Terminal output bytes dropped by [`ExecPeer::forget_output`].
    pub forgotten: usize,
}

impl ExecPeer {
    /// Connects to `server` (`ws://host:port`) and waits for the hello.
    pub async fn connect(server: &str, project: &str, token: &str) -> ExecPeer {
        let url = format!("{server}/exec/{project}?token={token}");
        let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("exec socket opens");
        let mut peer = ExecPeer { socket, seen: Vec::new(), forgotten: 0 };
        peer.until("the hello", |m| matches!(m, ServerMsg::Hello { .. })).await;
        peer
    }

    pub async fn send(&mut self, msg: &ClientMsg) {
        let text = serde_json::to_string(msg).expect("serialize");
        self.socket.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.socket.send(msg).await.expect("send");
    }

    /// Receives until a message satisfies `pred`; returns it.
    pub async fn until(&mut self, what: &str, pred: impl Fn(&ServerMsg) -> bool) -> ServerMsg {
        if let Some(found) = self.seen.iter().find(|m| pred(m)) {
            return found.clone();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {:?}", self.summary()));
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("socket ended waiting for {what}: {other:?}"),
            };
            let msg: ServerMsg = serde_json::from_str(&text).expect("server messages parse");
            self.seen.push(msg.clone());
            if pred(&msg) {
                return msg;
            }
        }
    }

    /// Everything a terminal printed so far (hello scrollback and live output).
    pub fn term_text(&self, term: u64) -> String {
        let mut bytes = Vec::new();
        for msg in &self.seen {
            match msg {
                ServerMsg::Hello { terms, .. } => {
                    for t in terms.iter().filter(|t| t.term == term) {
                        bytes.extend_from_slice(&t.scrollback.0);
                    }
                }
                ServerMsg::TermOutput { term: t, data } if *t == term => bytes.extend_from_slice(&data.0),
                _ => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Everything a run printed so far (both streams).
    pub fn run_text(&self, run: u64) -> String {
        let mut bytes = Vec::new();
        for msg in &self.seen {
            match msg {
                ServerMsg::Hello { runs, .. } => {
                    for r in runs.iter().filter(|r| r.run == run) {
                        r.history.iter().for_each(|c| bytes.extend_from_slice(&c.data.0));
                    }
                }
                ServerMsg::RunOutput { run: r, data, .. } if *r == run => bytes.extend_from_slice(&data.0),
                _ => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Bytes a terminal printed so far, counting output already forgotten.
    pub fn term_bytes(&self, term: u64) -> usize {
        self.forgotten + self.term_text(term).len()
    }

    /// Drops the terminal output seen so far (keeping its count), so a flood costs no memory.
    pub fn forget_output(&mut self) {
        let mut forgotten = 0;
        self.seen.retain(|m| match m {
            ServerMsg::TermOutput { data, .. } => {
                forgotten += data.0.len();
                false
            }
            _ => true,
        });
        self.forgotten += forgotten;
    }

    pub async fn until_term_text(&mut self, term: u64, needle: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.term_text(term).contains(needle) {
            assert!(tokio::time::Instant::now() < deadline, "no {needle:?} in terminal: {:?}", self.term_text(term));
            let _ = tokio::time::timeout(Duration::from_millis(200), self.until("output", |_| false)).await;
        }
    }

    pub async fn until_error(&mut self, containing: &str) -> String {
        let msg = self
            .until(
                &format!("an error about {containing:?}"),
                |m| matches!(m, ServerMsg::Error { message } if message.contains(containing)),
            )
            .await;
        match msg {
            ServerMsg::Error { message } => message,
            _ => unreachable!(),
        }
    }

    pub fn summary(&self) -> Vec<String> {
        self.seen.iter().rev().take(8).map(|m| format!("{m:?}").chars().take(200).collect()).collect()
    }
}
