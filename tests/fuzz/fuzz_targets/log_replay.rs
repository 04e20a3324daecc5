//! Arbitrary bytes as the outbox log, replayed as the server does at start
//! (`open_store` in src/main.rs): `Log::open` on a data directory holding
//! them (which reads them with `Replay::read`, cuts a damaged tail or keeps
//! a damaged log aside and rewrites it), each record into
//! `Outboxes::replay`, then `finish_replay` (and `after_lost_records` when
//! records were lost).
//!
//! Replay must not panic whatever the file holds; its memory must stay
//! within a constant factor of the file's size (a length field must not
//! make it allocate what the file does not hold); what it leaves on disk
//! must open again without damage to the same records; the state it
//! builds, written out as a snapshot (what compaction writes), must replay
//! to the same state; and that state must be usable: the next message for
//! a name is numbered above everything held for it.
//!
//! Random bytes rarely carry a valid CRC-32, so most inputs would only test
//! the search past damage: a record whose checksum field is zero gets the
//! right checksum written in before the file is, so the fuzzer also reaches
//! what lies behind the check. A real log (a seed) is taken as it is.
//!
//! The data directory is a fresh one under /dev/shm (the temporary
//! directory where there is none), removed after each input.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wschat::config::Config;
use wschat::store::log::{Log, Sync};
use wschat::store::record::{crc32, Record, FRAME_OVERHEAD};
use wschat::store::replay::{Damage, Replay};
use wschat::store::Outboxes;

/// What replay may take beyond the file's bytes: this many times their
/// number, plus a constant for the fixed costs (paths, file handles, the
/// first allocations of each table). A record of about 20 bytes (a short
/// name and a number) becomes a `Record` of about a hundred bytes in a
/// vector that may have doubled, and then a box of the same order: 3,000
/// such records, each naming a new user, took 13 bytes per file byte.
const BYTES_PER_FILE_BYTE: usize = 32;
const FIXED_BYTES: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut file = data.to_vec();
    fill_in_zero_checksums(&mut file);
    let dir = scratch_dir();
    fresh_log(dir, &file);

    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let mut first = open_and_replay(dir);
    let taken = PEAK.load(Ordering::Relaxed) - before;
    assert!(
        taken <= BYTES_PER_FILE_BYTE * file.len() + FIXED_BYTES,
        "replaying {} bytes took {taken} bytes of memory",
        file.len()
    );

    // The log as the first open left it (cut, or rewritten without the
    // damage) holds the same records, and no damage.
    let again = Log::open(dir, Sync::Never).unwrap();
    assert_eq!(again.records, Replay::read(&file).records);
    assert_eq!(again.log.replayed().damaged_regions, 0);
    drop(again);

    let snapshot = first.snapshot();
    fresh_log(dir, &snapshot);
    let mut second = open_and_replay(dir);
    let _ = std::fs::remove_dir_all(dir);
    let (a, b) = (&first, &second);
    assert_eq!(a.held(), b.held());
    assert_eq!(a.live_log_bytes(), b.live_log_bytes(), "the same names");
    assert_eq!(a.known_users(), b.known_users());
    assert_eq!(a.next_expiry(), b.next_expiry());
    // Only held messages are written: the largest id may have been acked.
    assert!(b.max_id <= a.max_id);
    let written = parts(&snapshot);
    let (known, boxes) = &written;
    for user in known {
        assert!(b.is_known(user), "{user:?} known");
    }
    let users: Vec<&str> = boxes
        .iter()
        .filter_map(|r| match r {
            Record::Store { user, .. } => Some(user.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(a.last_seq(), b.last_seq());
    for user in &users {
        assert!(
            a.held_after(user, 0).eq(b.held_after(user, 0)),
            "{user:?}'s messages"
        );
    }
    assert_eq!(parts(&second.snapshot()), written);
    // The replayed state is usable: a new message is numbered above
    // everything held, short of the end of the numbers (a log can claim
    // 2^63 - 1; past it the last number is given again, by design: see
    // `Outboxes::next_seq`).
    let seq = first.next_seq();
    if seq < wschat::store::record::SEQ_LIMIT - 1 {
        for user in &users {
            assert!(first.held_after(user, seq - 1).next().is_none());
        }
    }
});

/// A fresh data directory holding `log`.
fn fresh_log(dir: &Path, log: &[u8]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("outbox.log"), log).unwrap();
}

/// `open_store` in src/main.rs, without its logging.
fn open_and_replay(dir: &Path) -> Outboxes {
    let mut outboxes = Outboxes::new(Config::default().store_limits());
    let opened = Log::open(dir, Sync::Never).unwrap();
    let replayed = opened.log.replayed();
    for record in opened.records {
        outboxes.replay(record);
    }
    outboxes.finish_replay();
    if replayed.damaged_regions > 0 {
        outboxes.after_lost_records();
    }
    outboxes
}

/// A snapshot's records: the known names (sorted: they are written from a
/// hash set) and the rest, in order.
fn parts(snapshot: &[u8]) -> (Vec<String>, Vec<Record>) {
    let replay = Replay::read(snapshot);
    assert_eq!(replay.damage(), Damage::None, "a snapshot reads whole");
    let mut known = Vec::new();
    let mut rest = Vec::new();
    for record in replay.records {
        match record {
            Record::Known { user } => known.push(user),
            other => rest.push(other),
        }
    }
    known.sort_unstable();
    (known, rest)
}

/// Writes the right CRC-32 into every framed record (`[len][crc][payload]`)
/// whose checksum field is zero, up to the first length that overruns.
fn fill_in_zero_checksums(file: &mut [u8]) {
    let mut pos = 0;
    while let Some(header) = file.get(pos..pos + FRAME_OVERHEAD) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let end = pos + FRAME_OVERHEAD + len;
        if end > file.len() {
            break;
        }
        if header[4..8] == [0; 4] {
            let crc = crc32(&file[pos + FRAME_OVERHEAD..end]);
            file[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        }
        pos = end;
    }
}

fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        base.join(format!("wschat-fuzz-log-{}", std::process::id()))
    })
}

/// Bytes allocated now, and the most since the last reset.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

impl Counting {
    fn grew(by: usize) {
        let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            Counting::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            Counting::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            Counting::grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;
