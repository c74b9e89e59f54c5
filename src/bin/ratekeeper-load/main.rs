//! `ratekeeper-load`: the load generator and no-op reference server behind the published
//! numbers (bench/run.sh, docs/performance.md).
//!
//! - `run` drives ShouldRateLimit, CheckRateLimit, Report, or the token pattern
//!   (CheckRateLimit then Report), over the generated tonic clients, and prints throughput and
//!   latency percentiles (text, or JSON with `--json`). Its client runs on one thread by
//!   default, so that on a small machine the other cores are left to the server.
//! - `serve-noop` answers every rate limit call OK at once: the floor any tonic server can
//!   reach on this machine, measured in the same run as the server under test.
//! - `table` prints result files (JSON lines from `run --json`) side by side, each as a ratio to
//!   the row labelled `floor`.
//! - `llm` simulates LLM traffic on one user's token budget (N generations in flight, a
//!   latency, a real cost, an estimate) in the patterns gateways use, and prints how many
//!   tokens the budget let through.
//! - `free-port` prints a free loopback TCP port, for scripts.

mod llm;
mod load;
mod noop;
mod summary;

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ratekeeper-load",
    version,
    about = "Load generator and no-op reference server for ratekeeper's gRPC rate limit services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive a rate limit server for a bounded time and print throughput and latency.
    Run(load::RunOptions),
    /// Answer every RateLimitService / Kuadrant call OK at once (the reference floor).
    ServeNoop(noop::NoopOptions),
    /// Print results (JSON lines written by `run --json`) as a table, with ratios to `floor`.
    Table(summary::TableOptions),
    /// LLM traffic against one user's token budget: does the budget hold with requests in flight?
    Llm(llm::LlmOptions),
    /// Print a free TCP port on 127.0.0.1.
    FreePort,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(options) => load::run(options),
        Command::ServeNoop(options) => noop::serve(options),
        Command::Table(options) => summary::table(options),
        Command::Llm(options) => llm::run(options),
        Command::FreePort => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| println!("{}", addr.port()))
            .map_err(|e| format!("no free port: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ratekeeper-load: {message}");
            ExitCode::FAILURE
        }
    }
}
