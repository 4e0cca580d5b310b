//! Checks on untrusted yrs payloads (v1 updates, state vectors, awareness updates) before yrs decodes them.
//!
//! yrs's decoders trust the counts and client ids they read: a few bytes can declare billions of
//! entries (one allocation sized by the claim), nest `Any` values deep enough to overflow the
//! stack, or carry a client id wider than the 53 bits Yjs allows (a `debug_assert!` in yrs, a
//! silently aliased id in release); and a few well-formed shapes break yrs later (see
//! [`check_update_v1`]). These checks walk the same formats, bound every count by the bytes left,
//! and reject what yrs would mishandle, so [`crate::wire`]'s decoders return errors instead. Most
//! cases were found by the fuzz targets in `fuzz/` (see `fuzz/RESULTS.md`).

use std::collections::{HashMap, HashSet};

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

/// A block id as the walker reads it: (client, clock).
pub type BlockId = (u64, u32);

/// What an update refers to and creates, as [`shape_v1`] reads it: enough to tell, before yrs
/// integrates anything, whether every block of it can be integrated in full.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Each client's run of blocks: client, first clock, clock past the last block.
    pub runs: Vec<(u64, u32, u32)>,
    /// Whether a run holds a skip block (a hole the update does not fill).
    pub has_skip: bool,
    /// Left and right origins of the update's items.
    pub origins: Vec<BlockId>,
    /// Parents named by id (nested types).
    pub parents: Vec<BlockId>,
    /// Items of the update whose content is a nested type: the only valid targets of `parents`.
    pub types: Vec<BlockId>,
    /// Deleted ranges: client, first clock, length.
    pub deletes: Vec<(u64, u32, u32)>,
    /// Per root type name, the items the update puts under a key of that root map with no origin:
    /// an upper bound on the keys it adds (a write over an existing key has the old item as origin).
    pub root_keys: HashMap<String, usize>,
}

/// Why an update cannot be integrated in full into a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    #[error("blocks of client {0} start past what the document holds")]
    Gap(u64),
    #[error("the update leaves a hole in a client's blocks")]
    Skip,
    #[error("an item refers to {0}:{1}, which neither the document nor the update holds")]
    MissingOrigin(u64, u32),
    #[error("an item's parent {0}:{1} is content neither the document nor the update holds")]
    MissingParent(u64, u32),
    #[error("an item's parent {0}:{1} is not a nested type")]
    NotAType(u64, u32),
    #[error("a deletion covers {0}:{1}, which neither the document nor the update holds")]
    MissingDeletion(u64, u32),
}

fn clock_of(known: &StateVector, client: u64) -> u32 {
    known.get(&yrs::block::ClientID::new(client))
}

impl Unfit {
    /// Whether the update only waits for content the document may still receive, rather than
    /// being wrong in itself.
    pub fn is_missing(&self) -> bool {
        matches!(self, Unfit::Gap(_) | Unfit::MissingOrigin(..) | Unfit::MissingParent(..) | Unfit::MissingDeletion(..))
    }
}

impl Shape {
    /// Whether this update overlaps what a document at `known` already holds.
    pub fn overlaps(&self, known: &StateVector) -> bool {
        self.runs.iter().any(|(client, start, _)| *start < clock_of(known, *client))
    }

    /// Checks that every block and deletion of the update can be integrated at once into a
    /// document at state `known` whose nested types are `is_type`: no hole before or inside a
    /// run, every origin and parent present, every parent a nested type, every deleted range
    /// present. yrs would otherwise park blocks as pending or stop half way with an error after
    /// integrating part of the update (fuzz/RESULTS.md), and a room must apply all or nothing.
    pub fn fits(&self, known: &StateVector, is_type: impl Fn(BlockId) -> bool) -> Result<(), Unfit> {
        if self.has_skip {
            return Err(Unfit::Skip);
        }
        for (client, start, _) in &self.runs {
            if *start > clock_of(known, *client) {
                return Err(Unfit::Gap(*client));
            }
        }
        let runs: HashMap<u64, (u32, u32)> = self.runs.iter().map(|&(c, start, end)| (c, (start, end))).collect();
        let end = |client: u64| runs.get(&client).map_or(0, |r| r.1).max(clock_of(known, client));
        for &(client, clock) in &self.origins {
            if clock >= end(client) {
                return Err(Unfit::MissingOrigin(client, clock));
            }
        }
        let own_types: HashSet<BlockId> = self.types.iter().copied().collect();
        for &(client, clock) in &self.parents {
            let own = runs.get(&client).is_some_and(|(start, end)| (*start..*end).contains(&clock));
            if !own && clock >= clock_of(known, client) {
                return Err(Unfit::MissingParent(client, clock));
            }
            let is_type = if own { own_types.contains(&(client, clock)) } else { is_type((client, clock)) };
            if !is_type {
                return Err(Unfit::NotAType(client, clock));
            }
        }
        for &(client, clock, len) in &self.deletes {
            if len > 0 && u64::from(clock) + u64::from(len) > u64::from(end(client)) {
                return Err(Unfit::MissingDeletion(client, clock));
            }
        }
        Ok(())
    }
}

