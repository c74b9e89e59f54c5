//! Accepting and serving the connections of one listener, with the bounds a port open to a
//! network needs:
//!
//! - at most `max_connections` at once: past it the listener stops accepting, and new clients
//!   wait in the kernel's backlog until a connection closes (no descriptor is spent on them);
//! - a pause after a failed accept (out of file descriptors, say), instead of retrying at once
//!   and spinning a core while the failure lasts;
//! - timeouts for peers that connect and say nothing, trickle, or stop answering: HTTP/1's
//!   header-read timeout (which also ends idle keep-alive connections), HTTP/2's handshake
//!   timeout (the connection preface) and keepalive PINGs;
//! - a shutdown that waits for calls in flight, but not for idle or half-sent ones;
//! - TLS when configured: the handshake runs in the connection's own task (a slow peer holds
//!   its connection slot, never the accept loop), bounded by the same timeout as the preface
//!   (HTTP/2) or the first request's headers (HTTP/1), and abandoned at shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceExt};

/// How long a listener waits after a failed accept before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Once shutdown is asked for, how long a connection with nothing in flight is still served
/// before it is closed: time to flush the last answers and for polite peers to close first.
const LINGER: Duration = Duration::from_millis(100);

/// Length of the connection preface every HTTP/2 client sends first (RFC 9113, 3.4).
const H2_PREFACE_LEN: usize = 24;

/// Most calls one HTTP/2 connection may have open at once (hyper's default, made explicit;
/// tonic's own server left it unbounded). Clients queue or open another connection past it.
const MAX_STREAMS_PER_CONNECTION: u32 = 200;

/// What a listener serves: a service that answers every request (it has no errors of its
/// own), cloned per connection and moved onto the connection's task.
pub trait Handler<B>:
    Service<
        http::Request<Incoming>,
        Response = http::Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> Handler<B> for S where
    S: Service<
            http::Request<Incoming>,
            Response = http::Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// The body of an answer, as hyper sends it from a connection's task.
pub trait ResponseBody:
    hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> ResponseBody for B where
    B: hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// What a listener speaks, with its timeouts.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    /// HTTP/1.1. `header_read_timeout` is the longest wait for a request's headers, counted
    /// from the connection's start or from the end of the previous answer.
    Http1 { header_read_timeout: Duration },
    /// HTTP/2 only (gRPC). `handshake_timeout` is the longest wait for the connection
    /// preface; then a PING goes out after each `keepalive_interval` without traffic, and the
    /// connection is closed when one is not acknowledged within `keepalive_timeout`.
    Http2 {
        handshake_timeout: Duration,
        keepalive_interval: Duration,
        keepalive_timeout: Duration,
    },
}

impl Protocol {
    /// The longest a new connection may take to say something useful: its TLS handshake must
    /// be done within it, and (HTTP/2) its preface must have arrived by then too.
    fn first_words_timeout(&self) -> Duration {
        match *self {
            Protocol::Http1 {
                header_read_timeout,
            } => header_read_timeout,
            Protocol::Http2 {
                handshake_timeout, ..
            } => handshake_timeout,
        }
    }
}

/// The TLS configuration new connections of a listener get (`None`: plain text); whoever holds
/// it may swap in another (certificate rotation), which connections already open never see.
pub type TlsConfig = Option<Arc<ArcSwap<rustls::ServerConfig>>>;

