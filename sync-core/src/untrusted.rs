//! Checks on untrusted yrs payloads (v1 updates, state vectors, awareness updates) before yrs decodes them.
//!
//! yrs's decoders trust the counts and client ids they read: a few bytes can declare billions of
//! entries (one allocation sized by the claim), nest `Any` values deep enough to overflow the
//! stack, or carry a client id wider than the 53 bits Yjs allows (a `debug_assert!` in yrs, a
//! silently aliased id in release); and a few well-formed shapes break yrs later (see
//! [`check_update_v1`]). These checks walk the same formats, bound every count by the bytes left,
//! and reject what yrs would mishandle, so [`crate::wire`]'s decoders return errors instead. Most
//! cases were found by the fuzz targets in `fuzz/` (see `fuzz/RESULTS.md`).

use std::collections::HashSet;

use yrs::encoding::read::{Cursor, Read};
use yrs::updates::decoder::Decode;
use yrs::{StateVector, Update};

/// Yjs client ids are JavaScript integers: at most 53 bits.
pub const MAX_CLIENT_ID: u64 = (1 << 53) - 1;
/// Deepest nesting of `Any` arrays and maps accepted in an update.
pub const MAX_ANY_DEPTH: usize = 64;

/// Why an untrusted payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("truncated or malformed payload")]
    Malformed,
    #[error("client id {0} is wider than 53 bits")]
    ClientId(u64),
    #[error("a count of {0} is larger than the payload could hold")]
    Count(u64),
    #[error("values nested deeper than {MAX_ANY_DEPTH} levels")]
    TooDeep,
    #[error("unsupported content or type tag {0}")]
    Tag(u8),
    #[error("a client's clock overflows")]
    ClockOverflow,
    #[error("client {0} has two runs of blocks")]
    DuplicateClient(u64),
}

impl From<yrs::encoding::read::Error> for Untrusted {
    fn from(_: yrs::encoding::read::Error) -> Self {
        Untrusted::Malformed
    }
}

struct Walker<'a> {
    cur: Cursor<'a>,
}

