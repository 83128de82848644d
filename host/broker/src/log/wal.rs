//! The write-ahead segment file in front of the redb log: every change is appended here first,
//! and one `fdatasync` of this file is what makes a group of appended events safe (a redb
//! commit costs about three fsyncs' worth of page writes). The log keeps new events in memory
//! and writes redb without a sync, making it durable at each checkpoint; after a crash the
//! records past the last checkpoint are replayed.
//!
//! A record is `[len u32][crc32 u32][lsn u64][kind u8][fields]`, little-endian. Reading stops
//! at the first record whose length or checksum is wrong: a write torn by a crash is detected
//! there and cut off (the file is truncated), never served.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One change to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// A new event (its encoded record) owed to these triggers.
    Append {
        seq: u64,
        triggers: Vec<u64>,
        payload: Vec<u8>,
    },
    /// A trigger no longer owes this delivery.
    Ack { trigger: u64, seq: u64 },
    /// A delivery was attempted this many times.
    Attempt {
        trigger: u64,
        seq: u64,
        attempts: u32,
    },
}

impl Record {
    fn encode(&self, lsn: u64, out: &mut Vec<u8>) {
        // The body goes in place; its length and checksum are filled in in front of it after.
        let header = out.len();
        out.extend([0u8; 8]);
        let body = out;
        body.extend(lsn.to_le_bytes());
        match self {
            Record::Append {
                seq,
                triggers,
                payload,
            } => {
                body.push(1);
                body.extend(seq.to_le_bytes());
                body.extend((triggers.len() as u32).to_le_bytes());
                for t in triggers {
                    body.extend(t.to_le_bytes());
                }
                body.extend(payload);
            }
            Record::Ack { trigger, seq } => {
                body.push(2);
                body.extend(trigger.to_le_bytes());
                body.extend(seq.to_le_bytes());
            }
            Record::Attempt {
                trigger,
                seq,
                attempts,
            } => {
                body.push(3);
                body.extend(trigger.to_le_bytes());
                body.extend(seq.to_le_bytes());
                body.extend(attempts.to_le_bytes());
            }
        }
        let start = header + 8;
        let len = (body.len() - start) as u32;
        let crc = crc32fast::hash(&body[start..]);
        body[header..header + 4].copy_from_slice(&len.to_le_bytes());
        body[header + 4..start].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(body: &[u8]) -> Option<(u64, Record)> {
        let u64_at = |at: usize| {
            body.get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        let lsn = u64_at(0)?;
        let kind = *body.get(8)?;
        let record = match kind {
            1 => {
                let seq = u64_at(9)?;
                let n = u32::from_le_bytes(body.get(17..21)?.try_into().ok()?) as usize;
                let mut triggers = Vec::with_capacity(n);
                for i in 0..n {
                    triggers.push(u64_at(21 + i * 8)?);
                }
                let payload = body.get(21 + n * 8..)?.to_vec();
                Record::Append {
                    seq,
                    triggers,
                    payload,
                }
            }
            2 => Record::Ack {
                trigger: u64_at(9)?,
                seq: u64_at(17)?,
            },
            3 => Record::Attempt {
                trigger: u64_at(9)?,
                seq: u64_at(17)?,
                attempts: u32::from_le_bytes(body.get(25..29)?.try_into().ok()?),
            },
            _ => return None,
        };
        Some((lsn, record))
    }
}

/// The segment files of a directory, oldest first, and the one being written.
pub(crate) struct Wal {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    len: u64,
    next_lsn: u64,
}

fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.wal")
}

fn segments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    Ok(v)
}

/// Segments are created full of zeros, so that a sync after a write in place need not also
/// journal a new file size: on this kind of disk that makes each `fdatasync` about a third
/// cheaper. A zero length ends the records of a segment.
const SEGMENT_BYTES: u64 = 16 << 20;

/// Creates a segment of `SEGMENT_BYTES` zeros, durably.
fn create_segment(path: &Path) -> std::io::Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(SEGMENT_BYTES >> 20) {
        file.write_all(&zeros)?;
    }
    file.sync_all()?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(file)
}

