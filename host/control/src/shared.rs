//! Control state shared by the replicas over NATS JetStream (`--store nats://`): the admin
//! API's changes in a key/value bucket (every replica watches it and reconciles), module bytes
//! in an object store by digest, source leases (a source runs on one replica at a time), and
//! what sources last did (a PingSource's last tick), so that a failover neither loses nor
//! repeats events.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{kv, object_store};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::io::AsyncReadExt as _;
use wasmesh_broker::nats::NatsStore;

use crate::store::Overlay;

const OVERLAY_KEY: &str = "overlay";

pub use wasmesh_broker::nats::LEASE_TTL;
use wasmesh_broker::nats::{key_value_bucket as bucket, lease};

/// How long ago a shared object was last written, in whole seconds (`None`: not recorded).
fn age_secs(info: &object_store::ObjectInfo) -> Option<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let written = info.modified?.unix_timestamp();
    Some(now.saturating_sub(u64::try_from(written).unwrap_or(0)))
}

/// The replicas' shared buckets.
pub struct Shared {
    control: kv::Store,
    leases: kv::Store,
    state: kv::Store,
    modules: object_store::ObjectStore,
    /// This replica, as leases name their holder.
    pub replica: String,
}

/// Another replica changed the state first.
#[derive(Debug)]
pub struct Conflict;

impl Shared {
    /// Opens (creating when missing) the buckets.
    pub async fn open(nats: &NatsStore, replicas: usize) -> Result<Arc<Self>, String> {
        let js = nats.jetstream();
        let control = bucket(js, "wasmesh-control", Duration::ZERO, replicas).await?;
        let leases = bucket(js, "wasmesh-leases", LEASE_TTL, replicas).await?;
        let state = bucket(js, "wasmesh-sources", Duration::ZERO, replicas).await?;
        let modules = match js.get_object_store("wasmesh-modules").await {
            Ok(m) => m,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: "wasmesh-modules".into(),
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("object store wasmesh-modules: {e}"))?,
        };
        let mut raw = [0u8; 6];
        getrandom::fill(&mut raw).map_err(|e| e.to_string())?;
        let replica = raw.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Arc::new(Self {
            control,
            leases,
            state,
            modules,
            replica,
        }))
    }

    /// The admin API's changes and their revision (0: none yet).
    pub async fn load_overlay(&self) -> Result<(Overlay, u64), String> {
        match self.control.entry(OVERLAY_KEY).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Ok((
                serde_json::from_slice(&e.value).map_err(|e| format!("shared overlay: {e}"))?,
                e.revision,
            )),
            Ok(_) => Ok((Overlay::default(), 0)),
            Err(e) => Err(format!("cannot read the shared control state: {e}")),
        }
    }

    /// Saves the changes if nobody else saved since `revision`.
    pub async fn save_overlay(
        &self,
        overlay: &Overlay,
        revision: u64,
    ) -> Result<Result<u64, Conflict>, String> {
        let bytes = Bytes::from(serde_json::to_vec(overlay).map_err(|e| e.to_string())?);
        let result = if revision == 0 {
            self.control
                .create(OVERLAY_KEY, bytes)
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => None,
                    _ => Some(e.to_string()),
                })
        } else {
            self.control
                .update(OVERLAY_KEY, bytes, revision)
                .await
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => None,
                    _ => Some(e.to_string()),
                })
        };
        match result {
            Ok(rev) => Ok(Ok(rev)),
            Err(None) => Ok(Err(Conflict)),
            Err(Some(e)) => Err(format!("cannot save the shared control state: {e}")),
        }
    }

    /// Every new revision of the changes, as it is written.
    pub async fn watch_overlay(&self) -> Result<kv::Watch, String> {
        self.control
            .watch(OVERLAY_KEY)
            .await
            .map_err(|e| e.to_string())
    }

    /// Keeps a module's bytes under its hex digest. A build puts only what is missing; an
    /// upload through the admin API (`refresh_after`: half the grace before pruning) also puts
    /// the bytes again when they were written longer ago than that, so that the grace starts
    /// again (`prune_modules` counts from the last write), as it does for the local copy.
    pub async fn put_module(
        &self,
        hex: &str,
        bytes: &[u8],
        refresh_after: Option<Duration>,
    ) -> Result<(), String> {
        // A removed object keeps its name with `deleted` set: that one is put again.
        if let Ok(info) = self.modules.info(hex).await
            && !info.deleted
            && refresh_after.is_none_or(|r| age_secs(&info).is_some_and(|a| a < r.as_secs()))
        {
            return Ok(());
        }
        let mut reader = bytes;
        self.modules
            .put(hex, &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| format!("cannot share module {hex}: {e}"))
    }

    /// A module's bytes by hex digest, if any replica uploaded it.
    pub async fn get_module(&self, hex: &str) -> Option<Vec<u8>> {
        let mut object = self.modules.get(hex).await.ok()?;
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await.ok()?;
        (wasmesh_runtime::digest(&bytes) == hex).then_some(bytes)
    }

    /// Removes the shared modules that nothing names: neither `keep` (what this replica runs
    /// and its files name) nor the latest shared changes (every kept revision, every applied
    /// Function), and stored more than `grace` ago. Returns the digests removed. Replicas are
    /// expected to run the same files: a digest named only by another replica's files goes
    /// from here, though that replica keeps its own copy.
    pub async fn prune_modules(
        &self,
        keep: &HashSet<String>,
        grace: Duration,
    ) -> Result<Vec<String>, String> {
        // The latest changes, not those this replica last applied: a revision another replica
        // just made may name a module that is old in the store.
        let (overlay, _) = self.load_overlay().await?;
        let named = overlay.module_digests();
        let mut list = self.modules.list().await.map_err(|e| e.to_string())?;
        let mut unnamed = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| e.to_string())?;
            let age = age_secs(&info);
            if !info.deleted
                && age.is_some_and(|a| a >= grace.as_secs())
                && !keep.contains(&info.name)
                && !named.contains(&info.name)
            {
                unnamed.push(info.name);
            }
        }
        let mut removed = Vec::new();
        for name in unnamed {
            match self.modules.delete(&name).await {
                Ok(()) => removed.push(name),
                Err(e) => tracing::warn!(module = %name, "cannot remove a shared module: {e}"),
            }
        }
        Ok(removed)
    }

    fn key(id: &str) -> String {
        lease::key(id)
    }

    /// Tries to take the lease of `id`; the revision to renew it with.
    pub async fn acquire(&self, id: &str) -> Option<u64> {
        lease::acquire(&self.leases, id, &self.replica).await
    }

    /// Renews a lease this replica holds; `None` when it lost it.
    pub async fn renew(&self, id: &str, revision: u64) -> Option<u64> {
        lease::renew(&self.leases, id, &self.replica, revision).await
    }

    /// Gives a lease up (on shutdown), so that another replica takes over at once.
    pub async fn release(&self, id: &str, revision: u64) {
        lease::release(&self.leases, id, revision).await;
    }

    /// What a source last recorded under `what`.
    pub async fn source_state(&self, id: &str, what: &str) -> Option<Bytes> {
        self.state
            .get(format!("{}.{what}", Self::key(id)))
            .await
            .ok()
            .flatten()
    }

    /// Records what a source did.
    pub async fn set_source_state(&self, id: &str, what: &str, value: Bytes) {
        if let Err(e) = self
            .state
            .put(format!("{}.{what}", Self::key(id)), value)
            .await
        {
            tracing::warn!(source = id, error = %e, "cannot record the source's state");
        }
    }
}

