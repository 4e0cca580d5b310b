//! Wire codecs: the y-websocket framing (`/sync/{doc}`) and the Hocuspocus framing (`/sync`).
//!
//! Both carry the same y-protocols sync and awareness messages. y-websocket sends one document
//! per socket and may pack several messages into one frame; Hocuspocus prefixes every frame with
//! the document's routing key so one socket multiplexes many documents, and adds auth, sync-status,
//! close and ping messages. Decoders never panic on hostile input: they return [`WireError`], and
//! update, state-vector and awareness payloads pass [`crate::untrusted`]'s checks before yrs sees them.

use yrs::StateVector;
use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;
use yrs::sync::AwarenessUpdate;
pub use yrs::sync::SyncMessage;
use yrs::sync::protocol::{MSG_SYNC_STEP_1, MSG_SYNC_STEP_2, MSG_SYNC_UPDATE};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

use crate::untrusted::{self, Untrusted};

/// y-protocols top-level message tags.
pub const MSG_SYNC: u64 = 0;
pub const MSG_AWARENESS: u64 = 1;
pub const MSG_AUTH: u64 = 2;
pub const MSG_QUERY_AWARENESS: u64 = 3;
/// Hocuspocus-only message tags.
pub const HOCUS_STATELESS: u64 = 5;
pub const HOCUS_CLOSE: u64 = 7;
pub const HOCUS_SYNC_STATUS: u64 = 8;
pub const HOCUS_PING: u8 = 9;
pub const HOCUS_PONG: u8 = 10;
/// Auth sub-message tags (y-protocols auth and Hocuspocus auth).
pub const AUTH_TOKEN: u64 = 0;
pub const AUTH_PERMISSION_DENIED_YWS: u64 = 0;
pub const AUTH_PERMISSION_DENIED_HOCUS: u64 = 1;
pub const AUTH_AUTHENTICATED_HOCUS: u64 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty frame")]
    Empty,
    #[error("truncated or malformed message: {0}")]
    Malformed(String),
    #[error("unsupported message type {0}")]
    UnsupportedType(u64),
    #[error("unsupported sync message type {0}")]
    UnsupportedSyncType(u64),
}

impl From<yrs::encoding::read::Error> for WireError {
    fn from(e: yrs::encoding::read::Error) -> Self {
        WireError::Malformed(e.to_string())
    }
}

/// One message about one document, as a client sends it, whatever the framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocMessage {
    /// A sync message as yrs's `sync` module defines it; update payloads stay encoded.
    Sync(SyncMessage),
    Awareness(AwarenessUpdate),
    QueryAwareness,
}

/// A frame received on the multiplexed (Hocuspocus) endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HocusIn {
    /// Application-level ping from the client: answer with a pong.
    Ping,
    /// Application-level pong, the answer to our ping.
    Pong,
    /// A message for the document behind routing key `key`.
    Doc { key: String, msg: HocusDocIn },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HocusDocIn {
    Message(DocMessage),
    /// The client's token for this document.
    Token(String),
    /// The client detaches from this document.
    Close,
    /// Hocuspocus "stateless" payloads are accepted and not relayed (we define no use for them).
    Stateless(String),
    /// A message the server has no use for (a client-sent sync status or a bare auth request).
    Ignored(u64),
}