/// Serves `service` on every connection `listener` accepts, at most `max_connections` at
/// once, until `stopped` turns true; then stops accepting, lets calls in flight finish and
/// returns once every connection is closed.
pub async fn serve<S, B>(
    listener: TcpListener,
    protocol: Protocol,
    tls: TlsConfig,
    max_connections: usize,
    service: S,
    mut stopped: watch::Receiver<bool>,
) where
    S: Handler<B>,
    B: ResponseBody,
{
    let addr = listener.local_addr().ok();
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut connections = JoinSet::new();
    let mut failing = false;
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stop_asked(&mut stopped) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop_asked(&mut stopped) => break,
        };
        match accepted {
            Ok((stream, _)) => {
                failing = false;
                // Nagle's algorithm with delayed ACKs adds ~40 ms to small answers.
                let _ = stream.set_nodelay(true);
                connections.spawn(serve_connection(
                    stream,
                    protocol,
                    tls.clone(),
                    service.clone(),
                    stopped.clone(),
                    slot,
                ));
            }
            // That peer gave up before it was accepted; the next one may be fine.
            Err(e) if is_peer_error(&e) => continue,
            Err(error) => {
                if failing {
                    tracing::debug!(?addr, %error, "cannot accept a connection");
                } else {
                    tracing::warn!(?addr, %error, pause = ?ACCEPT_ERROR_PAUSE, "cannot accept connections; retrying after each pause");
                    failing = true;
                }
                drop(slot);
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    _ = stop_asked(&mut stopped) => break,
                }
            }
        }
        while connections.try_join_next().is_some() {}
    }
    // Closing the listening socket: new clients are refused instead of left waiting.
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn stop_asked(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|&stop| stop).await;
}

fn is_peer_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// One connection, from the TLS handshake (if any) to its close; `_slot` is its place among
/// the listener's connections, given back when it ends.
async fn serve_connection<S, B>(
    stream: TcpStream,
    protocol: Protocol,
    tls: TlsConfig,
    service: S,
    mut stopped: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) where
    S: Handler<B>,
    B: ResponseBody,
{
    let deadline = Instant::now() + protocol.first_words_timeout();
    let Some(config) = tls else {
        return serve_http(stream, protocol, deadline, service, stopped).await;
    };
    let peer = stream.peer_addr().ok();
    let handshake = TlsAcceptor::from(config.load_full()).accept(stream);
    let stream = tokio::select! {
        done = tokio::time::timeout_at(deadline, handshake) => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(?peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(?peer, "no TLS handshake within the timeout");
                return;
            }
        },
        _ = stop_asked(&mut stopped) => return,
    };
    serve_http(stream, protocol, deadline, service, stopped).await
}

/// HTTP on one connection (plain or TLS) until it closes.
async fn serve_http<I, S, B>(
    stream: I,
    protocol: Protocol,
    deadline: Instant,
    service: S,
    stopped: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Handler<B>,
    B: ResponseBody,
{
    let in_flight = Arc::new(InFlight::default());
    let service = {
        let in_flight = in_flight.clone();
        hyper::service::service_fn(move |request| {
            let call = InFlight::enter(&in_flight);
            let answer = service.clone().oneshot(request);
            async move {
                let response = answer.await;
                drop(call);
                response
            }
        })
    };
    let result = match protocol {
        Protocol::Http1 {
            header_read_timeout,
        } => {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            drive(
                pin!(connection),
                |connection| connection.graceful_shutdown(),
                &in_flight,
                stopped,
            )
            .await
        }
        Protocol::Http2 {
            handshake_timeout: _,
            keepalive_interval,
            keepalive_timeout,
        } => {
            let connection = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(keepalive_interval)
                .keep_alive_timeout(keepalive_timeout)
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .serve_connection(
                    TokioIo::new(HandshakeDeadline::new(stream, deadline)),
                    service,
                );
            drive(
                pin!(connection),
                |connection| connection.graceful_shutdown(),
                &in_flight,
                stopped,
            )
            .await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection closed");
    }
}

/// Runs `connection` until it ends or shutdown is asked for; then asks it to finish
/// gracefully (HTTP/1: close once the answer in progress is sent; HTTP/2: GOAWAY) and waits
/// until it has closed or has had nothing in flight for [`LINGER`], whichever comes first:
/// a peer that stopped talking does not hold the shutdown.
async fn drive<C>(
    mut connection: Pin<&mut C>,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    in_flight: &InFlight,
    mut stopped: watch::Receiver<bool>,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::select! {
        result = Gathered::new(connection.as_mut(), in_flight) => return result,
        _ = stop_asked(&mut stopped) => {}
    }
    graceful_shutdown(connection.as_mut());
    tokio::select! {
        result = Gathered::new(connection.as_mut(), in_flight) => result,
        _ = in_flight.settled() => Ok(()),
    }
}

/// A connection that writes the answers finished at the same moment together.
///
/// Each finished call wakes its connection's task to send the answer, and tokio runs a task
/// woken that way next, before the tasks already queued: when a storage reply finishes a dozen
/// calls at once (a Redis batch), the connection would write, one syscall each, the first
/// answer alone, then the next... Here, while other calls of the connection are in flight, the
/// first poll after a wake-up only wakes the task again, which puts it behind the tasks already
/// queued (the calls finishing meanwhile), and the next poll writes their answers at once:
/// about a third of the writes under load, less CPU on both sides (docs/performance.md). With
/// nothing else in flight it is polled at once: a lone call waits for nothing.
struct Gathered<'a, C> {
    connection: Pin<&'a mut C>,
    in_flight: &'a InFlight,
    requeued: bool,
}

impl<'a, C> Gathered<'a, C> {
    fn new(connection: Pin<&'a mut C>, in_flight: &'a InFlight) -> Self {
        Gathered {
            connection,
            in_flight,
            requeued: false,
        }
    }
}

impl<C: Future> Future for Gathered<'_, C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        if !self.requeued && self.in_flight.count.load(Ordering::Acquire) > 0 {
            self.requeued = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.requeued = false;
        self.connection.as_mut().poll(cx)
    }
}

