//! A client that stops reading is disconnected (with 1013 where the close frame fits in its socket)
//! while everyone else keeps receiving every edit.

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
    let connected = server.metric("collab_connections_active");
    // One edit per round trip, so that each is its own batch and its own frame to every peer;
    // the reader gets every one of them while the sloth's queue fills.
    let chunk = "x".repeat(32 * 1024);
    let mut rounds = 0;
    for round in 1..=1000usize {
        writer.insert(0, &chunk);
        reader.wait_until("edit relayed", WAIT, |p| p.text().len() == round * chunk.len()).await.unwrap();
        rounds = round;
        if server.metric("collab_queue_overflows_total") >= 1.0 {
            break;
        }
    }
    assert_eq!(server.metric("collab_queue_overflows_total"), 1.0, "one queue overflowed, after {rounds} edits");
    // It was the sloth's: its connection is the one that went; writer and reader are still on.
    server.await_metric("collab_connections_active", |n| n == connected - 1.0).await;
    assert!(writer.status().connected && reader.status().connected, "a reading client was disconnected");
    writer.insert(0, "still going");
    let expected = writer.text();
    reader.wait_text(&expected, WAIT).await.expect("the fast reader keeps up");
    // The slow client, reading at last, gets what was in its socket and then the end of its
    // stream: a 1013 close frame when the server was between frames as it gave up (the close fit),
    // else an end without one (a half-written frame cannot be followed by a close).
    let mut frames = 0;
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(msg) = sloth.next().await {
            match msg {
                Ok(Message::Close(frame)) => return frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                Err(_) => return None,
                Ok(Message::Binary(_)) => frames += 1,
                Ok(_) => {}
            }
        }
        None
    })
    .await
    .expect("slow client's stream ends");
    // At least the 8 frames its queue held when it overflowed never reach it.
    assert!(frames < rounds, "the sloth got {frames} frames for {rounds} edits: it was not cut off");
    if let Some((code, reason)) = &ended {
        assert_eq!(*code, 1013, "closed with {ended:?}");
        assert!(reason.contains("too slow"), "closed with {ended:?}");
    }
    server.stop().await;
}
