//! The NATS JetStream backend of the broker's log (`--store nats://HOST:PORT`): one stream per
//! broker (subject `wasmesh.events.<namespace>.<broker>`), one durable pull consumer per
//! trigger shared by every replica, so that each event is delivered by one of them. Ingress
//! answers 202 once JetStream acknowledged the publish; a delivery is acknowledged only after
//! the subscriber acknowledged it; a failed attempt is NAKed with the trigger's backoff and
//! redelivered (to any replica), and past the retry limit goes to the dead-letter sink. An
//! ordered trigger is delivered by one replica at a time, the holder of its lease (a key in the
//! `wasmesh-leases` bucket), through lanes that keep the order of each partition key: several
//! keys in flight at once, one event of a key at a time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use futures_util::StreamExt as _;
use wasmesh_core::Event;

use crate::log::LogError;
use crate::mesh::BrokerKey;
use crate::passthrough::Passthrough;
use crate::record;

/// How to reach NATS and how to keep events there.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port` (`tls://` for TLS).
    pub url: String,
    /// A `.creds` file (JWT and NKey).
    pub credentials: Option<PathBuf>,
    /// A PEM CA certificate to trust (TLS is then required).
    pub ca: Option<PathBuf>,
    /// Events older than this leave the stream.
    pub max_age: Duration,
    /// Bytes each broker's stream holds at most (-1: no limit).
    pub max_bytes: i64,
    /// Copies JetStream keeps of each stream (1 for one server, 3 for a cluster).
    pub replicas: usize,
}

/// What acknowledges, NAKs or extends one JetStream message; whether its delivery has ended
/// here; for an ordered trigger, whether this replica still holds the lease it was pulled under.
pub struct AckHandle {
    acker: jetstream::message::Acker,
    lease: Option<Arc<LeaseHold>>,
    settled: AtomicBool,
}

impl AckHandle {
    /// False once the lease this message was pulled under is lost: another replica may deliver
    /// it (and the events after it) by now, so this one must not start it.
    pub fn lease_held(&self) -> bool {
        self.lease.as_ref().is_none_or(|hold| hold.holds())
    }

    /// Its delivery ends here (the acknowledgement or NAK is on its way): no more progress is
    /// reported for it, which could otherwise follow a NAK and undo its delay.
    pub fn settle(&self) {
        self.settled.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckHandle")
    }
}

impl std::ops::Deref for AckHandle {
    type Target = jetstream::message::Acker;

    fn deref(&self) -> &Self::Target {
        &self.acker
    }
}

/// How long JetStream waits for a delivery's acknowledgement before it delivers the event again
/// (to any replica): twice the trigger's delivery timeout, at least 2 s, 30 s without one. The
/// replica holding a message reports it in progress until its delivery ends (`KeepWaiting`),
/// so this is how long a crashed replica's events take to come back.
pub fn ack_wait(timeout: Option<Duration>) -> Duration {
    timeout.map_or(Duration::from_secs(30), |t| {
        t.saturating_mul(2)
            .clamp(Duration::from_secs(2), wasmesh_core::duration::LONGEST)
    })
}

/// A connection to JetStream.
pub struct NatsStore {
    js: jetstream::Context,
    client: async_nats::Client,
    config: NatsConfig,
    /// The lease bucket, opened on first use.
    leases: tokio::sync::OnceCell<kv::Store>,
    /// How this process names itself in the leases it holds.
    holder: String,
    /// Whether the server refuses a message past a stream's `max_bytes` exactly (set on first
    /// use of a stream, once connected). Before 2.10.5 it miscounts the message's size and, the
    /// check passed, drops the stream's oldest message to make room
    /// (nats-io/nats-server#4771): an event accepted and still owed would be lost. With such
    /// a server wasmesh keeps `--log-max-bytes` itself and gives the stream no byte limit.
    exact_byte_limit: std::sync::OnceLock<bool>,
    /// Per stream: the bytes it held when last asked, plus what this replica added since.
    usage: Mutex<HashMap<String, (Instant, u64)>>,
}

/// How long the bytes a stream holds are taken as known (wasmesh's own byte limit).
const USAGE_FRESH: Duration = Duration::from_millis(50);

