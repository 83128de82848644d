//! Sources as the controller runs them: a PingSource or ApiServerSource started with its sink
//! (over NATS only on the replica that holds its lease), stopped when it changes or goes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use wasmesh_broker::Sink;
use wasmesh_core::resources::Resource;
use wasmesh_sources::Emit;
use wasmesh_sources::apiserver::{ApiServerSource, MemorySeen, SeenStore};
use wasmesh_sources::ping::PingSource;

use crate::shared::Shared;
use crate::{LogSeen, SinkEmit};

use super::{Controller, Problem, SourceRun};

impl Controller {
    /// Stops every source: each finishes the event it is handling, up to `grace`.
    pub async fn stop_sources(&self, grace: Duration) {
        let sources = std::mem::take(&mut self.state.lock().await.sources);
        for s in sources.values() {
            let _ = s.stop.send(true);
        }
        let all = async {
            for (_, s) in sources {
                let _ = s.handle.await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                "sources still busy after {} ms; stopping anyway",
                grace.as_millis()
            );
        }
    }

    pub(super) async fn start_source(
        &self,
        resource: &Resource,
        sink: Sink,
    ) -> Result<(watch::Sender<bool>, tokio::task::JoinHandle<()>), Problem> {
        let (stop, stop_rx) = watch::channel(false);
        let id = resource.id();
        let run: StartSource = match resource {
            Resource::PingSource(p) => {
                let source =
                    PingSource::new(&p.metadata, &p.spec).map_err(|e| ("InvalidSpec", e))?;
                let emit: Arc<dyn Emit> = Arc::new(SinkEmit {
                    mesh: Arc::clone(&self.mesh),
                    sink,
                    namespace: p.metadata.namespace().to_string(),
                });
                let shared = self.config.shared.clone();
                let id = id.clone();
                Arc::new(move |stop| {
                    let (source, emit, shared, id) = (
                        source.clone(),
                        Arc::clone(&emit),
                        shared.clone(),
                        id.clone(),
                    );
                    Box::pin(async move {
                        let Some(shared) = shared else {
                            return source.run(emit, stop).await;
                        };
                        // Over NATS: go on from the last tick any replica emitted, so that a
                        // failover neither skips nor repeats one.
                        let now = chrono::Utc::now();
                        let from = shared
                            .source_state(&id, "tick")
                            .await
                            .and_then(|b| {
                                chrono::DateTime::parse_from_rfc3339(&String::from_utf8_lossy(&b))
                                    .ok()
                            })
                            .map(|t| t.with_timezone(&chrono::Utc))
                            .filter(|t| now - *t < chrono::Duration::hours(1))
                            .unwrap_or(now);
                        let emit: Arc<dyn Emit> = Arc::new(TickRecorder {
                            inner: emit,
                            shared,
                            id,
                        });
                        source.run_from(emit, stop, from).await
                    })
                })
            }
            Resource::ApiServerSource(a) => {
                let (client, api_server) = self.kube_client().await?;
                let seen: Arc<dyn SeenStore> = match (&self.config.shared, self.mesh.log()) {
                    (Some(shared), _) => Arc::new(crate::SharedSeen(Arc::clone(shared))),
                    (None, Some(log)) => Arc::new(LogSeen(log)),
                    (None, None) => Arc::new(MemorySeen::default()),
                };
                let emit: Arc<dyn Emit> = Arc::new(SinkEmit {
                    mesh: Arc::clone(&self.mesh),
                    sink,
                    namespace: a.metadata.namespace().to_string(),
                });
                let source = ApiServerSource::new(&a.metadata, &a.spec);
                Arc::new(move |stop| {
                    let (source, client, api_server, emit, seen) = (
                        source.clone(),
                        client.clone(),
                        api_server.clone(),
                        Arc::clone(&emit),
                        Arc::clone(&seen),
                    );
                    Box::pin(source.run(client, api_server, emit, seen, stop))
                })
            }
            _ => return Err(("InvalidSpec", "not a source".into())),
        };
        let handle = match &self.config.shared {
            None => tokio::spawn(run(stop_rx)),
            Some(shared) => tokio::spawn(leased(Arc::clone(shared), id, run, stop_rx)),
        };
        Ok((stop, handle))
    }

