//! A trigger's workers: each takes an event from the trigger's queue, runs the Wasm filter and
//! the subscriber (on OS threads for a Wasm subscriber, on tasks for HTTP) with retries, and
//! acknowledges it in the store when the delivery is finished.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use wasmesh_core::Event;

use crate::delivery::DeliveryPolicy;
use crate::log::LogError;
use crate::metrics;
use crate::passthrough::Passthrough;
use crate::sink::{self, Failure, Outcome, Reply, Sink};

use super::reply::AfterReply;
use super::{Envelope, Mesh, PublishError, TriggerSpecRuntime, Worker, wait_for_gate};

/// Attempts a delivery until it succeeds, fails for good, or the policy's retries are spent;
/// between attempts it waits the subscriber's `retry-after` or the policy's backoff.
/// `already` counts retries made before (a restart); `record` is told each new count.
pub(crate) async fn retry_loop<F, Fut, R, RecFut>(
    policy: &DeliveryPolicy,
    trigger: &str,
    already: u32,
    record: R,
    mut attempt: F,
) -> Result<Option<Reply>, Failure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Outcome>,
    R: Fn(u32) -> RecFut,
    RecFut: std::future::Future<Output = ()>,
{
    let mut retries = already;
    loop {
        let failure = match attempt().await {
            Outcome::Delivered(reply) => return Ok(reply),
            Outcome::Fail(f) => return Err(f),
            Outcome::Retry(f) => f,
        };
        if retries >= policy.retry {
            return Err(failure);
        }
        retries += 1;
        // The count is on disk before the wait: a restart resumes the budget, not a fresh one.
        record(retries).await;
        let wait = policy.wait(failure.retry_after, retries);
        tracing::info!(
            trigger,
            retry = retries,
            wait_ms = wait.as_millis() as u64,
            code = ?failure.code,
            "retrying"
        );
        tokio::time::sleep(wait).await;
    }
}

/// How long a Wasm worker thread beyond the first may wait for its turn at the queue before it
/// ends. Threads wait in line for the queue's lock (the one holding it waits for an event), so
/// a thread that waited this long was not needed; the pool grows again under load.
const IDLE_THREAD_ENDS_AFTER: Duration = Duration::from_secs(10);

/// The threads serving one queue of a trigger whose subscriber is a Wasm Function.
struct WasmPool {
    mesh: Arc<Mesh>,
    worker: Worker,
    /// A `parking_lot` mutex for its timed lock: waiting on it is how a thread knows it idles,
    /// with no Tokio timer (which panics in a thread that outlives the runtime).
    rx: parking_lot::Mutex<mpsc::Receiver<Envelope>>,
    retrying: Arc<Semaphore>,
    runtime: tokio::runtime::Handle,
    /// The most threads at once.
    most: usize,
    /// Threads running (or being started).
    running: std::sync::atomic::AtomicUsize,
    /// Threads added so far (for their names).
    added: std::sync::atomic::AtomicUsize,
    trigger: String,
    /// Dropped with the pool, when its last thread ends: what the queue's handle waits for.
    _done: mpsc::Sender<()>,
}

impl WasmPool {
    /// Starts a thread, which serves until the queue closes or it idles (and is not the last).
    fn spawn(pool: &Arc<Self>) {
        let n = pool.added.fetch_add(1, Ordering::Relaxed);
        let name = format!("wasm-{}-{n}", pool.trigger);
        let p = Arc::clone(pool);
        if let Err(e) = std::thread::Builder::new()
            .name(name)
            .spawn(move || p.serve())
        {
            pool.running.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(trigger = %pool.trigger, error = %e, "cannot start a Wasm worker thread");
        }
    }

    fn serve(self: Arc<Self>) {
        let runtime = &self.runtime;
        runtime.block_on(wait_for_gate(self.worker.gate.clone()));
        let _enter = runtime.enter();
        loop {
            let (next, more) = {
                let Some(mut rx) = self.rx.try_lock_for(IDLE_THREAD_ENDS_AFTER) else {
                    if self.shrink() {
                        return;
                    }
                    continue;
                };
                let next = rx.blocking_recv();
                (next, !rx.is_empty())
            };
            // None: the queue closed (the trigger is gone or rebuilt).
            let Some(env) = next else { break };
            if more {
                self.grow();
            }
            self.mesh.deliver_on_thread(
                &self.worker.cell.load_full(),
                env,
                runtime,
                &self.retrying,
            );
            self.worker.finished.fetch_add(1, Ordering::Release);
        }
        self.running.fetch_sub(1, Ordering::AcqRel);
    }

