//! Results: one run's figures (text or JSON), and a table of several runs as ratios to the
//! no-op floor measured in the same session.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// One run, as `run --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub label: String,
    /// should, check, report or token.
    pub call: String,
    pub target: String,
    pub domain: String,
    pub concurrency: usize,
    pub connections: usize,
    pub threads: usize,
    pub users: u64,
    pub hits: u32,
    pub warmup_s: f64,
    /// Seconds measured.
    pub duration_s: f64,
    /// Operations measured (for the token pattern, one operation is CheckRateLimit + Report).
    pub ops: u64,
    pub rpcs: u64,
    pub ops_per_sec: f64,
    pub rpcs_per_sec: f64,
    /// Latency of one operation.
    pub latency_us: Latency,
    pub ok: u64,
    pub over_limit: u64,
    pub unknown: u64,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Operations still in flight when the run gave up on them.
    pub unfinished: u64,
    /// CPU time of the load generator per RPC, in microseconds.
    pub client_cpu_us_per_rpc: Option<f64>,
    /// CPU time of the server (`--server-pid`) per operation, in microseconds, over the
    /// measured window.
    #[serde(default)]
    pub server_cpu_us_per_op: Option<f64>,
    /// Cores the server kept busy over the measured window.
    #[serde(default)]
    pub server_cpu_cores: Option<f64>,
}

impl RunResult {
    pub fn text(&self) -> String {
        let mut out = String::new();
        let label = if self.label.is_empty() {
            String::new()
        } else {
            format!("[{}] ", self.label)
        };
        let _ = writeln!(
            out,
            "{label}{} -> {} (domain {}, {} users, hits {})",
            self.call, self.target, self.domain, self.users, self.hits
        );
        let _ = writeln!(
            out,
            "  {} in flight over {} connection(s), {} client thread(s); {:.1} s measured after {:.1} s warm-up",
            self.concurrency, self.connections, self.threads, self.duration_s, self.warmup_s
        );
        let errors: u64 = self.errors.values().sum();
        let _ = writeln!(
            out,
            "  operations: {} ({} ok, {} over limit, {} unknown, {} errors {:?}, {} unfinished)",
            self.ops, self.ok, self.over_limit, self.unknown, errors, self.errors, self.unfinished
        );
        let _ = writeln!(
            out,
            "  throughput: {:.0} ops/s ({:.0} RPCs/s)",
            self.ops_per_sec, self.rpcs_per_sec
        );
        let l = &self.latency_us;
        let _ = writeln!(
            out,
            "  latency (us): p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}  mean {:.0}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        if let Some(cpu) = self.client_cpu_us_per_rpc {
            let _ = writeln!(out, "  load generator CPU: {cpu:.1} us per RPC");
        }
        if let (Some(per_op), Some(cores)) = (self.server_cpu_us_per_op, self.server_cpu_cores) {
            let _ = writeln!(
                out,
                "  server CPU: {per_op:.1} us per operation ({cores:.2} cores busy)"
            );
        }
        out
    }
}

#[derive(Debug, Clone, Args)]
pub struct TableOptions {
    /// Files of JSON lines written by `run --json`.
    #[arg(required = true)]
    files: Vec<PathBuf>,

    /// Print a Markdown table.
    #[arg(long)]
    markdown: bool,

    /// The label of the reference rows.
    #[arg(long, default_value = "floor")]
    floor: String,
}

/// The median of some numbers (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Several runs of one server and call, as medians.
struct Row {
    call: String,
    label: String,
    runs: usize,
    ops_per_sec: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    server_cpu_us_per_op: Option<f64>,
    /// Calls that failed, in all the runs together (by code).
    errors: BTreeMap<String, u64>,
}

impl Row {
    fn of(runs: &[&RunResult]) -> Self {
        let m = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(|r| f(r)).collect());
        let cpu: Vec<f64> = runs.iter().filter_map(|r| r.server_cpu_us_per_op).collect();
        Self {
            call: runs[0].call.clone(),
            label: runs[0].label.clone(),
            runs: runs.len(),
            ops_per_sec: m(&|r| r.ops_per_sec),
            p50: m(&|r| r.latency_us.p50),
            p90: m(&|r| r.latency_us.p90),
            p99: m(&|r| r.latency_us.p99),
            p999: m(&|r| r.latency_us.p999),
            server_cpu_us_per_op: (!cpu.is_empty()).then(|| median(cpu)),
            errors: runs.iter().fold(BTreeMap::new(), |mut all, r| {
                for (code, count) in &r.errors {
                    *all.entry(code.clone()).or_default() += count;
                }
                all
            }),
        }
    }
}

pub fn table(options: TableOptions) -> Result<(), String> {
    let mut results: Vec<RunResult> = Vec::new();
    for file in &options.files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
            results.push(
                serde_json::from_str(line)
                    .map_err(|e| format!("{}: not a run result: {e}", file.display()))?,
            );
        }
    }
    // (call, server) pairs in the order they first appear; repeated runs become medians.
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for r in &results {
        let key = (r.call.as_str(), r.label.as_str());
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let first_of_call: Vec<usize> = keys
        .iter()
        .map(|&(call, _)| keys.iter().position(|k| k.0 == call).unwrap_or(0))
        .collect();
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by_key(|&i| first_of_call[i]);
    let keys: Vec<(&str, &str)> = order.into_iter().map(|i| keys[i]).collect();
    let rows: Vec<Row> = keys
        .iter()
        .map(|&(call, label)| {
            let runs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.call == call && r.label == label)
                .collect();
            Row::of(&runs)
        })
        .collect();
    let header = [
        "call",
        "server",
        "runs",
        "ops/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "p99.9 us",
        "ops/s vs floor",
        "p99 vs floor",
        "server CPU us/op",
        "errors (all runs)",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let floor = rows
                .iter()
                .find(|f| f.call == r.call && f.label == options.floor);
            let ratio = |a: f64, b: Option<f64>| match b {
                Some(b) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".to_string(),
            };
            vec![
                r.call.clone(),
                r.label.clone(),
                r.runs.to_string(),
                format!("{:.0}", r.ops_per_sec),
                format!("{:.0}", r.p50),
                format!("{:.0}", r.p90),
                format!("{:.0}", r.p99),
                format!("{:.0}", r.p999),
                ratio(r.ops_per_sec, floor.map(|f| f.ops_per_sec)),
                ratio(r.p99, floor.map(|f| f.p99)),
                r.server_cpu_us_per_op
                    .map_or("-".to_string(), |c| format!("{c:.1}")),
                if r.errors.is_empty() {
                    "0".to_string()
                } else {
                    r.errors
                        .iter()
                        .map(|(code, count)| format!("{count} {code}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            ]
        })
        .collect();
    if options.markdown {
        println!("| {} |", header.join(" | "));
        println!("|{}", "---|".repeat(header.len()));
        for row in cells {
            println!("| {} |", row.join(" | "));
        }
    } else {
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        let line = |cells: Vec<&str>| {
            cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (cell, &width))| {
                    if i < 2 {
                        format!("{cell:<width$}")
                    } else {
                        format!("{cell:>width$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("{}", line(header.to_vec()));
        for row in &cells {
            println!("{}", line(row.iter().map(String::as_str).collect()));
        }
    }
    Ok(())
}
