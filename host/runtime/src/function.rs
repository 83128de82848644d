//! A Function: a plugin with its configuration and limits, and its warm instances.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use wasmesh_core::Event;
use wasmtime::Store;
use wasmtime::component::Instance;

use crate::bindings::{handler, matcher, types};
use crate::convert;
use crate::engine::{Exports, Plugin, PluginEngine};
use crate::error::{CallError, CallErrorKind, LoadError};
use crate::host::{CallOutput, HostState, MemoryLimitExceeded};
use crate::limits::{Isolation, Limits};
use crate::validate::PluginKind;

/// How a function is run: its configuration, limits and isolation.
#[derive(Debug, Clone, Default)]
pub struct FunctionSettings {
    /// Key/value pairs the plugin reads through the `config` import.
    pub config: BTreeMap<String, String>,
    /// Memory and time per call.
    pub limits: Limits,
    /// Warm instances (default) or a fresh instance per event.
    pub isolation: Isolation,
    /// How many idle warm instances to keep (at least one).
    pub max_idle: usize,
}

/// What a subscriber decided, in host types.
#[derive(Debug, Clone)]
pub enum Disposition {
    /// Done.
    Ack,
    /// Done, with a reply event (already validated).
    Reply(Box<Event>),
    /// Deliver again, after this many milliseconds if given.
    Retry(Option<u32>),
    /// Dead-letter, with the plugin's reason.
    Reject(String),
}

/// A successful call: its result and what it wrote.
#[derive(Debug)]
pub struct Called<T> {
    /// The filter's verdict or the subscriber's disposition.
    pub value: T,
    /// What the call wrote.
    pub output: CallOutput,
}

struct WarmInstance {
    store: Store<HostState>,
    exports: InstanceExports,
}

enum InstanceExports {
    Filter(matcher::Guest),
    Subscriber(handler::Guest),
}

/// A plugin ready to be called, with its settings and its pool of warm instances.
pub struct Function {
    name: String,
    plugin: Arc<Plugin>,
    engine: PluginEngine,
    settings: FunctionSettings,
    config: Arc<BTreeMap<String, String>>,
    deadline_ticks: u64,
    idle: Mutex<Vec<WarmInstance>>,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("name", &self.name)
            .field("plugin", &self.plugin)
            .field("settings", &self.settings)
            .finish()
    }
}

