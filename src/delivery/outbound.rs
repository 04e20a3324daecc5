//! One connection's queue of bytes waiting for the socket.
//!
//! Frames are queued whole and written with one vectored write per loop turn
//! ("corking"), so a turn that queues ten frames costs one system call. A
//! frame shared by many recipients (a public message) is an `Rc` to the same
//! bytes. An empty queue owns no memory.
//!
//! The queue has three lanes, in this order behind the frame being written:
//! control frames (pong, ping, the 101), then urgent frames (private
//! messages and replies), then bulk frames (public messages, presence, the
//! closing frame). So a reader that is hundreds of KiB behind on public
//! traffic still gets a private message next; each lane keeps its own
//! order.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::rc::Rc;

use crate::budget::{self, Kind};
use crate::ws::frame::{header_len, write_header, Opcode};

/// Bytes to send: owned, shared with other connections, or static.
#[derive(Debug, Clone)]
pub enum Chunk {
    Owned(Vec<u8>),
    Shared(Rc<[u8]>),
    /// A range of shared bytes (one user's part of a presence window).
    Part(Rc<[u8]>, u32, u32),
    Static(&'static [u8]),
}

impl Chunk {
    /// `bytes[start..end]`, shared (windows are far below 4 GiB).
    pub fn part(bytes: Rc<[u8]>, start: usize, end: usize) -> Chunk {
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Chunk::Part(bytes, to_u32(start), to_u32(end))
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(v) => v,
            Chunk::Shared(r) => r,
            Chunk::Part(r, start, end) => r.get(*start as usize..*end as usize).unwrap_or_default(),
            Chunk::Static(s) => s,
        }
    }
}

/// Where a chunk joins the queue (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Control,
    Urgent,
    Bulk,
}

#[derive(Debug)]
struct Entry {
    chunk: Chunk,
    lane: Lane,
}

impl Entry {
    /// What the entry holds for the ledger ([`crate::budget`]): its own
    /// bytes if it owns them, and its place in the queue. Shared bytes are
    /// one copy whatever the readers, and a reader's shared backlog is
    /// bounded by the policy's marks.
    fn held(&self) -> usize {
        let own = match &self.chunk {
            Chunk::Owned(bytes) => bytes.len(),
            _ => 0,
        };
        own + std::mem::size_of::<Entry>()
    }
}

/// Small frames are appended to the last queued buffer up to this size
/// ("corking"), so a turn's replies to one client share one allocation and
/// one slice; control frames still overtake after at most this much.
const CORK_BYTES: usize = 16 * 1024;

/// A new cork buffer's capacity: room for a turn's worth of small frames.
const CORK_START: usize = 1024;

/// Emptied cork buffers kept for reuse.
const SPARES_KEPT: usize = 128;

/// Emptied queues kept for reuse: enough for a public message to a thousand
/// readers to queue without a `malloc` and a `free` per reader. Only small
/// ones are kept, so spares hold at most about 1024 × 8 entries (320 KiB).
const SPARE_QUEUES_KEPT: usize = 1024;
const SPARE_QUEUE_MAX: usize = 8;

/// Only buffers up to this capacity are kept (so spares hold at most
/// `SPARES_KEPT` × 4 KiB).
const SPARE_BUFFER_MAX: usize = 4 * 1024;

/// The most slices handed to one `writev` (Linux allows 1024; a few dozen
/// already fill the socket buffer).
const MAX_IOV: usize = 64;

#[derive(Debug, Default)]
pub struct Outbound {
    queue: VecDeque<Entry>,
    /// Bytes of the front entry already written.
    front_written: usize,
    /// Unsent bytes in the queue.
    bytes: usize,
}

/// Emptied cork buffers and queues, shared by every connection of the loop.
/// A busy connection fills its queue and empties it every turn; reusing the
/// memory saves an allocation and a free per connection per turn, while a
/// connection with nothing to send still owns nothing. Bounded, and only
/// ever as large as the number of connections that were busy in one turn.
#[derive(Debug, Default)]
pub struct Spares {
    buffers: Vec<Vec<u8>>,
    queues: Vec<VecDeque<Entry>>,
}