struct Walker<'a> {
    cur: Cursor<'a>,
    /// Filled by [`shape_v1`]; `None` when only checking.
    shape: Option<Shape>,
}

impl<'a> Walker<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Walker { cur: Cursor::new(bytes), shape: None }
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

    fn id(&mut self) -> Result<BlockId, Untrusted> {
        Ok((self.client()?, self.u32()?))
    }

    fn note(&mut self, f: impl FnOnce(&mut Shape)) {
        if let Some(shape) = self.shape.as_mut() {
            f(shape);
        }
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
            // Subdocuments: this product links documents by name in the project tree, never as
            // yrs subdocuments, and a document holding one is never freed (a reference cycle in
            // yrs 0.28, found by fuzzing as a leak).
            9 => return Err(Untrusted::Tag(9)),
            other => return Err(Untrusted::Tag(other)),
        })
    }

    /// One block of a client's run (yrs `Update::decode_block`), at `id`; returns its length.
    fn block(&mut self, id: BlockId) -> Result<u64, Untrusted> {
        let info = self.cur.read_u8()?;
        match info {
            // Skip and GC ranges.
            10 | 0 => {
                if info == 10 {
                    self.note(|s| s.has_skip = true);
                }
                Ok(u64::from(self.u32()?))
            }
            _ => {
                let has_origin = info & 0b1000_0000 != 0;
                let has_right_origin = info & 0b0100_0000 != 0;
                if has_origin {
                    let origin = self.id()?;
                    self.note(|s| s.origins.push(origin));
                }
                if has_right_origin {
                    let origin = self.id()?;
                    self.note(|s| s.origins.push(origin));
                }
                if !has_origin && !has_right_origin {
                    let mut root = None;
                    if self.u32()? == 1 {
                        let name = self.cur.read_string()?;
                        // Named only when the shape is wanted: checking allocates nothing.
                        root = self.shape.is_some().then(|| name.to_owned());
                    } else {
                        let parent = self.id()?;
                        self.note(|s| s.parents.push(parent));
                    }
                    if info & 0b0010_0000 != 0 {
                        self.string()?;
                        if let Some(root) = root {
                            self.note(|s| *s.root_keys.entry(root.to_owned()).or_default() += 1);
                        }
                    }
                }
                if info & 0b1111 == 7 {
                    self.note(|s| s.types.push(id));
                }
                self.content(info)
            }
        }
    }

    /// A delete set (yrs `IdSet::decode`).
    fn delete_set(&mut self) -> Result<(), Untrusted> {
        for _ in 0..self.count(2)? {
            let client = self.client()?;
            for _ in 0..self.count(2)? {
                let (clock, len) = (self.u32()?, self.u32()?);
                if clock.checked_add(len).is_none() {
                    return Err(Untrusted::ClockOverflow);
                }
                self.note(|s| s.deletes.push((client, clock, len)));
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
            let start = self.u32()?;
            let mut clock = u64::from(start);
            for _ in 0..blocks {
                // In range: checked after each block below.
                clock += self.block((client, clock as u32))?;
                if clock > u64::from(u32::MAX) {
                    return Err(Untrusted::ClockOverflow);
                }
            }
            self.note(|s| s.runs.push((client, start, clock as u32)));
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

/// [`check_update_v1`], and what the update refers to and creates.
pub fn shape_v1(bytes: &[u8]) -> Result<Shape, Untrusted> {
    let mut w = Walker::new(bytes);
    w.shape = Some(Shape::default());
    w.update()?;
    Ok(w.shape.unwrap_or_default())
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