/// Whether nats-server `version` refuses a message past `max_bytes` exactly (2.10.5 on).
fn counts_bytes_exactly(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok());
    match (
        parts.next().flatten(),
        parts.next().flatten(),
        parts.next().flatten(),
    ) {
        (Some(major), Some(minor), Some(patch)) => (major, minor, patch) >= (2, 10, 5),
        _ => false,
    }
}

/// How long a lease lives without renewal; the holder renews it three times as often.
pub const LEASE_TTL: Duration = Duration::from_secs(6);

/// How long before its lease could expire the holder stops counting on it.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// This replica's hold on an ordered trigger's lease, as the messages pulled under it see it:
/// held until the holder finds it lost, and in any case no longer than the lease surely lives
/// after its last renewal was sent (`LEASE_TTL` less `LEASE_MARGIN`). A holder that was paused
/// or starved past that (a stopped VM, a stalled process) learns of the loss only at its next
/// renewal, and meanwhile another replica may have taken the lease: by the clock it starts
/// nothing more, rather than deliver events another replica already delivered after.
pub(crate) struct LeaseHold {
    held: AtomicBool,
    origin: Instant,
    /// Until when, in milliseconds after `origin`, the lease surely lives.
    until_ms: AtomicU64,
}

impl LeaseHold {
    /// A lease whose taking (or last renewal) was asked for at `sent`.
    fn new(sent: Instant) -> Self {
        let hold = Self {
            held: AtomicBool::new(true),
            origin: sent,
            until_ms: AtomicU64::new(0),
        };
        hold.renewed(sent);
        hold
    }

    /// A renewal asked for at `sent` succeeded.
    fn renewed(&self, sent: Instant) {
        let until = sent.saturating_duration_since(self.origin) + LEASE_TTL - LEASE_MARGIN;
        let ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        self.until_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Until when the lease surely lives.
    fn deadline(&self) -> Instant {
        self.origin + Duration::from_millis(self.until_ms.load(Ordering::Acquire))
    }

    /// True while the lease is held and surely alive.
    pub(crate) fn holds(&self) -> bool {
        self.held.load(Ordering::Acquire) && Instant::now() < self.deadline()
    }

    /// The lease is lost or given up.
    fn end(&self) {
        self.held.store(false, Ordering::Release);
    }
}

/// A key/value bucket, created when missing. Its stream is created here with the key/value
/// conventions, rather than through `create_key_value`, whose account query does not parse the
/// answer of nats-server 2.9 (Debian's).
pub async fn key_value_bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, String> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("key/value bucket {name}: {e}"))?;
    js.get_key_value(name)
        .await
        .map_err(|e| format!("key/value bucket {name}: {e}"))
}

/// Leases in a bucket whose keys live `LEASE_TTL`: at most one holder per key; whoever stops
/// renewing loses it when the key expires.
pub mod lease {
    use super::kv;
    use bytes::Bytes;

    /// The bucket key of a lease on `id` (any text).
    pub fn key(id: &str) -> String {
        id.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '.'
                }
            })
            .collect()
    }

    /// Takes the lease of `id` for `holder` if nobody holds it; the revision to renew it with.
    pub async fn acquire(leases: &kv::Store, id: &str, holder: &str) -> Option<u64> {
        leases
            .create(key(id), Bytes::from(holder.to_string()))
            .await
            .ok()
    }

    /// Renews a lease; `None` when it was lost meanwhile.
    pub async fn renew(leases: &kv::Store, id: &str, holder: &str, revision: u64) -> Option<u64> {
        leases
            .update(key(id), Bytes::from(holder.to_string()), revision)
            .await
            .ok()
    }

    /// Gives a lease up, so that another holder takes it at once.
    pub async fn release(leases: &kv::Store, id: &str, revision: u64) {
        let _ = leases.delete_expect_revision(key(id), Some(revision)).await;
    }
}

/// The TTL travels in this header beside the event.
const TTL_HEADER: &str = "Wasmesh-Ttl";

fn io(e: impl std::fmt::Display) -> LogError {
    LogError::Io(format!("NATS JetStream: {e}"))
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore")
            .field("url", &self.config.url)
            .finish()
    }
}

