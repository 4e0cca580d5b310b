//! Frames a room sends, encoded per framing: y-websocket (one document per socket) or Hocuspocus
//! (every frame prefixed by the document's routing key).

use std::sync::Arc;

use bytes::Bytes;
use sync_core::room::Reply;
use sync_core::wire::{self, HocusOut, OutMsg};

use crate::close::CloseReason;

/// How a peer frames messages: y-websocket (one document per socket) or Hocuspocus (routing key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Framing {
    YWebsocket,
    Hocus { key: Arc<str> },
}

/// What one reply becomes on a peer's connection.
pub(super) enum ReplyFrame {
    Send(Bytes),
    Nothing,
    Kill(CloseReason),
}

pub(super) fn reply_frame(framing: &Framing, reply: &Reply) -> ReplyFrame {
    let msg = match reply {
        Reply::SyncStep1(sv) => OutMsg::SyncStep1(sv),
        Reply::SyncStep2(update) => OutMsg::SyncStep2(update),
        Reply::Awareness(update) => OutMsg::Awareness(update),
        Reply::Invalid(reason) => return ReplyFrame::Kill(CloseReason::malformed(reason)),
        Reply::WriteApplied | Reply::WriteRefused { .. } => return status_frame(framing, reply),
    };
    ReplyFrame::Send(encode(framing, msg))
}

/// Hocuspocus peers get a SyncStatus for every write; y-websocket peers hear only of refused
/// writes that held changes (auth permission-denied), as the y-protocols auth message defines.
fn status_frame(framing: &Framing, reply: &Reply) -> ReplyFrame {
    let applied = matches!(reply, Reply::WriteApplied | Reply::WriteRefused { had_changes: false });
    match framing {
        Framing::Hocus { key } => ReplyFrame::Send(Bytes::from(wire::encode_hocus(key, HocusOut::SyncStatus(applied)))),
        Framing::YWebsocket if !applied => ReplyFrame::Send(Bytes::from(wire::encode_ywebsocket_permission_denied(
            "read-only access: this token's role is viewer",
        ))),
        Framing::YWebsocket => ReplyFrame::Nothing,
    }
}

pub(super) fn encode(framing: &Framing, msg: OutMsg<'_>) -> Bytes {
    match framing {
        Framing::YWebsocket => Bytes::from(wire::encode_ywebsocket(msg)),
        Framing::Hocus { key } => Bytes::from(wire::encode_hocus(key, HocusOut::Doc(msg))),
    }
}