/// An object as a source saw it: its resourceVersion and its JSON.
pub type SeenObject = (String, Vec<u8>);

impl Shared {
    fn seen_prefix(source: &str) -> String {
        format!("{}.seen.", Self::key(source))
    }

    /// What an ApiServerSource saw, by object uid (`None`: it never finished a listing).
    pub async fn seen_load(
        &self,
        source: &str,
    ) -> Result<Option<std::collections::HashMap<String, SeenObject>>, String> {
        let listed = format!("{}.listed", Self::key(source));
        if self
            .state
            .get(&listed)
            .await
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Ok(None);
        }
        let prefix = Self::seen_prefix(source);
        let mut keys = self.state.keys().await.map_err(|e| e.to_string())?;
        let mut wanted = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| e.to_string())?;
            if let Some(uid) = k.strip_prefix(&prefix) {
                wanted.push((uid.to_string(), k.clone()));
            }
        }
        let mut out = std::collections::HashMap::new();
        for (uid, key) in wanted {
            if let Some(v) = self.state.get(&key).await.map_err(|e| e.to_string())? {
                out.insert(uid, split_seen(&v));
            }
        }
        Ok(Some(out))
    }

    /// One object an ApiServerSource saw.
    pub async fn seen_object(&self, source: &str, uid: &str) -> Result<Option<Vec<u8>>, String> {
        let key = format!("{}{uid}", Self::seen_prefix(source));
        Ok(self
            .state
            .get(&key)
            .await
            .map_err(|e| e.to_string())?
            .map(|v| split_seen(&v).1))
    }

    /// Records what an ApiServerSource saw (`None` forgets an object), and that it listed.
    pub async fn seen_update(
        &self,
        source: &str,
        changes: Vec<(String, Option<SeenObject>)>,
    ) -> Result<(), String> {
        let prefix = Self::seen_prefix(source);
        for (uid, seen) in changes {
            let key = format!("{prefix}{uid}");
            match seen {
                Some((rv, object)) => {
                    let mut v = rv.into_bytes();
                    v.push(b'\n');
                    v.extend(object);
                    self.state
                        .put(&key, v.into())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                None => {
                    self.state.purge(&key).await.map_err(|e| e.to_string())?;
                }
            }
        }
        self.state
            .put(
                format!("{}.listed", Self::key(source)),
                Bytes::from_static(b"1"),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// `resourceVersion\nobject`.
fn split_seen(v: &[u8]) -> SeenObject {
    match v.iter().position(|b| *b == b'\n') {
        Some(at) => (
            String::from_utf8_lossy(&v[..at]).into_owned(),
            v[at + 1..].to_vec(),
        ),
        None => (String::from_utf8_lossy(v).into_owned(), Vec::new()),
    }
}

/// Drains a watch into the revisions it reports (for the controller's loop).
pub async fn next_revision(watch: &mut kv::Watch) -> Option<u64> {
    loop {
        match watch.next().await? {
            Ok(e) if e.operation == kv::Operation::Put => return Some(e.revision),
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "watching the shared control state");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