impl Wal {
    /// Opens the directory: reads every valid record in order (cutting a torn tail) and returns
    /// those after `after_lsn`, with the WAL ready to append after the last one.
    pub(crate) fn open(dir: &Path, after_lsn: u64) -> std::io::Result<(Wal, Vec<(u64, Record)>)> {
        std::fs::create_dir_all(dir)?;
        let mut records = Vec::new();
        let mut last_lsn = after_lsn;
        let files = segments(dir)?;
        let mut cut = false;
        let mut current: Option<(PathBuf, u64)> = None;
        for path in &files {
            if cut {
                // Everything after a torn record is unreachable: never served.
                std::fs::remove_file(path)?;
                continue;
            }
            let mut bytes = Vec::new();
            File::open(path)?.read_to_end(&mut bytes)?;
            let mut at = 0usize;
            while at + 8 <= bytes.len() {
                let len =
                    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
                if len == 0 {
                    break;
                }
                let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default());
                let Some(body) = bytes.get(at + 8..at + 8 + len) else {
                    break;
                };
                if crc32fast::hash(body) != crc {
                    break;
                }
                let Some((lsn, record)) = Record::decode(body) else {
                    break;
                };
                if lsn > after_lsn {
                    records.push((lsn, record));
                }
                last_lsn = last_lsn.max(lsn);
                at += 8 + len;
            }
            let garbage_end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            if garbage_end > at {
                tracing::warn!(
                    file = %path.display(), valid = at, dropped = garbage_end - at,
                    "cut a torn write at the end of the write-ahead log"
                );
                let f = OpenOptions::new().write(true).open(path)?;
                f.write_all_at(&vec![0u8; garbage_end - at], at as u64)?;
                f.sync_all()?;
                cut = true;
            }
            current = Some((path.clone(), at as u64));
        }
        let (path, file, len) = match current {
            Some((path, len)) => {
                let file = OpenOptions::new().read(true).write(true).open(&path)?;
                (path, file, len)
            }
            None => {
                let path = dir.join(segment_name(last_lsn + 1));
                (path.clone(), create_segment(&path)?, 0)
            }
        };
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                file,
                path,
                len,
                next_lsn: last_lsn + 1,
            },
            records,
        ))
    }

    /// Appends records (one write, in place in the zero-filled segment; a new segment when this
    /// one is full). On failure the region is zeroed again, so nothing half-written stays.
    /// Returns the last LSN written.
    pub(crate) fn append(&mut self, records: &[Record]) -> std::io::Result<u64> {
        let mut buf = Vec::new();
        let mut lsn = self.next_lsn;
        for r in records {
            r.encode(lsn, &mut buf);
            lsn += 1;
        }
        if self.len > 0 && self.len + buf.len() as u64 > SEGMENT_BYTES {
            self.rotate()?;
        }
        if let Err(e) = self.file.write_all_at(&buf, self.len) {
            let _ = self.file.write_all_at(&vec![0u8; buf.len()], self.len);
            return Err(e);
        }
        self.len += buf.len() as u64;
        self.next_lsn = lsn;
        Ok(lsn - 1)
    }

    /// Makes everything appended so far durable.
    pub(crate) fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// The last LSN written.
    pub(crate) fn last_lsn(&self) -> u64 {
        self.next_lsn - 1
    }

    /// Starts a new segment; the older ones stay until [`Wal::remove_old`].
    pub(crate) fn rotate(&mut self) -> std::io::Result<()> {
        self.sync()?;
        let path = self.dir.join(segment_name(self.next_lsn));
        self.file = create_segment(&path)?;
        self.path = path;
        self.len = 0;
        Ok(())
    }

    /// Deletes every segment but the current one (after a checkpoint made them redundant).
    pub(crate) fn remove_old(&mut self) -> std::io::Result<()> {
        for p in segments(&self.dir)? {
            if p != self.path {
                std::fs::remove_file(p)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().expect("dir");
        let recs = vec![
            Record::Append {
                seq: 1,
                triggers: vec![3, 4],
                payload: b"hello".to_vec(),
            },
            Record::Ack { trigger: 3, seq: 1 },
            Record::Attempt {
                trigger: 4,
                seq: 1,
                attempts: 2,
            },
        ];
        let good_len = {
            let (mut wal, old) = Wal::open(dir.path(), 0).expect("open");
            assert!(old.is_empty());
            assert_eq!(wal.append(&recs).expect("append"), 3);
            wal.sync().expect("sync");
            wal.len as usize
        };
        // A torn write: half a record of junk right after the last record.
        let seg = segments(dir.path()).expect("list").remove(0);
        let f = OpenOptions::new().write(true).open(&seg).expect("open");
        f.write_all_at(&[7; 13], good_len as u64).expect("junk");
        let (mut wal, back) = Wal::open(dir.path(), 0).expect("reopen");
        assert_eq!(
            back.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            recs
        );
        let after = std::fs::read(&seg).expect("read");
        assert!(
            after[good_len..].iter().all(|b| *b == 0),
            "the torn tail is cut"
        );
        assert_eq!(
            wal.append(&[Record::Ack { trigger: 4, seq: 1 }])
                .expect("append"),
            4
        );
        wal.sync().expect("sync");
        let (_, after) = Wal::open(dir.path(), 3).expect("reopen");
        assert_eq!(
            after,
            vec![(4, Record::Ack { trigger: 4, seq: 1 })],
            "only past the checkpoint"
        );
        // A flipped byte inside a record: the checksum stops reading there.
        let mut bytes = std::fs::read(&seg).expect("read");
        bytes[12] ^= 0xff;
        std::fs::write(&seg, &bytes).expect("write");
        let (_, none) = Wal::open(dir.path(), 0).expect("reopen");
        assert!(none.is_empty());
    }

    #[test]
    fn rotation_and_removal() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut wal, _) = Wal::open(dir.path(), 0).expect("open");
        wal.append(&[Record::Ack { trigger: 1, seq: 1 }])
            .expect("append");
        wal.rotate().expect("rotate");
        wal.append(&[Record::Ack { trigger: 1, seq: 2 }])
            .expect("append");
        wal.sync().expect("sync");
        assert_eq!(segments(dir.path()).expect("list").len(), 2);
        wal.remove_old().expect("remove");
        assert_eq!(segments(dir.path()).expect("list").len(), 1);
        let (_, recs) = Wal::open(dir.path(), 0).expect("reopen");
        assert_eq!(recs, vec![(2, Record::Ack { trigger: 1, seq: 2 })]);
    }
}
