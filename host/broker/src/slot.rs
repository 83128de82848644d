//! A Function as triggers see it: a slot holding the live version, swapped atomically. A
//! delivery takes the version that is live when its attempt starts and finishes on it, so a
//! swap never splits, loses or repeats a call; the next attempt takes the new version.
//!
//! A version may be on trial (a rollout policy): over its first `window` calls it counts
//! failures, and once they pass `max_failure_rate` of the window the slot goes back to the
//! version before it, by itself, and keeps a note saying why.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use wasmesh_core::Event;
use wasmesh_runtime::{CallError, Called, Disposition, Function};

/// One version of a Function.
pub struct Version {
    pub function: Arc<Function>,
    /// 1 for the first version, counting up with each swap.
    pub revision: u32,
    /// `sha256:<hex>` of the module.
    pub digest: String,
    trial: Option<Trial>,
    /// The version a failed trial goes back to.
    fallback: Option<Arc<Version>>,
}

impl Version {
    /// A version that is not on trial.
    pub fn new(function: Arc<Function>, revision: u32, digest: String) -> Self {
        Self {
            function,
            revision,
            digest,
            trial: None,
            fallback: None,
        }
    }
}

/// The rollout policy of a Function: the first `window` calls of a new version decide it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutPolicy {
    pub window: u32,
    /// A fraction: 0.2 rolls back once more than a fifth of the window failed.
    pub max_failure_rate: f64,
}

struct Trial {
    policy: RolloutPolicy,
    calls: AtomicU32,
    failures: AtomicU32,
    decided: AtomicBool,
}

/// The live version of a Function, swappable.
pub struct FunctionSlot {
    name: String,
    live: ArcSwap<Version>,
    note: Mutex<Option<String>>,
}

impl std::fmt::Debug for FunctionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionSlot")
            .field("name", &self.name)
            .field("revision", &self.live.load().revision)
            .finish()
    }
}

impl FunctionSlot {
    /// A slot with its first version live.
    pub fn new(name: &str, first: Version) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            live: ArcSwap::from_pointee(first),
            note: Mutex::new(None),
        })
    }

    /// `namespace/name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The live version.
    pub fn live(&self) -> Arc<Version> {
        self.live.load_full()
    }

    /// Makes `next` live; calls that already started finish on the version they took. With a
    /// policy, `next` is on trial and the version live until now is its fallback.
    pub fn swap(&self, mut next: Version, policy: Option<RolloutPolicy>) {
        *self.note.lock().unwrap_or_else(PoisonError::into_inner) = None;
        // A newer version ends the trial of the one it replaces: if the newer one is rolled
        // back, the older one is live again as it was, not on trial.
        if let Some(t) = &self.live().trial {
            t.decided.store(true, Ordering::Relaxed);
        }
        if let Some(policy) = policy {
            next.fallback = Some(self.live());
            next.trial = Some(Trial {
                policy,
                calls: AtomicU32::new(0),
                failures: AtomicU32::new(0),
                decided: AtomicBool::new(false),
            });
        }
        self.live.store(Arc::new(next));
    }

    /// What the last trial came to (`None` while one runs or after a plain swap).
    pub fn note(&self) -> Option<String> {
        self.note
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Calls the live subscriber version.
    pub fn handle(&self, event: &Event) -> (Arc<Version>, Result<Called<Disposition>, CallError>) {
        self.handle_within(event, None)
    }

    /// [`handle`](Self::handle) within `timeout` when it is shorter than the Function's own
    /// deadline (a trigger's `delivery.timeout`).
    pub fn handle_within(
        &self,
        event: &Event,
        timeout: Option<Duration>,
    ) -> (Arc<Version>, Result<Called<Disposition>, CallError>) {
        let v = self.live();
        let result = v.function.handle_within(event, timeout);
        let ok = matches!(
            &result,
            Ok(c) if matches!(c.value, Disposition::Ack | Disposition::Reply(_))
        );
        self.record(&v, ok);
        (v, result)
    }

    /// Calls the live filter version.
    pub fn matches(&self, event: &Arc<Event>) -> (Arc<Version>, Result<Called<bool>, CallError>) {
        let v = self.live();
        let result = v.function.matches(event);
        self.record(&v, result.is_ok());
        (v, result)
    }

    /// Counts one call of `v` toward its trial, and ends the trial when it is decided.
    fn record(&self, v: &Arc<Version>, ok: bool) {
        let Some(trial) = &v.trial else { return };
        if trial.decided.load(Ordering::Relaxed) {
            return;
        }
        let calls = trial.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if calls > trial.policy.window {
            return;
        }
        let failures = if ok {
            trial.failures.load(Ordering::Relaxed)
        } else {
            trial.failures.fetch_add(1, Ordering::Relaxed) + 1
        };
        let allowed = (f64::from(trial.policy.window) * trial.policy.max_failure_rate).floor();
        let failed = f64::from(failures) > allowed;
        if !failed && calls < trial.policy.window {
            return;
        }
        if trial.decided.swap(true, Ordering::Relaxed) {
            return;
        }
        let message = if failed {
            let Some(fallback) = &v.fallback else { return };
            // Only if `v` is still live: a newer swap wins over the trial.
            let previous = self.live.compare_and_swap(v, Arc::clone(fallback));
            if !Arc::ptr_eq(&previous, v) {
                return;
            }
            format!(
                "revision {} ({}) failed {failures} of its first {calls} events (more than {:.0}% of {}); rolled back to revision {} ({})",
                v.revision,
                v.digest,
                trial.policy.max_failure_rate * 100.0,
                trial.policy.window,
                fallback.revision,
                fallback.digest
            )
        } else {
            format!(
                "revision {} passed its rollout: {failures} failures in its first {calls} events",
                v.revision
            )
        };
        if failed {
            tracing::warn!(function = %self.name, "{message}");
        } else {
            tracing::info!(function = %self.name, "{message}");
        }
        *self.note.lock().unwrap_or_else(PoisonError::into_inner) = Some(message);
    }
}
