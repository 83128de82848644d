//! The embedded durable log: events, and for each event the triggers that still owe a
//! delivery. Group commit is ours: one writer thread (`writer.rs`) takes every request waiting,
//! writes it to the write-ahead log (`wal.rs`) and syncs once, so concurrent producers share
//! one fsync; that sync is what makes an event safe. New events then stay in memory (`Hot`) until delivered
//! everywhere; what is still owed at a checkpoint goes to one redb database
//! (`<data-dir>/broker.redb`).
//!
//! Why redb: an ACID B-tree store in pure Rust whose commit is atomic and crash-safe (a torn
//! write at the tail is never served: recovery falls back to the last complete commit), so the
//! events, the per-trigger delivery state and the reclaiming of delivered events change together
//! in one transaction.
//!
//! Tables: `events` seq -> (ttl, structured JSON); `refs` seq -> deliveries still owed;
//! `pending` (trigger, seq) -> attempts made; `triggers` name -> id; `meta` counters; `seen` and
//! `seen_sources` what the ApiServerSources saw (`seen.rs`). An event's bytes: `record.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tokio::sync::{Notify, oneshot};
use wasmesh_core::Event;

use crate::passthrough::Passthrough;
use crate::record::{decode_record, encode_record};

mod seen;
mod wal;
mod writer;

pub use seen::SeenObject;
use wal::{Record, Wal};
use writer::{Writer, apply_records};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const REFS: TableDefinition<u64, u32> = TableDefinition::new("refs");
const PENDING: TableDefinition<(u64, u64), u32> = TableDefinition::new("pending");
const TRIGGERS: TableDefinition<&str, u64> = TableDefinition::new("triggers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SEEN: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("seen");
const SEEN_SOURCES: TableDefinition<&str, u64> = TableDefinition::new("seen_sources");

/// Why the log could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The log holds as much as it may: back off (429).
    #[error("the event log is full ({0}); retry later")]
    Full(String),
    /// The disk refused (full, unwritable, failing): 503, and nothing was acknowledged.
    #[error("the event log cannot write: {0}")]
    Io(String),
    /// The request is larger than the store takes at all (NATS' `max_payload`, more events or
    /// bytes than the log's limits): 413.
    #[error("too large for the event store: {0}")]
    TooLarge(String),
    /// The log cannot be opened at all (in use, damaged): the server does not start.
    #[error("{0}")]
    Open(String),
}

/// Limits of the log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Most events held (undelivered plus in delivery); above it ingress answers 429.
    pub max_events: u64,
    /// Most bytes of events held.
    pub max_bytes: u64,
    /// Events older than this are dropped even if undelivered (logged).
    pub max_age: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            max_events: 1_000_000,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// One event to append and the triggers it must reach.
pub struct Append {
    pub event: Arc<Event>,
    pub ttl: i32,
    pub headers: Passthrough,
    pub triggers: Vec<u64>,
}

/// A delivery the log says is owed.
pub struct Owed {
    pub seq: u64,
    pub event: Arc<Event>,
    pub ttl: i32,
    pub headers: Passthrough,
    pub attempts: u32,
}

/// An event to append: its record, the triggers that owe it, and the event itself with its
/// TTL and pass-through headers (kept in memory until it is delivered or spilled).
type Entry = (Vec<u8>, Vec<u64>, Arc<Event>, i32, Passthrough);

/// An appended event as it stays in memory: the event, its TTL and pass-through headers.
type Fresh = (Arc<Event>, i32, Passthrough);

enum Op {
    Append(Vec<Entry>, oneshot::Sender<Result<(), LogError>>),
    Ack(u64, u64),
    Attempt(u64, u64, u32, Option<oneshot::Sender<()>>),
    Barrier(oneshot::Sender<()>),
    Checkpoint(oneshot::Sender<()>),
}

/// The durable log. Cheap to share; the writer thread stops when the last handle is dropped.
pub struct DurableLog {
    db: Arc<Database>,
    tx: Mutex<Option<std::sync::mpsc::Sender<Op>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    config: LogConfig,
    events: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    notify: Arc<Mutex<HashMap<u64, Arc<Notify>>>>,
    hot: Arc<Mutex<Hot>>,
    syncs: Arc<SyncCounters>,
}

