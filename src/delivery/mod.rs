//! Delivery to connections: the one path by which bytes enter a
//! connection's outbound queue.
//!
//! [`Post`] owns everything delivery touches beside the connections: the
//! policy's marks and times, the presence window, the list of connections
//! to flush this turn, the senders held for flooded readers, the replies
//! waiting for the disk, and the spare buffers. Every frame for a client
//! goes through one of its methods: [`Post::deliver`] for chat traffic
//! (through [`Mailer`], the router's [`Outbox`]), and the named ones for
//! the connection's own frames (the 101, pongs, pings, echo, the closing
//! frame, an HTTP answer). Presence a connection is owed is settled inside
//! these, so no caller can forget it; `delivery::policy` judges every frame
//! for a reader that is behind; the `gap` count is kept and sent here.

pub mod outbound;
pub mod policy;
pub mod presence;

use std::collections::VecDeque;
use std::io;
use std::rc::Rc;

use slab::Slab;

use crate::budget::Pressure;
use crate::chat::protocol::encode;
use crate::chat::{Class, ConnId, Delivery, Fanout, Outbox};
use crate::conn::{CloseReason, Connection};
use crate::log;
use crate::timer::Tick;
use crate::ws::frame::{encode_close, header_len, write_header, Opcode};
use crate::ws::CloseCode;
use outbound::{Chunk, Flushed, Lane, Spares};
use policy::{Marks, Times, Verdict};
use presence::PresenceBatch;

/// Presence owed to a connection that gets something else is copied for it
/// up to this many bytes; more closes the window for everyone (see
/// `Post::settle_presence`).
const COPY_OWED_MAX: usize = 2048;

/// Unsent pongs a connection may have queued; beyond, the newest replaces the
/// last (see `Outbound::push_control_bounded`).
const PONGS_QUEUED: usize = 16;

/// An empty ping: the server's heartbeat.
const PING: &[u8] = &[0x89, 0x00];

/// A sender held (not read) until a reader it sent to drains.
#[derive(Debug, Clone, Copy)]
struct Hold {
    reader: usize,
    reader_id: u64,
    sender: usize,
    sender_id: u64,
    /// Released by then at the latest (`policy::hold_sender_until`).
    until: Tick,
}

/// Bookkeeping that delivering a message touches beside the connections.
#[derive(Debug)]
pub struct Post {
    marks: Marks,
    times: Times,
    /// The time of this turn, for judging readers.
    pub now: Tick,
    /// The wall clock at `now`, in milliseconds since 1970.
    pub now_ms: u64,
    /// The process's memory pressure as of this turn (see `budget`).
    pub pressure: Pressure,
    flush_list: Vec<usize>,
    /// `join`/`leave` events of the current window (see `presence`).
    pub presence: PresenceBatch,
    /// Open connections that stopped being open; the router forgets them
    /// within the same turn (see `Server::settle`).
    pub departures: Vec<usize>,
    /// Connections that began closing and need a close deadline.
    pub began_closing: Vec<usize>,
    /// Replies held until this turn's log records are on disk.
    after_sync: Vec<(usize, Vec<u8>)>,
    /// Senders held for readers, in the order they were held (so `until`
    /// only grows along it).
    holds: VecDeque<Hold>,
    /// Held senders released this turn, to be read again.
    pub released: Vec<(usize, u64)>,
    pub spares: Spares,
    /// Bytes the kernel took, for `/metrics`.
    pub bytes_out: u64,
    /// Times a sender was held, for `/metrics`.
    pub senders_held: u64,
    /// Where a broadcast frame is built before it becomes shared bytes.
    frame_scratch: Vec<u8>,
}

impl Post {
    pub fn new(marks: Marks, times: Times, now: Tick) -> Post {
        Post {
            marks,
            times,
            now,
            now_ms: 0,
            pressure: Pressure::Normal,
            flush_list: Vec::new(),
            presence: PresenceBatch::default(),
            departures: Vec::new(),
            began_closing: Vec::new(),
            after_sync: Vec::new(),
            holds: VecDeque::new(),
            released: Vec::new(),
            spares: Spares::default(),
            bytes_out: 0,
            senders_held: 0,
            frame_scratch: Vec::with_capacity(256),
        }
    }

    pub fn marks(&self) -> Marks {
        self.marks
    }

    pub fn times(&self) -> Times {
        self.times
    }

    #[inline]
    pub fn list_for_flush(&mut self, slot: usize, conn: &mut Connection) {
        if !conn.flush_listed {
            conn.flush_listed = true;
            self.flush_list.push(slot);
        }
    }

