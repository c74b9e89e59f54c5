//! `ratekeeper-load llm`: LLM traffic against one user's token budget, to see whether the
//! budget holds while generations are in flight. `--in-flight` requests run at once, each a
//! loop: ask admission, and if admitted "generate" for `--latency-ms`, then tell the real
//! `--cost` the way the pattern's client does. At the end it prints how many tokens the budget
//! let through (against `--budget`, the limit configured on the server), how many requests were
//! admitted and refused, and when the first refusal came (how long the budget lasted).
//!
//! Patterns, as the clients in use send them:
//! - `check-report`: the Kuadrant wasm-shim's TokenRateLimitPolicy — CheckRateLimit on the
//!   request, Report of the usage at the end.
//! - `check-charge`: Envoy's usual token config — ShouldRateLimit with `hits_addend` 0 on the
//!   request, a charge of the usage (`hits_addend` = cost) when the stream is done.
//! - `estimate-refund`: Envoy with refunds — the request charges `--estimate`; when the stream
//!   is done the usage is charged and the estimate refunded (`is_negative_hits`), also for a
//!   refused request (Envoy sends its stream-done descriptors for a 429 too).
//! - `reserve-commit`: the wasm-shim in Kuadrant's `Reservation` mode — Reserve `--estimate` on
//!   the request, Commit the usage with the reservation's id at the end.
//!
//! Run it for less than the limit's window, against a user no one else spends: the tokens let
//! through are then simply admitted × cost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ratekeeper::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ratekeeper::proto::kuadrant::service::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient as KuadrantClient;
use ratekeeper::proto::kuadrant::service::ratelimit::v1::{CommitRequest, ReserveRequest};
use tonic::transport::{Channel, Endpoint};

use crate::load::check_target;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    CheckReport,
    CheckCharge,
    EstimateRefund,
    ReserveCommit,
}

#[derive(Debug, Args)]
pub struct LlmOptions {
    /// The server's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    target: String,
    /// How the client asks and tells.
    #[arg(long, value_enum)]
    pattern: Pattern,
    /// The rate limit domain (namespace).
    #[arg(long, default_value = "llm_budget")]
    domain: String,
    /// The user whose budget is spent (descriptor `{generic_key: llm, user: <user>}`).
    #[arg(long, default_value = "alice")]
    user: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// How long a generation takes.
    #[arg(long, default_value_t = 200)]
    latency_ms: u64,
    /// Tokens a generation really uses.
    #[arg(long, default_value_t = 100)]
    cost: u64,
    /// Tokens estimated on admission (`estimate-refund`, `reserve-commit`).
    #[arg(long, default_value_t = 100)]
    estimate: u64,
    /// The budget configured on the server for this user, to report the overshoot against.
    #[arg(long, default_value_t = 2000)]
    budget: u64,
    /// Seconds of traffic (keep it under the limit's window).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    allow_non_loopback: bool,
}

#[derive(Default)]
struct Tally {
    admitted: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    /// Milliseconds from the start to the first refusal (u64::MAX: none).
    first_refusal_ms: AtomicU64,
}

