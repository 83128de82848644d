//! `wasmesh`: the command line of the wasmesh event mesh.

mod commands;

use clap::{Parser, Subcommand};

/// A WebAssembly-plugin event mesh: CloudEvents in, Wasm filters and subscribers out.
#[derive(Parser)]
#[command(name = "wasmesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the brokers, triggers, functions and sources that YAML files declare.
    Serve(commands::serve::ServeArgs),
    /// Send one CloudEvent to a broker (or any CloudEvents endpoint).
    Send(commands::send::SendArgs),
    /// Invoke a filter or subscriber plugin on one event and print what it did.
    Run(commands::run::RunArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => commands::serve::serve(args),
        Command::Send(args) => commands::send::send(args),
        Command::Run(args) => commands::run::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
