//! `wasmesh run PLUGIN.wasm --event EVENT.json`: a plugin author's inner loop.
//!
//! The plugin's stdout goes to stdout verbatim, so event-display reads exactly as `kubectl logs`
//! shows it; everything the host says (disposition, reply, the plugin's log) goes to stderr.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use wasmesh_runtime::{
    CallOutput, Disposition, EngineConfig, FunctionSettings, Isolation, Limits, PluginEngine,
    PluginKind,
};

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// The plugin: a WebAssembly component built for wasm32-wasip2.
    plugin: PathBuf,
    /// The event: a file holding a CloudEvent in the JSON format (structured mode), that JSON
    /// itself (an argument starting with `{`), or `-` to read it from stdin.
    #[arg(long, short = 'e')]
    event: PathBuf,
    /// A configuration entry the plugin reads through the `config` import (repeatable).
    #[arg(long = "config", short = 'c', value_name = "KEY=VALUE", value_parser = crate::commands::parse_key_value)]
    config: Vec<(String, String)>,
    /// Wall-time limit of the call, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    timeout: u64,
    /// Memory limit of the instance, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    memory: usize,
    /// Where compiled components are cached (`<DIR>/components`); without it, nothing is kept.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// `--event '{"specversion": ...}'`: the event given as text rather than as a file's name (a
/// file of that name, however unlikely, still wins).
fn inline_json(arg: &std::path::Path) -> Option<&str> {
    let text = arg.to_str()?;
    (text.trim_start().starts_with('{') && !arg.exists()).then_some(text)
}

pub(crate) fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let event_bytes = if args.event.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        buf
    } else if let Some(json) = inline_json(&args.event) {
        json.as_bytes().to_vec()
    } else {
        std::fs::read(&args.event)
            .with_context(|| format!("cannot read the event file {}", args.event.display()))?
    };
    let event = wasmesh_core::event::parse_json(&event_bytes)
        .with_context(|| format!("{}", args.event.display()))?;

    let config = match &args.data_dir {
        Some(dir) => EngineConfig::with_data_dir(dir),
        None => EngineConfig::default(),
    };
    let engine = PluginEngine::new(config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let name = args
        .plugin
        .file_stem()
        .map(|s| s.to_string_lossy().replace('_', "-"))
        .unwrap_or_else(|| "plugin".into());
    if args.memory == 0 || args.timeout == 0 {
        bail!("--memory and --timeout must be above zero");
    }
    let settings = FunctionSettings {
        config: args.config.into_iter().collect(),
        limits: Limits {
            // Past usize, as far past the host's maximum as can be: refused by name below.
            memory_bytes: args.memory.saturating_mul(1 << 20),
            timeout: Duration::from_millis(args.timeout),
        },
        isolation: Isolation::Fresh,
        max_idle: 1,
    };
    let plugin = engine.load_file(&name, &args.plugin)?;
    let function = wasmesh_runtime::Function::new(&engine, &name, plugin, settings)?;

    let (output, code) = match function.plugin().kind() {
        PluginKind::Filter => match function.matches(&Arc::new(event)) {
            Ok(called) => {
                let verdict = if called.value {
                    "matched"
                } else {
                    "not matched"
                };
                (called.output, Ok(verdict.to_string()))
            }
            Err(e) => (*e.output.clone(), Err(e.to_string())),
        },
        PluginKind::Subscriber => match function.handle(&event) {
            Ok(called) => (called.output, Ok(describe(called.value)?)),
            Err(e) => (*e.output.clone(), Err(e.to_string())),
        },
    };
    print_output(&name, &output)?;
    match code {
        Ok(summary) => {
            eprintln!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn describe(d: Disposition) -> anyhow::Result<String> {
    Ok(match d {
        Disposition::Ack => "disposition: ack".into(),
        Disposition::Retry(None) => "disposition: retry".into(),
        Disposition::Retry(Some(ms)) => format!("disposition: retry after {ms} ms"),
        Disposition::Reject(reason) => format!("disposition: reject ({reason})"),
        Disposition::Reply(ev) => format!(
            "disposition: reply\n{}",
            serde_json::to_string_pretty(&*ev).context("encoding the reply")?
        ),
    })
}

/// The plugin's stdout verbatim on stdout; its stderr and log records, tagged, on stderr.
fn print_output(name: &str, output: &CallOutput) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&output.stdout)?;
    stdout.flush()?;
    let mut stderr = std::io::stderr().lock();
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        writeln!(stderr, "[{name}] stderr: {line}")?;
    }
    for record in &output.logs {
        writeln!(stderr, "[{name}] {}: {}", record.level, record.message)?;
    }
    if output.truncated {
        writeln!(stderr, "[{name}] (output over 1 MiB was cut)")?;
    }
    Ok(())
}
