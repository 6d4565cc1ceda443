//! `tend run`: the controller. Holds the state dir's lock, binds the
//! `--listen` address if any, closes runs a crash left open, then watches,
//! reconciles and resyncs until SIGINT or SIGTERM, serving the read-only
//! HTTP endpoints meanwhile; exits 0 on a clean shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};

use super::exit;

/// How often the controller hands freed memory back ([`crate::alloc::trim`]).
const TRIM_EVERY: Duration = Duration::from_secs(10);
use crate::cli::Global;
use crate::controller::pulse::Pulse;
use crate::controller::{self, Event, real::Real, recover, watch as watches};
use crate::core::model;
use crate::metrics::Metrics;
use crate::serve;
use crate::settings::Settings;

/// How long a clean shutdown waits for blocking work nobody needs any more.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub fn run(g: &Global, listen: Option<SocketAddr>, listen_public: bool) -> Result<u8> {
    // A usage error, before anything else happens.
    if let Some(addr) = &listen {
        serve::check_address(addr, listen_public)?;
    }
    // The state dir and the first settings come from tend.yaml even when
    // the rest of the desired state is invalid: the controller starts,
    // reports the problems on every host it knows, and waits for a fix.
    let tree = crate::source::read_tree(&g.dir)?;
    let config = model::validate(&tree).state.config;
    let settings = Settings::resolve(g, config, None)?;
    let sd = settings.state_dir()?;
    sd.ensure()?;
    let _lock = super::lock_state_dir(&sd)?;
    // Bound before the controller starts work: a port in use stops here.
    let listener = listen.as_ref().map(serve::bind).transpose()?;
    tracing::info!(
        dir = %g.dir.display(),
        state_dir = %sd.root().display(),
        dispatch = settings.dispatch.as_str(),
        pid = std::process::id(),
        "tend run: controller starting"
    );
    if settings.dispatch == crate::core::spec::DispatchMode::Off {
        tracing::warn!(
            "dispatch mode is off: tend probes, plans and reports, and changes nothing on any host; set `dispatch: enforced` (or `canary`) in tend.yaml, or TEND_DISPATCH, to apply"
        );
    }
    if let Some(addr) = listen.filter(|a| !serve::is_loopback(a)) {
        tracing::warn!(
            %addr,
            "--listen-public: the HTTP endpoints are unauthenticated and now reachable beyond this machine; put a reverse proxy with authentication (and TLS) in front of them"
        );
    }
    let interrupted = recover::interrupted_runs(&sd).context("closing interrupted runs")?;
    if !interrupted.is_empty() {
        tracing::warn!(hosts = ?interrupted, "runs left unfinished were marked Interrupted; their hosts get a fresh pass");
    }

    let rt = super::runtime()?;
    let served = rt.block_on(async move {
        let (tx, rx) = mpsc::unbounded_channel();
        watches::signals(tx.clone())?;
        let paths = watches::Paths::resolve(&g.dir, sd.root())?;
        // History retention (SPEC 8.5): at start, then hourly, on a
        // blocking thread; the controller holds the state dir's lock. The
        // `history` settings are those tend.yaml had at start.
        let history = settings.config.history.clone();
        let retention_sd = sd.clone();
        tokio::spawn(async move {
            let mut hourly = tokio::time::interval(Duration::from_secs(3600));
            loop {
                hourly.tick().await;
                let (sd, h) = (retention_sd.clone(), history.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    crate::store::retention::sweep_now(&sd, &h)
                })
                .await;
            }
        });
        // Memory freed by passes goes back to the system (glibc keeps it
        // in its arenas otherwise: a long-running controller's RSS would be
        // its busiest moment's).
        tokio::spawn(async move {
            let mut every = tokio::time::interval(TRIM_EVERY);
            loop {
                every.tick().await;
                let _ = tokio::task::spawn_blocking(crate::alloc::trim).await;
            }
        });
        let metrics = Arc::new(Metrics::for_this_build());
        let pulse = Arc::new(Pulse::new());
        let real = Arc::new(Real::new(g.clone(), settings, sd.clone(), metrics.clone()));
        // The HTTP side stops with the controller: `stop` turns true (or is
        // dropped) when the loop has ended.
        let (stop, stopped) = watch::channel(false);
        let server = match listener {
            Some(l) => Some(serve::spawn(
                l,
                serve::App {
                    state_dir: sd.clone(),
                    pulse: pulse.clone(),
                    metrics,
                },
                stopped,
            )?),
            None => None,
        };
        let w = watches::Watches::start(paths, tx.clone())?;
        real.set_watches(w);
        // Retry requests left while no controller ran.
        if let Ok(entries) = std::fs::read_dir(sd.retry_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_file = e.file_type().is_ok_and(|t| t.is_file());
                if !name.starts_with('.') && is_file && super::retry::take(&e.path()) {
                    let _ = tx.send(Event::RetryRequested(name));
                }
            }
        }
        controller::run(real.clone(), rx, seed(), pulse).await;
        {
            let r = real.clone();
            let _ = tokio::task::spawn_blocking(move || r.flush_fleet()).await;
        }
        let _ = stop.send(true);
        if let Some(s) = server {
            let _ = s.await;
        }
        anyhow::Ok(())
    });
    // Every pass has finished; what may still run is a load of the desired
    // state (a slow `git`) that nobody waits for any more. Do not let it
    // hold the exit.
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    served?;
    Ok(exit::OK)
}

/// Jitter seed: different for every process start.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}