    /// Counts this thread out unless it is the last one running: true when it may end.
    fn shrink(&self) -> bool {
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 1).then(|| n - 1)
            })
            .is_ok()
    }

    /// Another thread, if fewer than the most are running.
    fn grow(self: &Arc<Self>) {
        let most = self.most;
        if self
            .running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < most).then_some(n + 1)
            })
            .is_ok()
        {
            Self::spawn(self);
        }
    }
}

impl Mesh {
    /// A trigger whose subscriber is a Wasm Function is served by OS threads (as many as the
    /// machine has cores, at most its concurrency): each takes the next event and runs the Wasm
    /// filter and the subscriber on the spot, publishing a reply from there. Only a failed
    /// attempt goes to an async task for its backoff, retries and dead letter. Under load a
    /// thread finds the next event waiting, so the hot path has no task spawn and no hand-off.
    ///
    /// One thread starts with the queue; another is added whenever a thread takes an event and
    /// finds more waiting (up to that most). So a trigger whose events never queue up holds one
    /// thread, not one per core: a thousand such triggers on a 64-core machine are a thousand
    /// threads, not 64,000. An added thread ends when it has waited `IDLE_THREAD_ENDS_AFTER`
    /// for its turn at the queue, so a burst leaves no lasting threads behind.
    pub(super) fn start_wasm_workers(
        self: &Arc<Self>,
        worker: Worker,
        rx: mpsc::Receiver<Envelope>,
        concurrency: usize,
    ) -> Vec<JoinHandle<()>> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (done, mut all_done) = mpsc::channel::<()>(1);
        let trigger = worker.cell.load().name.clone();
        let pool = Arc::new(WasmPool {
            mesh: Arc::clone(self),
            worker,
            rx: parking_lot::Mutex::new(rx),
            // Events whose first attempt failed wait for their retries on tasks; at most
            // `concurrency` at once, as an HTTP subscriber's do (beyond that the threads wait,
            // the queue fills and producers get 429: memory stays bounded).
            retrying: Arc::new(Semaphore::new(concurrency.max(1))),
            runtime: tokio::runtime::Handle::current(),
            most: concurrency.clamp(1, cores),
            running: std::sync::atomic::AtomicUsize::new(1),
            added: std::sync::atomic::AtomicUsize::new(0),
            trigger,
            _done: done,
        });
        WasmPool::spawn(&pool);
        // Ends when the last thread has ended (the pool, holding `done`, goes with it).
        vec![tokio::spawn(async move {
            while all_done.recv().await.is_some() {}
        })]
    }

    /// The first attempt of a Wasm delivery, synchronously on a worker thread.
    fn deliver_on_thread(
        self: &Arc<Self>,
        t: &Arc<TriggerSpecRuntime>,
        env: Envelope,
        runtime: &tokio::runtime::Handle,
        retrying: &Arc<Semaphore>,
    ) {
        // The rest of a delivery, on a task once this thread has a slot for it.
        let later = |work: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            let slot = runtime.block_on(Arc::clone(retrying).acquire_owned()).ok();
            runtime.spawn(async move {
                work.await;
                drop(slot);
            });
        };
        if env.abandoned() {
            return;
        }
        if let Some(wf) = &t.wasm_filter {
            match wf.matches(&env.event).1 {
                Ok(called) => {
                    self.config.output.write(wf.name(), &called.output);
                    if !called.value {
                        metrics::add(&t.stats.filtered, 1);
                        self.done(&env);
                        return;
                    }
                }
                Err(e) => {
                    self.config.output.write(wf.name(), &e.output);
                    tracing::warn!(trigger = %t.name, error = %e, "wasm filter failed");
                    let failure = Failure::message(Some(500), e.to_string());
                    let (mesh, t, wf) = (Arc::clone(self), Arc::clone(t), Arc::clone(wf));
                    later(Box::pin(async move {
                        if mesh
                            .dead_letter(&t, &env, &Sink::Function(wf), failure)
                            .await
                        {
                            mesh.done(&env);
                        }
                    }));
                    return;
                }
            }
        }
        let first = match &t.subscriber {
            Sink::Function(f) => {
                sink::call_function(f, &env.event, &self.config.output, t.policy.timeout)
            }
            // The trigger changed to another kind of subscriber while this event was queued.
            _ => {
                let (mesh, t) = (Arc::clone(self), Arc::clone(t));
                later(Box::pin(async move {
                    mesh.finish_delivery(&t, env, None).await
                }));
                return;
            }
        };
        match first {
            Outcome::Delivered(Some(reply)) => {
                metrics::add(&t.stats.delivered, 1);
                let (reply, headers) = Self::reply_of(reply, &env);
                let result = self.publish_blocking(&t.broker, vec![reply.clone()], headers.clone());
                match self.after_reply(t, &reply, result, 0) {
                    AfterReply::Settled => {
                        self.done(&env);
                        return;
                    }
                    AfterReply::Unsettled => return,
                    AfterReply::Again => {}
                }
                // The broker is full: the reply is published again after a backoff, off this
                // thread (for an ordered trigger, its lane waits), and the event acknowledged then.
                let ordered = t.policy.ordered_by.is_some();
                let (mesh, t) = (Arc::clone(self), Arc::clone(t));
                let retry = async move {
                    if mesh
                        .publish_reply(&t, reply, headers, 1, env.acker.as_deref())
                        .await
                    {
                        mesh.done(&env);
                    }
                };
                if ordered {
                    runtime.block_on(retry);
                } else {
                    later(Box::pin(retry));
                }
            }
            Outcome::Delivered(None) => {
                metrics::add(&t.stats.delivered, 1);
                self.done(&env);
            }
            failed if t.policy.ordered_by.is_some() => {
                // Ordered: the lane waits for this event's retries before the next event.
                runtime.block_on(self.finish_delivery(t, env, Some(failed)));
            }
            failed => {
                let (mesh, t) = (Arc::clone(self), Arc::clone(t));
                later(Box::pin(async move {
                    mesh.finish_delivery(&t, env, Some(failed)).await
                }));
            }
        }
    }

    pub(super) async fn run_trigger(
        self: Arc<Self>,
        worker: Worker,
        mut rx: mpsc::Receiver<Envelope>,
        concurrency: usize,
    ) {
        let Worker {
            cell,
            gate,
            alive: _alive,
            finished,
        } = worker;
        wait_for_gate(gate).await;
        let limit = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut inflight = tokio::task::JoinSet::new();
        while let Some(env) = rx.recv().await {
            let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                break;
            };
            let mesh = Arc::clone(&self);
            let trigger = cell.load_full();
            let finished = Arc::clone(&finished);
            inflight.spawn(async move {
                mesh.deliver(&trigger, env).await;
                finished.fetch_add(1, Ordering::Release);
                drop(permit);
            });
            while inflight.try_join_next().is_some() {}
        }
        while inflight.join_next().await.is_some() {}
    }

    /// One event to one trigger: the Wasm filter, then the subscriber with retries, then the
    /// reply or the dead letter.
    pub(super) async fn deliver(&self, t: &TriggerSpecRuntime, env: Envelope) {
        if env.abandoned() {
            return;
        }
        if let Some(wf) = &t.wasm_filter {
            let f = Arc::clone(wf);
            let ev = Arc::clone(&env.event);
            match tokio::task::spawn_blocking(move || f.matches(&ev).1).await {
                Ok(Ok(called)) => {
                    self.config.output.write(wf.name(), &called.output);
                    if !called.value {
                        metrics::add(&t.stats.filtered, 1);
                        self.done(&env);
                        return;
                    }
                }
                Ok(Err(e)) => {
                    self.config.output.write(wf.name(), &e.output);
                    tracing::warn!(trigger = %t.name, error = %e, "wasm filter failed");
                    let failure = Failure::message(Some(500), e.to_string());
                    if self
                        .dead_letter(t, &env, &Sink::Function(Arc::clone(wf)), failure)
                        .await
                    {
                        self.done(&env);
                    }
                    return;
                }
                // Shutting down: the event stays owed (durable mode) for the next start.
                Err(e) if e.is_cancelled() => return,
                // A panic in the host while filtering: a failure like any other, not an event
                // left neither acknowledged nor dead-lettered.
                Err(e) => {
                    tracing::error!(trigger = %t.name, error = %e, "wasm filter aborted");
                    let failure = Failure::message(Some(500), format!("wasm filter aborted: {e}"));
                    if self
                        .dead_letter(t, &env, &Sink::Function(Arc::clone(wf)), failure)
                        .await
                    {
                        self.done(&env);
                    }
                    return;
                }
            }
        }
        self.finish_delivery(t, env, None).await;
    }

    /// The subscriber with retries (continuing after `first` when the first attempt was made
    /// elsewhere), then the reply or the dead letter.
    async fn finish_delivery(&self, t: &TriggerSpecRuntime, env: Envelope, first: Option<Outcome>) {
        if let Some(acker) = env.acker.clone()
            && t.policy.ordered_by.is_none()
        {
            return self.finish_jetstream(t, env, first, acker).await;
        }
        let mut first = first;
        let event = &env.event;
        let log = self.config.log.clone().zip(env.seq);
        let acker = env.acker.clone();
        let record = |attempts: u32| {
            let log = log.clone();
            let acker = acker.clone();
            metrics::add(&t.stats.retried, 1);
            async move {
                if let Some((log, (id, seq))) = log {
                    log.attempted(id, seq, attempts).await;
                }
                // JetStream, ordered: the message stays in flight while its retries run here
                // (as long as this replica holds the trigger's lease).
                if let Some(a) = acker.filter(|a| a.lease_held()) {
                    let _ = a.ack_with(async_nats::jetstream::AckKind::Progress).await;
                }
            }
        };
        let env_ref = &env;
        let result = retry_loop(&t.policy, &t.name, env.attempts, record, || {
            let ready = first.take();
            async move {
                match ready {
                    Some(outcome) => outcome,
                    // JetStream, ordered: the lease went to another replica, which delivers
                    // this event again in its turn; no more attempts here.
                    None if env_ref.abandoned() => {
                        Outcome::Fail(Failure::message(None, "the trigger's lease was lost"))
                    }
                    None => {
                        self.send_once(t, &t.subscriber, event, &env_ref.headers, true)
                            .await
                    }
                }
            }
        })
        .await;
        if result.is_ok() {
            metrics::add(&t.stats.delivered, 1);
        }
        let settled = match result {
            Ok(Some(reply)) => self.reply(t, reply, &env).await,
            Ok(None) => true,
            // Neither dead-lettered nor acknowledged: the next holder has it.
            Err(_) if env.abandoned() => return,
            Err(failure) => self.dead_letter(t, &env, &t.subscriber, failure).await,
        };
        if settled {
            self.done(&env);
        }
    }

    /// JetStream, unordered: one attempt here; a retryable failure is NAKed with the trigger's
    /// backoff, and JetStream delivers the event again later, to this replica or another. Past
    /// the retry limit, or for a failure that is not retried, the dead-letter sink.
    async fn finish_jetstream(
        &self,
        t: &TriggerSpecRuntime,
        env: Envelope,
        first: Option<Outcome>,
        acker: Arc<crate::nats::AckHandle>,
    ) {
        let outcome = match first {
            Some(o) => o,
            None => {
                self.send_once(t, &t.subscriber, &env.event, &env.headers, true)
                    .await
            }
        };
        let settled = match outcome {
            Outcome::Delivered(reply) => {
                metrics::add(&t.stats.delivered, 1);
                match reply {
                    Some(reply) => self.reply(t, reply, &env).await,
                    None => true,
                }
            }
            Outcome::Retry(f) if env.attempts < t.policy.retry => {
                metrics::add(&t.stats.retried, 1);
                let wait = t.policy.wait(f.retry_after, env.attempts + 1);
                tracing::info!(
                    trigger = %t.name, retry = env.attempts + 1, wait_ms = wait.as_millis() as u64,
                    code = ?f.code, "retrying (JetStream NAK)"
                );
                acker.settle();
                if let Err(e) = acker
                    .ack_with(async_nats::jetstream::AckKind::Nak(Some(wait)))
                    .await
                {
                    tracing::warn!(error = %e, "JetStream NAK failed; the event comes again after the ack wait");
                }
                return;
            }
            Outcome::Retry(f) | Outcome::Fail(f) => {
                self.dead_letter(t, &env, &t.subscriber, f).await
            }
        };
        if settled {
            self.done(&env);
        }
    }

    /// The delivery is finished (delivered, filtered out, or dead-lettered): the log no longer
    /// owes it.
    pub(super) fn done(&self, env: &Envelope) {
        if let (Some((id, seq)), Some(log)) = (env.seq, &self.config.log) {
            log.ack(id, seq);
        }
        if let Some(acker) = &env.acker {
            acker.settle();
            let acker = Arc::clone(acker);
            tokio::spawn(async move {
                if let Err(e) = acker.ack().await {
                    tracing::warn!(error = %e, "JetStream ack failed; the event will come again");
                }
            });
        }
    }

    /// One attempt; `replies` for the trigger's subscriber (see [`sink::SendOptions`]).
    pub(super) async fn send_once(
        &self,
        t: &TriggerSpecRuntime,
        sink: &Sink,
        event: &Arc<Event>,
        headers: &Passthrough,
        replies: bool,
    ) -> Outcome {
        match sink {
            Sink::Function(f) => {
                sink::send_function(f, Arc::clone(event), &self.config.output, t.policy.timeout)
                    .await
            }
            Sink::Http(uri, own) => {
                let client = own.as_deref().unwrap_or(&self.client);
                let options = sink::SendOptions {
                    namespace: &t.namespace,
                    timeout: Some(t.policy.timeout.unwrap_or(self.config.http_timeout)),
                    structured: t.policy.structured,
                    replies,
                };
                sink::send_http(client, uri, event, headers, options).await
            }
            Sink::Broker(key) => match self
                .publish_with(key, vec![(**event).clone()], headers.clone())
                .await
            {
                Ok(()) => Outcome::Delivered(None),
                Err(PublishError::Full(why)) => Outcome::Retry(Failure::message(Some(429), why)),
                Err(PublishError::Log(e @ LogError::Full(_))) => {
                    Outcome::Retry(Failure::message(Some(429), e.to_string()))
                }
                Err(e @ (PublishError::Log(LogError::TooLarge(_)) | PublishError::TooLarge(_))) => {
                    Outcome::Fail(Failure::message(Some(413), e.to_string()))
                }
                Err(PublishError::Log(e)) => {
                    Outcome::Retry(Failure::message(Some(503), e.to_string()))
                }
                // Gone because wasmesh is stopping, not removed: worth another try later.
                Err(e @ PublishError::UnknownBroker(_)) if self.is_stopping() => {
                    Outcome::Retry(Failure::message(Some(503), format!("stopping: {e}")))
                }
                Err(e) => Outcome::Fail(Failure::message(Some(400), e.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;
    use wasmesh_core::resources::BackoffPolicy;

    use super::*;

    /// Retries with paused time: the waits between attempts are exactly the policy's backoff.
    async fn gaps(backoff: BackoffPolicy, retry: u32, succeed_on: usize) -> (Vec<Duration>, bool) {
        let policy = DeliveryPolicy {
            retry,
            backoff,
            delay: Duration::from_millis(100),
            ..Default::default()
        };
        let times = std::sync::Mutex::new(Vec::new());
        let result = retry_loop(
            &policy,
            "t",
            0,
            |_| async {},
            || {
                let n = {
                    let mut t = times.lock().expect("lock");
                    t.push(Instant::now());
                    t.len()
                };
                async move {
                    if n == succeed_on {
                        Outcome::Delivered(None)
                    } else {
                        Outcome::Retry(Failure::message(Some(503), "busy"))
                    }
                }
            },
        )
        .await;
        let t = times.into_inner().expect("lock");
        (t.windows(2).map(|w| w[1] - w[0]).collect(), result.is_ok())
    }

    #[tokio::test(start_paused = true)]
    async fn linear_backoff_between_retries() {
        let (g, ok) = gaps(BackoffPolicy::Linear, 3, 0).await;
        assert!(
            !ok,
            "every attempt failed: the error goes to the dead-letter sink"
        );
        let ms: Vec<u128> = g.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn exponential_backoff_between_retries() {
        let (g, ok) = gaps(BackoffPolicy::Exponential, 3, 3).await;
        assert!(ok, "the third attempt succeeded");
        let ms: Vec<u128> = g.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [200, 400]);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_wins_and_fail_stops_at_once() {
        let policy = DeliveryPolicy::default();
        let mut n = 0;
        let start = Instant::now();
        let r = retry_loop(
            &policy,
            "t",
            0,
            |_| async {},
            || {
                n += 1;
                let first = n == 1;
                async move {
                    if first {
                        Outcome::Retry(Failure {
                            retry_after: Some(crate::delivery::AskedDelay::RetryAfter(
                                Duration::from_secs(7),
                            )),
                            ..Default::default()
                        })
                    } else {
                        Outcome::Fail(Failure::message(Some(400), "bad"))
                    }
                }
            },
        )
        .await;
        assert_eq!(n, 2);
        assert_eq!(start.elapsed(), Duration::from_secs(7));
        assert_eq!(r.expect_err("failed").code, Some(400));
    }
}
