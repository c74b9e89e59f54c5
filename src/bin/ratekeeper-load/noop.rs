//! The no-op reference server: Envoy's RateLimitService and Kuadrant's RateLimitService over
//! the same generated code and the same tonic stack as ratekeeper, answering OK at once. What
//! it reaches is the floor for any tonic server on the machine; ratekeeper is reported as a
//! ratio to it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Args;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use ratekeeper::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ratekeeper::proto::kuadrant::service::ratelimit::v1 as kuadrant;
use ratekeeper::proto::kuadrant::service::ratelimit::v1::rate_limit_service_server::{
    RateLimitService as KuadrantService, RateLimitServiceServer as KuadrantServer,
};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone, Args)]
pub struct NoopOptions {
    /// Port to listen on.
    #[arg(long, short = 'p')]
    port: u16,

    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,

    /// Worker threads of the server's (multi-threaded) runtime; 0 = one per core, as
    /// ratekeeper runs.
    #[arg(long, default_value_t = 0)]
    threads: usize,

    /// Stop by itself after this many seconds, in case whoever started it forgets to.
    #[arg(long, default_value_t = 3600)]
    exit_after: u64,
}

#[derive(Clone, Copy)]
struct Noop;

fn ok() -> Result<Response<RateLimitResponse>, Status> {
    Ok(Response::new(RateLimitResponse {
        overall_code: Code::Ok as i32,
        ..Default::default()
    }))
}

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        _request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        ok()
    }
}

#[tonic::async_trait]
impl KuadrantService for Noop {
    async fn check_rate_limit(
        &self,
        _request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        ok()
    }

    async fn report(
        &self,
        _request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        ok()
    }

    async fn reserve(
        &self,
        _request: Request<kuadrant::ReserveRequest>,
    ) -> Result<Response<kuadrant::ReserveResponse>, Status> {
        Ok(Response::new(kuadrant::ReserveResponse {
            code: Code::Ok as i32,
            reservation_id: "noop".to_string(),
        }))
    }

    async fn commit(
        &self,
        _request: Request<kuadrant::CommitRequest>,
    ) -> Result<Response<kuadrant::CommitResponse>, Status> {
        Ok(Response::new(kuadrant::CommitResponse {
            reservation_released: true,
        }))
    }
}

pub fn serve(options: NoopOptions) -> Result<(), String> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if options.threads > 0 {
        builder.worker_threads(options.threads);
    }
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let addr = SocketAddr::new(options.bind, options.port);
    runtime.block_on(async move {
        let stop = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminated() => {}
                _ = tokio::time::sleep(Duration::from_secs(options.exit_after)) => {
                    eprintln!("serve-noop: stopping after {} s (--exit-after)", options.exit_after);
                }
            }
        };
        eprintln!("serve-noop: listening on {addr}");
        tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(Noop))
            .add_service(KuadrantServer::new(Noop))
            .serve_with_shutdown(addr, stop)
            .await
            .map_err(|e| format!("cannot serve on {addr}: {e}"))
    })
}

async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            terminate.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await
}
