//! The `fastlane` command: parses the command line and hands each
//! subcommand to its module (`demo`, `serve`, `probe`, `bench mixed`,
//! `jobs`), which does the work.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fastlane_cli::{demo, jobs, mixed, probe, serve};

#[derive(Debug, Parser)]
#[command(name = "fastlane", version, about = "fastlane: slow work never blocks fast requests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the demo app (the seed articles' scenarios) on 127.0.0.1:8000.
    // The demo's routes sleep up to 60 s, so its request timeout is longer
    // than an app's (see `demo::run_command`); its help says so.
    #[command(mut_arg("request_timeout", |arg| arg.help(
        "Seconds a handler has to answer before the client gets 504; 0 disables [default: 90 in the demo]"
    )))]
    Demo(Box<demo::DemoCommand>),
    /// Serve an ASGI app (FastAPI, Starlette) as it is: `fastlane serve main:app`.
    #[command(mut_arg("workers", |arg| arg.help(
        "Python worker processes, each running the app on its own event loop [default: 1]"
    )))]
    #[command(mut_arg("timeout", |arg| arg.help(
        "Accepted as gunicorn's -t; a worker is never killed for a slow or blocked event loop"
    )))]
    // Flags of a Rust app's server that mean nothing here (refused if given).
    #[command(mut_arg("max_requests", |arg| arg.hide(true)))]
    #[command(mut_arg("max_requests_jitter", |arg| arg.hide(true)))]
    #[command(mut_arg("runners", |arg| arg.hide(true)))]
    #[command(mut_arg("max_threads", |arg| arg.hide(true)))]
    #[command(mut_arg("no_isolation", |arg| arg.hide(true)))]
    #[command(mut_arg("blocking_threads", |arg| arg.hide(true)))]
    #[command(mut_arg("blocking_queue", |arg| arg.hide(true)))]
    #[command(mut_arg("cpu_threads", |arg| arg.hide(true)))]
    #[command(mut_arg("cpu_queue", |arg| arg.hide(true)))]
    #[command(mut_arg("cpu_nice", |arg| arg.hide(true)))]
    #[command(mut_arg("stall_threshold_ms", |arg| arg.help(
        "Milliseconds a worker's event loop may go without coming back before it counts as blocked \
         (at least 5) [default: 10]"
    )))]
    Serve(Box<serve::ServeCommand>),
    /// Send requests concurrently and show whether they ran in parallel.
    Probe(probe::ProbeCommand),
    /// Benchmarks (see bench/run.py for the full comparison with peers).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Durable jobs: run a worker, enqueue, inspect (sqlite://path or postgres://...).
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
}

/// `fastlane bench ...`.
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Probe a fast URL at a fixed rate (open loop) while N slow requests are in flight.
    Mixed(mixed::MixedCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(command) = &cli.command {
        builder.worker_threads(command.front_threads());
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("fastlane: could not start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Demo(command) => demo::run_command(*command).await,
            Command::Serve(command) => serve::run_command(*command).await,
            Command::Probe(command) => probe::run_command(command).await,
            Command::Bench(BenchCommand::Mixed(command)) => mixed::run_command(command).await,
            Command::Jobs(command) => jobs::run_command(command).await,
        }
    })
}
