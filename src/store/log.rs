//! The outbox log on disk: an append-only file of checksummed records,
//! replayed at start, appended once per loop turn (group commit), and
//! compacted by rewriting it whole. Its directory is locked for the
//! process's life, so that two servers never write one log.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::record::Record;
use super::replay::{Damage, Replay};

const LOG_NAME: &str = "outbox.log";
const COMPACT_NAME: &str = "outbox.log.compact";
const LOCK_NAME: &str = "lock";

/// When appended records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// `fdatasync` once per loop turn that wrote records, before any reply
    /// that depends on them leaves.
    Always,
    /// Never (benchmarks): a crash can lose the last seconds.
    Never,
}

/// What opening the log found.
#[derive(Debug)]
pub struct Opened {
    pub log: Log,
    pub records: Vec<Record>,
    /// Bytes cut from a torn or corrupt tail, and where it started.
    pub cut: Option<(u64, u64)>,
    /// Where the log was kept aside because it was damaged before its last
    /// readable record; the log itself was rewritten without the damage.
    pub kept_aside: Option<PathBuf>,
}

/// What replay found at start, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub records_kept: u64,
    /// Bytes that could not be read, a cut tail's included.
    pub damaged_bytes: u64,
    /// Separate damaged stretches: each held at least one lost record,
    /// unless it was bytes added to the log by something else.
    pub damaged_regions: u64,
}

/// Why the log could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// Another process holds the directory's lock: it is using the log.
    Locked {
        lock: PathBuf,
    },
    /// The log is damaged before its last readable record and could not be
    /// kept aside, so it was left as it was.
    KeepAside {
        path: PathBuf,
        source: io::Error,
    },
    Io(io::Error),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Locked { lock } => write!(
                f,
                "another process is using it (it holds the lock on {}); \
                 two servers on one data directory would lose messages",
                lock.display()
            ),
            OpenError::KeepAside { path, source } => write!(
                f,
                "{LOG_NAME} is damaged and could not be kept aside as {}: {source}",
                path.display()
            ),
            OpenError::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OpenError::Locked { .. } => None,
            OpenError::KeepAside { source, .. } | OpenError::Io(source) => Some(source),
        }
    }
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> OpenError {
        OpenError::Io(e)
    }
}

#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    file: File,
    sync: Sync,
    /// Bytes in the file.
    len: u64,
    /// Held open for the process's life: its `flock` keeps other servers
    /// out of `dir`.
    _lock: File,
    replayed: Replayed,
}

