//! The outbox log on disk: an append-only file of checksummed records,
//! replayed at start, appended once per loop turn (group commit), and
//! compacted by rewriting it whole.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::record::{Corrupt, Record};

const LOG_NAME: &str = "outbox.log";
const COMPACT_NAME: &str = "outbox.log.compact";

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
}

#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    file: File,
    sync: Sync,
    /// Bytes in the file.
    len: u64,
}

impl Log {
    /// Creates `dir` if needed, reads the log, and cuts a damaged tail.
    pub fn open(dir: &Path, sync: Sync) -> io::Result<Opened> {
        fs::create_dir_all(dir)?;
        // A compaction that did not reach its rename left only a scratch file.
        match fs::remove_file(dir.join(COMPACT_NAME)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
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
        let mut records = Vec::new();
        let mut pos = 0;
        let mut cut = None;
        while pos < bytes.len() {
            match Record::decode(&bytes[pos..]) {
                Ok((record, used)) => {
                    records.push(record);
                    pos += used;
                }
                Err(Corrupt::Truncated | Corrupt::BadRecord) => {
                    cut = Some((pos as u64, (bytes.len() - pos) as u64));
                    file.set_len(pos as u64)?;
                    file.sync_all()?;
                    break;
                }
            }
        }
        // Prove the directory is writable now, not at the first message.
        file.write_all(&[])?;
        Ok(Opened {
            log: Log {
                dir: dir.to_owned(),
                file,
                sync,
                len: pos as u64,
            },
            records,
            cut,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends records and, in `Sync::Always`, waits until they are on disk.
    pub fn append(&mut self, records: &[u8]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.file.write_all(records)?;
        self.len += records.len() as u64;
        if self.sync == Sync::Always {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Replaces the log with `snapshot` (the live records). Crash-safe at
    /// every step: the old log stays whole until the rename, and the new
    /// one is on disk before it.
    pub fn compact(&mut self, snapshot: &[u8]) -> io::Result<()> {
        let scratch = self.dir.join(COMPACT_NAME);
        let mut file = File::create(&scratch)?;
        file.write_all(snapshot)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&scratch, self.dir.join(LOG_NAME))?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_NAME))?;
        self.len = snapshot.len() as u64;
        Ok(())
    }
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
            drop(opened);
            fs::remove_dir_all(&dir).unwrap();
        }
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
