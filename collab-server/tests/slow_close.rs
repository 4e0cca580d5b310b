//! A slow consumer's close is observed: when the server gives up on a client whose socket is
//! full, the 1013 close frame still goes out after what the socket holds, if the client takes
//! it before the close deadline. Here the client pauses reading until the server has given up,
//! then reads on: it must see the close frame, not only the end of the stream.

mod common;

use common::{TestServer, WAIT};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_the_1013_close_frame() {
    let server = TestServer::start_with(|c| {
        c.limits.outbound_queue = 8;
        c.limits.rate_messages = 0;
        c.limits.rate_bytes = 0;
    })
    .await;
    let doc = "slowclose/doc";
    let url = format!("{}/sync/{doc}?token={}", server.url, server.editor("slowclose", "sloth"));
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("buffer size");
    let tcp = socket.connect(server.http_addr().parse().expect("address")).await.expect("connect");
    let (mut sloth, _) = tokio_tungstenite::client_async(url, tcp).await.expect("upgrade");
    let writer = server.connect(doc, "writer").await;
    let reader = server.connect(doc, "reader").await;
    let chunk = "x".repeat(32 * 1024);
    for round in 1..=1000usize {
        writer.insert(0, &chunk);
        reader.wait_until("edit relayed", WAIT, |p| p.text().len() == round * chunk.len()).await.expect("relayed");
        if server.metric("collab_queue_overflows_total") >= 1.0 {
            break;
        }
    }
    assert_eq!(server.metric("collab_queue_overflows_total"), 1.0, "the sloth's queue overflowed");
    // The server gave up on the sloth; it reads on now, well within the close deadline.
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(msg) = sloth.next().await {
            match msg {
                Ok(Message::Close(frame)) => return frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                Err(e) => panic!("the stream ended without a close frame: {e}"),
                Ok(_) => {}
            }
        }
        None
    })
    .await
    .expect("the sloth's stream ends");
    let (code, reason) = ended.expect("a close frame with a code");
    assert_eq!(code, 1013, "{reason}");
    assert!(reason.contains("too slow"), "{reason}");
    server.stop().await;
}
