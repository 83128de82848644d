//! Where Functions' output goes: their stdout to the host's stdout, one call's output written
//! at once so two events' lines never interleave; their log records to the host's log.

use std::io::Write as _;
use std::sync::Arc;

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
}

impl std::fmt::Debug for FunctionOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionOutput")
            .field("prefix", &self.prefix)
            .field("sink", &self.sink.is_some())
            .finish()
    }
}

impl FunctionOutput {
    /// Writes one call's output.
    pub fn write(&self, function: &str, out: &CallOutput) {
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
