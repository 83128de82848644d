//! What a plugin's store holds, and the imports the host grants: `log`, `config`, `event-view`,
//! plus the deny-by-default WASI context that Rust's `wasm32-wasip2` std needs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use wasmesh_core::{AttributesReader, Event};
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::bindings::types::Level;
use crate::bindings::wasmesh::plugin::{config, event_view, log, types};
use crate::convert;

/// The most a single call may log or print; the rest is dropped and marked as cut.
pub(crate) const OUTPUT_LIMIT: usize = 1 << 20;

/// One log record written by a plugin through the `log` import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Severity, as the plugin gave it.
    pub level: LogLevel,
    /// The message.
    pub message: String,
}

/// Severity of a [`LogRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl std::fmt::Display for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogLevel::Trace => "TRACE",
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARN",
            LogLevel::Error => "ERROR",
        })
    }
}

/// What one call wrote: its stdout, its stderr and its log records.
#[derive(Debug, Default, Clone)]
pub struct CallOutput {
    /// The plugin's stdout, as it wrote it.
    pub stdout: Vec<u8>,
    /// The plugin's stderr (a Rust panic message lands here).
    pub stderr: Vec<u8>,
    /// Records written through the `log` import.
    pub logs: Vec<LogRecord>,
    /// True when the call wrote more than the host keeps and the rest was dropped.
    pub truncated: bool,
    /// How many bytes of event data were copied into the guest (filters read data on request).
    pub data_bytes_read: usize,
}

impl CallOutput {
    fn log_bytes(&self) -> usize {
        self.logs.iter().map(|r| r.message.len()).sum()
    }
}

/// A captured stdout or stderr: the bytes of the current call.
#[derive(Clone, Default)]
pub(crate) struct Capture(Arc<Mutex<CaptureBuf>>);

#[derive(Default)]
pub(crate) struct CaptureBuf {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Capture {
    pub(crate) fn take(&self) -> (Vec<u8>, bool) {
        let mut buf = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let truncated = std::mem::take(&mut buf.truncated);
        (std::mem::take(&mut buf.bytes), truncated)
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only the p2 stream is linked; an async writer that discards is the honest answer here.
        Box::new(tokio::io::sink())
    }
}

#[async_trait::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let mut buf = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let room = OUTPUT_LIMIT.saturating_sub(buf.bytes.len());
        if bytes.len() > room {
            buf.truncated = true;
        }
        buf.bytes.extend_from_slice(&bytes[..bytes.len().min(room)]);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

/// The event a filter is looking at, behind the `incoming-event` resource.
pub(crate) struct EventHandle(pub Arc<Event>);

/// Memory cap of one store; remembers a refused growth so the error can say why.
pub(crate) struct MemoryLimiter {
    pub(crate) max_bytes: usize,
    pub(crate) exceeded: bool,
}

/// The error a refused memory growth traps with.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {} exceeded", crate::limits::human_bytes(*.0))]
pub(crate) struct MemoryLimitExceeded(pub(crate) usize);

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.exceeded = true;
            return Err(MemoryLimitExceeded(self.max_bytes).into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The data of one plugin store.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    config: Arc<BTreeMap<String, String>>,
    stdout: Capture,
    stderr: Capture,
    pub(crate) output: CallOutput,
}

impl HostState {
    pub(crate) fn new(config: Arc<BTreeMap<String, String>>, max_memory: usize) -> Self {
        let stdout = Capture::default();
        let stderr = Capture::default();
        // Deny by default: no arguments, environment, preopened directories or network; stdin
        // is empty; stdout and stderr are captured.
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: max_memory,
                exceeded: false,
            },
            config,
            stdout,
            stderr,
            output: CallOutput::default(),
        }
    }

    /// Takes what the finished call wrote, leaving the store ready for the next call.
    pub(crate) fn take_output(&mut self) -> CallOutput {
        let mut out = std::mem::take(&mut self.output);
        let (stdout, t1) = self.stdout.take();
        let (stderr, t2) = self.stderr.take();
        out.stdout = stdout;
        out.stderr = stderr;
        out.truncated |= t1 | t2;
        out
    }

    /// Lends the event to the guest as an `incoming-event` resource.
    pub(crate) fn lend_event(
        &mut self,
        event: &Arc<Event>,
    ) -> wasmtime::Result<Resource<event_view::IncomingEvent>> {
        let res = self.table.push(EventHandle(Arc::clone(event)))?;
        Ok(Resource::new_borrow(res.rep()))
    }

    /// Takes the lent event back after the call.
    pub(crate) fn return_event(&mut self, res: Resource<event_view::IncomingEvent>) {
        let _ = self
            .table
            .delete(Resource::<EventHandle>::new_own(res.rep()));
    }

    fn event(&self, res: &Resource<event_view::IncomingEvent>) -> wasmtime::Result<&Event> {
        let handle = self
            .table
            .get(&Resource::<EventHandle>::new_borrow(res.rep()))?;
        Ok(&handle.0)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        if self.output.log_bytes() + message.len() > OUTPUT_LIMIT {
            self.output.truncated = true;
            return;
        }
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        self.output.logs.push(LogRecord { level, message });
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn get_all(&mut self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl event_view::Host for HostState {}

impl event_view::HostIncomingEvent for HostState {
    fn id(&mut self, this: Resource<event_view::IncomingEvent>) -> String {
        self.event(&this)
            .map(|e| e.id().to_string())
            .unwrap_or_default()
    }

    fn source(&mut self, this: Resource<event_view::IncomingEvent>) -> String {
        self.event(&this)
            .map(|e| e.source().to_string())
            .unwrap_or_default()
    }

    fn type_(&mut self, this: Resource<event_view::IncomingEvent>) -> String {
        self.event(&this)
            .map(|e| e.ty().to_string())
            .unwrap_or_default()
    }

    fn subject(&mut self, this: Resource<event_view::IncomingEvent>) -> Option<String> {
        self.event(&this).ok()?.subject().map(str::to_string)
    }

    fn datacontenttype(&mut self, this: Resource<event_view::IncomingEvent>) -> Option<String> {
        self.event(&this)
            .ok()?
            .datacontenttype()
            .map(str::to_string)
    }

    fn time(&mut self, this: Resource<event_view::IncomingEvent>) -> Option<types::Datetime> {
        self.event(&this).ok()?.time().map(convert::datetime)
    }

    fn attribute(
        &mut self,
        this: Resource<event_view::IncomingEvent>,
        name: String,
    ) -> Option<String> {
        convert::attribute_text(self.event(&this).ok()?, &name)
    }

    fn extension(
        &mut self,
        this: Resource<event_view::IncomingEvent>,
        name: String,
    ) -> Option<types::ExtensionValue> {
        self.event(&this)
            .ok()?
            .extension(&name)
            .map(convert::extension_value)
    }

    fn attributes(&mut self, this: Resource<event_view::IncomingEvent>) -> types::Attributes {
        match self.event(&this) {
            Ok(e) => convert::attributes(e),
            Err(_) => convert::empty_attributes(),
        }
    }

    fn data(&mut self, this: Resource<event_view::IncomingEvent>) -> Option<Vec<u8>> {
        let data = wasmesh_core::event::data_bytes(self.event(&this).ok()?)?.into_owned();
        self.output.data_bytes_read += data.len();
        Some(data)
    }

    fn drop(&mut self, this: Resource<event_view::IncomingEvent>) -> wasmtime::Result<()> {
        // Borrowed handles are returned by the host after the call; nothing to do here.
        let _ = this;
        Ok(())
    }
}
