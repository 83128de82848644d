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
    Serve(Box<commands::serve::ServeArgs>),
    /// Send one CloudEvent to a broker (or any CloudEvents endpoint).
    Send(commands::send::SendArgs),
    /// Invoke a filter or subscriber plugin on one event and print what it did.
    Run(commands::run::RunArgs),
    /// Create or change objects from YAML files on a running server (Function modules given as
    /// paths are uploaded first).
    Apply(commands::ops::ApplyArgs),
    /// Delete the objects YAML files declare from a running server.
    Delete(commands::ops::ApplyArgs),
    /// List objects of a kind with their Ready condition.
    Get(commands::ops::GetArgs),
    /// Show one object: its spec, conditions and a Function's revisions.
    Describe(commands::ops::DescribeArgs),
    /// Upload a .wasm and make it a Function's live version: `push function NAME FILE.wasm`.
    Push(commands::ops::PushArgs),
    /// A Function's revisions: `rollout history|undo function NAME`.
    Rollout(commands::ops::RolloutArgs),
    /// What a Function printed and logged: `logs function NAME [-f]`.
    Logs(commands::ops::LogsArgs),
    /// Save the admin API's URL and token in ~/.wasmesh/config.
    Login(commands::ops::LoginArgs),
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
        Command::Serve(args) => commands::serve::serve(*args),
        Command::Send(args) => commands::send::send(args),
        Command::Run(args) => commands::run::run(args),
        Command::Apply(args) => commands::ops::apply(args),
        Command::Delete(args) => commands::ops::delete(args),
        Command::Get(args) => commands::ops::get(args),
        Command::Describe(args) => commands::ops::describe(args),
        Command::Push(args) => commands::ops::push(args),
        Command::Rollout(args) => commands::ops::rollout(args),
        Command::Logs(args) => commands::ops::logs(args),
        Command::Login(args) => commands::ops::login(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