    async fn kube_client(&self) -> Result<(kube::Client, String), Problem> {
        let config = match &self.config.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| ("NoCluster", format!("--kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| ("NoCluster", format!("--kubeconfig {}: {e}", path.display())))?
            }
            None => kube::Config::infer().await.map_err(|e| {
                (
                    "NoCluster",
                    format!(
                        "no Kubernetes API server to watch (set KUBECONFIG or --kubeconfig, or run \
                         in a cluster): {e}"
                    ),
                )
            })?,
        };
        let api_server = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_string();
        let client = kube::Client::try_from(config).map_err(|e| {
            (
                "NoCluster",
                format!("cannot build a Kubernetes client: {e}"),
            )
        })?;
        Ok((client, api_server))
    }
}

/// Starts a source's work, given what stops it.
type StartSource = Arc<
    dyn Fn(watch::Receiver<bool>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Over NATS: runs a source only while this replica holds its lease, renewing it; another
/// replica takes over when this one stops renewing (crash) or gives the lease up (shutdown).
async fn leased(
    shared: Arc<Shared>,
    id: String,
    run: StartSource,
    mut stop: watch::Receiver<bool>,
) {
    let period = crate::shared::LEASE_TTL / 3;
    loop {
        if *stop.borrow() {
            return;
        }
        let Some(mut revision) = shared.acquire(&id).await else {
            tokio::select! {
                _ = tokio::time::sleep(period) => continue,
                _ = stop.changed() => return,
            }
        };
        tracing::info!(source = %id, replica = %shared.replica, "holds the lease: the source runs here");
        let (inner_stop, inner_rx) = watch::channel(false);
        // In a set, so that the source is cancelled with this task (a stop that timed out).
        let mut task = JoinSet::new();
        task.spawn(run(inner_rx));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => match shared.renew(&id, revision).await {
                    Some(r) => revision = r,
                    None => {
                        tracing::warn!(source = %id, "lost the lease: the source stops here");
                        let _ = inner_stop.send(true);
                        let _ = task.join_next().await;
                        break;
                    }
                },
                _ = stop.changed() => {
                    let _ = inner_stop.send(true);
                    let _ = task.join_next().await;
                    shared.release(&id, revision).await;
                    return;
                }
                _ = task.join_next() => {
                    shared.release(&id, revision).await;
                    return;
                }
            }
        }
    }
}

/// Records each emitted ping's tick in the shared state once it was accepted.
struct TickRecorder {
    inner: Arc<dyn Emit>,
    shared: Arc<Shared>,
    id: String,
}

#[async_trait::async_trait]
impl Emit for TickRecorder {
    async fn emit(&self, ev: wasmesh_core::Event) -> Result<(), wasmesh_sources::EmitError> {
        let tick = wasmesh_core::AttributesReader::time(&ev).copied();
        self.inner.emit(ev).await?;
        if let Some(t) = tick {
            self.shared
                .set_source_state(
                    &self.id,
                    "tick",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into(),
                )
                .await;
        }
        Ok(())
    }
}

/// Stops a source that is replaced or removed. One that does not stop within 5 s (an
/// ApiServerSource takes a stop between batches, and a sink that keeps refusing a batch holds
/// it) is cancelled, so that it does not run on beside its successor; the successor sends again
/// what it had not recorded as sent.
pub(super) async fn stop_source(run: SourceRun) {
    let _ = run.stop.send(true);
    let mut handle = run.handle;
    if tokio::time::timeout(Duration::from_secs(5), &mut handle)
        .await
        .is_err()
    {
        handle.abort();
        tracing::warn!("a replaced source did not stop within 5 s: cancelled");
    }
}
