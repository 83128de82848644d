//! The log's writer thread: takes every request waiting, appends it to the write-ahead log with
//! one sync (group commit), then answers; keeps new events in memory and spills what is still
//! owed to redb at each checkpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable};
use tokio::sync::Notify;

use super::wal::{Record, Wal};
use super::{
    DurableLog, EVENTS, Fresh, HOT_EVENTS, Hot, HotEvent, LogError, META, Op, PENDING, REFS,
    SyncCounters, io,
};

/// One delivery fewer owed for `seq`; the event is reclaimed when none is left.
fn release(
    refs: &mut redb::Table<u64, u32>,
    events: &mut redb::Table<u64, &[u8]>,
    seq: u64,
    count: &AtomicU64,
    bytes: &AtomicU64,
) -> Result<(), LogError> {
    let left = refs.get(seq).map_err(io)?.map(|v| v.value());
    match left {
        Some(n) if n > 1 => {
            refs.insert(seq, n - 1).map_err(io)?;
        }
        _ => {
            refs.remove(seq).map_err(io)?;
            if let Some(v) = events.remove(seq).map_err(io)? {
                count.fetch_sub(1, Ordering::Relaxed);
                bytes.fetch_sub(v.value().len() as u64, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

pub(super) struct Writer {
    db: Arc<Database>,
    events: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    notify: Arc<Mutex<HashMap<u64, Arc<Notify>>>>,
    hot: Arc<Mutex<Hot>>,
    syncs: Arc<SyncCounters>,
    wal: Wal,
    last_checkpoint: Instant,
    /// The next event sequence number; kept here so that a failed redb write never hands out
    /// a number the write-ahead log already used.
    next_seq: u64,
}

/// How often redb is made durable so that full write-ahead segments can be dropped.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

impl Writer {
    /// The writer of `log`, which shares its counters, notifiers and hot events.
    pub(super) fn new(db: Arc<Database>, log: &DurableLog, wal: Wal, next_seq: u64) -> Self {
        Writer {
            db,
            events: Arc::clone(&log.events),
            bytes: Arc::clone(&log.bytes),
            notify: Arc::clone(&log.notify),
            hot: Arc::clone(&log.hot),
            syncs: Arc::clone(&log.syncs),
            wal,
            last_checkpoint: Instant::now(),
            next_seq,
        }
    }

    /// Acknowledgements alone are appended to the write-ahead log without a sync; they become
    /// durable with the next synced write, at the latest `ACK_SYNC_DELAY` later. Until then a
    /// crash only repeats deliveries that had just finished.
    pub(super) fn run(mut self, rx: std::sync::mpsc::Receiver<Op>) {
        const ACK_SYNC_DELAY: Duration = Duration::from_millis(5);
        let mut unsynced = false;
        loop {
            let first = if unsynced {
                match rx.recv_timeout(ACK_SYNC_DELAY) {
                    Ok(op) => op,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        unsynced = self.wal.sync().is_err();
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(op) => op,
                    Err(_) => break,
                }
            };
            let mut ops = vec![first];
            while ops.len() < 8192 {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let sync = ops.iter().any(|op| !matches!(op, Op::Ack(..)));
            let wants_checkpoint = ops.iter().any(|op| matches!(op, Op::Checkpoint(_)));
            let (ops, checkpoints): (Vec<Op>, Vec<Op>) = ops
                .into_iter()
                .partition(|op| !matches!(op, Op::Checkpoint(_)));
            let committed = self.apply(ops, sync);
            unsynced = !sync || !committed;
            if wants_checkpoint {
                if let Err(e) = self.checkpoint() {
                    tracing::error!(error = %e, "checkpoint failed");
                }
                for op in checkpoints {
                    if let Op::Checkpoint(done) = op {
                        let _ = done.send(());
                    }
                }
            }
            if self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
                && let Err(e) = self.checkpoint()
            {
                tracing::error!(error = %e, "checkpoint failed; the write-ahead log keeps growing");
            }
        }
        let _ = self.checkpoint();
    }

    /// Makes redb durable up to the last record written, then drops the older segments.
    pub(super) fn checkpoint(&mut self) -> Result<(), LogError> {
        let lsn = self.wal.last_lsn();
        // Everything written is in redb or in memory: spill what is in memory and make redb
        // durable in one commit, then older segments go.
        self.wal.sync().map_err(io)?;
        let mut hot = self.hot.lock().unwrap_or_else(PoisonError::into_inner);
        let entries: Vec<(u64, HotEvent)> = std::mem::take(&mut hot.map).into_iter().collect();
        let spill = Hot::spill_records(&entries);
        let committed = (|| {
            let mut w = self.db.begin_write().map_err(io)?;
            w.set_durability(Durability::Immediate).map_err(io)?;
            apply_in(&w, &spill, (&self.events, &self.bytes), false)?;
            {
                let mut meta = w.open_table(META).map_err(io)?;
                meta.insert("checkpoint_lsn", lsn).map_err(io)?;
                let next = meta.get("next_seq").map_err(io)?.map_or(1, |v| v.value());
                meta.insert("next_seq", next.max(self.next_seq))
                    .map_err(io)?;
            }
            w.commit().map_err(io)
        })();
        if let Err(e) = committed {
            // The events stay in memory (and in the write-ahead log); tried again next time.
            hot.map.extend(entries);
            return Err(e);
        }
        drop(hot);
        self.wal.remove_old().map_err(io)?;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Writes `ops` to the write-ahead log (synced if `sync`), then applies them to redb
    /// without a sync. Returns whether it all succeeded.
    fn apply(&mut self, mut ops: Vec<Op>, sync: bool) -> bool {
        let mut records = Vec::new();
        let mut fresh = Vec::new();
        let mut touched: Vec<u64> = Vec::new();
        let mut seq = self.next_seq;
        for op in &mut ops {
            match op {
                Op::Append(entries, _) => {
                    for (bytes, triggers, event, ttl, headers) in entries.iter_mut() {
                        if triggers.is_empty() {
                            continue;
                        }
                        fresh.push((Arc::clone(event), *ttl, headers.clone()));
                        for t in triggers.iter() {
                            if !touched.contains(t) {
                                touched.push(*t);
                            }
                        }
                        // The op keeps only its reply from here on: its record moves.
                        records.push(Record::Append {
                            seq,
                            triggers: std::mem::take(triggers),
                            payload: std::mem::take(bytes),
                        });
                        seq += 1;
                    }
                }
                Op::Ack(t, s) => records.push(Record::Ack {
                    trigger: *t,
                    seq: *s,
                }),
                Op::Attempt(t, s, n, _) => records.push(Record::Attempt {
                    trigger: *t,
                    seq: *s,
                    attempts: *n,
                }),
                Op::Barrier(_) | Op::Checkpoint(_) => {}
            }
        }
        self.next_seq = seq;
        let mut result = Ok(());
        if !records.is_empty() {
            result = self.wal.append(&records).map(|_| ()).map_err(io);
        }
        if result.is_ok() && sync {
            let started = Instant::now();
            result = self.wal.sync().map_err(io);
            if !fresh.is_empty() {
                let c = &self.syncs;
                c.groups.fetch_add(1, Ordering::Relaxed);
                c.events.fetch_add(fresh.len() as u64, Ordering::Relaxed);
                c.nanos
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
        if result.is_ok() {
            for r in &records {
                if let Record::Append { payload, .. } = r {
                    self.events.fetch_add(1, Ordering::Relaxed);
                    self.bytes
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                }
            }
            result = self.apply_hot(records, fresh);
        }
        if let Err(e) = &result {
            // Producers get 503. Records already in the write-ahead log are applied again at the
            // next start (replay is idempotent), so a refused event may still be delivered:
            // at least once, never lost.
            tracing::error!(error = %e, "the event log could not commit; producers get 503");
        }
        let mut done = Vec::new();
        for op in ops {
            match op {
                Op::Append(_, reply) => {
                    let _ = reply.send(result.clone());
                }
                Op::Barrier(b) | Op::Attempt(_, _, _, Some(b)) => done.push(b),
                _ => {}
            }
        }
        for b in done {
            let _ = b.send(());
        }
        if result.is_ok() {
            let n = self.notify.lock().unwrap_or_else(PoisonError::into_inner);
            for t in touched {
                if let Some(n) = n.get(&t) {
                    n.notify_one();
                }
            }
        }
        result.is_ok()
    }

    /// Applies written records: new events go to memory, acknowledgements and attempts to the
    /// event in memory when it is there, to redb otherwise; past `HOT_EVENTS` the oldest events
    /// in memory move to redb in the same transaction.
    fn apply_hot(&mut self, records: Vec<Record>, fresh: Vec<Fresh>) -> Result<(), LogError> {
        let mut hot = self.hot.lock().unwrap_or_else(PoisonError::into_inner);
        let mut fresh = fresh.into_iter();
        let mut cold = Vec::new();
        for r in records {
            match r {
                Record::Append {
                    seq,
                    triggers,
                    payload,
                } => {
                    let Some((event, ttl, headers)) = fresh.next() else {
                        continue;
                    };
                    let owed = triggers.into_iter().map(|t| (t, 0)).collect();
                    hot.map.insert(
                        seq,
                        HotEvent {
                            payload,
                            event,
                            ttl,
                            headers,
                            owed,
                        },
                    );
                }
                Record::Ack { trigger, seq } => match hot.map.get_mut(&seq) {
                    Some(h) => {
                        h.owed.retain(|(t, _)| *t != trigger);
                        if h.owed.is_empty()
                            && let Some(h) = hot.map.remove(&seq)
                        {
                            self.events.fetch_sub(1, Ordering::Relaxed);
                            self.bytes
                                .fetch_sub(h.payload.len() as u64, Ordering::Relaxed);
                        }
                    }
                    None => cold.push(Record::Ack { trigger, seq }),
                },
                Record::Attempt {
                    trigger,
                    seq,
                    attempts,
                } => match hot.map.get_mut(&seq) {
                    Some(h) => {
                        if let Some(o) = h.owed.iter_mut().find(|(t, _)| *t == trigger) {
                            o.1 = attempts;
                        }
                    }
                    None => cold.push(Record::Attempt {
                        trigger,
                        seq,
                        attempts,
                    }),
                },
            }
        }
        let mut spilled = Vec::new();
        while hot.map.len() > HOT_EVENTS {
            if let Some(e) = hot.map.pop_first() {
                spilled.push(e);
            }
        }
        cold.extend(Hot::spill_records(&spilled));
        let applied = apply_records(
            &self.db,
            &cold,
            Durability::None,
            (&self.events, &self.bytes),
            false,
        );
        if applied.is_err() {
            // Kept in memory; a checkpoint tries again.
            hot.map.extend(spilled);
        }
        applied
    }
}

/// Applies records to redb in one transaction. Replays are idempotent: an append whose event is
/// already there, or an ack of a delivery no longer owed, changes nothing.
/// `counters` (events, bytes) follow releases, and appends too when `count_appends`.
pub(super) fn apply_records(
    db: &Database,
    records: &[Record],
    durability: Durability,
    counters: (&AtomicU64, &AtomicU64),
    count_appends: bool,
) -> Result<(), LogError> {
    if records.is_empty() {
        return Ok(());
    }
    let mut w = db.begin_write().map_err(io)?;
    w.set_durability(durability).map_err(io)?;
    apply_in(&w, records, counters, count_appends)?;
    w.commit().map_err(io)
}

/// [`apply_records`] inside a transaction of the caller's.
fn apply_in(
    w: &redb::WriteTransaction,
    records: &[Record],
    counters: (&AtomicU64, &AtomicU64),
    count_appends: bool,
) -> Result<(), LogError> {
    let (count, total) = counters;
    {
        let mut meta = w.open_table(META).map_err(io)?;
        let mut events = w.open_table(EVENTS).map_err(io)?;
        let mut refs = w.open_table(REFS).map_err(io)?;
        let mut pending = w.open_table(PENDING).map_err(io)?;
        let mut next = meta.get("next_seq").map_err(io)?.map_or(1, |v| v.value());
        for r in records {
            match r {
                Record::Append {
                    seq,
                    triggers,
                    payload,
                } => {
                    next = next.max(seq + 1);
                    if events.get(*seq).map_err(io)?.is_some() {
                        continue;
                    }
                    events.insert(*seq, payload.as_slice()).map_err(io)?;
                    refs.insert(*seq, triggers.len() as u32).map_err(io)?;
                    for t in triggers {
                        pending.insert((*t, *seq), 0).map_err(io)?;
                    }
                    if count_appends {
                        count.fetch_add(1, Ordering::Relaxed);
                        total.fetch_add(payload.len() as u64, Ordering::Relaxed);
                    }
                }
                Record::Ack { trigger, seq } => {
                    if pending.remove((*trigger, *seq)).map_err(io)?.is_some() {
                        release(&mut refs, &mut events, *seq, count, total)?;
                    }
                }
                Record::Attempt {
                    trigger,
                    seq,
                    attempts,
                } => {
                    if pending.get((*trigger, *seq)).map_err(io)?.is_some() {
                        pending.insert((*trigger, *seq), *attempts).map_err(io)?;
                    }
                }
            }
        }
        meta.insert("next_seq", next).map_err(io)?;
    }
    Ok(())
}