impl NatsStore {
    /// Connects (retrying in the background if the server is not up yet).
    pub async fn connect(config: NatsConfig) -> Result<Arc<Self>, String> {
        let mut options = async_nats::ConnectOptions::new()
            .name("wasmesh")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5));
        if let Some(creds) = &config.credentials {
            options = options
                .credentials_file(creds)
                .await
                .map_err(|e| format!("--nats-creds {}: {e}", creds.display()))?;
        }
        if let Some(ca) = &config.ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = options
            .connect(config.url.as_str())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", config.url))?;
        let js = jetstream::new(client.clone());
        let holder = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        Ok(Arc::new(Self {
            js,
            client,
            config,
            leases: tokio::sync::OnceCell::new(),
            holder,
            exact_byte_limit: std::sync::OnceLock::new(),
            usage: Mutex::new(HashMap::new()),
        }))
    }

    /// The bucket of leases (shared with the control path's source leases).
    pub async fn leases(&self) -> Result<&kv::Store, String> {
        self.leases
            .get_or_try_init(|| {
                key_value_bucket(&self.js, "wasmesh-leases", LEASE_TTL, self.config.replicas)
            })
            .await
    }

    /// The JetStream context (the control path keeps its key/value and object buckets there).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Whether the client is connected to a server now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    fn subject(key: &BrokerKey) -> String {
        format!("wasmesh.events.{}.{}", key.namespace, key.name)
    }

    fn stream_name(key: &BrokerKey) -> String {
        format!("WASMESH-{}-{}", key.namespace, key.name)
    }

    /// The broker's stream, created when it is missing, and given this replica's limits
    /// (`--log-max-age`, `--log-max-bytes`) when they changed since it was created.
    pub async fn stream(&self, key: &BrokerKey) -> Result<stream::Stream, LogError> {
        if self.client.server_info().version.is_empty() {
            // Connected once this returns: the server's version decides who keeps the limit.
            self.client.flush().await.map_err(io)?;
        }
        let config = stream::Config {
            name: Self::stream_name(key),
            subjects: vec![Self::subject(key)],
            max_age: self.config.max_age,
            max_bytes: if self.exact_byte_limit() {
                self.config.max_bytes
            } else {
                -1
            },
            storage: stream::StorageType::File,
            num_replicas: self.config.replicas.max(1),
            // An event leaves the stream once every trigger's consumer acknowledged it
            // (delivered events are reclaimed), so `max_bytes` bounds what is still owed;
            // a full stream refuses new events (429) rather than dropping owed ones.
            retention: stream::RetentionPolicy::Interest,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let mut stream = self
            .js
            .get_or_create_stream(config.clone())
            .await
            .map_err(io)?;
        let now = &stream.cached_info().config;
        if now.num_replicas != config.num_replicas {
            tracing::warn!(
                stream = %config.name,
                replicas = now.num_replicas,
                asked = config.num_replicas,
                "the stream keeps the copies it was created with; --nats-replicas does not change them"
            );
        }
        if now.max_age != config.max_age || now.max_bytes != config.max_bytes {
            tracing::info!(
                stream = %config.name,
                max_bytes = config.max_bytes,
                max_age_s = config.max_age.as_secs(),
                "updating the stream's limits"
            );
            let updated = stream::Config {
                // What JetStream does not let change stays as it is.
                num_replicas: now.num_replicas,
                ..config
            };
            self.js.update_stream(updated).await.map_err(io)?;
            stream = self
                .js
                .get_stream(Self::stream_name(key))
                .await
                .map_err(io)?;
        }
        Ok(stream)
    }

    /// Whether the server keeps `--log-max-bytes` itself (see `exact_byte_limit`); asked once
    /// connected, and said in the log when it cannot.
    fn exact_byte_limit(&self) -> bool {
        if let Some(exact) = self.exact_byte_limit.get() {
            return *exact;
        }
        let version = self.client.server_info().version;
        if version.is_empty() {
            // Not connected yet (`stream` waits until it is): keep the limit here meanwhile.
            return false;
        }
        *self.exact_byte_limit.get_or_init(|| {
            let exact = counts_bytes_exactly(&version);
            if !exact {
                tracing::warn!(
                    server = %version,
                    "this nats-server drops a full stream's oldest events instead of refusing new ones (nats-io/nats-server#4771, fixed in 2.10.5); wasmesh keeps --log-max-bytes itself, give or take what the replicas publish in {} ms",
                    USAGE_FRESH.as_millis()
                );
            }
            exact
        })
    }

    /// Refuses (`Full`) `adding` bytes that would take the broker's stream past
    /// `--log-max-bytes`, on a server that cannot be trusted to (`exact_byte_limit`).
    async fn make_room(&self, key: &BrokerKey, adding: u64) -> Result<(), LogError> {
        let max = u64::try_from(self.config.max_bytes).unwrap_or(u64::MAX);
        if self.config.max_bytes <= 0 {
            return Ok(());
        }
        // More than the stream holds even empty: refused for good (413), not full (429).
        if adding > max {
            return Err(LogError::TooLarge(format!(
                "the request needs {adding} bytes of the broker's stream, which holds at most \
                 {max} (--log-max-bytes); send fewer at a time"
            )));
        }
        if self.exact_byte_limit() {
            return Ok(());
        }
        let name = Self::stream_name(key);
        let known = self
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&name)
            .copied();
        let used = match known {
            // Known and room: no round trip.
            Some((at, used)) if at.elapsed() < USAGE_FRESH && used + adding <= max => used,
            _ => {
                let stream = self.js.get_stream(&name).await.map_err(io)?;
                let used = stream.cached_info().state.bytes;
                self.usage
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(name.clone(), (Instant::now(), used));
                used
            }
        };
        if used + adding > max {
            return Err(LogError::Full(format!(
                "the broker's stream holds {used} bytes, the limit is {max}"
            )));
        }
        if let Some((_, held)) = self
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&name)
        {
            *held += adding;
        }
        Ok(())
    }

    /// Appends events to a broker's stream; resolves once JetStream acknowledged every one.
    pub async fn publish(
        &self,
        key: &BrokerKey,
        events: Vec<(Arc<Event>, i32, Passthrough)>,
    ) -> Result<(), LogError> {
        let subject = Self::subject(key);
        let mut messages = Vec::with_capacity(events.len());
        // What the server stores: about 40 bytes of its own per message, the subject, the
        // headers as sent ("NATS/1.0", each `name: value` line) and the payload.
        let mut adding = 0u64;
        for (event, ttl, passthrough) in events {
            let mut headers = async_nats::HeaderMap::new();
            let ttl_text = ttl.to_string();
            headers.insert(TTL_HEADER, ttl_text.as_str());
            // An event is its source and id: JetStream drops a second publish of the same
            // event within its duplicate window (a producer's retry, a source's replay after a
            // failover).
            let msg_id = format!(
                "{}#{}",
                wasmesh_core::AttributesReader::source(&*event),
                wasmesh_core::AttributesReader::id(&*event)
            );
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            let payload = record::encode_record(&event, ttl, &passthrough);
            let header_bytes = 12 + TTL_HEADER.len() + ttl_text.len() + 11 + msg_id.len() + 8;
            // NATS takes no message past the server's max_payload: refused for good (413),
            // not as if the store were failing (503, tried again forever).
            let max_payload = self.client.max_payload();
            if max_payload > 0 && header_bytes + payload.len() > max_payload {
                return Err(LogError::TooLarge(format!(
                    "an event of {} bytes as a NATS message, and the server takes at most {max_payload} (its max_payload)",
                    header_bytes + payload.len()
                )));
            }
            adding += (40 + subject.len() + header_bytes + payload.len()) as u64;
            messages.push((headers, payload));
        }
        self.make_room(key, adding).await?;
        let mut acks = Vec::with_capacity(messages.len());
        for (headers, payload) in messages {
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await
                .map_err(io)?;
            acks.push(ack);
        }
        for ack in acks {
            if let Err(e) = ack.await {
                let text = e.to_string();
                // JetStream's limits (--log-max-bytes): back off, as the embedded log says.
                if text.contains("maximum") {
                    return Err(LogError::Full(format!("NATS JetStream: {text}")));
                }
                return Err(io(e));
            }
        }
        Ok(())
    }

    /// Deletes a trigger's durable consumer (the trigger was deleted).
    pub async fn delete_consumer(&self, key: &BrokerKey, trigger: &str) -> Result<(), LogError> {
        let stream = self.stream(key).await?;
        match stream
            .delete_consumer(&Self::consumer_name(key, trigger))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    fn consumer_name(key: &BrokerKey, trigger: &str) -> String {
        format!("wasmesh-{}-{trigger}", key.namespace)
    }

    /// The trigger's durable consumer on its broker's stream, created when missing, and
    /// updated when its limits no longer match the trigger's (JetStream keeps the settings a
    /// consumer was created with).
    pub async fn consumer(
        &self,
        key: &BrokerKey,
        trigger: &str,
        max_pending: usize,
        ack_wait: Duration,
    ) -> Result<consumer::PullConsumer, LogError> {
        let stream = self.stream(key).await?;
        let name = Self::consumer_name(key, trigger);
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            max_deliver: -1,
            filter_subject: Self::subject(key),
            max_ack_pending: i64::try_from(max_pending).unwrap_or(1024),
            ..Default::default()
        };
        let existing = stream
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(io)?;
        let now = &existing.cached_info().config;
        if now.max_ack_pending == config.max_ack_pending && now.ack_wait == config.ack_wait {
            return Ok(existing);
        }
        tracing::info!(
            consumer = %name,
            max_ack_pending = config.max_ack_pending,
            ack_wait_ms = config.ack_wait.as_millis() as u64,
            "the trigger changed: updating its JetStream consumer"
        );
        // Create-or-update: the consumer keeps its position and what it has in flight.
        stream.create_consumer(config).await.map_err(io)
    }
}