    /// The connections to flush, emptying the list (each is unlisted as it
    /// is flushed, by `write`).
    pub fn take_flush_list(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.flush_list)
    }

    pub fn nothing_to_flush(&self) -> bool {
        self.flush_list.is_empty()
    }

    // --- The chat's frames -------------------------------------------------

    /// Queues one frame for `to` if the policy admits it.
    fn deliver(
        &mut self,
        conns: &mut Slab<Connection>,
        to: usize,
        frame: Frame<'_>,
        class: Class,
        sender: Option<usize>,
    ) -> Delivery {
        if class == Class::Public {
            // Presence goes in the same lane: what it is owed goes first.
            self.settle_presence(conns, to);
        }
        let Some(conn) = conns.get_mut(to) else {
            return Delivery::Gone;
        };
        if !conn.is_open() {
            return Delivery::Gone;
        }
        let verdict = self.judge(to, conn, class, frame.len());
        match verdict {
            Verdict::Queue => {}
            Verdict::QueueAndHoldSender => {
                if let Some(sender) = sender.filter(|&s| s != to) {
                    let reader_id = conn.id;
                    self.hold_sender(conns, sender, to, reader_id);
                }
            }
            Verdict::Shed => {
                conn.shed = conn.shed.saturating_add(1);
                return Delivery::Shed;
            }
            Verdict::Refuse => {
                if let Some(sender) = sender.filter(|&s| s != to) {
                    let reader_id = conn.id;
                    self.hold_sender(conns, sender, to, reader_id);
                }
                return Delivery::Refused;
            }
            Verdict::Disconnect => {
                log::warn!(
                    "#{} {}: slow consumer disconnected ({} bytes unsent)",
                    conn.id,
                    conn.peer,
                    conn.out.bytes()
                );
                self.close(
                    conns,
                    to,
                    CloseCode::Policy,
                    "slow consumer",
                    CloseReason::SlowConsumer,
                );
                return Delivery::Disconnected;
            }
        }
        let Some(conn) = conns.get_mut(to) else {
            return Delivery::Gone;
        };
        let lane = match class {
            Class::Public | Class::Presence => Lane::Bulk,
            Class::Private | Class::Reply => Lane::Urgent,
        };
        match frame {
            Frame::Text(json) => conn
                .out
                .push_frame(Opcode::Text, json, lane, &mut self.spares),
            Frame::Shared(bytes) => {
                conn.out
                    .push_reusing(Chunk::Shared(bytes.clone()), lane, &mut self.spares)
            }
        }
        self.list_for_flush(to, conn);
        Delivery::Queued
    }

    /// The policy's verdict for `len` more bytes of `class` for `conn`,
    /// judged by what its socket has not taken: when the first verdict is
    /// anything but `Queue` and the socket may still take bytes, the queue is
    /// offered to it before judging again.
    #[inline]
    fn judge(&mut self, slot: usize, conn: &mut Connection, class: Class, len: usize) -> Verdict {
        let (now, times) = (self.now, self.times);
        let (reader, pressure) = (
            || policy::reader(conn.stalled_since, now, times),
            self.pressure,
        );
        let verdict = policy::admit(class, conn.out.bytes(), len, reader, pressure, self.marks);
        // A socket that said "full" may have drained since without an
        // EPOLLOUT edge (the kernel wakes writers only once a third of a
        // large send buffer is free): before disconnecting, look.
        if !policy::worth_offering(verdict) || (conn.blocked && verdict != Verdict::Disconnect) {
            return verdict;
        }
        self.offer(conn);
        // Whatever the verdict, what is left (or an error) goes to this
        // turn's flush, which registers for writability.
        self.list_for_flush(slot, conn);
        let reader = || policy::reader(conn.stalled_since, now, times);
        policy::admit(class, conn.out.bytes(), len, reader, pressure, self.marks)
    }

    /// Offers a blocked connection's queue to its socket once more: the
    /// kernel raises no EPOLLOUT edge until a third of a large send buffer
    /// is free, so a reader that drains slowly looks stalled without it.
    pub fn probe(&mut self, conn: &mut Connection, slot: usize) {
        self.offer(conn);
        self.list_for_flush(slot, conn);
    }

    /// Writes what the socket takes now, within the turn. An error is left
    /// for the turn's flush, which meets it again and ends the connection.
    fn offer(&mut self, conn: &mut Connection) {
        if conn.out.is_empty() {
            return; // nothing offered, nothing learned about the reader
        }
        let before = conn.out.bytes();
        if let Ok(flushed) = conn.out.write_to(&mut conn.socket, &mut self.spares) {
            self.note_write(conn, before, flushed);
        }
    }

    /// Records what a write did to the connection's progress.
    fn note_write(&mut self, conn: &mut Connection, before: usize, flushed: Flushed) {
        let after = conn.out.bytes();
        self.bytes_out += (before - after) as u64;
        match flushed {
            Flushed::All => {
                conn.blocked = false;
                conn.stalled_since = None;
            }
            Flushed::Blocked => {
                conn.blocked = true;
                if conn.stalled_since.is_none() || after < before {
                    conn.stalled_since = Some(self.now);
                }
            }
        }
    }

    /// Reads no more from `sender` until `reader` drains (or for
    /// `--slow-reader-after` at most).
    fn hold_sender(
        &mut self,
        conns: &mut Slab<Connection>,
        sender: usize,
        reader: usize,
        reader_id: u64,
    ) {
        let Some(conn) = conns.get_mut(sender) else {
            return;
        };
        if conn.held || conn.dead {
            return;
        }
        conn.held = true;
        self.senders_held += 1;
        self.holds.push_back(Hold {
            reader,
            reader_id,
            sender,
            sender_id: conn.id,
            until: policy::hold_sender_until(self.now, self.times),
        });
        if let Some(reader) = conns.get_mut(reader) {
            reader.holding += 1;
        }
    }

    /// Releases the senders held for `reader` (it drained or is gone).
    pub fn release_senders_of(&mut self, conns: &mut Slab<Connection>, reader: usize) {
        let holds = std::mem::take(&mut self.holds);
        for hold in holds {
            if hold.reader == reader {
                self.release(conns, hold);
            } else {
                self.holds.push_back(hold);
            }
        }
    }

    /// Releases the holds that reached their time.
    pub fn release_due_holds(&mut self, conns: &mut Slab<Connection>) {
        while let Some(hold) = self.holds.front().copied() {
            if hold.until > self.now {
                return;
            }
            self.holds.pop_front();
            self.release(conns, hold);
        }
    }

    /// When the next hold runs out.
    pub fn next_hold_due(&self) -> Option<Tick> {
        self.holds.front().map(|hold| hold.until)
    }

    fn release(&mut self, conns: &mut Slab<Connection>, hold: Hold) {
        if let Some(sender) = conns.get_mut(hold.sender) {
            if sender.id == hold.sender_id && sender.held {
                sender.held = false;
                self.released.push((hold.sender, hold.sender_id));
            }
        }
        if let Some(reader) = conns.get_mut(hold.reader) {
            if reader.id == hold.reader_id {
                reader.holding = reader.holding.saturating_sub(1);
            }
        }
    }

    /// A presence event joins the window; the recipient is owed it.
    fn owe_presence(
        &mut self,
        conns: &mut Slab<Connection>,
        to: usize,
        frame: &Rc<[u8]>,
    ) -> Delivery {
        let start = self.presence.append(frame);
        let Some(conn) = conns.get_mut(to) else {
            return Delivery::Gone;
        };
        if !conn.is_open() {
            return Delivery::Gone;
        }
        match self.judge(to, conn, Class::Presence, frame.len()) {
            Verdict::Queue => {}
            _ => {
                conn.shed = conn.shed.saturating_add(1);
                // A hole in what it is owed: the window closes here, and this
                // connection's part ends before the shed frame (the others'
                // include it; later recipients find it in a new window).
                if let Some(from) = conn.presence_from.take() {
                    let shared = self.release_presence(conns);
                    if let Some(conn) = conns.get_mut(to) {
                        conn.out.push_reusing(
                            Chunk::part(shared, from as usize, start),
                            Lane::Bulk,
                            &mut self.spares,
                        );
                        self.list_for_flush(to, conn);
                    }
                }
                return Delivery::Shed;
            }
        }
        if conn.presence_from.is_none() {
            conn.presence_from = u32::try_from(start).ok();
            self.presence.owed.push(to);
        }
        Delivery::Queued
    }

    /// Closes the presence window now: everyone owed events gets its part
    /// of the window's bytes, shared, behind what it already has queued.
    /// Returns the bytes, for a caller that set a connection's part aside.
    pub fn release_presence(&mut self, conns: &mut Slab<Connection>) -> Rc<[u8]> {
        let (shared, owed) = self.presence.close();
        let end = shared.len();
        for slot in owed {
            let Some(conn) = conns.get_mut(slot) else {
                continue;
            };
            // None: paid already, or a new connection in a reused slot.
            let Some(from) = conn.presence_from.take() else {
                continue;
            };
            if conn.is_open() {
                conn.out.push_reusing(
                    Chunk::part(shared.clone(), from as usize, end),
                    Lane::Bulk,
                    &mut self.spares,
                );
                self.list_for_flush(slot, conn);
            }
        }
        shared
    }

    /// Before anything else is queued in the bulk lane for `slot`, what it
    /// is owed goes first: a small debt as its own copy, a large one by
    /// closing the window for everyone, shared. Releasing for every reader
    /// that gets something else would queue a part for all owed readers each
    /// time (a crowd leaving in one turn, each leave owed to the rest:
    /// quadratic memory); copying every debt would copy a growing window per
    /// reader. The bound keeps both linear.
    pub fn settle_presence(&mut self, conns: &mut Slab<Connection>, slot: usize) {
        let Some(conn) = conns.get_mut(slot) else {
            return;
        };
        let Some(from) = conn.presence_from else {
            return;
        };
        if self.presence.end() - from as usize <= COPY_OWED_MAX {
            self.pay_presence_copy(conn);
            // It goes out this turn even if nothing follows (a deadline
            // that settles but then sends nothing).
            self.list_for_flush(slot, conn);
        } else {
            self.release_presence(conns);
        }
    }

    /// Queues a copy of what one connection is owed (a small debt, or a
    /// path that holds only that connection: a close, a `gap`).
    fn pay_presence_copy(&mut self, conn: &mut Connection) {
        if let Some(from) = conn.presence_from.take() {
            let owed = self.presence.copy(from as usize, self.presence.end());
            if !owed.is_empty() {
                conn.out
                    .push_reusing(Chunk::Owned(owed), Lane::Bulk, &mut self.spares);
            }
        }
    }

    /// Sends a reply once this turn's log records are on disk.
    fn send_when_durable(&mut self, to: usize, json: &[u8]) {
        let mut frame = Vec::with_capacity(header_len(json.len()) + json.len());
        write_header(&mut frame, Opcode::Text, json.len());
        frame.extend_from_slice(json);
        self.after_sync.push((to, frame));
    }

    /// The log records of this turn are on disk: the replies that promised
    /// it go out.
    pub fn release_durable(&mut self, conns: &mut Slab<Connection>) {
        for (slot, frame) in std::mem::take(&mut self.after_sync) {
            if let Some(conn) = conns.get_mut(slot) {
                if conn.is_open() {
                    conn.out
                        .push_reusing(Chunk::Owned(frame), Lane::Urgent, &mut self.spares);
                    self.list_for_flush(slot, conn);
                }
            }
        }
    }

    /// This turn's log records did not reach the disk: the replies that
    /// promised it never go out.
    pub fn drop_durable(&mut self) {
        self.after_sync.clear();
    }

    // --- The connection's own frames --------------------------------------

    /// The opening handshake's answer: first, whatever follows it.
    pub fn upgrade(&mut self, conn: &mut Connection, slot: usize, response: Vec<u8>) {
        // A control entry: nothing (a pong to a ping sent right behind the
        // request) may overtake the 101.
        conn.out.push_control(Chunk::Owned(response));
        self.list_for_flush(slot, conn);
    }

    /// A pong for a ping, ahead of queued data.
    pub fn pong(&mut self, conn: &mut Connection, slot: usize, payload: &[u8]) {
        let pong = crate::ws::frame::encode(Opcode::Pong, payload);
        conn.out
            .push_control_bounded(Chunk::Owned(pong), PONGS_QUEUED);
        self.list_for_flush(slot, conn);
    }

    /// The server's heartbeat (at most one waits unsent).
    pub fn ping(&mut self, conn: &mut Connection, slot: usize) {
        conn.out.push_control_bounded(Chunk::Static(PING), 1);
        self.list_for_flush(slot, conn);
    }

    /// The echo server's answer (its backlog is bounded by the read pause:
    /// an echo is never larger than what was read).
    pub fn echo(&mut self, conn: &mut Connection, slot: usize, opcode: Opcode, payload: &[u8]) {
        conn.out
            .push_frame(opcode, payload, Lane::Bulk, &mut self.spares);
        self.list_for_flush(slot, conn);
    }

    /// An HTTP answer, then the connection closes (it never was a WebSocket).
    pub fn respond_and_close(
        &mut self,
        conn: &mut Connection,
        slot: usize,
        response: Vec<u8>,
        why: CloseReason,
    ) {
        conn.out.push(Chunk::Owned(response));
        conn.enter_closing(why);
        self.began_closing.push(slot);
        self.list_for_flush(slot, conn);
    }

    /// Starts the closing handshake with `code`: what it is owed and what
    /// is queued go out first, then the close frame.
    pub fn close(
        &mut self,
        conns: &mut Slab<Connection>,
        slot: usize,
        code: CloseCode,
        reason: &str,
        why: CloseReason,
    ) {
        self.push_last(conns, slot, encode_close(code.to_u16(), reason), why);
    }

    /// Answers the peer's close frame: echo its code (RFC 6455 5.5.1).
    pub fn answer_close(&mut self, conns: &mut Slab<Connection>, slot: usize, code: Option<u16>) {
        let frame = match code {
            Some(code) => encode_close(code, ""),
            None => vec![0x88, 0x00],
        };
        self.push_last(conns, slot, frame, CloseReason::Normal);
    }

    /// Queues an open connection's closing frame behind everything else.
    fn push_last(
        &mut self,
        conns: &mut Slab<Connection>,
        slot: usize,
        frame: Vec<u8>,
        why: CloseReason,
    ) {
        if !conns.get(slot).is_some_and(|c| c.is_open()) {
            return;
        }
        // What it is owed comes before its close, settled as for any bulk
        // frame: a crowd closing in one turn, each owed the others' leaves,
        // must not copy a growing window once per leaver.
        self.settle_presence(conns, slot);
        let Some(conn) = conns.get_mut(slot) else {
            return;
        };
        // What is queued still goes out first: replies to what came before (a
        // peer that breaks the protocol after a valid message gets that
        // message's echo) and messages replayed from an outbox, which count
        // as delivered once queued. The backlog is bounded by the policy; a
        // peer that never reads it is dropped by the write-stall timeout.
        conn.out.push(Chunk::Owned(frame));
        self.leave_open(conn, slot, why);
    }

    fn leave_open(&mut self, conn: &mut Connection, slot: usize, why: CloseReason) {
        if conn.enter_closing(why) {
            self.departures.push(slot);
        }
        self.began_closing.push(slot);
        self.list_for_flush(slot, conn);
    }

    /// The connection ends now, without a closing handshake: the router
    /// must forget it if it was open.
    pub fn killed(&mut self, conn: &Connection, slot: usize) {
        if conn.is_open() {
            self.departures.push(slot);
        }
    }

    // --- Writing ------------------------------------------------------------

    /// Writes one listed connection's queue; a reader that drained gets the
    /// `gap` it is owed. Returns what the write achieved.
    pub fn write(&mut self, conns: &mut Slab<Connection>, slot: usize) -> io::Result<Flushed> {
        let Some(conn) = conns.get_mut(slot) else {
            return Ok(Flushed::All);
        };
        conn.flush_listed = false;
        if conn.blocked {
            // The kernel said no at this turn's earlier write, and has not
            // said writable since.
            return Ok(Flushed::Blocked);
        }
        let mut before = conn.out.bytes();
        let mut result = conn.out.write_to(&mut conn.socket, &mut self.spares);
        if matches!(result, Ok(Flushed::All)) && conn.shed > 0 && conn.is_open() {
            // The backlog drained: tell the reader what it missed.
            self.bytes_out += before as u64;
            let mut json = Vec::with_capacity(40);
            self.pay_presence_copy(conn);
            encode::gap(&mut json, u64::from(conn.shed));
            conn.shed = 0;
            conn.out
                .push_frame(Opcode::Text, &json, Lane::Bulk, &mut self.spares);
            before = conn.out.bytes();
            result = conn.out.write_to(&mut conn.socket, &mut self.spares);
        }
        if let Ok(flushed) = result {
            self.note_write(conn, before, flushed);
        }
        if conn.holding > 0 && policy::may_release_senders(conn.out.bytes(), self.marks) {
            self.release_senders_of(conns, slot);
        }
        result
    }
}