impl Log {
    /// Creates `dir` if needed, locks it, reads the log, and deals with
    /// damage: a damaged tail is cut; damage before the last readable record
    /// is stepped over (see `store::replay`), the file kept aside as
    /// `outbox.log.corrupt-<unix seconds>`, and the log rewritten without it.
    pub fn open(dir: &Path, sync: Sync) -> Result<Opened, OpenError> {
        fs::create_dir_all(dir)?;
        // Before anything in `dir` is read or changed: a second server must
        // not cut, rewrite or compact a log that another one is appending to.
        let lock_path = dir.join(LOCK_NAME);
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)?;
        if !crate::sys::try_lock_exclusive(&lock)? {
            return Err(OpenError::Locked { lock: lock_path });
        }
        // A compaction that did not reach its rename left only a scratch file.
        match fs::remove_file(dir.join(COMPACT_NAME)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let path = dir.join(LOG_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let replay = Replay::read(&bytes);
        let mut log = Log {
            dir: dir.to_owned(),
            file,
            sync,
            len: bytes.len() as u64,
            _lock: lock,
            replayed: Replayed {
                records_kept: replay.records.len() as u64,
                damaged_bytes: replay.damaged_bytes() as u64,
                damaged_regions: replay.damaged.len() as u64,
            },
        };
        let mut cut = None;
        let mut kept_aside = None;
        match replay.damage() {
            Damage::None => {}
            Damage::Tail(tail) => {
                cut = Some((tail.start as u64, tail.len() as u64));
                log.file.set_len(tail.start as u64)?;
                log.file.sync_all()?;
                log.len = tail.start as u64;
            }
            Damage::Inside => {
                let path = keep_aside(dir, &bytes, unix_seconds())?;
                log.compact(&replay.clean(&bytes))?;
                kept_aside = Some(path);
            }
        }
        // Prove the directory is writable now, not at the first message.
        log.file.write_all(&[])?;
        Ok(Opened {
            log,
            records: replay.records,
            cut,
            kept_aside,
        })
    }

    /// What replay found when the log was opened.
    pub fn replayed(&self) -> Replayed {
        self.replayed
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends records and, in `Sync::Always`, waits until they are on disk.
    /// On failure (a full disk, an I/O error, a failed sync) the file is cut
    /// back to where it was, as far as the file system lets it, and the
    /// records count as not written: the caller rewrites the log from
    /// memory once the disk takes writes again (see `persist`).
    pub fn append(&mut self, records: &[u8]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let written = self.file.write_all(records).and_then(|()| {
            if self.sync == Sync::Always {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // A torn tail left behind if this fails too is cut at the next
            // start, or replaced by the rewrite.
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += records.len() as u64;
        Ok(())
    }

    /// Replaces the log with `snapshot` (the live records). Crash-safe at
    /// every step: the old log stays whole until the rename, and the new
    /// one is on disk before it.
    pub fn compact(&mut self, snapshot: &[u8]) -> io::Result<()> {
        let scratch = self.dir.join(COMPACT_NAME);
        let written = File::create(&scratch).and_then(|mut file| {
            file.write_all(snapshot)?;
            file.sync_all()
        });
        if let Err(e) = written {
            // What it took of a full disk is given back.
            let _ = fs::remove_file(&scratch);
            return Err(e);
        }
        fs::rename(&scratch, self.dir.join(LOG_NAME))?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_NAME))?;
        self.len = snapshot.len() as u64;
        Ok(())
    }
}

/// Keeps the damaged log as `outbox.log.corrupt-<secs>` (with a further
/// `.N` if that name is taken), never replacing anything: a hard link to the
/// file, so the very bytes, or where the file system has no hard links a
/// copy of `bytes`, what was read from it.
fn keep_aside(dir: &Path, bytes: &[u8], secs: u64) -> Result<PathBuf, OpenError> {
    let mut path = dir.join(format!("{LOG_NAME}.corrupt-{secs}"));
    for n in 1..=100 {
        let kept = fs::hard_link(dir.join(LOG_NAME), &path).or_else(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                return Err(e);
            }
            let mut copy = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            copy.write_all(bytes)?;
            copy.sync_all()
        });
        match kept {
            Ok(()) => {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| OpenError::KeepAside {
                        path: path.clone(),
                        source,
                    })?;
                return Ok(path);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                path = dir.join(format!("{LOG_NAME}.corrupt-{secs}.{n}"));
            }
            Err(source) => return Err(OpenError::KeepAside { path, source }),
        }
    }
    Err(OpenError::KeepAside {
        path,
        source: io::ErrorKind::AlreadyExists.into(),
    })
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wschat-log-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn ack(seq: u64) -> Record {
        Record::Ack {
            user: "bob".into(),
            seq,
        }
    }

