//! What one incoming message costs the server, in units of the per-connection throttle.
//!
//! A frame can carry any number of messages (an 8 MiB frame holds millions), so the throttle
//! counts messages, not frames, and weighs each by the work it asks for: an update or an awareness
//! change costs one unit; a sync step 1 asks for a diff of the whole document, and a query asks for
//! every awareness state, so each costs as many units as a burst of ordinary messages. An honest
//! client sends one step 1 per connection and as many updates as its user types or pastes; a
//! hostile one that repeats the expensive messages meets the limit after a few of them.

use crate::wire::{DocMessage, SyncMessage};

/// Units a sync step 1 costs: it is answered with everything the sender lacks.
pub const STEP1_UNITS: u32 = 256;
/// Units an awareness query costs: it is answered with every client's state.
pub const QUERY_UNITS: u32 = 64;

/// The throttle units `msg` costs.
pub fn units(msg: &DocMessage) -> u32 {
    match msg {
        DocMessage::Sync(SyncMessage::SyncStep1(_)) => STEP1_UNITS,
        DocMessage::QueryAwareness => QUERY_UNITS,
        DocMessage::Sync(_) | DocMessage::Awareness(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::StateVector;

    #[test]
    fn requests_for_the_whole_document_cost_more_than_edits() {
        assert_eq!(units(&DocMessage::Sync(SyncMessage::Update(vec![0, 0]))), 1);
        assert_eq!(units(&DocMessage::Sync(SyncMessage::SyncStep2(vec![0, 0]))), 1);
        assert_eq!(units(&DocMessage::Sync(SyncMessage::SyncStep1(StateVector::default()))), STEP1_UNITS);
        assert_eq!(units(&DocMessage::QueryAwareness), QUERY_UNITS);
    }
}
