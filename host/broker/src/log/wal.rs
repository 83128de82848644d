//! The write-ahead segment file in front of the redb log: every change is appended here first,
//! and one `fdatasync` of this file is what makes a group of appended events safe (a redb
//! commit costs about three fsyncs' worth of page writes). The log keeps new events in memory
//! and writes redb without a sync, making it durable at each checkpoint; after a crash the
//! records past the last checkpoint are replayed.
//!
//! A record is `[len u32][crc32 u32][lsn u64][kind u8][fields]`, little-endian, and LSNs
//! follow one another. A record whose length or checksum is wrong at the end of the newest
//! segment is a write torn by a crash: it is detected there and cut off (zeroed), never
//! served. Anywhere else it is damage: reading goes on at the next intact record and the LSNs
//! skipped say how many records were lost.

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
                // Never more than the body holds, whatever the count says.
                let mut triggers = Vec::with_capacity(n.min(body.len() / 8));
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

/// The smallest record: its header, LSN and kind, and an acknowledgement's two numbers.
const MIN_RECORD: usize = 8 + 8 + 1 + 16;

/// The first LSN of a segment, from its name.
fn first_lsn(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.parse().ok()
}

/// The record at `at` if it is there whole and intact: its LSN, the record and where the next
/// one starts.
fn record_at(bytes: &[u8], at: usize) -> Option<(u64, Record, usize)> {
    let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
    if len == 0 {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(at + 4..at + 8)?.try_into().ok()?);
    let end = at.checked_add(8)?.checked_add(len)?;
    let body = bytes.get(at + 8..end)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let (lsn, record) = Record::decode(body)?;
    Some((lsn, record, end))
}

/// Where reading can go on after unreadable bytes at `from`: the first intact record before
/// `end` whose LSN can follow `prev`, that is above it by no more than the records that fit in
/// the bytes skipped (counted from `named_prev`, the LSN before this segment, when that is
/// further on). The LSN is checked before the checksum, so a scan costs little.
fn next_intact(bytes: &[u8], from: usize, end: usize, prev: u64, named_prev: u64) -> Option<usize> {
    (from + 1..end).find(|&at| {
        let Some(lsn) = bytes
            .get(at + 8..at + 16)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
        else {
            return false;
        };
        let most = named_prev.saturating_add(((at - from) / MIN_RECORD) as u64 + 1);
        lsn > prev && lsn <= most && record_at(bytes, at).is_some()
    })
}

/// Reports the records between LSN `prev` and `next` (both excluded) that could not be read:
/// those past the checkpoint `after_lsn` are lost (an event among them is not delivered; an
/// acknowledgement among them means a delivery is repeated).
fn report_unreadable(path: &Path, prev: u64, next: u64, after_lsn: u64) {
    let first = prev.max(after_lsn) + 1;
    if first < next {
        tracing::error!(
            file = %path.display(), first_lsn = first, last_lsn = next - 1,
            records = next - first,
            "write-ahead log records past the last checkpoint could not be read: the events \
             among them are lost, even if they were acknowledged"
        );
    } else {
        tracing::warn!(
            file = %path.display(), first_lsn = prev + 1, last_lsn = next - 1,
            "write-ahead log records could not be read; all were checkpointed, nothing is lost"
        );
    }
}