impl<'a> Walker<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Walker { cur: Cursor::new(bytes) }
    }

    fn remaining(&self) -> usize {
        self.cur.buf.len() - self.cur.next
    }

    /// A count of items that each take at least `min_bytes` bytes.
    fn count(&mut self, min_bytes: usize) -> Result<usize, Untrusted> {
        let n: u64 = self.cur.read_var()?;
        match usize::try_from(n) {
            Ok(c) if c.saturating_mul(min_bytes) <= self.remaining() => Ok(c),
            _ => Err(Untrusted::Count(n)),
        }
    }

    fn u32(&mut self) -> Result<u32, Untrusted> {
        Ok(self.cur.read_var::<u32>()?)
    }

    fn client(&mut self) -> Result<u64, Untrusted> {
        let client: u64 = self.cur.read_var()?;
        if client > MAX_CLIENT_ID { Err(Untrusted::ClientId(client)) } else { Ok(client) }
    }

    fn id(&mut self) -> Result<(), Untrusted> {
        self.client()?;
        self.u32()?;
        Ok(())
    }

    fn string(&mut self) -> Result<(), Untrusted> {
        self.cur.read_string()?;
        Ok(())
    }

    /// A string, measured in UTF-16 code units as yrs counts text.
    fn text(&mut self) -> Result<u64, Untrusted> {
        Ok(self.cur.read_string()?.encode_utf16().count() as u64)
    }

    /// A signed varint as yrs reads it. yrs shifts an 11th byte past 63 bits (an overflow panic
    /// in debug builds, garbage in release) and negates `i64::MIN` (the same), so both are refused.
    fn var_i64(&mut self) -> Result<(), Untrusted> {
        let first = self.cur.read_u8()?;
        let mut num = u64::from(first & 0b0011_1111);
        let mut more = first & 0b1000_0000 != 0;
        let mut shift = 6;
        while more {
            if shift > 62 {
                return Err(Untrusted::Malformed);
            }
            let byte = self.cur.read_u8()?;
            num |= u64::from(byte & 0b0111_1111) << shift;
            shift += 7;
            more = byte & 0b1000_0000 != 0;
        }
        if num == 1 << 63 { Err(Untrusted::Malformed) } else { Ok(()) }
    }

    /// A lib0 `Any` value (yrs `Any::decode`), nested at most [`MAX_ANY_DEPTH`] deep.
    fn any(&mut self, depth: usize) -> Result<(), Untrusted> {
        if depth > MAX_ANY_DEPTH {
            return Err(Untrusted::TooDeep);
        }
        match self.cur.read_u8()? {
            127 | 126 | 121 | 120 => {}
            125 => self.var_i64()?,
            124 => {
                self.cur.read_exact(4)?;
            }
            123 | 122 => {
                self.cur.read_exact(8)?;
            }
            119 => {
                self.string()?;
            }
            118 => {
                for _ in 0..self.count(2)? {
                    self.string()?;
                    self.any(depth + 1)?;
                }
            }
            117 => {
                for _ in 0..self.count(1)? {
                    self.any(depth + 1)?;
                }
            }
            116 => {
                self.cur.read_buf()?;
            }
            other => return Err(Untrusted::Tag(other)),
        }
        Ok(())
    }

    /// An item's content (yrs `ItemContent::decode`); returns its length in clock ticks.
    fn content(&mut self, info: u8) -> Result<u64, Untrusted> {
        Ok(match info & 0b1111 {
            1 => u64::from(self.u32()?),
            // Legacy ContentJSON, which no current Yjs writes: yrs reads one string more than the
            // count it declares (Yjs reads the count) and writes the count, so it cannot read back
            // its own encoding of such an item, and a document holding one fails to re-encode.
            2 => return Err(Untrusted::Tag(2)),
            3 => {
                self.cur.read_buf()?;
                1
            }
            4 => self.text()?,
            5 => {
                self.string()?;
                1
            }
            6 => {
                self.string()?;
                self.string()?;
                1
            }
            7 => {
                match self.cur.read_u8()? {
                    0..=2 | 4..=6 | 9 | 15 => {}
                    3 => {
                        self.string()?;
                    }
                    other => return Err(Untrusted::Tag(other)),
                }
                1
            }
            8 => {
                let n = self.count(1)?;
                for _ in 0..n {
                    self.any(1)?;
                }
                n as u64
            }
            9 => {
                self.string()?;
                self.any(1)?;
                1
            }
            other => return Err(Untrusted::Tag(other)),
        })
    }

    /// One block of a client's run (yrs `Update::decode_block`); returns its length.
    fn block(&mut self) -> Result<u64, Untrusted> {
        let info = self.cur.read_u8()?;
        match info {
            // Skip and GC ranges.
            10 | 0 => Ok(u64::from(self.u32()?)),
            _ => {
                let has_origin = info & 0b1000_0000 != 0;
                let has_right_origin = info & 0b0100_0000 != 0;
                if has_origin {
                    self.id()?;
                }
                if has_right_origin {
                    self.id()?;
                }
                if !has_origin && !has_right_origin {
                    if self.u32()? == 1 {
                        self.string()?;
                    } else {
                        self.id()?;
                    }
                    if info & 0b0010_0000 != 0 {
                        self.string()?;
                    }
                }
                self.content(info)
            }
        }
    }

    /// A delete set (yrs `IdSet::decode`).
    fn delete_set(&mut self) -> Result<(), Untrusted> {
        for _ in 0..self.count(2)? {
            self.client()?;
            for _ in 0..self.count(2)? {
                let (clock, len) = (self.u32()?, self.u32()?);
                if clock.checked_add(len).is_none() {
                    return Err(Untrusted::ClockOverflow);
                }
            }
        }
        Ok(())
    }

    /// A whole v1 update (yrs `Update::decode`).
    fn update(&mut self) -> Result<(), Untrusted> {
        let clients = self.count(3)?;
        // Most updates hold one client: the set is only built for more.
        let mut seen = HashSet::with_capacity(if clients > 1 { clients } else { 0 });
        for _ in 0..clients {
            let blocks = self.count(1)?;
            let client = self.client()?;
            // yrs appends a repeated client's run to the first one with its own start clock, so
            // blocks overlap and integration underflows a clock.
            if clients > 1 && !seen.insert(client) {
                return Err(Untrusted::DuplicateClient(client));
            }
            let mut clock = u64::from(self.u32()?);
            for _ in 0..blocks {
                clock += self.block()?;
                if clock > u64::from(u32::MAX) {
                    return Err(Untrusted::ClockOverflow);
                }
            }
        }
        self.delete_set()
    }
}

/// Checks that `bytes` is a v1 update yrs can decode and integrate without trusting it.
///
/// Besides bounds, ids and nesting, it refuses two shapes that decode but break yrs afterwards:
/// a client with two runs of blocks in one update (overlapping blocks: integration underflows a
/// clock) and legacy JSON content (a document holding it can no longer be encoded and re-read).
pub fn check_update_v1(bytes: &[u8]) -> Result<(), Untrusted> {
    Walker::new(bytes).update()
}

/// Decodes an untrusted v1 update: [`check_update_v1`], then yrs.
pub fn decode_update_v1(bytes: &[u8]) -> Result<Update, Untrusted> {
    check_update_v1(bytes)?;
    Update::decode_v1(bytes).map_err(Untrusted::from)
}

/// Whether `update` starts past what a document at state `known` holds for one of its clients,
/// so that yrs would stash blocks of it as pending until the gap is filled.
///
/// A peer of one server never needs that: its updates follow what it received from the server
/// and its sync step 2 answers the server's state vector. Hostile ones do, and yrs's pending path
/// is where fuzzing found a use-after-free (a stashed block split while excluding known clocks)
/// and a panic (a GC run far past a client's clock). Whoever applies untrusted updates to a
/// document should refuse these before `apply_update`, against the transaction's state vector.
pub fn has_gap(update: &Update, known: &StateVector) -> bool {
    update.state_vector_lower().iter().any(|(client, clock)| *clock > known.get(client))
}