/// A message taken from a consumer: the event, its TTL, how many times it was delivered
/// before, and what acknowledges it.
pub(crate) struct Pulled {
    pub event: Event,
    pub ttl: i32,
    pub headers: Passthrough,
    pub delivered_before: u32,
    pub acker: Arc<AckHandle>,
}

/// Reads a trigger's consumer until `stop`, handing each message to `take`; it reconnects
/// after errors. `take` returning false stops the reading.
///
/// With a `lease` (an ordered trigger), everything is held back at first, until no message is
/// in flight anywhere but here (JetStream's count of unacknowledged messages is what this
/// holds), and then handed over in stream order. What a previous holder left comes back as its
/// ack wait runs out, in that order, not theirs, and a holder that was paused rather than
/// stopped still has its pull open, so JetStream may hand it a message again: waiting for a
/// while, or for the first new message, let a key's newer event go before an older one.
pub(crate) async fn pull<Fut>(
    consumer: consumer::PullConsumer,
    ack_wait: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut retire: tokio::sync::watch::Receiver<bool>,
    lease: Option<Arc<LeaseHold>>,
    mut take: impl FnMut(Pulled) -> Fut,
) where
    Fut: std::future::Future<Output = bool>,
{
    /// How often, while holding back, the count of unacknowledged messages is asked for.
    const POLL: Duration = Duration::from_millis(100);
    let waiting = KeepWaiting::start(ack_wait);
    let mut collecting = lease.is_some();
    let mut held_back: Vec<(u64, Pulled)> = Vec::new();
    let mut asked = OnlyHere {
        consumer: consumer.clone(),
        give_up_after: ack_wait,
        failing_since: None,
    };
    let mut last_asked = Instant::now();
    loop {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the JetStream consumer; retrying in 1 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                    _ = retire.changed() => return,
                }
            }
        };
        loop {
            let next = tokio::select! {
                m = async {
                    if collecting {
                        tokio::time::timeout(POLL, messages.next()).await.ok()
                    } else {
                        Some(messages.next().await)
                    }
                } => m,
                _ = stop.changed() => return,
                _ = retire.changed() => return,
            };
            let Some(next) = next else {
                // Nothing new for a while: is anything still in flight elsewhere?
                last_asked = Instant::now();
                if asked.check(held_back.len()).await {
                    collecting = false;
                    if !hand_over_in_order(&mut held_back, &mut take).await {
                        return;
                    }
                }
                continue;
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "JetStream consumer stream error");
                    continue;
                }
                None => break,
            };
            let (delivered, stream_seq) = msg
                .info()
                .map_or((1, 0), |i| (i.delivered.max(1), i.stream_sequence));
            let (msg, acker) = msg.split();
            let acker = Arc::new(AckHandle {
                acker,
                lease: lease.clone(),
                settled: AtomicBool::new(false),
            });
            waiting.add(&acker);
            match record::decode_record(&msg.payload) {
                Ok((event, ttl, headers)) => {
                    let pulled = Pulled {
                        event,
                        ttl,
                        headers,
                        delivered_before: u32::try_from(delivered - 1).unwrap_or(u32::MAX),
                        acker,
                    };
                    if collecting {
                        held_back.push((stream_seq, pulled));
                        if last_asked.elapsed() < POLL {
                            continue;
                        }
                        last_asked = Instant::now();
                        if !asked.check(held_back.len()).await {
                            continue;
                        }
                        collecting = false;
                        if !hand_over_in_order(&mut held_back, &mut take).await {
                            return;
                        }
                        continue;
                    }
                    if !take(pulled).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "a message in the stream is not a wasmesh event; dropped");
                    acker.settle();
                    let _ = acker.ack_with(jetstream::AckKind::Term).await;
                }
            }
        }
    }
}

