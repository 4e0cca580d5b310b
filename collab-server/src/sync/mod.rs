//! The sync layer: connections and their outbound sinks, the rooms that own loaded documents,
//! the group committer and the cluster bus.

pub mod bus;
pub mod commit;
pub mod conn;
pub mod rooms;
pub mod sink;
