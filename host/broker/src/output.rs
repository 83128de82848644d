//! Where Functions' output goes: their stdout to the host's stdout, one call's output written
//! at once so two events' lines never interleave; their log records to the host's log.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;

use wasmesh_runtime::{CallOutput, LogLevel};

/// Receives each call's stdout instead of the host's stdout: (function name, bytes).
pub type OutputSink = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// How function output is printed.
#[derive(Clone, Default)]
pub struct FunctionOutput {
    /// Prefix each line with `[function] ` (off: lines appear as a container's log would).
    pub prefix: bool,
    /// Where stdout goes instead of the host's stdout (benchmarks measure with it).
    pub sink: Option<OutputSink>,
    /// Keeps the recent lines of each function for `wasmesh logs`.
    pub book: Option<Arc<LogBook>>,
}

/// What one call of a function wrote on one stream (one or more lines), as `wasmesh logs
/// function NAME` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub function: Arc<str>,
    /// `stdout`, `stderr`, or the log level of a record.
    pub stream: &'static str,
    pub text: Arc<str>,
}

impl LogEntry {
    fn lines(&self) -> usize {
        self.text.lines().count().max(1)
    }
}

struct Ring {
    name: Arc<str>,
    entries: VecDeque<LogEntry>,
    lines: usize,
}

/// The recent output of every function (about the last `per_function` lines each) and a feed
/// of new entries. One lock and no copy per line on the delivery path; the feed is fed only
/// while someone follows it.
pub struct LogBook {
    per_function: usize,
    rings: Mutex<HashMap<String, Ring>>,
    feed: broadcast::Sender<LogEntry>,
}

impl LogBook {
    /// Keeps about the last `per_function` lines of each function.
    pub fn new(per_function: usize) -> Arc<Self> {
        Arc::new(Self {
            per_function: per_function.max(1),
            rings: Mutex::new(HashMap::new()),
            feed: broadcast::channel(1024).0,
        })
    }

    fn push(&self, function: &str, entries: Vec<(&'static str, String)>) {
        if entries.is_empty() {
            return;
        }
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        if !rings.contains_key(function) {
            rings.insert(
                function.to_string(),
                Ring {
                    name: Arc::from(function),
                    entries: VecDeque::new(),
                    lines: 0,
                },
            );
        }
        let Some(ring) = rings.get_mut(function) else {
            return;
        };
        let following = self.feed.receiver_count() > 0;
        for (stream, text) in entries {
            let entry = LogEntry {
                function: Arc::clone(&ring.name),
                stream,
                text: Arc::from(text),
            };
            ring.lines += entry.lines();
            if following {
                let _ = self.feed.send(entry.clone());
            }
            ring.entries.push_back(entry);
        }
        while ring.lines > self.per_function && ring.entries.len() > 1 {
            if let Some(old) = ring.entries.pop_front() {
                ring.lines -= old.lines();
            }
        }
    }

    /// The entries kept for `function`, oldest first.
    pub fn recent(&self, function: &str) -> Vec<LogEntry> {
        self.rings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(function)
            .map(|r| r.entries.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every new entry from now on (of every function; a slow reader skips what it missed).
    pub fn follow(&self) -> broadcast::Receiver<LogEntry> {
        self.feed.subscribe()
    }
}

impl std::fmt::Debug for FunctionOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionOutput")
            .field("prefix", &self.prefix)
            .field("sink", &self.sink.is_some())
            .field("book", &self.book.is_some())
            .finish()
    }
}

impl FunctionOutput {
    /// Writes one call's output.
    pub fn write(&self, function: &str, out: &CallOutput) {
        if let Some(book) = &self.book {
            let mut entries = Vec::new();
            for (stream, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
                if !bytes.is_empty() {
                    entries.push((stream, String::from_utf8_lossy(bytes).into_owned()));
                }
            }
            for r in &out.logs {
                let level = match r.level {
                    LogLevel::Trace => "trace",
                    LogLevel::Debug => "debug",
                    LogLevel::Info => "info",
                    LogLevel::Warn => "warn",
                    LogLevel::Error => "error",
                };
                entries.push((level, r.message.clone()));
            }
            book.push(function, entries);
        }
        if let Some(sink) = &self.sink {
            sink(function, &out.stdout);
        } else if !out.stdout.is_empty() {
            let text;
            let bytes: &[u8] = if self.prefix {
                text = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(|l| format!("[{function}] {l}\n"))
                    .collect::<String>();
                text.as_bytes()
            } else {
                &out.stdout
            };
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
        }
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            tracing::warn!(function = %function, "stderr: {line}");
        }
        for r in &out.logs {
            match r.level {
                LogLevel::Trace => tracing::trace!(function = %function, "{}", r.message),
                LogLevel::Debug => tracing::debug!(function = %function, "{}", r.message),
                LogLevel::Info => tracing::info!(function = %function, "{}", r.message),
                LogLevel::Warn => tracing::warn!(function = %function, "{}", r.message),
                LogLevel::Error => tracing::error!(function = %function, "{}", r.message),
            }
        }
        if out.truncated {
            tracing::warn!(function = %function, "output over 1 MiB in one call was cut");
        }
    }
}
