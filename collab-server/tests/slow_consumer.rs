//! A client that stops reading is disconnected with 1013 while everyone else carries on.

mod common;

use common::{TestServer, WAIT};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_disconnected_and_the_room_keeps_going() {
    let server = TestServer::start_with(|c| {
        c.limits.outbound_queue = 8;
        c.limits.rate_messages = 0;
        c.limits.rate_bytes = 0;
    })
    .await;
    let doc = "slow/doc";
    let url = format!("{}/sync/{doc}?token={}", server.url, server.editor("slow", "sloth"));
    // Connects with a tiny receive buffer, then never reads: the socket fills, then the
    // server-side queue.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.url.trim_start_matches("ws://").parse().unwrap()).await.unwrap();
    let (mut sloth, _) = tokio_tungstenite::client_async(url, tcp).await.expect("connect");
    let writer = server.connect(doc, "writer").await;
    let reader = server.connect(doc, "reader").await;
    // One edit per round trip, so that each is its own batch and its own frame to every peer.
    let chunk = "x".repeat(32 * 1024);
    for round in 1..=1000usize {
        writer.insert(0, &chunk);
        reader.wait_until("edit relayed", WAIT, |p| p.text().len() == round * chunk.len()).await.unwrap();
        if server.metric("collab_queue_overflows_total") >= 1.0 {
            break;
        }
    }
    server.eventually("slow client disconnected", |s| s.metric("collab_queue_overflows_total") >= 1.0).await;
    writer.insert(0, "still going");
    let expected = writer.text();
    reader.wait_text(&expected, WAIT).await.expect("the fast reader keeps up");
    // The slow client, reading at last, finds its stream ended (1013 if the close frame fit).
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(msg) = sloth.next().await {
            match msg {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Err(_) => return None,
                Ok(_) => {}
            }
        }
        None
    })
    .await
    .expect("slow client's stream ends");
    assert!(matches!(ended, None | Some(1013)), "closed with {ended:?}");
    server.stop().await;
}
