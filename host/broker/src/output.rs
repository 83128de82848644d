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

/// Lines a function wrote, as `wasmesh logs function NAME` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub function: String,
    /// `stdout`, `stderr`, or the log level of a record.
    pub stream: String,
    pub text: String,
}

/// The recent output of every function (a bounded ring each) and a feed of new lines.
pub struct LogBook {
    per_function: usize,
    lines: Mutex<HashMap<String, VecDeque<LogLine>>>,
    feed: broadcast::Sender<LogLine>,
}

impl LogBook {
    /// Keeps the last `per_function` lines of each function.
    pub fn new(per_function: usize) -> Arc<Self> {
        Arc::new(Self {
            per_function: per_function.max(1),
            lines: Mutex::new(HashMap::new()),
            feed: broadcast::channel(4096).0,
        })
    }

    fn push(&self, function: &str, stream: &str, text: &[u8]) {
        let text = String::from_utf8_lossy(text);
        let mut all = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let ring = all.entry(function.to_string()).or_default();
        for l in text.lines() {
            let line = LogLine {
                function: function.to_string(),
                stream: stream.to_string(),
                text: l.to_string(),
            };
            if ring.len() == self.per_function {
                ring.pop_front();
            }
            ring.push_back(line.clone());
            let _ = self.feed.send(line);
        }
    }

    /// The lines kept for `function`, oldest first.
    pub fn recent(&self, function: &str) -> Vec<LogLine> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(function)
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every new line from now on (of every function; a slow reader skips lines it missed).
    pub fn follow(&self) -> broadcast::Receiver<LogLine> {
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
            book.push(function, "stdout", &out.stdout);
            book.push(function, "stderr", &out.stderr);
            for r in &out.logs {
                book.push(
                    function,
                    &format!("{:?}", r.level).to_lowercase(),
                    r.message.as_bytes(),
                );
            }
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