/// Renews the lease `id`, moving `hold`'s deadline on from when the renewal was asked for;
/// false when the lease was lost.
async fn renew_hold(
    leases: &kv::Store,
    id: &str,
    holder: &str,
    revision: &mut u64,
    hold: &LeaseHold,
) -> bool {
    let asked = Instant::now();
    match lease::renew(leases, id, holder, *revision).await {
        Some(r) => {
            *revision = r;
            hold.renewed(asked);
            true
        }
        None => false,
    }
}

/// True when JetStream counts no more unacknowledged messages than the `held` ones here: none is
/// in flight with another replica (or with a paused holder) any more.
/// When that count cannot be read (credentials without the right to ask, say) for an ack wait,
/// the messages held are handed over anyway, as before this check, rather than never.
struct OnlyHere {
    consumer: consumer::PullConsumer,
    give_up_after: Duration,
    failing_since: Option<Instant>,
}

impl OnlyHere {
    async fn check(&mut self, held: usize) -> bool {
        let pending = match self.consumer.info().await {
            Ok(info) => Ok(info.num_ack_pending),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the consumer's state; asking again");
                Err(())
            }
        };
        let (here, since) = only_here(
            pending,
            held,
            self.failing_since,
            Instant::now(),
            self.give_up_after,
        );
        if since.is_none() && self.failing_since.is_some() && pending.is_err() {
            tracing::warn!(
                "cannot read the JetStream consumer's state for an ack wait: handing the held \
                 messages over without knowing whether older ones are still in flight"
            );
        }
        self.failing_since = since;
        here
    }
}