/// A frame to deliver: JSON to frame into the connection's own buffer, or a
/// frame shared by many connections.
#[derive(Debug, Clone, Copy)]
enum Frame<'a> {
    Text(&'a [u8]),
    Shared(&'a Rc<[u8]>),
}

impl Frame<'_> {
    fn len(&self) -> usize {
        match self {
            Frame::Text(json) => header_len(json.len()) + json.len(),
            Frame::Shared(bytes) => bytes.len(),
        }
    }
}

/// The router's view of the connections: every message it sends goes
/// through [`Post::deliver`].
pub struct Mailer<'a> {
    pub conns: &'a mut Slab<Connection>,
    pub post: &'a mut Post,
}

impl Outbox for Mailer<'_> {
    fn send(&mut self, ConnId(to): ConnId, json: &[u8], class: Class) -> Delivery {
        self.post
            .deliver(self.conns, to, Frame::Text(json), class, None)
    }

    fn send_private(&mut self, ConnId(from): ConnId, ConnId(to): ConnId, json: &[u8]) -> Delivery {
        self.post.deliver(
            self.conns,
            to,
            Frame::Text(json),
            Class::Private,
            Some(from),
        )
    }

    fn broadcast(&mut self, json: &[u8], class: Class, to: impl Iterator<Item = ConnId>) -> Fanout {
        // Framed in a reused buffer, then copied once into the shared bytes.
        let mut buffer = std::mem::take(&mut self.post.frame_scratch);
        buffer.clear();
        write_header(&mut buffer, Opcode::Text, json.len());
        buffer.extend_from_slice(json);
        let frame: Rc<[u8]> = Rc::from(&buffer[..]);
        self.post.frame_scratch = buffer;
        let mut fanout = Fanout::default();
        for ConnId(slot) in to {
            let delivery = if class == Class::Presence {
                self.post.owe_presence(self.conns, slot, &frame)
            } else {
                self.post
                    .deliver(self.conns, slot, Frame::Shared(&frame), class, None)
            };
            match delivery {
                Delivery::Queued => fanout.queued += 1,
                Delivery::Shed => fanout.shed += 1,
                Delivery::Gone | Delivery::Disconnected | Delivery::Refused => {}
            }
        }
        fanout
    }

    fn send_when_durable(&mut self, ConnId(to): ConnId, json: &[u8]) {
        self.post.send_when_durable(to, json);
    }

    fn close(&mut self, ConnId(slot): ConnId, code: CloseCode, reason: &'static str) {
        let why = match code {
            CloseCode::Replaced => CloseReason::Replaced,
            CloseCode::TokenExpired => CloseReason::TokenExpired,
            _ => CloseReason::Refused(code),
        };
        self.post.close(self.conns, slot, code, reason, why);
    }

    fn renew(&mut self, ConnId(slot): ConnId, until_unix_secs: u64) {
        let left_ms = until_unix_secs
            .saturating_mul(1000)
            .saturating_sub(self.post.now_ms);
        let until = self.post.now + std::time::Duration::from_millis(left_ms);
        if let Some(conn) = self.conns.get_mut(slot) {
            // Only later: the deadline armed for the old expiry finds this
            // and re-arms.
            conn.token_expires = Some(until);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Delivery's bookkeeping, in process: real (idle) sockets only to build
    //! connections; queues are read back without sending. A connection
    //! whose socket "refused" bytes is marked `blocked`, so nothing is
    //! offered to the kernel behind the test's back.
    use std::time::{Duration, Instant};

    use super::*;
    use crate::conn::{OpenState, Phase};
    use crate::timer::Clock;

    fn open_connection(keep: &mut Vec<std::net::TcpStream>, id: u64) -> Connection {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        keep.push(
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect"),
        );
        let (socket, peer) = listener.accept().expect("accept");
        socket.set_nonblocking(true).expect("nonblocking");
        let mut conn = Connection::new(id, peer, mio::net::TcpStream::from_std(socket));
        // Its own clock: these tests never compare connection times.
        let now = Clock::starting_now().tick(Instant::now());
        conn.phase = Phase::Open(OpenState::new(now));
        conn
    }

    fn post(max_outbound: usize) -> Post {
        let now = Clock::starting_now().tick(Instant::now());
        Post::new(
            Marks::new(max_outbound),
            Times {
                slow_reader_after: Duration::from_secs(2),
                write_timeout: Duration::from_secs(30),
            },
            now,
        )
    }

    fn queued(conn: &mut Connection) -> Vec<u8> {
        let mut sink = Vec::new();
        conn.out
            .write_to(&mut sink, &mut Spares::default())
            .expect("a Vec takes everything");
        sink
    }

    fn framed(text: &str) -> Vec<u8> {
        crate::ws::frame::encode(Opcode::Text, text.as_bytes())
    }

    fn to(slots: &[usize]) -> impl Iterator<Item = ConnId> + '_ {
        slots.iter().map(|&s| ConnId(s))
    }

    #[test]
    fn presence_is_owed_then_released_in_order_and_a_shed_event_is_left_out() {
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let (a, b, c) = (
            conns.insert(open_connection(&mut keep, 1)),
            conns.insert(open_connection(&mut keep, 2)),
            conns.insert(open_connection(&mut keep, 3)),
        );
        let mut post = post(64); // soft mark 16
        let mut mailer = Mailer {
            conns: &mut conns,
            post: &mut post,
        };
        let sent = mailer.broadcast(b"[1]", Class::Presence, to(&[a, b]));
        assert_eq!(sent, Fanout { queued: 2, shed: 0 });
        assert!(mailer.conns[a].out.is_empty(), "owed, not queued yet");

        // b falls behind (its socket takes nothing): it is shed from event
        // two, which a still gets.
        mailer.conns[b]
            .out
            .push(Chunk::Static(b"a backlog of 20 bytes"));
        mailer.conns[b].blocked = true;
        let sent = mailer.broadcast(b"[2]", Class::Presence, to(&[a, b]));
        assert_eq!(sent, Fanout { queued: 1, shed: 1 });
        assert_eq!(
            queued(&mut mailer.conns[b]),
            [b"a backlog of 20 bytes".to_vec(), framed("[1]")].concat()
        );
        assert_eq!(
            queued(&mut mailer.conns[a]),
            [framed("[1]"), framed("[2]")].concat()
        );

        // A new window: c is owed three; a public message for c takes it along first.
        mailer.broadcast(b"[3]", Class::Presence, to(&[c]));
        mailer.send(ConnId(c), b"{}", Class::Public);
        assert_eq!(
            queued(&mut mailer.conns[c]),
            [framed("[3]"), framed("{}")].concat()
        );

        // Owed events go out before a close frame.
        mailer.broadcast(b"[4]", Class::Presence, to(&[a]));
        post.close(&mut conns, a, CloseCode::Normal, "", CloseReason::Normal);
        let bytes = queued(&mut conns[a]);
        assert!(
            bytes.starts_with(&[framed("[4]"), vec![0x88]].concat()),
            "{bytes:?}"
        );
        assert_eq!(post.departures, [a], "the router is told it left");
    }

    #[test]
    fn a_crowd_closing_in_one_turn_gets_its_presence_with_linear_bookkeeping() {
        let leavers = 200;
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let slots: Vec<usize> = (0..leavers)
            .map(|i| conns.insert(open_connection(&mut keep, i as u64)))
            .collect();
        let mut post = post(usize::MAX);
        let text = r#"{"type":"leave","username":"someone","online":100}"#;
        // Each leaver closes (answering its client's close frame, as the
        // loop does), then its `leave` is owed to everyone still open.
        for (i, &slot) in slots.iter().enumerate() {
            post.answer_close(&mut conns, slot, Some(1000));
            let mut mailer = Mailer {
                conns: &mut conns,
                post: &mut post,
            };
            mailer.broadcast(text.as_bytes(), Class::Presence, to(&slots[i + 1..]));
        }
        let (chunks, copied) = slots
            .iter()
            .map(|&s| conns[s].out.footprint())
            .fold((0, 0), |(c, b), (chunks, owned)| (c + chunks, b + owned));
        // Releasing the window at every close would queue ~leavers²/2 parts
        // (20,100 here); copying every debt, ~leavers²/2 events (~1 MB).
        assert!(
            chunks < 10 * leavers,
            "{chunks} chunks for {leavers} leavers"
        );
        assert!(
            copied < 256 * 1024,
            "{copied} bytes copied for {leavers} leavers"
        );
        for (i, &slot) in slots.iter().enumerate() {
            let bytes = queued(&mut conns[slot]);
            let close_at = bytes
                .iter()
                .position(|&b| b == 0x88)
                .expect("a close frame");
            assert_eq!(
                bytes[..close_at].len(),
                i * framed(text).len(),
                "leaver {i} gets every earlier leave before its close"
            );
        }
    }

    #[test]
    fn a_settled_debt_is_listed_for_this_turns_flush() {
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let slot = conns.insert(open_connection(&mut keep, 1));
        let mut post = post(1 << 20);
        let mut mailer = Mailer {
            conns: &mut conns,
            post: &mut post,
        };
        mailer.broadcast(b"[1]", Class::Presence, to(&[slot]));
        post.settle_presence(&mut conns, slot);
        assert!(conns[slot].flush_listed);
        assert_eq!(post.take_flush_list(), [slot]);
        assert_eq!(queued(&mut conns[slot]), framed("[1]"));
    }

    /// A reader whose socket has taken nothing since `stalled_for` ago.
    fn stall(post: &mut Post, conn: &mut Connection, stalled_for: Duration) {
        conn.blocked = true;
        conn.stalled_since = Some(post.now);
        post.now = post.now + stalled_for;
    }

    #[test]
    fn a_slow_consumer_gets_its_owed_presence_then_the_close_and_not_the_private() {
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let sender = conns.insert(open_connection(&mut keep, 1));
        let slot = conns.insert(open_connection(&mut keep, 2));
        let mut post = post(64);
        stall(&mut post, &mut conns[slot], Duration::from_secs(3));
        let mut mailer = Mailer {
            conns: &mut conns,
            post: &mut post,
        };
        mailer.broadcast(b"[1]", Class::Presence, to(&[slot]));
        let private = [b'x'; 80];
        let sent = mailer.send_private(ConnId(sender), ConnId(slot), &private);
        assert_eq!(sent, Delivery::Disconnected);
        let bytes = queued(&mut conns[slot]);
        assert!(
            bytes.starts_with(&[framed("[1]"), vec![0x88]].concat()),
            "{bytes:?}"
        );
        assert!(!bytes.windows(8).any(|w| w == b"xxxxxxxx"), "{bytes:?}");
        assert!(
            !conns[sender].held,
            "a slow reader does not hold its sender"
        );
    }

    #[test]
    fn a_flooded_reader_holds_its_sender_refuses_past_the_limit_and_releases_when_drained() {
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let sender = conns.insert(open_connection(&mut keep, 1));
        let reader = conns.insert(open_connection(&mut keep, 2));
        let mut post = post(4096); // soft 1024, released below 512
                                   // Its socket refuses now, but took bytes a moment ago: draining.
        stall(&mut post, &mut conns[reader], Duration::from_millis(10));
        let mut mailer = Mailer {
            conns: &mut conns,
            post: &mut post,
        };
        let message = [b'm'; 500];
        for _ in 0..2 {
            let sent = mailer.send_private(ConnId(sender), ConnId(reader), &message);
            assert_eq!(sent, Delivery::Queued);
        }
        assert!(!mailer.conns[sender].held, "below the soft mark");
        let sent = mailer.send_private(ConnId(sender), ConnId(reader), &message);
        assert_eq!(sent, Delivery::Queued);
        assert!(
            mailer.conns[sender].held,
            "past the soft mark: the sender waits"
        );
        assert_eq!(mailer.conns[reader].holding, 1);
        for _ in 0..5 {
            mailer.send_private(ConnId(sender), ConnId(reader), &message);
        }
        let sent = mailer.send_private(ConnId(sender), ConnId(reader), &message);
        assert_eq!(
            sent,
            Delivery::Refused,
            "past --max-outbound while draining"
        );
        assert!(
            mailer.conns[reader].is_open(),
            "never disconnected for others' flood"
        );
        assert_eq!(post.senders_held, 1);

        // The socket says writable again and takes it all: the sender is read again.
        conns[reader].blocked = false;
        assert_eq!(post.write(&mut conns, reader).expect("write"), Flushed::All);
        assert!(!conns[sender].held);
        assert_eq!(post.released, [(sender, 1)]);
    }

    #[test]
    fn a_hold_ends_by_its_time_even_if_the_reader_never_drains() {
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let sender = conns.insert(open_connection(&mut keep, 1));
        let reader = conns.insert(open_connection(&mut keep, 2));
        let mut post = post(4096);
        stall(&mut post, &mut conns[reader], Duration::ZERO);
        let mut mailer = Mailer {
            conns: &mut conns,
            post: &mut post,
        };
        mailer.send_private(ConnId(sender), ConnId(reader), &[b'm'; 2000]);
        assert!(conns[sender].held);
        let due = post.next_hold_due().expect("a hold");
        post.release_due_holds(&mut conns);
        assert!(conns[sender].held, "not yet");
        post.now = due;
        post.release_due_holds(&mut conns);
        assert!(!conns[sender].held);
        assert_eq!(conns[reader].holding, 0);
        assert_eq!(post.next_hold_due(), None);
    }

    #[test]
    fn a_reader_marked_blocked_is_looked_at_again_before_it_is_disconnected() {
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let sender = conns.insert(open_connection(&mut keep, 1));
        let reader = conns.insert(open_connection(&mut keep, 2));
        let mut post = post(4096);
        // Its last write hit a full socket long ago, and no EPOLLOUT came
        // since (Linux raises none until a third of a large buffer is free),
        // but its socket has room now.
        stall(&mut post, &mut conns[reader], Duration::from_secs(10));
        conns[reader].out.push(Chunk::Owned(vec![b'q'; 4000]));
        let mut mailer = Mailer {
            conns: &mut conns,
            post: &mut post,
        };
        let sent = mailer.send_private(ConnId(sender), ConnId(reader), &[b'm'; 500]);
        assert_eq!(sent, Delivery::Queued, "it drained: not disconnected");
        assert!(conns[reader].is_open());
        assert!(conns[reader].stalled_since.is_none());
    }

    #[test]
    fn a_burst_is_judged_after_the_kernel_took_what_it_could() {
        let mut keep = Vec::new();
        let mut conns = Slab::new();
        let reader = conns.insert(open_connection(&mut keep, 1));
        let mut post = post(4096); // soft 1024
        let mut mailer = Mailer {
            conns: &mut conns,
            post: &mut post,
        };
        // 50 × 400 bytes in one turn: twenty times the soft mark, and the
        // (idle, but empty) socket takes it all.
        for _ in 0..50 {
            let sent = mailer.broadcast(&[b'p'; 400], Class::Public, to(&[reader]));
            assert_eq!(sent, Fanout { queued: 1, shed: 0 });
        }
        assert!(conns[reader].out.bytes() <= 1024 + 410);
        assert_eq!(conns[reader].shed, 0);
    }
}
