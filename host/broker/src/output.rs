//! Where Functions' output goes: their stdout to the host's stdout, one call's output written
//! at once so two events' lines never interleave; their log records to the host's log.

use std::io::Write as _;

use wasmesh_runtime::{CallOutput, LogLevel};

/// How function output is printed.
#[derive(Debug, Clone, Default)]
pub struct FunctionOutput {
    /// Prefix each line with `[function] ` (off: lines appear as a container's log would).
    pub prefix: bool,
}

impl FunctionOutput {
    /// Writes one call's output.
    pub fn write(&self, function: &str, out: &CallOutput) {
        if !out.stdout.is_empty() {
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