/// Whether only `held` messages are unacknowledged, given what asking JetStream answered
/// (`pending`); and since when asking has failed. After failing for `give_up_after`, yes.
fn only_here(
    pending: Result<usize, ()>,
    held: usize,
    failing_since: Option<Instant>,
    now: Instant,
    give_up_after: Duration,
) -> (bool, Option<Instant>) {
    match pending {
        Ok(pending) => (pending <= held, None),
        Err(()) => {
            let since = failing_since.unwrap_or(now);
            if now.saturating_duration_since(since) >= give_up_after {
                (true, None)
            } else {
                (false, Some(since))
            }
        }
    }
}

/// Hands `held` over in stream order; false when `take` wants no more.
async fn hand_over_in_order<Fut>(
    held: &mut Vec<(u64, Pulled)>,
    take: &mut impl FnMut(Pulled) -> Fut,
) -> bool
where
    Fut: std::future::Future<Output = bool>,
{
    held.sort_by_key(|(seq, _)| *seq);
    for (_, pulled) in held.drain(..) {
        if !take(pulled).await {
            return false;
        }
    }
    true
}

/// Messages taken from a consumer wait in the trigger's queues until a worker is free, and their
/// deliveries run, retries and backoff included, for as long as the subscriber takes (up to the
/// trigger's timeout, else ten minutes for an HTTP request): either can last longer than the ack
/// wait, and JetStream would then deliver them a second time beside this replica's. A task tells
/// JetStream, often enough for any ack wait, that every message this replica still holds is in
/// progress (not those pulled under a lease since lost: they are left to come back to its next
/// holder). A replica that dies stops telling, and its messages come back after one ack wait.
/// The task outlives the reading (a trigger rebuilt: its old workers still empty their queues)
/// and ends once the reading has stopped and no message it handed over is left.
struct KeepWaiting {
    handles: Arc<Mutex<Vec<Weak<AckHandle>>>>,
    reading: Arc<AtomicBool>,
}