impl Spares {
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        match self.buffers.last() {
            Some(buffer) if buffer.capacity() >= len => self.buffers.pop().unwrap_or_default(),
            _ => Vec::with_capacity(len.max(CORK_START)),
        }
    }

    fn keep_buffer(&mut self, mut buffer: Vec<u8>) {
        if buffer.capacity() <= SPARE_BUFFER_MAX && self.buffers.len() < SPARES_KEPT {
            buffer.clear();
            self.buffers.push(buffer);
        }
    }

    fn keep_queue(&mut self, queue: VecDeque<Entry>) {
        if (1..=SPARE_QUEUE_MAX).contains(&queue.capacity())
            && self.queues.len() < SPARE_QUEUES_KEPT
        {
            self.queues.push(queue);
        }
    }
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything was written.
    All,
    /// The socket is full; the rest waits for writability.
    Blocked,
}

impl Outbound {
    /// Unsent bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Chunks queued, and the bytes of those owned rather than shared
    /// (tests bound what a crowd of readers costs).
    #[cfg(test)]
    pub fn footprint(&self) -> (usize, usize) {
        let owned = self
            .queue
            .iter()
            .filter_map(|entry| match &entry.chunk {
                Chunk::Owned(bytes) => Some(bytes.len()),
                _ => None,
            })
            .sum();
        (self.queue.len(), owned)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queues bytes behind everything else (HTTP bytes, a closing frame).
    pub fn push(&mut self, chunk: Chunk) {
        self.bytes += chunk.as_bytes().len();
        let entry = Entry {
            chunk,
            lane: Lane::Bulk,
        };
        budget::charge(Kind::Outbound, entry.held());
        self.queue.push_back(entry);
    }

    /// Queues a chunk in `lane` (not `Control`: see `push_control`), into a
    /// spare queue if this one owns no memory (the hot paths: a public
    /// message to every reader, presence).
    pub fn push_reusing(&mut self, chunk: Chunk, lane: Lane, spares: &mut Spares) {
        self.reuse_queue(spares);
        let at = self.lane_end(lane);
        self.bytes += chunk.as_bytes().len();
        self.insert(at, Entry { chunk, lane });
    }

    /// `VecDeque::insert`, with the usual case (at the back) kept cheap.
    fn insert(&mut self, at: usize, entry: Entry) {
        budget::charge(Kind::Outbound, entry.held());
        if at >= self.queue.len() {
            self.queue.push_back(entry);
        } else {
            self.queue.insert(at, entry);
        }
    }

    /// Where a new entry of `lane` goes: at the back, except that an urgent
    /// one goes ahead of bulk entries not yet started.
    #[inline]
    fn lane_end(&self, lane: Lane) -> usize {
        let len = self.queue.len();
        match (lane, self.queue.back()) {
            (Lane::Urgent, Some(back)) if back.lane == Lane::Bulk => {
                // Behind the entry being written, control and urgent ones.
                let mut at = usize::from(self.front_written > 0);
                while self.queue.get(at).is_some_and(|e| e.lane != Lane::Bulk) {
                    at += 1;
                }
                at.min(len)
            }
            _ => len,
        }
    }

    fn reuse_queue(&mut self, spares: &mut Spares) {
        if self.queue.capacity() == 0 {
            if let Some(queue) = spares.queues.pop() {
                self.queue = queue;
            }
        }
    }

    /// Queues a data frame built from `payload` in `lane` (urgent or bulk),
    /// appended to the lane's last buffer when that one is ours and small (no
    /// allocation per frame).
    pub fn push_frame(&mut self, opcode: Opcode, payload: &[u8], lane: Lane, spares: &mut Spares) {
        let len = header_len(payload.len()) + payload.len();
        self.bytes += len;
        let at = self.lane_end(lane);
        let before = if at == self.queue.len() {
            self.queue.back_mut()
        } else {
            at.checked_sub(1).and_then(|i| self.queue.get_mut(i))
        };
        if let Some(Entry {
            chunk: Chunk::Owned(buffer),
            lane: last_lane,
        }) = before
        {
            if *last_lane == lane && buffer.len() + len <= CORK_BYTES {
                write_header(buffer, opcode, payload.len());
                buffer.extend_from_slice(payload);
                budget::charge(Kind::Outbound, len);
                return;
            }
        }
        self.reuse_queue(spares);
        let mut buffer = spares.buffer(len);
        write_header(&mut buffer, opcode, payload.len());
        buffer.extend_from_slice(payload);
        self.insert(
            at,
            Entry {
                chunk: Chunk::Owned(buffer),
                lane,
            },
        );
    }

    /// Queues a control frame ahead of queued data, behind the frame being
    /// written and behind earlier control frames (which keep their order).
    pub fn push_control(&mut self, chunk: Chunk) {
        let mut at = usize::from(self.front_written > 0);
        while self.queue.get(at).is_some_and(|e| e.lane == Lane::Control) {
            at += 1;
        }
        self.bytes += chunk.as_bytes().len();
        let entry = Entry {
            chunk,
            lane: Lane::Control,
        };
        budget::charge(Kind::Outbound, entry.held());
        self.queue.insert(at.min(self.queue.len()), entry);
    }

    /// Queues a pong or a ping, keeping at most `keep` unsent frames of the
    /// same kind: past that, the newest replaces the last one waiting (RFC
    /// 6455 section 5.5.3 lets a pong answer only the latest ping). So a ping
    /// flood from a client that does not read queues a few pongs, not
    /// millions, and the control prefix of the queue stays short, while a
    /// burst of a few pings still gets every pong (Autobahn 2.10).
    pub fn push_control_bounded(&mut self, chunk: Chunk, keep: usize) {
        let kind = chunk.as_bytes().first().copied();
        let mut at = usize::from(self.front_written > 0);
        let mut same = 0;
        let mut last_same = None;
        while let Some(entry) = self.queue.get(at) {
            if entry.lane != Lane::Control {
                break;
            }
            if entry.chunk.as_bytes().first().copied() == kind {
                same += 1;
                last_same = Some(at);
            }
            at += 1;
        }
        match last_same {
            Some(i) if same >= keep => {
                let entry = &mut self.queue[i];
                self.bytes -= entry.chunk.as_bytes().len();
                self.bytes += chunk.as_bytes().len();
                budget::refund(Kind::Outbound, entry.held());
                entry.chunk = chunk;
                budget::charge(Kind::Outbound, entry.held());
            }
            _ => self.push_control(chunk),
        }
    }

    /// Writes as much as the socket takes.
    pub fn write_to(&mut self, sink: &mut impl Write, spares: &mut Spares) -> io::Result<Flushed> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            for (i, entry) in self.queue.iter().take(MAX_IOV).enumerate() {
                let bytes = entry.chunk.as_bytes();
                slices[i] = IoSlice::new(if i == 0 {
                    &bytes[self.front_written..]
                } else {
                    bytes
                });
                count += 1;
            }
            // One slice (the usual case: frames are corked into one buffer,
            // or one shared frame) takes plain `write`.
            let result = match &slices[..count] {
                [only] => sink.write(only),
                many => sink.write_vectored(many),
            };
            let written = match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.consume(written, spares);
        }
        // Give the queue's memory back: an idle connection owns nothing.
        spares.keep_queue(std::mem::take(&mut self.queue));
        Ok(Flushed::All)
    }

    fn consume(&mut self, mut written: usize, spares: &mut Spares) {
        self.bytes -= written;
        while let Some(front) = self.queue.front() {
            let left = front.chunk.as_bytes().len() - self.front_written;
            if written < left {
                self.front_written += written;
                return;
            }
            written -= left;
            self.front_written = 0;
            if let Some(entry) = self.queue.pop_front() {
                budget::refund(Kind::Outbound, entry.held());
                if let Chunk::Owned(buffer) = entry.chunk {
                    spares.keep_buffer(buffer);
                }
            }
        }
    }
}