impl Function {
    /// A function named `name` running `plugin`. Fails when the settings ask for more memory
    /// than the engine's instance slots hold.
    pub fn new(
        engine: &PluginEngine,
        name: &str,
        plugin: Arc<Plugin>,
        mut settings: FunctionSettings,
    ) -> Result<Self, LoadError> {
        let max = engine.config().max_memory_per_instance;
        if settings.limits.memory_bytes > max {
            return Err(LoadError::Link {
                name: name.into(),
                reason: format!(
                    "memory limit of {} is above the host's maximum of {}",
                    crate::limits::human_bytes(settings.limits.memory_bytes),
                    crate::limits::human_bytes(max)
                ),
            });
        }
        settings.max_idle = settings.max_idle.max(1);
        let tick = engine.config().epoch_tick.as_nanos().max(1);
        // One tick more than the timeout: the deadline is never shorter than asked.
        let deadline_ticks = u64::try_from(settings.limits.timeout.as_nanos().div_ceil(tick))
            .unwrap_or(u64::MAX / 2)
            + 1;
        Ok(Self {
            name: name.into(),
            plugin,
            engine: engine.clone(),
            config: Arc::new(settings.config.clone()),
            settings,
            deadline_ticks,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin it runs.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// Its settings.
    pub fn settings(&self) -> &FunctionSettings {
        &self.settings
    }

    /// Asks a filter whether the event passes. The filter sees the event through the lazy
    /// `incoming-event` resource: data is copied only if the filter asks for it.
    pub fn matches(&self, event: &Arc<Event>) -> Result<Called<bool>, CallError> {
        self.expect(PluginKind::Filter)?;
        self.call(self.settings.limits.timeout, |store, exports| {
            let InstanceExports::Filter(guest) = exports else {
                unreachable!("checked by expect()")
            };
            let res = store.data_mut().lend_event(event)?;
            let rep = res.rep();
            let out = guest.call_matches(&mut *store, res);
            store
                .data_mut()
                .return_event(wasmtime::component::Resource::new_own(rep));
            out
        })
    }

    /// Hands an event to a subscriber and returns its disposition. A reply is validated here.
    pub fn handle(&self, event: &Event) -> Result<Called<Disposition>, CallError> {
        self.handle_within(event, None)
    }

    /// [`handle`](Self::handle), with the call's deadline cut to `timeout` when that is
    /// shorter than the Function's own (a trigger's `delivery.timeout`).
    pub fn handle_within(
        &self,
        event: &Event,
        timeout: Option<Duration>,
    ) -> Result<Called<Disposition>, CallError> {
        self.expect(PluginKind::Subscriber)?;
        let wit_event = convert::to_wit(event);
        let limit = match timeout {
            Some(t) if t < self.settings.limits.timeout => t,
            _ => self.settings.limits.timeout,
        };
        let called = self.call(limit, |store, exports| {
            let InstanceExports::Subscriber(guest) = exports else {
                unreachable!("checked by expect()")
            };
            guest.call_handle(&mut *store, &wit_event)
        })?;
        let value = match called.value {
            types::Disposition::Ack => Disposition::Ack,
            types::Disposition::Retry(after) => Disposition::Retry(after),
            types::Disposition::Reject(reason) => Disposition::Reject(reason),
            types::Disposition::Reply(reply) => match convert::from_wit(reply) {
                Ok(ev) => Disposition::Reply(Box::new(ev)),
                Err(e) => {
                    return Err(CallError {
                        function: self.name.clone(),
                        kind: e.into(),
                        output: Box::new(called.output),
                    });
                }
            },
        };
        Ok(Called {
            value,
            output: called.output,
        })
    }

    fn expect(&self, kind: PluginKind) -> Result<(), CallError> {
        if self.plugin.kind == kind {
            return Ok(());
        }
        Err(CallError {
            function: self.name.clone(),
            kind: CallErrorKind::Instantiate(format!(
                "plugin implements world `{}`, not `{}`",
                self.plugin.kind, kind
            )),
            output: Box::default(),
        })
    }

    /// Runs `f` on a warm instance (or a fresh one), with the deadline (`limit`, at most the
    /// Function's own) armed. An instance that failed in any way is discarded; the next call
    /// gets a fresh one.
    fn call<T>(
        &self,
        limit: Duration,
        f: impl FnOnce(&mut Store<HostState>, &InstanceExports) -> wasmtime::Result<T>,
    ) -> Result<Called<T>, CallError> {
        let _ticking = self.engine.running();
        let pooled = match self.settings.isolation {
            Isolation::Warm => self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop(),
            Isolation::Fresh => None,
        };
        let mut inst = match pooled {
            Some(i) => i,
            None => self.instantiate().map_err(|e| CallError {
                function: self.name.clone(),
                kind: CallErrorKind::Instantiate(format!("{e:#}")),
                output: Box::default(),
            })?,
        };
        inst.store.set_epoch_deadline(self.ticks(limit));
        let result = f(&mut inst.store, &inst.exports);
        let output = inst.store.data_mut().take_output();
        match result {
            Ok(value) => {
                if self.settings.isolation == Isolation::Warm {
                    let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                    if idle.len() < self.settings.max_idle {
                        idle.push(inst);
                    }
                }
                Ok(Called { value, output })
            }
            Err(e) => Err(CallError {
                function: self.name.clone(),
                kind: self.classify(&e, &inst.store, &output, limit),
                output: Box::new(output),
            }),
        }
    }

    /// Epoch ticks for a deadline of `limit`: the Function's own, or fewer for a shorter one.
    fn ticks(&self, limit: Duration) -> u64 {
        if limit >= self.settings.limits.timeout {
            return self.deadline_ticks;
        }
        let tick = self.engine.config().epoch_tick.as_nanos().max(1);
        // One tick more than asked: the deadline is never shorter than the limit.
        u64::try_from(limit.as_nanos().div_ceil(tick)).unwrap_or(u64::MAX / 2) + 1
    }

    fn classify(
        &self,
        e: &wasmtime::Error,
        store: &Store<HostState>,
        output: &CallOutput,
        limit: Duration,
    ) -> CallErrorKind {
        if store.data().limiter.exceeded || e.downcast_ref::<MemoryLimitExceeded>().is_some() {
            return CallErrorKind::Memory(self.settings.limits.memory_bytes);
        }
        match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => CallErrorKind::Deadline(limit),
            Some(trap) => {
                let what = match trap {
                    wasmtime::Trap::UnreachableCodeReached => "unreachable executed".to_string(),
                    other => other.to_string(),
                };
                // A Rust guest's panic message is the best explanation of its `unreachable`.
                let panic = String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .find(|l| l.contains("panicked"))
                    .map(|l| format!(" ({})", l.trim()));
                CallErrorKind::Trap(what + panic.as_deref().unwrap_or(""))
            }
            None => CallErrorKind::Trap(format!("{e:#}")),
        }
    }

    fn instantiate(&self) -> wasmtime::Result<WarmInstance> {
        let state = HostState::new(Arc::clone(&self.config), self.settings.limits.memory_bytes);
        let mut store = Store::new(self.engine.engine(), state);
        store.limiter(|s| &mut s.limiter);
        // Instantiation runs guest start code too: it gets the same deadline.
        store.set_epoch_deadline(self.deadline_ticks);
        let instance: Instance = self.plugin.pre.instantiate(&mut store)?;
        let exports = match &self.plugin.exports {
            Exports::Filter(ix) => InstanceExports::Filter(ix.load(&mut store, &instance)?),
            Exports::Subscriber(ix) => InstanceExports::Subscriber(ix.load(&mut store, &instance)?),
        };
        Ok(WarmInstance { store, exports })
    }

    /// How many warm instances are idle, ready for the next call.
    pub fn idle_instances(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Drops the idle warm instances (their slots go back to the pool).
    pub fn drain_idle(&self) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// Loads a plugin and wraps it in a function in one step, checking its world.
pub fn load_function(
    engine: &PluginEngine,
    name: &str,
    bytes: &[u8],
    expected: Option<PluginKind>,
    settings: FunctionSettings,
) -> Result<Function, LoadError> {
    let plugin = engine.load(name, bytes)?;
    if let Some(expected) = expected
        && plugin.kind != expected
    {
        return Err(LoadError::WrongWorld {
            name: name.into(),
            found: plugin.kind.world(),
            expected: expected.world(),
        });
    }
    Function::new(engine, name, plugin, settings)
}