/// Checks an encoded state vector (yrs `StateVector::decode`).
pub fn check_state_vector(bytes: &[u8]) -> Result<(), Untrusted> {
    let mut w = Walker::new(bytes);
    for _ in 0..w.count(2)? {
        w.client()?;
        w.u32()?;
    }
    Ok(())
}

/// Decodes an untrusted state vector: [`check_state_vector`], then yrs.
pub fn decode_state_vector(bytes: &[u8]) -> Result<StateVector, Untrusted> {
    check_state_vector(bytes)?;
    StateVector::decode_v1(bytes).map_err(Untrusted::from)
}

/// Checks an encoded awareness update (yrs `AwarenessUpdate::decode`).
pub fn check_awareness(bytes: &[u8]) -> Result<(), Untrusted> {
    let mut w = Walker::new(bytes);
    for _ in 0..w.count(3)? {
        w.client()?;
        w.u32()?;
        w.string()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::encoder::Encode;
    use yrs::{Array, Doc, Map, ReadTxn, Text, Transact, WriteTxn};

    #[test]
    fn real_payloads_pass() {
        let doc = Doc::with_client_id(MAX_CLIENT_ID);
        let mut txn = doc.transact_mut();
        txn.get_or_insert_text("content").insert(&mut txn, 0, "héllo ✓ 𝄞");
        let map = txn.get_or_insert_map("files");
        map.insert(&mut txn, "a", yrs::MapPrelim::from([("path".to_owned(), yrs::Any::from("x"))]));
        map.insert(&mut txn, "n", 1.5);
        txn.get_or_insert_array("chat").push_back(&mut txn, yrs::Any::from(vec![yrs::Any::Null, true.into()]));
        txn.get_or_insert_text("content").remove_range(&mut txn, 1, 2);
        let update = txn.encode_update_v1();
        drop(txn);
        assert_eq!(check_update_v1(&update), Ok(()));
        let state = doc.transact().encode_state_as_update_v1(&StateVector::default());
        assert_eq!(check_update_v1(&state), Ok(()));
        assert_eq!(check_state_vector(&doc.transact().state_vector().encode_v1()), Ok(()));
        assert_eq!(check_update_v1(&[0, 0]), Ok(()));
    }

    #[test]
    fn gaps_are_found() {
        let doc = Doc::with_client_id(7);
        let text = doc.get_or_insert_text("content");
        let first = {
            let mut txn = doc.transact_mut();
            text.insert(&mut txn, 0, "ab");
            txn.encode_update_v1()
        };
        let second = {
            let mut txn = doc.transact_mut();
            text.insert(&mut txn, 2, "cd");
            txn.encode_update_v1()
        };
        let (first, second) = (decode_update_v1(&first).unwrap(), decode_update_v1(&second).unwrap());
        let empty = StateVector::default();
        assert!(!has_gap(&first, &empty));
        assert!(has_gap(&second, &empty));
        assert!(!has_gap(&second, &first.state_vector()));
    }

    #[test]
    fn hostile_payloads_are_refused() {
        // One client with a 54-bit id.
        let mut wide = vec![1, 0];
        wide.extend([0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10, 0, 0]);
        assert!(matches!(check_update_v1(&wide), Err(Untrusted::ClientId(_))));
        // Four bytes claiming a quarter of a billion clients.
        assert!(matches!(check_state_vector(&[0x80, 0x80, 0x80, 0x7f]), Err(Untrusted::Count(_))));
        assert!(matches!(check_awareness(&[0xff, 0xff, 0x03]), Err(Untrusted::Count(_))));
        // An `Any` array nested far past the limit: one item of content 8 holding [[[[...]]]].
        let mut deep = vec![1, 1, 1, 0, 8, 1, 1, b'x', 1];
        for _ in 0..1000 {
            deep.extend([117, 1]);
        }
        deep.push(126);
        deep.push(0);
        assert_eq!(check_update_v1(&deep), Err(Untrusted::TooDeep));
        assert_eq!(check_update_v1(&[0]), Err(Untrusted::Malformed));
        // Client 1 twice: one GC block of length 1 in each run.
        assert_eq!(check_update_v1(&[2, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0]), Err(Untrusted::DuplicateClient(1)));
        // An item of legacy JSON content under root type "a".
        assert_eq!(check_update_v1(&[1, 1, 1, 0, 2, 1, 1, b'a', 0, 0, 0]), Err(Untrusted::Tag(2)));
        // Integers yrs cannot read back: eleven varint bytes, and -2^63.
        let any_int = |varint: &[u8]| [&[1, 1, 1, 0, 8, 1, 1, b'a', 1, 125][..], varint, &[0]].concat();
        assert_eq!(check_update_v1(&any_int(&[0x81, 0x80, 0x01])), Ok(()));
        assert_eq!(check_update_v1(&any_int(&[0xff; 11])), Err(Untrusted::Malformed));
        let min = [0xc0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02];
        assert_eq!(check_update_v1(&any_int(&min)), Err(Untrusted::Malformed));
        // A deleted range whose end overflows a u32 clock.
        assert_eq!(check_update_v1(&[0, 1, 5, 1, 0xff, 0xff, 0xff, 0xff, 0x0f, 1]), Err(Untrusted::ClockOverflow));
    }
}
