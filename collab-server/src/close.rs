//! WebSocket close codes and reasons the server uses, in one place.
//!
//! Codes in 4400-4499 are avoided on purpose: y-websocket treats them as permanent and stops
//! reconnecting, while every close below is one a client should recover from by reconnecting,
//! except a refused token, which never reaches a WebSocket (401 at the upgrade).

/// A close code and a reason safe to show to a client (no internal error text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: String,
}

pub const NORMAL: u16 = 1000;
pub const GOING_AWAY: u16 = 1001;
pub const UNSUPPORTED_DATA: u16 = 1003;
pub const INVALID_PAYLOAD: u16 = 1007;
pub const POLICY_VIOLATION: u16 = 1008;
pub const MESSAGE_TOO_BIG: u16 = 1009;
pub const INTERNAL_ERROR: u16 = 1011;
pub const TRY_AGAIN_LATER: u16 = 1013;

impl CloseReason {
    pub fn new(code: u16, reason: impl Into<String>) -> CloseReason {
        let mut reason = reason.into();
        // A close frame's reason must fit in 123 bytes.
        if reason.len() > 120 {
            let mut cut = 120;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        CloseReason { code, reason }
    }

    pub fn too_slow() -> CloseReason {
        CloseReason::new(TRY_AGAIN_LATER, "outbound queue full: client too slow, reconnect to resync")
    }

    pub fn malformed(detail: impl std::fmt::Display) -> CloseReason {
        CloseReason::new(INVALID_PAYLOAD, format!("malformed message: {detail}"))
    }

    pub fn shutdown() -> CloseReason {
        CloseReason::new(GOING_AWAY, "server shutting down")
    }
}
