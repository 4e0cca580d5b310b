//! Checks for the two wire framings: decoders never panic, and what decodes re-encodes to the same messages.

use sync_core::wire::{
    self, ClientIn, DocMessage, HocusClientIn, HocusDocIn, HocusIn, HocusOut, MSG_QUERY_AWARENESS, OutMsg, SyncMessage,
};
use yrs::encoding::write::Write;
use yrs::updates::encoder::Encode;

/// Encodes one document message with the crate's own encoders, framed by `frame`.
fn encode_doc_message(msg: &DocMessage, frame: impl Fn(OutMsg<'_>) -> Vec<u8>, query: impl Fn() -> Vec<u8>) -> Vec<u8> {
    match msg {
        DocMessage::Sync(SyncMessage::SyncStep1(sv)) => frame(OutMsg::SyncStep1(sv)),
        DocMessage::Sync(SyncMessage::SyncStep2(update)) => frame(OutMsg::SyncStep2(update)),
        DocMessage::Sync(SyncMessage::Update(update)) => frame(OutMsg::Update(update)),
        DocMessage::Awareness(update) => frame(OutMsg::Awareness(&update.encode_v1())),
        DocMessage::QueryAwareness => query(),
    }
}

fn encode_yws_message(msg: &DocMessage) -> Vec<u8> {
    encode_doc_message(msg, wire::encode_ywebsocket, || vec![MSG_QUERY_AWARENESS as u8])
}

/// `decode_ywebsocket` and `decode_ywebsocket_client` on one arbitrary frame.
///
/// Properties: neither panics; both accept exactly the same frames; the server's messages are the
/// client's without the permission-denied ones; re-encoding what was decoded and decoding it again
/// gives the same messages.
pub fn wire_ywebsocket(frame: &[u8]) {
    let server = wire::decode_ywebsocket(frame);
    let client = wire::decode_ywebsocket_client(frame);
    assert_eq!(server.is_ok(), client.is_ok(), "the server and client decoders disagree: {server:?} / {client:?}");
    let (Ok(server), Ok(client)) = (server, client) else {
        return;
    };
    let client_docs: Vec<&DocMessage> = client
        .iter()
        .filter_map(|m| match m {
            ClientIn::Message(m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(server.iter().collect::<Vec<_>>(), client_docs);

    if !server.is_empty() {
        let again: Vec<u8> = server.iter().flat_map(encode_yws_message).collect();
        assert_eq!(wire::decode_ywebsocket(&again).as_ref(), Ok(&server), "server messages do not round-trip");
    }
    if !client.is_empty() {
        let again: Vec<u8> = client
            .iter()
            .flat_map(|m| match m {
                ClientIn::Message(m) => encode_yws_message(m),
                ClientIn::PermissionDenied(reason) => wire::encode_ywebsocket_permission_denied(reason),
                other => panic!("a y-websocket frame decoded to a Hocuspocus-only message {other:?}"),
            })
            .collect();
        assert_eq!(wire::decode_ywebsocket_client(&again).as_ref(), Ok(&client), "client messages do not round-trip");
    }
}

fn hocus_query_awareness(key: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.write_string(key);
    buf.write_var(MSG_QUERY_AWARENESS);
    buf
}

/// `decode_hocus` and `decode_hocus_client` on one arbitrary frame.
///
/// Properties: neither panics; every decoded frame the crate has an encoder for re-encodes to
/// bytes that decode to the same frame.
pub fn wire_hocus(frame: &[u8]) {
    if let Ok(decoded) = wire::decode_hocus(frame) {
        let again = match &decoded {
            HocusIn::Ping => Some(wire::hocus_ping()),
            HocusIn::Pong => Some(wire::hocus_pong()),
            HocusIn::Doc { key, msg } => match msg {
                HocusDocIn::Message(m) => Some(encode_doc_message(
                    m,
                    |out| wire::encode_hocus_client(key, out),
                    || hocus_query_awareness(key),
                )),
                HocusDocIn::Token(token) => Some(wire::encode_hocus_token(key, token)),
                HocusDocIn::Close => Some(wire::encode_hocus_close(key)),
                HocusDocIn::Stateless(_) | HocusDocIn::Ignored(_) => None,
            },
        };
        if let Some(again) = again {
            assert_eq!(wire::decode_hocus(&again).as_ref(), Ok(&decoded), "server-side frame does not round-trip");
        }
    }
    if let Ok(decoded) = wire::decode_hocus_client(frame) {
        let again = match &decoded {
            HocusClientIn::Ping => Some(wire::hocus_ping()),
            HocusClientIn::Pong => Some(wire::hocus_pong()),
            HocusClientIn::Doc { key, msg } => match msg {
                ClientIn::Message(m) => Some(encode_doc_message(
                    m,
                    |out| wire::encode_hocus(key, HocusOut::Doc(out)),
                    || hocus_query_awareness(key),
                )),
                ClientIn::PermissionDenied(reason) => Some(wire::encode_hocus(key, HocusOut::PermissionDenied(reason))),
                ClientIn::Authenticated(scope) => match scope.as_str() {
                    "read-write" => Some(wire::encode_hocus(key, HocusOut::Authenticated { read_write: true })),
                    "readonly" => Some(wire::encode_hocus(key, HocusOut::Authenticated { read_write: false })),
                    _ => None,
                },
                ClientIn::SyncStatus(applied) => Some(wire::encode_hocus(key, HocusOut::SyncStatus(*applied))),
                ClientIn::Close(reason) => Some(wire::encode_hocus(key, HocusOut::Close(reason))),
            },
        };
        if let Some(again) = again {
            assert_eq!(
                wire::decode_hocus_client(&again).as_ref(),
                Ok(&decoded),
                "client-side frame does not round-trip"
            );
        }
    }
}