impl Wal {
    /// Opens the directory: reads every valid record in order (cutting a torn tail) and returns
    /// those after `after_lsn`, with the WAL ready to append after the last one.
    ///
    /// A crash can tear only the newest segment's last write (a segment is synced before the
    /// next one is started, and each group before the next is written), so that is the one
    /// place where unreadable bytes are cut as a torn write. Unreadable bytes anywhere else
    /// are damage (or a write whose sync failed and was answered 503): reading goes on at the
    /// next intact record, so the records written after it (acknowledged events) are still
    /// delivered, and the records that could not be read are counted by their LSNs and
    /// reported.
    pub(crate) fn open(dir: &Path, after_lsn: u64) -> std::io::Result<(Wal, Vec<(u64, Record)>)> {
        std::fs::create_dir_all(dir)?;
        let mut records = Vec::new();
        let files = segments(dir)?;
        // The LSN before the first record: the first segment's name says where it starts.
        let mut prev = files
            .first()
            .and_then(|p| first_lsn(p))
            .map_or(after_lsn, |first| first.saturating_sub(1));
        let mut current: Option<(PathBuf, u64)> = None;
        for (i, path) in files.iter().enumerate() {
            let newest = i + 1 == files.len();
            let mut bytes = Vec::new();
            File::open(path)?.read_to_end(&mut bytes)?;
            let garbage_end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            let named_prev = first_lsn(path).map_or(prev, |first| first.saturating_sub(1));
            let mut at = 0usize;
            loop {
                if let Some((lsn, record, next)) = record_at(&bytes, at) {
                    if lsn > prev + 1 {
                        report_unreadable(path, prev, lsn, after_lsn);
                    }
                    if lsn > after_lsn {
                        records.push((lsn, record));
                    }
                    prev = prev.max(lsn);
                    at = next;
                    continue;
                }
                if at >= garbage_end {
                    break;
                }
                match next_intact(&bytes, at, garbage_end, prev, prev.max(named_prev)) {
                    Some(next) => {
                        tracing::warn!(
                            file = %path.display(), from = at, to = next,
                            "the write-ahead log has unreadable bytes; reading on after them"
                        );
                        at = next;
                    }
                    None => break,
                }
            }
            if garbage_end > at {
                if newest {
                    tracing::warn!(
                        file = %path.display(), valid = at, dropped = garbage_end - at,
                        "cut a torn write at the end of the write-ahead log"
                    );
                    let f = OpenOptions::new().write(true).open(path)?;
                    f.write_all_at(&vec![0u8; garbage_end - at], at as u64)?;
                    f.sync_all()?;
                } else {
                    // Synced before the next segment began: not a torn write. The records lost
                    // are reported by their LSNs at the next intact record.
                    tracing::error!(
                        file = %path.display(), from = at, to = garbage_end,
                        "the end of a write-ahead log segment is unreadable"
                    );
                }
            }
            current = Some((path.clone(), at as u64));
        }
        let (path, file, len) = match current {
            Some((path, len)) => {
                let file = OpenOptions::new().read(true).write(true).open(&path)?;
                (path, file, len)
            }
            None => {
                let path = dir.join(segment_name(prev.max(after_lsn) + 1));
                (path.clone(), create_segment(&path)?, 0)
            }
        };
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                file,
                path,
                len,
                next_lsn: prev.max(after_lsn) + 1,
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
        // A flipped byte inside the first record: that record is lost, the ones after it,
        // acknowledged since, are still read.
        let mut bytes = std::fs::read(&seg).expect("read");
        bytes[12] ^= 0xff;
        std::fs::write(&seg, &bytes).expect("write");
        let (_, rest) = Wal::open(dir.path(), 0).expect("reopen");
        assert_eq!(
            rest.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        // The same with the record's length damaged, so that its end is unknown too.
        bytes[0] ^= 0x40;
        std::fs::write(&seg, &bytes).expect("write");
        let (mut wal, rest) = Wal::open(dir.path(), 0).expect("reopen");
        assert_eq!(
            rest.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(
            wal.append(&[Record::Ack { trigger: 4, seq: 2 }])
                .expect("append"),
            5
        );
    }

    #[test]
    fn damage_in_an_older_segment_loses_only_the_damaged_records() {
        let dir = tempfile::tempdir().expect("dir");
        let ack = |seq| Record::Ack { trigger: 1, seq };
        let (mut wal, _) = Wal::open(dir.path(), 0).expect("open");
        wal.append(&[ack(1), ack(2), ack(3)]).expect("append");
        wal.rotate().expect("rotate");
        wal.append(&[ack(4), ack(5)]).expect("append");
        wal.sync().expect("sync");
        drop(wal);
        let files = segments(dir.path()).expect("list");
        assert_eq!(files.len(), 2);
        // The older segment's last record is zeroed (say, a bad sector): it is not the tail of
        // the log, so the newer segment is kept and read.
        let mut bytes = std::fs::read(&files[0]).expect("read");
        let end = bytes.iter().rposition(|b| *b != 0).expect("records") + 1;
        bytes[end - 20..end].fill(0);
        std::fs::write(&files[0], &bytes).expect("write");
        let (_, back) = Wal::open(dir.path(), 0).expect("reopen");
        assert_eq!(
            back.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(),
            vec![1, 2, 4, 5]
        );
        assert_eq!(segments(dir.path()).expect("list").len(), 2);
        // The middle record garbled as well: only it goes besides.
        let second = {
            let (_, _, next) = record_at(&bytes, 0).expect("first record");
            next
        };
        bytes[second + 8..second + 12].copy_from_slice(&[9, 9, 9, 9]);
        std::fs::write(&files[0], &bytes).expect("write");
        let (wal, back) = Wal::open(dir.path(), 0).expect("reopen");
        assert_eq!(
            back.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(),
            vec![1, 4, 5]
        );
        assert_eq!(wal.last_lsn(), 5);
        assert!(
            std::fs::read(&files[0]).expect("read") == bytes,
            "an older segment is left as it is"
        );
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