/// What group commit did since the log opened: how many groups of appended events were synced,
/// how many events they held, and the time spent in `fdatasync` for them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncStats {
    pub groups: u64,
    pub events: u64,
    pub syncing: Duration,
}

#[derive(Default)]
struct SyncCounters {
    groups: AtomicU64,
    events: AtomicU64,
    nanos: AtomicU64,
}

/// The events appended by this process since the last checkpoint that are not delivered
/// everywhere yet, with the deliveries they still owe: they are in the write-ahead log (that is
/// what makes them safe) but not in redb. Deliveries take them from here as ingress built them,
/// and an event delivered everywhere before the next checkpoint never costs redb anything. A
/// checkpoint, or more than `HOT_EVENTS` of them, moves them to redb ("spills" them), so memory
/// stays bounded whatever the subscribers do.
#[derive(Default)]
struct Hot {
    map: std::collections::BTreeMap<u64, HotEvent>,
}

struct HotEvent {
    payload: Vec<u8>,
    event: Arc<Event>,
    ttl: i32,
    headers: Passthrough,
    /// (trigger, attempts made) for each delivery still owed.
    owed: Vec<(u64, u32)>,
}

/// Most events kept in memory only (the oldest are spilled to redb first).
const HOT_EVENTS: usize = 8192;

impl Hot {
    /// Records that put `entries` into redb as they are now.
    fn spill_records(entries: &[(u64, HotEvent)]) -> Vec<Record> {
        let mut out = Vec::new();
        for (seq, h) in entries {
            out.push(Record::Append {
                seq: *seq,
                triggers: h.owed.iter().map(|(t, _)| *t).collect(),
                payload: h.payload.clone(),
            });
            for (trigger, attempts) in &h.owed {
                if *attempts > 0 {
                    out.push(Record::Attempt {
                        trigger: *trigger,
                        seq: *seq,
                        attempts: *attempts,
                    });
                }
            }
        }
        out
    }
}

fn io<E: std::fmt::Display>(e: E) -> LogError {
    LogError::Io(e.to_string())
}

