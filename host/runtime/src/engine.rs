//! The one wasmtime `Engine` of the host, its linker, its epoch ticker and its component cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::bindings::{Host_, handler, matcher};
use crate::cache::{ComponentCache, digest};
use crate::error::LoadError;
use crate::host::HostState;
use crate::validate::{self, PluginKind};

/// Settings of the engine, shared by every plugin.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where compiled artifacts are cached (`<data-dir>/components`); `None` caches in memory only.
    pub cache_dir: Option<PathBuf>,
    /// The most instances alive at once, across all plugins (pooling allocator slots).
    pub max_instances: u32,
    /// The largest memory limit a function may ask for.
    pub max_memory_per_instance: usize,
    /// Granularity of deadlines: one ticker thread bumps the engine's epoch this often.
    pub epoch_tick: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_instances: 1000,
            max_memory_per_instance: 1 << 30,
            epoch_tick: Duration::from_millis(1),
        }
    }
}

impl EngineConfig {
    /// The defaults, caching compiled components under `<data_dir>/components`.
    pub fn with_data_dir(data_dir: &Path) -> Self {
        Self {
            cache_dir: Some(data_dir.join("components")),
            ..Self::default()
        }
    }
}

/// A compiled, validated component, ready to be instantiated many times.
pub struct Plugin {
    pub(crate) name: String,
    pub(crate) digest: String,
    pub(crate) kind: PluginKind,
    pub(crate) pre: wasmtime::component::InstancePre<HostState>,
    pub(crate) exports: Exports,
}

pub(crate) enum Exports {
    Filter(matcher::GuestIndices),
    Subscriber(handler::GuestIndices),
}

impl Plugin {
    /// The name it was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The hex sha256 of its bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The world it implements.
    pub fn kind(&self) -> PluginKind {
        self.kind
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .field("kind", &self.kind)
            .finish()
    }
}

/// The host's Wasm engine. Cheap to clone; the epoch ticker stops when the last clone is dropped.
#[derive(Clone)]
pub struct PluginEngine {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    cache: ComponentCache,
    config: EngineConfig,
    ticking: Arc<Ticking>,
    ticker: Option<JoinHandle<()>>,
}

/// What the epoch ticker and the calls share. With no call running for `IDLE_TICKS` ticks the
/// ticker parks, so an idle server does not wake a thousand times a second; the first call to
/// start after that wakes it. (Deadlines only matter while a call runs, and a call's deadline
/// is counted from the epoch at its start.)
struct Ticking {
    stop: AtomicBool,
    /// Calls running (guest code on a store of this engine).
    active: std::sync::atomic::AtomicUsize,
    /// The ticker is parked, or about to be.
    parked: AtomicBool,
}