impl KeepWaiting {
    fn start(ack_wait: Duration) -> Self {
        let handles: Arc<Mutex<Vec<Weak<AckHandle>>>> = Arc::default();
        let reading = Arc::new(AtomicBool::new(true));
        let held = Arc::clone(&handles);
        let still_reading = Arc::clone(&reading);
        // At least every 600 ms: a third of the shortest ack wait (2 s), so that a trigger whose
        // timeout shrank meanwhile (its consumer updated, this feeder not rebuilt) is covered.
        let period = (ack_wait / 3).min(Duration::from_millis(600));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tick.tick().await;
                let waiting: Vec<Arc<AckHandle>> = {
                    let mut h = held.lock().unwrap_or_else(PoisonError::into_inner);
                    // Delivered (acknowledged or NAKed) messages are dropped: forget them.
                    h.retain(|w| w.strong_count() > 0);
                    if h.is_empty() && !still_reading.load(Ordering::Acquire) {
                        return;
                    }
                    h.iter()
                        .filter_map(Weak::upgrade)
                        .filter(|a| !a.settled.load(Ordering::Acquire) && a.lease_held())
                        .collect()
                };
                for a in waiting {
                    let _ = a.ack_with(jetstream::AckKind::Progress).await;
                }
            }
        });
        Self { handles, reading }
    }

    fn add(&self, handle: &Arc<AckHandle>) {
        self.handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(handle));
    }
}

impl Drop for KeepWaiting {
    fn drop(&mut self) {
        self.reading.store(false, Ordering::Release);
    }
}