impl DurableLog {
    /// Opens (or creates) the log in `dir`, recovering to the last complete commit.
    pub fn open(dir: &Path, config: LogConfig) -> Result<Arc<Self>, LogError> {
        // redb panics (`unreachable!`) on some damaged pages rather than returning an error: a
        // damaged file in the data directory must stop the start with a message, not a crash.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::open_unguarded(dir, config)
        }))
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(LogError::Open(format!(
                "{} is damaged and cannot be read (redb: {why}): restore it from a backup, \
                 or move it away to start with an empty log (the events it still owes are \
                 then lost)",
                dir.join("broker.redb").display()
            )))
        })
    }

    fn open_unguarded(dir: &Path, config: LogConfig) -> Result<Arc<Self>, LogError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let db = Database::create(dir.join("broker.redb")).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => LogError::Open(format!(
                "{} is in use by another process (another `wasmesh serve` on the same \
                 --data-dir?): each server needs a data directory of its own",
                dir.display()
            )),
            other => LogError::Open(format!("{}: {other}", dir.join("broker.redb").display())),
        })?;
        let checkpoint = {
            let w = db.begin_write().map_err(io)?;
            let checkpoint = {
                let mut meta = w.open_table(META).map_err(io)?;
                for name in ["next_seq", "next_trigger"] {
                    if meta.get(name).map_err(io)?.is_none() {
                        meta.insert(name, 1).map_err(io)?;
                    }
                }
                meta.get("checkpoint_lsn")
                    .map_err(io)?
                    .map_or(0, |v| v.value())
            };
            w.open_table(EVENTS).map_err(io)?;
            w.open_table(REFS).map_err(io)?;
            w.open_table(PENDING).map_err(io)?;
            w.open_table(TRIGGERS).map_err(io)?;
            w.open_table(SEEN).map_err(io)?;
            w.open_table(SEEN_SOURCES).map_err(io)?;
            w.commit().map_err(io)?;
            checkpoint
        };
        // Replay what the write-ahead log holds past the last checkpoint.
        let (wal, replay) = Wal::open(&dir.join("wal"), checkpoint).map_err(io)?;
        let replayed = replay.len();
        let records: Vec<Record> = replay.into_iter().map(|(_, r)| r).collect();
        let scratch = (AtomicU64::new(0), AtomicU64::new(0));
        apply_records(
            &db,
            &records,
            Durability::None,
            (&scratch.0, &scratch.1),
            true,
        )?;
        let (count, bytes, next_seq) = {
            let r = db.begin_read().map_err(io)?;
            let next_seq = r
                .open_table(META)
                .map_err(io)?
                .get("next_seq")
                .map_err(io)?
                .map_or(1, |v| v.value());
            let events = r.open_table(EVENTS).map_err(io)?;
            let mut bytes = 0u64;
            for item in events.iter().map_err(io)? {
                let (_, v) = item.map_err(io)?;
                bytes += v.value().len() as u64;
            }
            (events.len().map_err(io)?, bytes, next_seq)
        };
        let db = Arc::new(db);
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Self {
            db: Arc::clone(&db),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            config,
            events: Arc::new(AtomicU64::new(count)),
            bytes: Arc::new(AtomicU64::new(bytes)),
            notify: Arc::new(Mutex::new(HashMap::new())),
            hot: Arc::default(),
            syncs: Arc::default(),
        });
        let mut writer = Writer::new(db, &log, wal, next_seq);
        if replayed > 0 {
            tracing::info!(records = replayed, "replayed the write-ahead log");
        }
        writer.checkpoint()?;
        let handle = std::thread::Builder::new()
            .name("wasmesh-log".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        *log.writer.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        Ok(log)
    }

    /// Group commit so far (the benchmarks print it).
    pub fn sync_stats(&self) -> SyncStats {
        SyncStats {
            groups: self.syncs.groups.load(Ordering::Relaxed),
            events: self.syncs.events.load(Ordering::Relaxed),
            syncing: Duration::from_nanos(self.syncs.nanos.load(Ordering::Relaxed)),
        }
    }

    fn send(&self, op: Op) -> Result<(), ()> {
        match &*self.tx.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(tx) => tx.send(op).map_err(|_| ()),
            None => Err(()),
        }
    }

    /// The id of a trigger (`namespace/name`), stable across restarts.
    pub fn trigger_id(&self, name: &str) -> Result<u64, LogError> {
        let w = self.db.begin_write().map_err(io)?;
        let id = {
            let mut triggers = w.open_table(TRIGGERS).map_err(io)?;
            let existing = triggers.get(name).map_err(io)?.map(|v| v.value());
            match existing {
                Some(id) => id,
                None => {
                    let mut meta = w.open_table(META).map_err(io)?;
                    let id = meta
                        .get("next_trigger")
                        .map_err(io)?
                        .map_or(1, |v| v.value());
                    meta.insert("next_trigger", id + 1).map_err(io)?;
                    triggers.insert(name, id).map_err(io)?;
                    id
                }
            }
        };
        w.commit().map_err(io)?;
        Ok(id)
    }

    /// Wakes when new deliveries for this trigger are committed.
    pub fn notifier(&self, trigger: u64) -> Arc<Notify> {
        let mut n = self.notify.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(n.entry(trigger).or_default())
    }

    /// The events and bytes the log holds now.
    pub fn held(&self) -> (u64, u64) {
        (
            self.events.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    fn check_capacity(&self, adding: u64, adding_bytes: u64) -> Result<(), LogError> {
        // A request the log could not hold even empty would be refused forever: 413, not 429.
        if adding > self.config.max_events || adding_bytes > self.config.max_bytes {
            return Err(LogError::TooLarge(format!(
                "the request has {adding} events ({adding_bytes} bytes), more than the log \
                 holds at all ({} events, {} bytes); send fewer at a time",
                self.config.max_events, self.config.max_bytes
            )));
        }
        let events = self.events.load(Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        if events + adding > self.config.max_events {
            return Err(LogError::Full(format!(
                "{events} events held, the limit is {}",
                self.config.max_events
            )));
        }
        if bytes + adding_bytes > self.config.max_bytes {
            return Err(LogError::Full(format!(
                "{bytes} bytes held, the limit is {}",
                self.config.max_bytes
            )));
        }
        Ok(())
    }

    fn encode(entries: Vec<Append>) -> Vec<Entry> {
        entries
            .into_iter()
            .map(|a| {
                let record = encode_record(&a.event, a.ttl, &a.headers);
                (record, a.triggers, a.event, a.ttl, a.headers)
            })
            .collect()
    }

    fn submit(
        &self,
        entries: Vec<Append>,
    ) -> Result<oneshot::Receiver<Result<(), LogError>>, LogError> {
        let encoded = Self::encode(entries);
        let size: u64 = encoded.iter().map(|(b, ..)| b.len() as u64).sum();
        self.check_capacity(encoded.len() as u64, size)?;
        let (reply, rx) = oneshot::channel();
        self.send(Op::Append(encoded, reply))
            .map_err(|()| LogError::Io("the log writer has stopped".into()))?;
        Ok(rx)
    }

    /// Appends events durably: resolves once they are on disk (fsync), shared with whatever
    /// else was waiting to be written.
    pub async fn append(&self, entries: Vec<Append>) -> Result<(), LogError> {
        let rx = self.submit(entries)?;
        rx.await
            .map_err(|_| LogError::Io("the log writer has stopped".into()))?
    }

    /// Same as [`append`](Self::append), for threads outside the async runtime.
    pub fn append_blocking(&self, entries: Vec<Append>) -> Result<(), LogError> {
        let rx = self.submit(entries)?;
        rx.blocking_recv()
            .map_err(|_| LogError::Io("the log writer has stopped".into()))?
    }

    /// The trigger no longer owes this delivery (delivered, or dead-lettered).
    pub fn ack(&self, trigger: u64, seq: u64) {
        let _ = self.send(Op::Ack(trigger, seq));
    }

    /// Records that a delivery was attempted `attempts` times, so retries survive restarts;
    /// resolves once that is on disk.
    pub async fn attempted(&self, trigger: u64, seq: u64, attempts: u32) {
        let (tx, rx) = oneshot::channel();
        if self
            .send(Op::Attempt(trigger, seq, attempts, Some(tx)))
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// Waits until everything sent to the writer so far is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Op::Barrier(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Makes everything durable now (at shutdown).
    pub async fn checkpoint(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Op::Checkpoint(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Up to `limit` deliveries owed by `trigger` after sequence `after`, oldest first: from
    /// the events in memory and from redb.
    pub fn owed(&self, trigger: u64, after: u64, limit: usize) -> Result<Vec<Owed>, LogError> {
        // Memory first, then redb: an event only ever moves from memory to redb, so one that
        // moves in between is found twice (and kept once), never missed.
        let mut out = Vec::new();
        {
            let hot = self.hot.lock().unwrap_or_else(PoisonError::into_inner);
            for (seq, h) in hot.map.range(after + 1..) {
                if out.len() >= limit {
                    break;
                }
                if let Some((_, attempts)) = h.owed.iter().find(|(t, _)| *t == trigger) {
                    out.push(Owed {
                        seq: *seq,
                        event: Arc::clone(&h.event),
                        ttl: h.ttl,
                        headers: h.headers.clone(),
                        attempts: *attempts,
                    });
                }
            }
        }
        let in_memory: std::collections::HashSet<u64> = out.iter().map(|o| o.seq).collect();
        let r = self.db.begin_read().map_err(io)?;
        let pending = r.open_table(PENDING).map_err(io)?;
        let events = r.open_table(EVENTS).map_err(io)?;
        let mut from_redb = 0;
        for item in pending
            .range((trigger, after + 1)..=(trigger, u64::MAX))
            .map_err(io)?
        {
            if from_redb >= limit {
                break;
            }
            let (k, v) = item.map_err(io)?;
            let (_, seq) = k.value();
            if in_memory.contains(&seq) {
                continue;
            }
            let Some(bytes) = events.get(seq).map_err(io)? else {
                continue;
            };
            match decode_record(bytes.value()) {
                Ok((event, ttl, headers)) => {
                    out.push(Owed {
                        seq,
                        event: Arc::new(event),
                        ttl,
                        headers,
                        attempts: v.value(),
                    });
                    from_redb += 1;
                }
                Err(e) => {
                    tracing::error!(seq, error = %e, "an event in the log cannot be read; skipped")
                }
            }
        }
        out.sort_by_key(|o| o.seq);
        out.truncate(limit);
        Ok(out)
    }

    /// How many events the log holds.
    pub fn len(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// True when the log holds no events.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the deliveries owed by triggers that no longer exist, and events past the maximum
    /// age; returns how many deliveries were dropped. Run at start-up and now and then.
    ///
    /// `live` is read again, and held, when the drops are made: a trigger declared anew while
    /// the log was being read (it gets the same id) keeps everything owed to it, including
    /// events appended for it meanwhile.
    pub async fn collect_garbage(&self, live: &Mutex<Vec<u64>>) -> Result<u64, LogError> {
        let snapshot = live.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let garbage = self.find_garbage(&snapshot)?;
        Ok(self.drop_garbage(garbage, live).await)
    }

    /// The deliveries owed to triggers not in `live_triggers` or of events past the maximum
    /// age: (trigger, seq, past the age).
    fn find_garbage(&self, live_triggers: &[u64]) -> Result<Vec<(u64, u64, bool)>, LogError> {
        let mut drop_list: Vec<(u64, u64, bool)> = Vec::new();
        let r = self.db.begin_read().map_err(io)?;
        let pending = r.open_table(PENDING).map_err(io)?;
        let events = r.open_table(EVENTS).map_err(io)?;
        let now = chrono::Utc::now();
        let max_age =
            chrono::Duration::from_std(self.config.max_age).unwrap_or(chrono::Duration::MAX);
        let mut old = std::collections::HashSet::new();
        for item in events.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            let time = decode_record(v.value())
                .ok()
                .and_then(|(e, ..)| e.extension("knativearrivaltime").map(|t| t.to_string()))
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok());
            if time.is_some_and(|t| now.signed_duration_since(t) > max_age) {
                old.insert(k.value());
            }
        }
        for item in pending.iter().map_err(io)? {
            let (k, _) = item.map_err(io)?;
            let (t, seq) = k.value();
            if !live_triggers.contains(&t) || old.contains(&seq) {
                drop_list.push((t, seq, old.contains(&seq)));
            }
        }
        let hot = self.hot.lock().unwrap_or_else(PoisonError::into_inner);
        for (seq, h) in &hot.map {
            let too_old = h
                .event
                .extension("knativearrivaltime")
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t.to_string()).ok())
                .is_some_and(|t| now.signed_duration_since(t) > max_age);
            for (t, _) in &h.owed {
                if too_old || !live_triggers.contains(t) {
                    drop_list.push((*t, *seq, too_old));
                }
            }
        }
        Ok(drop_list)
    }

    /// Drops `garbage` but what a trigger live now is owed (unless past the age), through the
    /// writer (as acknowledgements), so that the write-ahead log records it like any other
    /// change; returns how many were dropped.
    async fn drop_garbage(
        &self,
        mut garbage: Vec<(u64, u64, bool)>,
        live: &Mutex<Vec<u64>>,
    ) -> u64 {
        {
            let live_now = live.lock().unwrap_or_else(PoisonError::into_inner);
            garbage.retain(|(t, _, too_old)| *too_old || !live_now.contains(t));
            for (t, seq, _) in &garbage {
                self.ack(*t, *seq);
            }
        }
        self.flush().await;
        garbage.len() as u64
    }
}

impl std::fmt::Debug for DurableLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableLog")
            .field("events", &self.len())
            .field("config", &self.config)
            .finish()
    }
}