    #[test]
    fn appends_survive_reopening() {
        let dir = temp_dir("reopen");
        let mut opened = Log::open(&dir, Sync::Always).unwrap();
        let mut bytes = Vec::new();
        ack(1).encode(&mut bytes);
        ack(2).encode(&mut bytes);
        opened.log.append(&bytes).unwrap();
        drop(opened);
        let again = Log::open(&dir, Sync::Always).unwrap();
        assert_eq!(again.records, vec![ack(1), ack(2)]);
        assert!(again.cut.is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_tail_torn_at_every_offset_is_cut_and_the_rest_kept() {
        let dir = temp_dir("torn");
        let mut whole = Vec::new();
        ack(1).encode(&mut whole);
        let first = whole.len();
        ack(2).encode(&mut whole);
        for cut in first..whole.len() {
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(LOG_NAME), &whole[..cut]).unwrap();
            let opened = Log::open(&dir, Sync::Never).unwrap();
            assert_eq!(opened.records, vec![ack(1)], "cut {cut}");
            assert_eq!(opened.cut.is_some(), cut > first, "cut {cut}");
            assert_eq!(
                fs::metadata(dir.join(LOG_NAME)).unwrap().len(),
                first as u64
            );
            assert!(opened.kept_aside.is_none());
            assert_eq!(
                kept_aside(&dir),
                Vec::<PathBuf>::new(),
                "a tail is cut, not kept"
            );
            drop(opened);
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// The `outbox.log.corrupt-*` files in `dir`.
    fn kept_aside(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".corrupt-"))
            .collect();
        found.sort();
        found
    }

    #[test]
    fn damage_inside_is_stepped_over_and_the_original_kept_aside() {
        let dir = temp_dir("inside");
        fs::create_dir_all(&dir).unwrap();
        let mut whole = Vec::new();
        let mut starts = Vec::new();
        for seq in 1..=100 {
            starts.push(whole.len());
            ack(seq).encode(&mut whole);
        }
        let mut damaged = whole.clone();
        damaged[starts[49] + 10] ^= 0x04;
        fs::write(dir.join(LOG_NAME), &damaged).unwrap();

        let opened = Log::open(&dir, Sync::Never).unwrap();
        let want: Vec<_> = (1..=100).filter(|&s| s != 50).map(ack).collect();
        assert_eq!(opened.records, want);
        assert_eq!(opened.cut, None);
        let aside = opened.kept_aside.clone().expect("kept aside");
        assert_eq!(kept_aside(&dir), vec![aside.clone()]);
        let name = aside.file_name().unwrap().to_string_lossy().into_owned();
        let secs: u64 = name
            .strip_prefix("outbox.log.corrupt-")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{name}"));
        assert!(secs.abs_diff(unix_seconds()) < 60, "{name}");
        assert_eq!(
            fs::read(&aside).unwrap(),
            damaged,
            "the evidence, byte for byte"
        );
        let mut clean = whole[..starts[49]].to_vec();
        clean.extend_from_slice(&whole[starts[50]..]);
        assert_eq!(fs::read(dir.join(LOG_NAME)).unwrap(), clean, "rewritten");
        assert_eq!(
            opened.log.replayed(),
            Replayed {
                records_kept: 99,
                damaged_bytes: (starts[50] - starts[49]) as u64,
                damaged_regions: 1,
            }
        );
        // Appends go to the rewritten log, not to the evidence.
        let mut log = opened.log;
        let mut more = Vec::new();
        ack(101).encode(&mut more);
        log.append(&more).unwrap();
        drop(log);
        assert_eq!(fs::read(&aside).unwrap(), damaged);

        let again = Log::open(&dir, Sync::Never).unwrap();
        assert_eq!(again.records.len(), 100);
        assert_eq!(again.kept_aside, None);
        assert_eq!(again.log.replayed().damaged_regions, 0);
        assert_eq!(kept_aside(&dir).len(), 1);
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keeping_aside_never_replaces_an_earlier_copy() {
        let dir = temp_dir("aside");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(LOG_NAME), b"first").unwrap();
        let first = keep_aside(&dir, b"first", 7).unwrap();
        fs::remove_file(dir.join(LOG_NAME)).unwrap();
        fs::write(dir.join(LOG_NAME), b"second").unwrap();
        let second = keep_aside(&dir, b"second", 7).unwrap();
        assert_eq!(first, dir.join("outbox.log.corrupt-7"));
        assert_eq!(second, dir.join("outbox.log.corrupt-7.1"));
        assert_eq!(fs::read(&first).unwrap(), b"first");
        assert_eq!(fs::read(&second).unwrap(), b"second");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_open_of_a_locked_directory_is_refused_until_the_first_ends() {
        let dir = temp_dir("lock");
        let first = Log::open(&dir, Sync::Never).unwrap();
        // flock locks belong to an open file, so this conflicts within one
        // process just as between two.
        match Log::open(&dir, Sync::Never) {
            Err(OpenError::Locked { lock }) => assert_eq!(lock, dir.join(LOCK_NAME)),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        let again = Log::open(&dir, Sync::Never).unwrap();
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compaction_replaces_the_log_and_a_leftover_scratch_file_is_ignored() {
        let dir = temp_dir("compact");
        let mut opened = Log::open(&dir, Sync::Always).unwrap();
        let mut bytes = Vec::new();
        for seq in 1..=10 {
            ack(seq).encode(&mut bytes);
        }
        opened.log.append(&bytes).unwrap();
        let mut snapshot = Vec::new();
        ack(10).encode(&mut snapshot);
        opened.log.compact(&snapshot).unwrap();
        let mut more = Vec::new();
        ack(11).encode(&mut more);
        opened.log.append(&more).unwrap();
        drop(opened);
        // A crash mid-compaction leaves a partial scratch file behind.
        fs::write(dir.join(COMPACT_NAME), b"partial").unwrap();
        let again = Log::open(&dir, Sync::Always).unwrap();
        assert_eq!(again.records, vec![ack(10), ack(11)]);
        assert!(!dir.join(COMPACT_NAME).exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