/// [`pull`] on one replica at a time: only while this process holds the lease `id`, renewed
/// every third of its life. A replica that takes the lease over while messages are still
/// unacknowledged (its holder died or stopped) first waits `ack_wait`, so that JetStream
/// delivers those again, oldest first, before anything newer: the order of each key holds
/// across the failover (an event may come twice, never after a later one of its key).
pub(crate) async fn pull_exclusive<Fut>(
    nats: &NatsStore,
    id: &str,
    consumer: consumer::PullConsumer,
    ack_wait: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
    mut retire: tokio::sync::watch::Receiver<bool>,
    mut take: impl FnMut(Pulled) -> Fut,
) where
    Fut: std::future::Future<Output = bool>,
{
    let period = LEASE_TTL / 3;
    let mut stopped = stop.clone();
    loop {
        let leases = match nats.leases().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(trigger = id, error = %e, "no lease bucket yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(period) => continue,
                    _ = stopped.changed() => return,
                    _ = retire.changed() => return,
                }
            }
        };
        let asked = Instant::now();
        let Some(mut revision) = lease::acquire(leases, id, &nats.holder).await else {
            tokio::select! {
                _ = tokio::time::sleep(period) => continue,
                _ = stopped.changed() => return,
                _ = retire.changed() => return,
            }
        };
        let mut consumer = consumer.clone();
        // The consumer's own ack wait counts, should the trigger's timeout have changed since
        // this feeder started (unknown: the feeder's, and wait anyway).
        let (unacknowledged, wait) = consumer.info().await.map_or((1, ack_wait), |i| {
            (i.num_ack_pending, i.config.ack_wait.max(ack_wait))
        });
        tracing::info!(
            trigger = id,
            unacknowledged,
            "holds the lease: this ordered trigger is delivered here"
        );
        let hold = Arc::new(LeaseHold::new(asked));
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        if unacknowledged > 0 {
            let settle = tokio::time::sleep(wait);
            tokio::pin!(settle);
            let lost = loop {
                tokio::select! {
                    _ = &mut settle => break None,
                    _ = renew.tick() => {
                        if !renew_hold(leases, id, &nats.holder, &mut revision, &hold).await {
                            break Some(true);
                        }
                    }
                    _ = stopped.changed() => break Some(false),
                    _ = retire.changed() => break Some(false),
                }
            };
            match lost {
                None => {}
                Some(true) => continue,
                Some(false) => {
                    lease::release(leases, id, revision).await;
                    return;
                }
            }
        }
        let (lose, lost_rx) = tokio::sync::watch::channel(false);
        let pulling = pull(
            consumer,
            ack_wait,
            stop.clone(),
            lost_rx,
            Some(Arc::clone(&hold)),
            &mut take,
        );
        tokio::pin!(pulling);
        let (lost, ended) = loop {
            // Past the time the lease surely lives (this task was paused or starved, or the
            // renewals keep failing to arrive), it counts as lost.
            let expiry = tokio::time::Instant::from_std(hold.deadline());
            tokio::select! {
                () = &mut pulling => break (false, true),
                _ = renew.tick() => {
                    if !renew_hold(leases, id, &nats.holder, &mut revision, &hold).await {
                        break (true, false);
                    }
                }
                () = tokio::time::sleep_until(expiry) => break (true, false),
                _ = retire.changed() => break (false, false),
            }
        };
        // What this replica pulled and has not started stays unacknowledged: JetStream delivers
        // it again to the next holder.
        hold.end();
        if !ended {
            let _ = lose.send(true);
            pulling.await;
        }
        if !lost {
            lease::release(leases, id, revision).await;
            return;
        }
        tracing::warn!(
            trigger = id,
            "lost the lease: this ordered trigger is no longer delivered here"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Duration, Instant, LEASE_MARGIN, LEASE_TTL, LeaseHold, counts_bytes_exactly, only_here,
    };

    #[test]
    fn held_messages_go_once_nothing_older_is_in_flight_or_the_count_stays_unknown() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(10);
        // JetStream counts 5 unacknowledged, 3 of them here: wait.
        assert_eq!(only_here(Ok(5), 3, None, t0, wait), (false, None));
        assert_eq!(only_here(Ok(3), 3, None, t0, wait), (true, None));
        // The count cannot be read: wait, but not for ever.
        let (here, since) = only_here(Err(()), 3, None, t0, wait);
        assert_eq!((here, since), (false, Some(t0)));
        let later = t0 + Duration::from_secs(4);
        assert_eq!(only_here(Err(()), 3, since, later, wait), (false, Some(t0)));
        let past = t0 + wait;
        assert_eq!(only_here(Err(()), 3, since, past, wait), (true, None));
        // Readable again: the failures are forgotten.
        assert_eq!(only_here(Ok(4), 3, since, later, wait), (false, None));
    }

    #[test]
    fn a_lease_is_held_by_the_clock_too() {
        let start = Instant::now();
        let hold = LeaseHold::new(start);
        assert_eq!(hold.deadline(), start + LEASE_TTL - LEASE_MARGIN);
        assert!(hold.holds());
        // A renewal asked for later moves the deadline on; one that answers late, for a request
        // sent before the last, does not move it back.
        let later = start + Duration::from_secs(2);
        hold.renewed(later);
        assert_eq!(hold.deadline(), later + LEASE_TTL - LEASE_MARGIN);
        hold.renewed(start);
        assert_eq!(hold.deadline(), later + LEASE_TTL - LEASE_MARGIN);
        hold.end();
        assert!(!hold.holds(), "ended");
        // Asked for long ago (the holder was paused since): no longer counted on.
        let old = LeaseHold::new(start - LEASE_TTL);
        assert!(!old.holds());
    }

    #[test]
    fn servers_from_2_10_5_on_count_message_sizes_exactly() {
        for v in ["2.10.5", "2.10.22", "2.11.0", "v2.12.1", "3.0.0-beta.1"] {
            assert!(counts_bytes_exactly(v), "{v}");
        }
        for v in ["2.9.10", "2.9.25", "2.10.4", "2.10.0-RC.1", "", "unknown"] {
            assert!(!counts_bytes_exactly(v), "{v}");
        }
    }
}