impl Drop for DurableLog {
    fn drop(&mut self) {
        // Closing the channel ends the writer after it commits what it has; the database is
        // released when it returns.
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Arc<Event> {
        Arc::new(
            wasmesh_core::event::parse_json(
                format!(r#"{{"specversion":"1.0","id":"{id}","source":"/s","type":"t","data":{{"x":1}}}}"#).as_bytes(),
            )
            .expect("valid"),
        )
    }

    /// A trigger deleted and declared again while the garbage was being found keeps what it is
    /// owed, including an event appended for it in between; one still gone loses its share.
    #[tokio::test]
    async fn garbage_of_a_trigger_declared_again_meanwhile_is_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let log = DurableLog::open(dir.path(), LogConfig::default()).expect("open");
        let (a, b) = (
            log.trigger_id("ns/a").expect("id"),
            log.trigger_id("ns/b").expect("id"),
        );
        let both = |id: &str| Append {
            event: event(id),
            ttl: 255,
            headers: Passthrough::default(),
            triggers: vec![a, b],
        };
        log.append(vec![both("1")]).await.expect("append");
        // Neither trigger is declared when the garbage is found...
        let garbage = log.find_garbage(&[]).expect("find");
        assert_eq!(garbage.len(), 2);
        // ...then `a` is declared again and an event is appended for it.
        let live = Mutex::new(vec![a]);
        log.append(vec![both("2")]).await.expect("append");
        assert_eq!(
            log.drop_garbage(garbage, &live).await,
            1,
            "only b's share of 1"
        );
        let owed: Vec<String> = log
            .owed(a, 0, 10)
            .expect("owed")
            .iter()
            .map(|o| wasmesh_core::AttributesReader::id(&*o.event).to_string())
            .collect();
        assert_eq!(owed, ["1", "2"]);
        assert_eq!(
            log.owed(b, 0, 10).expect("owed").len(),
            1,
            "2 is b's until collected"
        );
    }

    /// A damaged store stops the start with a message naming the file. redb panics on some
    /// damaged pages (this one among them) instead of returning an error: caught.
    #[tokio::test]
    async fn a_damaged_store_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = DurableLog::open(dir.path(), LogConfig::default()).expect("open");
            let a = log.trigger_id("ns/a").expect("id");
            let appends = (0..50)
                .map(|i| Append {
                    event: event(&i.to_string()),
                    ttl: 255,
                    headers: Passthrough::default(),
                    triggers: vec![a],
                })
                .collect();
            log.append(appends).await.expect("append");
            log.checkpoint().await;
        }
        let path = dir.path().join("broker.redb");
        let mut bytes = std::fs::read(&path).expect("read");
        let n = bytes.len();
        bytes[4096..n].fill(0xab);
        std::fs::write(&path, &bytes).expect("write");
        match DurableLog::open(dir.path(), LogConfig::default()) {
            Err(LogError::Open(message)) => {
                assert!(message.contains("broker.redb is damaged"), "{message}")
            }
            Err(other) => panic!("not the open error: {other}"),
            Ok(_) => panic!("a damaged store opened"),
        }
    }

    #[tokio::test]
    async fn append_owe_ack_reclaim_and_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = DurableLog::open(dir.path(), LogConfig::default()).expect("open");
            let a = log.trigger_id("ns/a").expect("id");
            let b = log.trigger_id("ns/b").expect("id");
            assert_ne!(a, b);
            assert_eq!(log.trigger_id("ns/a").expect("id"), a, "ids are stable");
            log.append(vec![
                Append {
                    event: event("1"),
                    ttl: 255,
                    headers: Passthrough::default(),
                    triggers: vec![a, b],
                },
                Append {
                    event: event("2"),
                    ttl: 7,
                    headers: Passthrough::default(),
                    triggers: vec![b],
                },
            ])
            .await
            .expect("append");
            assert_eq!(log.len(), 2);
            let synced = log.sync_stats();
            assert_eq!(
                (synced.groups, synced.events),
                (1, 2),
                "one group, one sync"
            );
            assert!(synced.syncing > Duration::ZERO);
            let owed_b = log.owed(b, 0, 10).expect("owed");
            assert_eq!(owed_b.len(), 2);
            assert_eq!(owed_b[1].ttl, 7);
            log.ack(b, owed_b[0].seq);
            log.attempted(b, owed_b[1].seq, 3).await;
            log.flush().await;
            assert_eq!(log.len(), 2, "event 1 is still owed to a");
            let owed_a = log.owed(a, 0, 10).expect("owed");
            log.ack(a, owed_a[0].seq);
            log.flush().await;
            assert_eq!(log.len(), 1, "event 1 reclaimed once delivered everywhere");
            assert_eq!(log.sync_stats().groups, 1, "no appended event since");
        }
        // A restart finds what is still owed, with its attempts.
        let log = DurableLog::open(dir.path(), LogConfig::default()).expect("reopen");
        let b = log.trigger_id("ns/b").expect("id");
        let owed = log.owed(b, 0, 10).expect("owed");
        assert_eq!(owed.len(), 1);
        assert_eq!(owed[0].attempts, 3);
        assert_eq!(wasmesh_core::AttributesReader::id(&*owed[0].event), "2");
        assert_eq!(
            wasmesh_core::event::data_bytes(&owed[0].event).as_deref(),
            Some(&br#"{"x":1}"#[..])
        );
        assert_eq!(log.len(), 1);
        // A trigger that is gone no longer holds events.
        assert_eq!(
            log.collect_garbage(&Mutex::new(Vec::new()))
                .await
                .expect("gc"),
            1
        );
        assert!(log.is_empty());
    }

    #[tokio::test]
    async fn events_stay_in_memory_until_delivered_or_spilled() {
        let dir = tempfile::tempdir().expect("dir");
        let log = DurableLog::open(dir.path(), LogConfig::default()).expect("open");
        let (a, b) = (
            log.trigger_id("a").expect("id"),
            log.trigger_id("b").expect("id"),
        );
        let events: Vec<Arc<Event>> = (0..=HOT_EVENTS).map(|i| event(&i.to_string())).collect();
        log.append(
            events
                .iter()
                .map(|e| Append {
                    event: Arc::clone(e),
                    ttl: 3,
                    headers: Passthrough::default(),
                    triggers: vec![a, b],
                })
                .collect(),
        )
        .await
        .expect("append");
        let owed = log.owed(a, 0, HOT_EVENTS + 1).expect("owed");
        assert_eq!(owed.len(), HOT_EVENTS + 1);
        // One over the limit: the oldest went to redb, and comes back decoded, equal.
        assert!(!Arc::ptr_eq(&owed[0].event, &events[0]));
        assert_eq!(*owed[0].event, *events[0]);
        assert_eq!(owed[0].ttl, 3);
        // The others are the very events appended.
        assert!(
            owed[1..]
                .iter()
                .zip(&events[1..])
                .all(|(o, e)| Arc::ptr_eq(&o.event, e))
        );
        // Acknowledged by one trigger and tried by the other: still owed, attempts counted.
        log.ack(a, owed[1].seq);
        log.attempted(b, owed[1].seq, 2).await;
        assert!(log.owed(a, owed[0].seq, 1).expect("owed")[0].seq == owed[2].seq);
        assert_eq!(log.owed(b, owed[0].seq, 1).expect("owed")[0].attempts, 2);
        // Delivered everywhere: gone, redb never involved.
        log.ack(b, owed[1].seq);
        log.flush().await;
        assert_eq!(log.len(), HOT_EVENTS as u64);
        assert!(!log.hot.lock().expect("lock").map.contains_key(&owed[1].seq));
        // A checkpoint spills the rest, attempts included; a restart finds them all.
        log.attempted(b, owed[2].seq, 5).await;
        log.checkpoint().await;
        assert!(log.hot.lock().expect("lock").map.is_empty());
        drop(log);
        let log = DurableLog::open(dir.path(), LogConfig::default()).expect("reopen");
        assert_eq!(log.len(), HOT_EVENTS as u64);
        let b_owed = log.owed(b, 0, 3).expect("owed");
        assert_eq!(
            b_owed.iter().map(|o| o.seq).collect::<Vec<_>>(),
            [owed[0].seq, owed[2].seq, owed[3].seq]
        );
        assert_eq!(b_owed[1].attempts, 5);
    }

    #[tokio::test]
    async fn capacity_refuses_with_full() {
        let dir = tempfile::tempdir().expect("dir");
        let log = DurableLog::open(
            dir.path(),
            LogConfig {
                max_events: 2,
                ..Default::default()
            },
        )
        .expect("open");
        let t = log.trigger_id("t").expect("id");
        let one = |id: &str| {
            vec![Append {
                event: event(id),
                ttl: 255,
                headers: Passthrough::default(),
                triggers: vec![t],
            }]
        };
        log.append(one("1")).await.expect("fits");
        log.append(one("2")).await.expect("fits");
        assert!(matches!(log.append(one("3")).await, Err(LogError::Full(_))));
        let owed = log.owed(t, 0, 1).expect("owed");
        log.ack(t, owed[0].seq);
        log.flush().await;
        log.append(one("3")).await.expect("room again");
    }
}