/// A message the server sends about one document, before framing.
#[derive(Debug, Clone, Copy)]
pub enum OutMsg<'a> {
    SyncStep1(&'a StateVector),
    SyncStep2(&'a [u8]),
    Update(&'a [u8]),
    Awareness(&'a [u8]),
}

/// Hocuspocus-only messages the server sends.
#[derive(Debug, Clone, Copy)]
pub enum HocusOut<'a> {
    Doc(OutMsg<'a>),
    /// Authenticated with scope `read-write` (true) or `readonly` (false).
    Authenticated {
        read_write: bool,
    },
    PermissionDenied(&'a str),
    /// Whether the client's last update was applied.
    SyncStatus(bool),
    Close(&'a str),
}

impl From<Untrusted> for WireError {
    fn from(e: Untrusted) -> Self {
        WireError::Malformed(e.to_string())
    }
}

/// Update payloads stay encoded, but only once [`untrusted::check_update_v1`] has walked them:
/// whoever decodes them later gets nothing yrs would mishandle.
fn read_sync(cur: &mut Cursor<'_>) -> Result<SyncMessage, WireError> {
    let kind: u64 = cur.read_var()?;
    let payload = cur.read_buf()?;
    match kind {
        k if k == u64::from(MSG_SYNC_STEP_1) => Ok(SyncMessage::SyncStep1(untrusted::decode_state_vector(payload)?)),
        k if k == u64::from(MSG_SYNC_STEP_2) => {
            untrusted::check_update_v1(payload)?;
            Ok(SyncMessage::SyncStep2(payload.to_vec()))
        }
        k if k == u64::from(MSG_SYNC_UPDATE) => {
            untrusted::check_update_v1(payload)?;
            Ok(SyncMessage::Update(payload.to_vec()))
        }
        other => Err(WireError::UnsupportedSyncType(other)),
    }
}

fn read_awareness(cur: &mut Cursor<'_>) -> Result<AwarenessUpdate, WireError> {
    let payload = cur.read_buf()?;
    untrusted::check_awareness(payload)?;
    Ok(AwarenessUpdate::decode_v1(payload)?)
}

/// Reads the body of a sync, awareness or query-awareness message; `None` for any other tag.
fn read_doc_message(tag: u64, cur: &mut Cursor<'_>) -> Result<Option<DocMessage>, WireError> {
    Ok(Some(match tag {
        MSG_SYNC => DocMessage::Sync(read_sync(cur)?),
        MSG_AWARENESS => DocMessage::Awareness(read_awareness(cur)?),
        MSG_QUERY_AWARENESS => DocMessage::QueryAwareness,
        _ => return Ok(None),
    }))
}

/// A multiplexed frame split into its routing key, its message tag and the rest, or one of the
/// bare control frames.
enum HocusFrame<'a> {
    Ping,
    Pong,
    Doc { key: String, tag: u64, cur: Cursor<'a> },
}

fn split_hocus(frame: &[u8]) -> Result<HocusFrame<'_>, WireError> {
    match frame {
        [] => Err(WireError::Empty),
        [HOCUS_PING] => Ok(HocusFrame::Ping),
        [HOCUS_PONG] => Ok(HocusFrame::Pong),
        _ => {
            let mut cur = Cursor::new(frame);
            let key = cur.read_string()?.to_owned();
            let tag: u64 = cur.read_var()?;
            Ok(HocusFrame::Doc { key, tag, cur })
        }
    }
}

/// Decodes one y-websocket frame, which may hold several messages back to back.
///
/// Auth messages from a client carry nothing the server needs (the token travels in the URL)
/// and are skipped; any other unknown tag is an error, so garbage is never half-applied.
pub fn decode_ywebsocket(frame: &[u8]) -> Result<Vec<DocMessage>, WireError> {
    if frame.is_empty() {
        return Err(WireError::Empty);
    }
    let mut cur = Cursor::new(frame);
    let mut out = Vec::with_capacity(1);
    while cur.has_content() {
        let tag: u64 = cur.read_var()?;
        if let Some(msg) = read_doc_message(tag, &mut cur)? {
            out.push(msg);
        } else if tag == MSG_AUTH {
            let sub: u64 = cur.read_var()?;
            if sub == AUTH_PERMISSION_DENIED_YWS {
                cur.read_string()?;
            }
        } else {
            return Err(WireError::UnsupportedType(tag));
        }
    }
    Ok(out)
}

/// Decodes one frame of the multiplexed endpoint.
pub fn decode_hocus(frame: &[u8]) -> Result<HocusIn, WireError> {
    let (key, tag, mut cur) = match split_hocus(frame)? {
        HocusFrame::Ping => return Ok(HocusIn::Ping),
        HocusFrame::Pong => return Ok(HocusIn::Pong),
        HocusFrame::Doc { key, tag, cur } => (key, tag, cur),
    };
    if let Some(msg) = read_doc_message(tag, &mut cur)? {
        return Ok(HocusIn::Doc { key, msg: HocusDocIn::Message(msg) });
    }
    let msg = match tag {
        MSG_AUTH => {
            let sub: u64 = cur.read_var()?;
            if sub == AUTH_TOKEN {
                // The provider appends its version string after the token; it is optional.
                HocusDocIn::Token(cur.read_string()?.to_owned())
            } else {
                HocusDocIn::Ignored(MSG_AUTH)
            }
        }
        HOCUS_STATELESS => HocusDocIn::Stateless(cur.read_string()?.to_owned()),
        HOCUS_CLOSE => HocusDocIn::Close,
        HOCUS_SYNC_STATUS => HocusDocIn::Ignored(HOCUS_SYNC_STATUS),
        other => return Err(WireError::UnsupportedType(other)),
    };
    Ok(HocusIn::Doc { key, msg })
}

fn write_out(buf: &mut Vec<u8>, msg: OutMsg<'_>) {
    match msg {
        OutMsg::SyncStep1(sv) => {
            buf.write_var(MSG_SYNC);
            buf.write_var(MSG_SYNC_STEP_1);
            buf.write_buf(sv.encode_v1());
        }
        OutMsg::SyncStep2(update) => {
            buf.write_var(MSG_SYNC);
            buf.write_var(MSG_SYNC_STEP_2);
            buf.write_buf(update);
        }
        OutMsg::Update(update) => {
            buf.write_var(MSG_SYNC);
            buf.write_var(MSG_SYNC_UPDATE);
            buf.write_buf(update);
        }
        OutMsg::Awareness(update) => {
            buf.write_var(MSG_AWARENESS);
            buf.write_buf(update);
        }
    }
}

/// Encodes a message for a y-websocket peer.
pub fn encode_ywebsocket(msg: OutMsg<'_>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(payload_len(msg) + 8);
    write_out(&mut buf, msg);
    buf
}

/// Encodes a y-protocols auth permission-denied message for a y-websocket peer.
pub fn encode_ywebsocket_permission_denied(reason: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(reason.len() + 4);
    buf.write_var(MSG_AUTH);
    buf.write_var(AUTH_PERMISSION_DENIED_YWS);
    buf.write_string(reason);
    buf
}

/// Encodes a message for the Hocuspocus peer that reached this document by routing key `key`.
pub fn encode_hocus(key: &str, msg: HocusOut<'_>) -> Vec<u8> {
    let extra = match msg {
        HocusOut::Doc(m) => payload_len(m),
        _ => 16,
    };
    let mut buf = Vec::with_capacity(key.len() + extra + 8);
    buf.write_string(key);
    match msg {
        HocusOut::Doc(m) => write_out(&mut buf, m),
        HocusOut::Authenticated { read_write } => {
            buf.write_var(MSG_AUTH);
            buf.write_var(AUTH_AUTHENTICATED_HOCUS);
            buf.write_string(if read_write { "read-write" } else { "readonly" });
        }
        HocusOut::PermissionDenied(reason) => {
            buf.write_var(MSG_AUTH);
            buf.write_var(AUTH_PERMISSION_DENIED_HOCUS);
            buf.write_string(reason);
        }
        HocusOut::SyncStatus(applied) => {
            buf.write_var(HOCUS_SYNC_STATUS);
            buf.write_var(u64::from(applied));
        }
        HocusOut::Close(reason) => {
            buf.write_var(HOCUS_CLOSE);
            buf.write_string(reason);
        }
    }
    buf
}

/// The application-level ping frame of the Hocuspocus framing.
pub fn hocus_ping() -> Vec<u8> {
    vec![HOCUS_PING]
}

/// The application-level pong frame of the Hocuspocus framing.
pub fn hocus_pong() -> Vec<u8> {
    vec![HOCUS_PONG]
}

/// A message a client receives about one document, whatever the framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIn {
    Message(DocMessage),
    PermissionDenied(String),
    /// Hocuspocus: authenticated with this scope (`read-write` or `readonly`).
    Authenticated(String),
    /// Hocuspocus: whether the client's last update was applied.
    SyncStatus(bool),
    /// Hocuspocus: the server closed this document for the client.
    Close(String),
}

/// Decodes a y-websocket frame as a client receives it.
pub fn decode_ywebsocket_client(frame: &[u8]) -> Result<Vec<ClientIn>, WireError> {
    if frame.is_empty() {
        return Err(WireError::Empty);
    }
    let mut cur = Cursor::new(frame);
    let mut out = Vec::with_capacity(1);
    while cur.has_content() {
        let tag: u64 = cur.read_var()?;
        if let Some(msg) = read_doc_message(tag, &mut cur)? {
            out.push(ClientIn::Message(msg));
        } else if tag == MSG_AUTH {
            if cur.read_var::<u64>()? == AUTH_PERMISSION_DENIED_YWS {
                out.push(ClientIn::PermissionDenied(cur.read_string()?.to_owned()));
            }
        } else {
            return Err(WireError::UnsupportedType(tag));
        }
    }
    Ok(out)
}

/// A frame a client receives on the multiplexed endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HocusClientIn {
    Ping,
    Pong,
    Doc { key: String, msg: ClientIn },
}

/// Decodes a multiplexed frame as a client receives it.
pub fn decode_hocus_client(frame: &[u8]) -> Result<HocusClientIn, WireError> {
    let (key, tag, mut cur) = match split_hocus(frame)? {
        HocusFrame::Ping => return Ok(HocusClientIn::Ping),
        HocusFrame::Pong => return Ok(HocusClientIn::Pong),
        HocusFrame::Doc { key, tag, cur } => (key, tag, cur),
    };
    if let Some(msg) = read_doc_message(tag, &mut cur)? {
        return Ok(HocusClientIn::Doc { key, msg: ClientIn::Message(msg) });
    }
    let msg = match tag {
        MSG_AUTH => match cur.read_var::<u64>()? {
            AUTH_PERMISSION_DENIED_HOCUS => ClientIn::PermissionDenied(cur.read_string()?.to_owned()),
            AUTH_AUTHENTICATED_HOCUS => ClientIn::Authenticated(cur.read_string()?.to_owned()),
            other => return Err(WireError::Malformed(format!("unknown auth message {other}"))),
        },
        HOCUS_SYNC_STATUS => ClientIn::SyncStatus(cur.read_var::<u64>()? == 1),
        HOCUS_CLOSE => ClientIn::Close(cur.read_string()?.to_owned()),
        other => return Err(WireError::UnsupportedType(other)),
    };
    Ok(HocusClientIn::Doc { key, msg })
}

/// Encodes a client's document message on the multiplexed endpoint.
pub fn encode_hocus_client(key: &str, msg: OutMsg<'_>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(key.len() + payload_len(msg) + 8);
    buf.write_string(key);
    write_out(&mut buf, msg);
    buf
}

/// Encodes a client's token for one document on the multiplexed endpoint.
pub fn encode_hocus_token(key: &str, token: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(key.len() + token.len() + 8);
    buf.write_string(key);
    buf.write_var(MSG_AUTH);
    buf.write_var(AUTH_TOKEN);
    buf.write_string(token);
    buf
}

/// Encodes a client's request to detach from one document on the multiplexed endpoint.
pub fn encode_hocus_close(key: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(key.len() + 4);
    buf.write_string(key);
    buf.write_var(HOCUS_CLOSE);
    buf
}

/// The part of a Hocuspocus routing key that names the document: providers with
/// `sessionAwareness` send `documentName\0sessionId`.
pub fn doc_name_of_key(key: &str) -> &str {
    key.split_once('\0').map_or(key, |(name, _)| name)
}

fn payload_len(msg: OutMsg<'_>) -> usize {
    match msg {
        OutMsg::SyncStep1(_) => 64,
        OutMsg::SyncStep2(b) | OutMsg::Update(b) | OutMsg::Awareness(b) => b.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::sync::Awareness;
    use yrs::{Doc, GetString, Text, Transact};

    fn sample_update() -> Vec<u8> {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("content");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, "hello");
        txn.encode_update_v1()
    }

    #[test]
    fn ywebsocket_round_trip_with_several_messages_per_frame() {
        let update = sample_update();
        let mut frame = encode_ywebsocket(OutMsg::Update(&update));
        frame.extend(encode_ywebsocket(OutMsg::SyncStep1(&StateVector::default())));
        frame.push(MSG_QUERY_AWARENESS as u8);
        let msgs = decode_ywebsocket(&frame).unwrap();
        assert_eq!(
            msgs,
            vec![
                DocMessage::Sync(SyncMessage::Update(update.clone())),
                DocMessage::Sync(SyncMessage::SyncStep1(StateVector::default())),
                DocMessage::QueryAwareness,
            ]
        );
        let doc = Doc::new();
        let DocMessage::Sync(SyncMessage::Update(u)) = &msgs[0] else { unreachable!() };
        doc.transact_mut().apply_update(yrs::Update::decode_v1(u).unwrap()).unwrap();
        assert_eq!(doc.get_or_insert_text("content").get_string(&doc.transact()), "hello");
    }

    #[test]
    fn truncated_and_garbage_frames_are_errors() {
        let update = sample_update();
        let frame = encode_ywebsocket(OutMsg::Update(&update));
        for cut in 1..frame.len() {
            assert!(decode_ywebsocket(&frame[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(decode_ywebsocket(&[]), Err(WireError::Empty));
        assert_eq!(decode_ywebsocket(&[42, 0]), Err(WireError::UnsupportedType(42)));
        assert_eq!(decode_ywebsocket(&[0, 7, 0]), Err(WireError::UnsupportedSyncType(7)));
        assert!(decode_ywebsocket(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn hocus_round_trip() {
        let update = sample_update();
        let frame = encode_hocus("p/doc", HocusOut::Doc(OutMsg::Update(&update)));
        assert_eq!(
            decode_hocus(&frame).unwrap(),
            HocusIn::Doc {
                key: "p/doc".into(),
                msg: HocusDocIn::Message(DocMessage::Sync(SyncMessage::Update(update)))
            }
        );
        // An auth token message exactly as @hocuspocus/provider 4 writes it: token then version.
        let mut auth = Vec::new();
        auth.write_string("p/doc");
        auth.write_var(MSG_AUTH);
        auth.write_var(AUTH_TOKEN);
        auth.write_string("tok");
        auth.write_string("4.8.0");
        assert_eq!(
            decode_hocus(&auth).unwrap(),
            HocusIn::Doc { key: "p/doc".into(), msg: HocusDocIn::Token("tok".into()) }
        );
        assert_eq!(decode_hocus(&[HOCUS_PING]).unwrap(), HocusIn::Ping);
        assert_eq!(decode_hocus(&[HOCUS_PONG]).unwrap(), HocusIn::Pong);
        assert!(decode_hocus(&[5, b'a']).is_err());
    }

    #[test]
    fn hocus_auth_replies_match_the_provider() {
        let ok = encode_hocus("d", HocusOut::Authenticated { read_write: false });
        assert_eq!(ok, [&[1u8, b'd', 2, 2, 8][..], b"readonly"].concat());
        let status = encode_hocus("d", HocusOut::SyncStatus(true));
        assert_eq!(status, vec![1, b'd', 8, 1]);
        assert_eq!(doc_name_of_key("p/x\0session"), "p/x");
        assert_eq!(doc_name_of_key("p/x"), "p/x");
    }

    #[test]
    fn awareness_round_trip() {
        let mut aw = Awareness::new(Doc::new());
        aw.set_local_state_raw(r#"{"user":{"name":"Ada"}}"#);
        let update = aw.update().unwrap().encode_v1();
        let frame = encode_ywebsocket(OutMsg::Awareness(&update));
        let msgs = decode_ywebsocket(&frame).unwrap();
        let [DocMessage::Awareness(got)] = msgs.as_slice() else { panic!("{msgs:?}") };
        assert_eq!(got.encode_v1(), update);
    }
}