impl Drop for Outbound {
    /// A connection that ends with bytes unsent gives them back to the ledger.
    fn drop(&mut self) {
        if !self.queue.is_empty() {
            let held: usize = self.queue.iter().map(Entry::held).sum();
            budget::refund(Kind::Outbound, held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that accepts at most `room` bytes per call and then blocks.
    struct Trickle {
        out: Vec<u8>,
        room: usize,
        calls: usize,
        block_after: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.calls == self.block_after {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.room - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn sink(room: usize, block_after: usize) -> Trickle {
        Trickle {
            out: Vec::new(),
            room,
            calls: 0,
            block_after,
        }
    }

    #[test]
    fn writes_everything_in_order_with_one_call_when_it_fits() {
        let mut q = Outbound::default();
        q.push(Chunk::Owned(b"one ".to_vec()));
        q.push(Chunk::Shared(Rc::from(&b"two "[..])));
        q.push(Chunk::Static(b"three"));
        let mut s = sink(1000, usize::MAX);
        assert_eq!(
            q.write_to(&mut s, &mut Spares::default()).unwrap(),
            Flushed::All
        );
        assert_eq!(s.out, b"one two three");
        assert_eq!(s.calls, 1);
        assert_eq!(q.bytes(), 0);
        assert_eq!(q.queue.capacity(), 0);
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let mut q = Outbound::default();
        for word in ["alpha ", "beta ", "gamma"] {
            q.push(Chunk::Owned(word.as_bytes().to_vec()));
        }
        let mut s = sink(4, 2);
        assert_eq!(
            q.write_to(&mut s, &mut Spares::default()).unwrap(),
            Flushed::Blocked
        );
        assert_eq!(s.out, b"alpha be");
        assert_eq!(q.bytes(), 8);
        s.block_after = usize::MAX;
        assert_eq!(
            q.write_to(&mut s, &mut Spares::default()).unwrap(),
            Flushed::All
        );
        assert_eq!(s.out, b"alpha beta gamma");
    }

    #[test]
    fn control_frames_go_right_after_the_frame_being_written() {
        let mut q = Outbound::default();
        q.push(Chunk::Owned(b"AAAA".to_vec()));
        q.push(Chunk::Owned(b"BBBB".to_vec()));
        let mut s = sink(2, 1);
        assert_eq!(
            q.write_to(&mut s, &mut Spares::default()).unwrap(),
            Flushed::Blocked
        );
        q.push_control(Chunk::Owned(b"p1".to_vec()));
        q.push_control(Chunk::Owned(b"p2".to_vec()));
        s.block_after = usize::MAX;
        s.room = 100;
        q.write_to(&mut s, &mut Spares::default()).unwrap();
        assert_eq!(s.out, b"AAAAp1p2BBBB");
    }

    #[test]
    fn a_flood_of_pongs_keeps_a_few_and_the_latest() {
        let mut q = Outbound::default();
        q.push_control(Chunk::Static(b"HTTP/1.1 101\r\n\r\n"));
        q.push(Chunk::Owned(b"data".to_vec()));
        for i in 0..1000u16 {
            let pong = crate::ws::frame::encode(Opcode::Pong, &i.to_be_bytes());
            q.push_control_bounded(Chunk::Owned(pong), 2);
        }
        q.push_control_bounded(Chunk::Static(&[0x89, 0x00]), 1);
        q.push_control_bounded(Chunk::Static(&[0x89, 0x00]), 1);
        assert_eq!(q.queue.len(), 5, "101, two pongs, one ping, data");
        let mut s = sink(1000, usize::MAX);
        q.write_to(&mut s, &mut Spares::default()).unwrap();
        assert_eq!(
            s.out,
            b"HTTP/1.1 101\r\n\r\n\x8a\x02\x00\x00\x8a\x02\x03\xe7\x89\x00data"
        );
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn control_frames_lead_an_unstarted_queue() {
        let mut q = Outbound::default();
        q.push(Chunk::Owned(b"data".to_vec()));
        q.push_control(Chunk::Owned(b"pong".to_vec()));
        let mut s = sink(100, usize::MAX);
        q.write_to(&mut s, &mut Spares::default()).unwrap();
        assert_eq!(s.out, b"pongdata");
    }

    #[test]
    fn small_frames_share_a_buffer_and_keep_their_order() {
        let mut q = Outbound::default();
        q.push_frame(Opcode::Text, b"one", Lane::Bulk, &mut Spares::default());
        q.push_frame(Opcode::Text, b"two", Lane::Bulk, &mut Spares::default());
        q.push(Chunk::Shared(Rc::from(&b"\x81\x05three"[..])));
        q.push_frame(Opcode::Text, b"four", Lane::Bulk, &mut Spares::default());
        assert_eq!(q.queue.len(), 3, "the first two share one buffer");
        let big = vec![b'x'; CORK_BYTES];
        q.push_frame(Opcode::Binary, &big, Lane::Bulk, &mut Spares::default());
        assert_eq!(
            q.queue.len(),
            4,
            "a frame that would pass the cork size starts a buffer"
        );
        let mut s = sink(usize::MAX, usize::MAX);
        q.write_to(&mut s, &mut Spares::default()).unwrap();
        let mut expected = b"\x81\x03one\x81\x03two\x81\x05three\x81\x04four".to_vec();
        expected.extend(crate::ws::frame::encode(Opcode::Binary, &big));
        assert_eq!(s.out, expected);
    }

    #[test]
    fn the_ledger_counts_what_queues_hold_until_written_or_dropped() {
        use crate::budget;
        let entry = std::mem::size_of::<Entry>();
        let mut spares = Spares::default();
        let mut q = Outbound::default();
        q.push_frame(Opcode::Text, b"one", Lane::Urgent, &mut spares);
        q.push_frame(Opcode::Text, b"two", Lane::Urgent, &mut spares); // corked
        let public = Chunk::Shared(Rc::from(&b"[public]"[..]));
        q.push_reusing(public, Lane::Bulk, &mut spares); // shared: its entry
        q.push_control_bounded(Chunk::Static(b"\x8a\x00"), 1);
        q.push_control_bounded(Chunk::Owned(b"\x8a\x01p".to_vec()), 1); // replaces it
        q.push(Chunk::Owned(vec![0; 100]));
        let held = budget::held().outbound;
        assert_eq!(held, (10 + entry) + entry + (3 + entry) + (100 + entry));
        // Partly written: the front entry is still held.
        let mut partly = sink(2, 1);
        q.write_to(&mut partly, &mut spares).unwrap();
        assert_eq!(budget::held().outbound, held);
        let mut all = sink(1 << 20, usize::MAX);
        q.write_to(&mut all, &mut spares).unwrap();
        assert_eq!(budget::held().outbound, 0);
        // A connection that ends with bytes unsent gives them back.
        let mut q = Outbound::default();
        q.push(Chunk::Owned(vec![0; 100]));
        q.push_control(Chunk::Static(b"\x89\x00"));
        assert_eq!(budget::held().outbound, 100 + 2 * entry);
        drop(q);
        assert_eq!(budget::held().outbound, 0);
    }

    #[test]
    fn emptied_buffers_are_reused_and_the_connection_keeps_nothing() {
        let mut spares = Spares::default();
        let mut q = Outbound::default();
        q.push_frame(Opcode::Text, b"one", Lane::Bulk, &mut spares);
        let mut s = sink(usize::MAX, usize::MAX);
        q.write_to(&mut s, &mut spares).unwrap();
        assert_eq!(q.queue.capacity(), 0, "an empty queue owns nothing");
        assert_eq!((spares.buffers.len(), spares.queues.len()), (1, 1));
        let kept = spares.buffers[0].as_ptr();

        q.push_frame(Opcode::Text, b"two", Lane::Bulk, &mut spares);
        assert_eq!((spares.buffers.len(), spares.queues.len()), (0, 0));
        let Some(Entry {
            chunk: Chunk::Owned(buffer),
            ..
        }) = q.queue.front()
        else {
            panic!("a cork buffer is queued");
        };
        assert_eq!(buffer.as_ptr(), kept, "the spare buffer was reused");
        q.write_to(&mut s, &mut spares).unwrap();
        assert_eq!(s.out, b"\x81\x03one\x81\x03two");

        // Large buffers are freed, and spares stay bounded.
        q.push_frame(
            Opcode::Binary,
            &[0; SPARE_BUFFER_MAX + 1],
            Lane::Bulk,
            &mut spares,
        );
        q.write_to(&mut s, &mut spares).unwrap();
        assert_eq!(spares.buffers.len(), 1, "only the small buffer is kept");
        for _ in 0..SPARES_KEPT + 10 {
            spares.keep_buffer(Vec::with_capacity(64));
        }
        assert_eq!(spares.buffers.len(), SPARES_KEPT);
        // Queues: a shared frame pushed to an empty connection takes one.
        spares.queues.clear();
        spares.keep_queue(VecDeque::with_capacity(4));
        let mut reader = Outbound::default();
        reader.push_reusing(Chunk::Static(b"frame"), Lane::Bulk, &mut spares);
        assert!(spares.queues.is_empty(), "the spare queue was taken");
        reader.write_to(&mut s, &mut spares).unwrap();
        assert_eq!(spares.queues.len(), 1, "and given back");
        // Only small ones are kept, and a bounded number.
        spares.queues.clear();
        spares.keep_queue(VecDeque::with_capacity(SPARE_QUEUE_MAX * 2));
        assert!(spares.queues.is_empty(), "a large queue is freed");
        for _ in 0..SPARE_QUEUES_KEPT + 10 {
            spares.keep_queue(VecDeque::with_capacity(4));
        }
        assert_eq!(spares.queues.len(), SPARE_QUEUES_KEPT);
    }

    #[test]
    fn urgent_frames_overtake_bulk_frames_not_yet_started_and_each_lane_keeps_its_order() {
        let mut spares = Spares::default();
        let mut q = Outbound::default();
        let shared = |text: &'static [u8]| Chunk::Shared(Rc::from(text));
        q.push_reusing(shared(b"[pub1]"), Lane::Bulk, &mut spares);
        q.push_reusing(shared(b"[pub2]"), Lane::Bulk, &mut spares);
        // The first bulk frame is half written when the urgent ones arrive.
        let mut s = sink(3, 1);
        assert_eq!(q.write_to(&mut s, &mut spares).unwrap(), Flushed::Blocked);
        q.push_frame(Opcode::Text, b"p1", Lane::Urgent, &mut spares);
        q.push_frame(Opcode::Text, b"p2", Lane::Urgent, &mut spares);
        q.push_reusing(shared(b"[pub3]"), Lane::Bulk, &mut spares);
        q.push_control(Chunk::Static(b"[pong]"));
        q.push_frame(Opcode::Text, b"p3", Lane::Urgent, &mut spares);
        assert_eq!(q.queue.len(), 5, "p1, p2 and p3 share one buffer");
        s.block_after = usize::MAX;
        s.room = usize::MAX;
        q.write_to(&mut s, &mut spares).unwrap();
        assert_eq!(
            s.out,
            b"[pub1][pong]\x81\x02p1\x81\x02p2\x81\x02p3[pub2][pub3]".as_slice()
        );
        assert_eq!(q.bytes(), 0);
        // An empty queue or one of urgent frames only: urgent goes to the back.
        q.push_frame(Opcode::Text, b"u1", Lane::Urgent, &mut spares);
        q.push(Chunk::Static(b"[close]"));
        q.push_frame(Opcode::Text, b"u2", Lane::Urgent, &mut spares);
        let mut s = sink(usize::MAX, usize::MAX);
        q.write_to(&mut s, &mut spares).unwrap();
        assert_eq!(s.out, b"\x81\x02u1\x81\x02u2[close]".as_slice());
    }

    #[test]
    fn a_long_queue_goes_out_in_batches_of_slices() {
        let mut q = Outbound::default();
        for i in 0..200u8 {
            q.push(Chunk::Owned(vec![i]));
        }
        let mut s = sink(usize::MAX, usize::MAX);
        q.write_to(&mut s, &mut Spares::default()).unwrap();
        assert_eq!(s.out, (0..200u8).collect::<Vec<_>>());
        assert_eq!(s.calls, 200usize.div_ceil(MAX_IOV));
    }
}