pub fn run(options: LlmOptions) -> Result<(), String> {
    check_target(&options.target, options.allow_non_loopback)?;
    if options.in_flight == 0 || !(options.duration > 0.0 && options.duration <= 3600.0) {
        return Err("--in-flight must be at least 1 and --duration in (0, 3600]".into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(drive(options))
}

async fn drive(options: LlmOptions) -> Result<(), String> {
    let channel = Endpoint::from_shared(options.target.clone())
        .map_err(|e| format!("invalid --target: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", options.target))?;
    let options = Arc::new(options);
    let tally = Arc::new(Tally {
        first_refusal_ms: AtomicU64::new(u64::MAX),
        ..Tally::default()
    });
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(options.duration);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.in_flight {
        let client = Client::new(channel.clone(), options.clone());
        let tally = tally.clone();
        workers.spawn(async move {
            while Instant::now() < until {
                match client.one_request().await {
                    Ok(true) => tally.admitted.fetch_add(1, Ordering::Relaxed),
                    Ok(false) => {
                        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                        tally.first_refusal_ms.fetch_min(ms, Ordering::Relaxed);
                        // A refused client waits a little before asking again.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        tally.refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => tally.errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    workers.join_all().await;

    let admitted = tally.admitted.load(Ordering::Relaxed);
    let through = admitted.saturating_mul(options.cost);
    let first = tally.first_refusal_ms.load(Ordering::Relaxed);
    let lasted = if first == u64::MAX {
        "never refused".to_string()
    } else {
        format!("{:.2} s", first as f64 / 1000.0)
    };
    println!(
        "{{\"pattern\":\"{:?}\",\"in_flight\":{},\"latency_ms\":{},\"cost\":{},\"estimate\":{},\"budget\":{},\"admitted\":{},\"refused\":{},\"errors\":{},\"tokens_let_through\":{},\"overshoot\":{},\"first_refusal\":\"{}\"}}",
        options.pattern,
        options.in_flight,
        options.latency_ms,
        options.cost,
        options.estimate,
        options.budget,
        admitted,
        tally.refused.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
        through,
        through.saturating_sub(options.budget),
        lasted,
    );
    Ok(())
}

/// One simulated gateway connection.
struct Client {
    envoy: RateLimitServiceClient<Channel>,
    kuadrant: KuadrantClient<Channel>,
    options: Arc<LlmOptions>,
}

impl Client {
    fn new(channel: Channel, options: Arc<LlmOptions>) -> Self {
        Self {
            envoy: RateLimitServiceClient::new(channel.clone()),
            kuadrant: KuadrantClient::new(channel),
            options,
        }
    }

    /// One LLM request: `Ok(true)` when it was admitted (and its usage told).
    async fn one_request(&self) -> Result<bool, tonic::Status> {
        let o = &self.options;
        let generate = || tokio::time::sleep(Duration::from_millis(o.latency_ms));
        match o.pattern {
            Pattern::CheckReport => {
                let check = self.request(vec![self.descriptor(None, false)], 0);
                if !admitted(self.kuadrant.clone().check_rate_limit(check).await?) {
                    return Ok(false);
                }
                generate().await;
                let report = self.request(vec![self.descriptor(None, false)], cost32(o.cost));
                self.kuadrant.clone().report(report).await?;
                Ok(true)
            }
            Pattern::CheckCharge => {
                let check = self.request(vec![self.descriptor(Some(0), false)], 0);
                if !admitted(self.envoy.clone().should_rate_limit(check).await?) {
                    return Ok(false);
                }
                generate().await;
                let charge = self.request(vec![self.descriptor(Some(o.cost), false)], 0);
                self.envoy.clone().should_rate_limit(charge).await?;
                Ok(true)
            }
            Pattern::ReserveCommit => {
                let reserve = ReserveRequest {
                    domain: o.domain.clone(),
                    descriptors: vec![self.descriptor(None, false)],
                    amount: o.estimate,
                    ttl: None,
                };
                let reserved = self.kuadrant.clone().reserve(reserve).await?.into_inner();
                if reserved.code != Code::Ok as i32 {
                    return Ok(false);
                }
                generate().await;
                let commit = CommitRequest {
                    domain: o.domain.clone(),
                    descriptors: vec![self.descriptor(None, false)],
                    reservation_id: reserved.reservation_id,
                    actual_amount: o.cost,
                };
                self.kuadrant.clone().commit(commit).await?;
                Ok(true)
            }
            Pattern::EstimateRefund => {
                let estimate = self.request(vec![self.descriptor(Some(o.estimate), false)], 0);
                let ok = admitted(self.envoy.clone().should_rate_limit(estimate).await?);
                let mut done = vec![self.descriptor(Some(o.estimate), true)];
                if ok {
                    generate().await;
                    done.insert(0, self.descriptor(Some(o.cost), false));
                }
                self.envoy
                    .clone()
                    .should_rate_limit(self.request(done, 0))
                    .await?;
                Ok(ok)
            }
        }
    }

    fn descriptor(&self, hits: Option<u64>, refund: bool) -> RateLimitDescriptor {
        let entry = |key: &str, value: &str| Entry {
            key: key.to_string(),
            value: value.to_string(),
        };
        RateLimitDescriptor {
            entries: vec![
                entry("generic_key", "llm"),
                entry("user", &self.options.user),
            ],
            limit: None,
            hits_addend: hits,
            is_negative_hits: refund,
        }
    }

    fn request(&self, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
        RateLimitRequest {
            domain: self.options.domain.clone(),
            descriptors,
            hits_addend: hits,
        }
    }
}

fn admitted(response: tonic::Response<RateLimitResponse>) -> bool {
    response.into_inner().overall_code == Code::Ok as i32
}

fn cost32(cost: u64) -> u32 {
    u32::try_from(cost).unwrap_or(u32::MAX)
}