/// The calls of one connection that have been received (headers read) and not yet answered.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

struct Call(Arc<InFlight>);

impl InFlight {
    fn enter(this: &Arc<Self>) -> Call {
        this.count.fetch_add(1, Ordering::AcqRel);
        Call(this.clone())
    }

    /// Returns once nothing has been in flight for [`LINGER`].
    async fn settled(&self) {
        loop {
            loop {
                let idle = self.idle.notified();
                let mut idle = pin!(idle);
                idle.as_mut().enable();
                if self.count.load(Ordering::Acquire) == 0 {
                    break;
                }
                idle.await;
            }
            tokio::time::sleep(LINGER).await;
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A connection that must deliver the HTTP/2 preface before a deadline: until
/// [`H2_PREFACE_LEN`] bytes have arrived, a read still waiting at the deadline fails with
/// `TimedOut`, which ends the connection. After that it is the plain stream.
struct HandshakeDeadline<I> {
    stream: I,
    deadline: Option<Pin<Box<Sleep>>>,
    received: usize,
}

impl<I> HandshakeDeadline<I> {
    fn new(stream: I, deadline: Instant) -> Self {
        Self {
            stream,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            received: 0,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HandshakeDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = &mut this.deadline {
            match &polled {
                Poll::Ready(Ok(())) => {
                    this.received += buf.filled().len() - before;
                    if this.received >= H2_PREFACE_LEN {
                        this.deadline = None;
                    }
                }
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 connection preface within the handshake timeout",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HandshakeDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Counts its polls; ready at the second.
    #[derive(Default)]
    struct Polled(usize);

    impl Future for Polled {
        type Output = usize;

        fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<usize> {
            self.0 += 1;
            if self.0 == 2 {
                Poll::Ready(self.0)
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn a_woken_connection_is_requeued_once_while_other_calls_are_in_flight() {
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let in_flight = Arc::new(InFlight::default());
        let mut connection = pin!(Polled::default());
        let mut gathered = pin!(Gathered::new(connection.as_mut(), &in_flight));
        // Nothing else in flight: polled at once.
        assert!(gathered.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        // A call in flight: a wake-up's first poll only wakes the task again, then the real one.
        let call = InFlight::enter(&in_flight);
        assert!(gathered.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(gathered.as_mut().poll(&mut cx), Poll::Ready(2));
        drop(call);
    }
}
