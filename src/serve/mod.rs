//! `tend run --listen ADDR:PORT` (SPEC 8.6): read-only HTTP endpoints on
//! the controller's runtime. `routes` answers requests; this file checks
//! the address, binds it, and runs the accept loop.
//!
//! Invariant: nothing served changes state (GET and HEAD only; no token,
//! retry or resume is made here). Everything is bounded: at most
//! `MAX_CONNECTIONS` connections, one request each (no keep-alive), the
//! request head within `HEAD_TIMEOUT` and 64 KiB, a connection's whole
//! life within `CONNECTION_TIMEOUT`, each request's reads within
//! `routes::WORK_TIMEOUT`; request bodies are never read.

mod pages;
mod routes;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::controller::pulse::Pulse;
use crate::metrics::Metrics;
use crate::store::StateDir;

/// Connections served at once; the next waits in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// The request line and headers must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection (request, work and response) never lives longer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head read.
const MAX_HEAD: usize = 64 * 1024;
/// At shutdown, connections in flight get this long to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// What the handlers read: the state dir's documents, the loop's pulse and
/// the metrics.
#[derive(Clone)]
pub struct App {
    pub state_dir: StateDir,
    pub pulse: Arc<Pulse>,
    pub metrics: Arc<Metrics>,
}

/// `--listen ADDR:PORT` as typed: an IP socket address, or `localhost:PORT`
/// (127.0.0.1).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{port}` is not a port number"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse().map_err(|_| {
        format!("`{s}` is not ADDR:PORT (e.g. 127.0.0.1:9100, [::1]:9100, localhost:9100)")
    })
}

/// A loopback address (127.0.0.0/8, ::1, or ::ffff:127.x.y.z).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Any address but loopback needs `--listen-public`: the endpoints are
/// unauthenticated.
pub fn check_address(addr: &SocketAddr, public: bool) -> Result<()> {
    if !is_loopback(addr) && !public {
        bail!(
            "--listen {addr} is not a loopback address, and the HTTP endpoints are unauthenticated: \
             listen on 127.0.0.1 (or ::1) and put a reverse proxy with authentication in front, \
             or pass --listen-public to serve on {addr} anyway"
        );
    }
    Ok(())
}

/// Bind the address now, before the controller starts work, so that a
/// port in use stops `tend run` with a clear error.
pub fn bind(addr: &SocketAddr) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).with_context(|| {
        format!(
            "cannot listen on {addr} (--listen): is another process using it? choose another address or port"
        )
    })?;
    l.set_nonblocking(true)
        .with_context(|| format!("cannot listen on {addr} (--listen)"))?;
    Ok(l)
}

/// Serve `app` on `listener` until `stop` turns true (or its sender is
/// dropped). Must be called on the runtime.
pub fn spawn(
    listener: std::net::TcpListener,
    app: App,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>> {
    let addr = listener.local_addr().context("the --listen socket")?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .context("the --listen socket on the runtime")?;
    tracing::info!(%addr, "http endpoints listening (read-only): /metrics /healthz /readyz /api/fleet /api/hosts/<host> /api/runs /");
    Ok(tokio::spawn(accept_loop(
        listener,
        routes::router(app),
        stop,
    )))
}

/// Resolves once `stop` says so, or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s,
            _ = stopped(&mut stop) => break,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, or a connection reset before
                // it was taken: wait a little rather than spin.
                tracing::warn!(error = %e, "http: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        conns.spawn(async move {
            let _slot = slot;
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(MAX_HEAD);
            let mut conn = std::pin::pin!(b.serve_connection(TokioIo::new(stream), service));
            let served = async {
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stopped(&mut stop) => {
                        conn.as_mut().graceful_shutdown();
                        conn.as_mut().await
                    }
                }
            };
            match tokio::time::timeout(CONNECTION_TIMEOUT, served).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "http: connection ended"),
                Err(_) => tracing::debug!(%peer, "http: connection took too long; closed"),
            }
        });
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        conns.abort_all();
    }
    tracing::info!("http endpoints stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_and_only_loopback_is_private() {
        let a = |s: &str| parse_listen(s).unwrap();
        assert_eq!(a("127.0.0.1:9100").port(), 9100);
        assert_eq!(a("localhost:9100"), a("127.0.0.1:9100"));
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen("9100").is_err());
        assert!(parse_listen("example.com:80").is_err());
        assert!(parse_listen("127.0.0.1:99999").is_err());
        for private in [
            "127.0.0.1:1",
            "127.1.2.3:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(&a(private)), "{private}");
            assert!(check_address(&a(private), false).is_ok());
        }
        for public in ["0.0.0.0:1", "[::]:1", "10.1.2.3:1", "192.0.2.1:1"] {
            assert!(!is_loopback(&a(public)), "{public}");
            let e = check_address(&a(public), false).unwrap_err().to_string();
            assert!(e.contains("--listen-public"), "{e}");
            assert!(check_address(&a(public), true).is_ok());
        }
    }

    #[test]
    fn a_port_in_use_is_an_error_naming_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = format!("{:#}", bind(&addr).unwrap_err());
        assert!(e.contains(&addr.to_string()), "{e}");
    }
}