/// Ticks without a call before the ticker parks: long enough that calls back to back never
/// make it park (each wake-up is a system call on the calling thread).
const IDLE_TICKS: u32 = 100;

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticking.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.ticker.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Held while guest code runs: keeps the epoch ticker going.
pub(crate) struct Running<'a> {
    ticking: &'a Ticking,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.ticking.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PluginEngine {
    /// Builds the engine (pooling allocator, epoch interruption), links the granted imports and
    /// starts the one epoch ticker.
    pub fn new(config: EngineConfig) -> wasmtime::Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances.saturating_mul(4))
            .total_memories(config.max_instances)
            .total_tables(config.max_instances.saturating_mul(2))
            .max_memory_size(config.max_memory_per_instance)
            // Reset small memories with memset rather than madvise: far cheaper for fresh
            // instances of Rust guests, whose memories start around 1 MiB.
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10);
        let mut wasm = Config::new();
        wasm.epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm)?;

        let mut linker = Linker::new(&engine);
        link_wasi(&mut linker)?;
        Host_::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;

        let ticking = Arc::new(Ticking {
            stop: AtomicBool::new(false),
            active: std::sync::atomic::AtomicUsize::new(0),
            parked: AtomicBool::new(false),
        });
        let ticker = {
            let engine = engine.clone();
            let ticking = Arc::clone(&ticking);
            let tick = config.epoch_tick;
            std::thread::Builder::new()
                .name("wasmesh-epoch".into())
                .spawn(move || {
                    let mut idle = 0u32;
                    while !ticking.stop.load(Ordering::SeqCst) {
                        if ticking.active.load(Ordering::SeqCst) == 0 {
                            idle += 1;
                        } else {
                            idle = 0;
                        }
                        if idle >= IDLE_TICKS {
                            // Said before looking once more: a call starting now either sees
                            // `parked` and wakes this thread, or is seen here.
                            ticking.parked.store(true, Ordering::SeqCst);
                            if ticking.active.load(Ordering::SeqCst) == 0
                                && !ticking.stop.load(Ordering::SeqCst)
                            {
                                std::thread::park();
                            }
                            ticking.parked.store(false, Ordering::SeqCst);
                            idle = 0;
                        }
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })?
        };
        let cache = ComponentCache::new(&engine, config.cache_dir.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                linker,
                cache,
                config,
                ticking,
                ticker: Some(ticker),
            }),
        })
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// To hold while guest code runs (instantiation included): the epoch ticker runs then.
    pub(crate) fn running(&self) -> Running<'_> {
        let ticking = &*self.inner.ticking;
        if ticking.active.fetch_add(1, Ordering::SeqCst) == 0
            && ticking.parked.load(Ordering::SeqCst)
            && let Some(t) = &self.inner.ticker
        {
            t.thread().unpark();
        }
        Running { ticking }
    }

    pub(crate) fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Creates and drops a store with an empty, deny-by-default WASI context: the floor of any
    /// fresh-instance call, for the benchmarks.
    #[doc(hidden)]
    pub fn empty_store_roundtrip(&self) {
        let state = HostState::new(std::sync::Arc::default(), 1 << 20);
        drop(wasmtime::Store::new(&self.inner.engine, state));
    }

    /// True when a compiled artifact for this digest is cached on disk.
    pub fn is_cached_on_disk(&self, digest: &str) -> bool {
        self.inner.cache.on_disk(digest)
    }

    /// Reads, compiles (or takes from the cache) and validates a plugin file.
    pub fn load_file(&self, name: &str, path: &Path) -> Result<Arc<Plugin>, LoadError> {
        let bytes = std::fs::read(path).map_err(|error| LoadError::Read {
            name: name.into(),
            path: path.display().to_string(),
            error,
        })?;
        self.load(name, &bytes)
    }

    /// Compiles (or takes from the cache) and validates a plugin. Nothing runs yet.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<Arc<Plugin>, LoadError> {
        validate::check_header(name, bytes)?;
        let digest = digest(bytes);
        let component = self
            .inner
            .cache
            .get_or_compile(&self.inner.engine, &digest, bytes)
            .map_err(|e| LoadError::Invalid {
                name: name.into(),
                reason: format!("{e:#}"),
            })?;
        let kind = validate::inspect(name, &self.inner.engine, &component)?;
        let link_err = |e: wasmtime::Error| LoadError::Link {
            name: name.into(),
            reason: format!("{e:#}"),
        };
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(link_err)?;
        let exports = match kind {
            PluginKind::Filter => {
                Exports::Filter(matcher::GuestIndices::new(&pre).map_err(link_err)?)
            }
            PluginKind::Subscriber => {
                Exports::Subscriber(handler::GuestIndices::new(&pre).map_err(link_err)?)
            }
        };
        Ok(Arc::new(Plugin {
            name: name.into(),
            digest,
            kind,
            pre,
            exports,
        }))
    }
}

/// The WASI that Rust's `wasm32-wasip2` std needs, and nothing more: no sockets, no HTTP; the
/// filesystem is not linked at all, so a plugin importing it is refused at load.
fn link_wasi(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, random, sync};
    use wasmtime_wasi::random::{WasiRandom, WasiRandomView};

    struct HasIo;
    impl wasmtime::component::HasData for HasIo {
        type Data<'a> = &'a mut wasmtime::component::ResourceTable;
    }
    fn table(s: &mut HostState) -> &mut wasmtime::component::ResourceTable {
        wasmtime_wasi::WasiView::ctx(s).table
    }

    clocks::wall_clock::add_to_linker::<_, WasiClocks>(l, HostState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<_, WasiClocks>(l, HostState::clocks)?;
    random::random::add_to_linker::<_, WasiRandom>(l, HostState::random)?;
    random::insecure::add_to_linker::<_, WasiRandom>(l, HostState::random)?;
    random::insecure_seed::add_to_linker::<_, WasiRandom>(l, HostState::random)?;
    cli::exit::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::environment::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stdin::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stdout::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::stderr::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_input::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_output::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdin::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdout::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    cli::terminal_stderr::add_to_linker::<_, WasiCli>(l, HostState::cli)?;
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<_, HasIo>(l, table)?;
    sync::io::poll::add_to_linker::<_, HasIo>(l, table)?;
    sync::io::streams::add_to_linker::<_, HasIo>(l, table)?;
    Ok(())
}
