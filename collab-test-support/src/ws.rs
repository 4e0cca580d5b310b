//! Raw WebSocket clients for hostile-input tests: a plain tungstenite socket and reading it to
//! the server's close frame.

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::WAIT;

/// A plain tungstenite client socket, as a test that speaks the wire by hand holds it.
pub type RawSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads until the server's close frame and returns its code; `None` when the stream ended
/// without one. Panics if the server has not closed within [`WAIT`].
pub async fn close_code(socket: &mut RawSocket) -> Option<u16> {
    let read = async {
        while let Some(msg) = socket.next().await {
            match msg {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    };
    tokio::time::timeout(WAIT, read).await.expect("the server closes the socket in time")
}
