//! The routes of `tend run --listen` (SPEC 8.6) and the checks on what a
//! request names.
//!
//! Invariant: a path under the state dir is built only from a name that
//! passed its check here (a host of the inventory or the status dir, a run
//! id of exactly the run-id shape), never from raw input; every file read
//! runs on a blocking thread under `WORK_TIMEOUT`; every list is capped.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::{App, pages};
use crate::controller::pulse::{self, Readiness};
use crate::core::model::is_host_name;
use crate::core::report::{FleetStatus, HostStatus};
use crate::metrics::{self, FleetView};
use crate::store::db::Db;

/// A request's reads of the state dir must end within this (else 503).
pub const WORK_TIMEOUT: Duration = Duration::from_secs(10);
/// `/api/runs` without `limit`.
pub const DEFAULT_LIMIT: usize = 20;
/// The largest `limit` of `/api/runs`.
pub const MAX_LIMIT: usize = 200;
/// Host names listed in a `/readyz` answer.
const NAMES_SHOWN: usize = 20;

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/fleet", get(fleet))
        .route("/api/hosts/{host}", get(host))
        .route("/api/runs", get(runs))
        .route("/api/runs/{run_id}", get(run))
        .route("/api/hosts/{host}/runs", get(host_runs_api))
        .route("/api/hosts/{host}/plan", get(host_plan_api))
        .route("/api/runs/{run_id}/timeline", get(timeline_api))
        .route("/parts/fleet", get(fleet_part))
        .route("/hosts/{host}", get(host_page))
        .route("/parts/hosts/{host}", get(host_part))
        .route("/runs/{run_id}", get(run_page))
        .route("/runs/{run_id}/logs/{host}/{file}", get(step_log))
        .route("/assets/dash.css", get(css))
        .route("/assets/dash.js", get(js))
        .fallback(not_found)
        .layer(axum::middleware::map_response(common_headers))
        .with_state(app)
}

/// Every answer is about now: never cached, never sniffed as another type.
async fn common_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<axum::body::Body>,
) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body.into(),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({ "error": message.into() }).to_string();
    respond(status, JSON, body)
}

/// Run blocking reads off the runtime, within `WORK_TIMEOUT`.
async fn read<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    match tokio::time::timeout(WORK_TIMEOUT, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "http: a request's work failed");
            Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request failed",
            ))
        }
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "reading the state dir took too long",
        )),
    }
}

/// `limit` of `/api/runs?limit=N`: 1..=MAX_LIMIT, DEFAULT_LIMIT without
/// one; other parameters are ignored.
pub fn parse_limit(query: Option<&str>) -> Result<usize, String> {
    let mut limit = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "limit" {
            continue;
        }
        if limit.is_some() {
            return Err("`limit` given twice".into());
        }
        let n = value
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| format!("`limit` must be a whole number from 1 to {MAX_LIMIT}"))?;
        limit = Some(n);
    }
    Ok(limit.unwrap_or(DEFAULT_LIMIT))
}

/// The hosts the controller keeps (its last load), or, before the first
/// load, those with a status file.
fn kept_hosts(app: &App) -> Vec<String> {
    match app.pulse.hosts() {
        Some(h) => h,
        None => app.state_dir.status_hosts().unwrap_or_default(),
    }
}

/// A name `/api/hosts/<host>` may serve: a host name (SPEC: the inventory's
/// rule) among `known`, sorted.
pub fn is_known_host(name: &str, known: &[String]) -> bool {
    is_host_name(name)
        && name != "fleet"
        && known.binary_search_by(|k| k.as_str().cmp(name)).is_ok()
}

/// The hosts kept and those with a status file, sorted.
fn known_hosts(app: &App) -> Vec<String> {
    let mut hosts = app.pulse.hosts().unwrap_or_default();
    hosts.extend(app.state_dir.status_hosts().unwrap_or_default());
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Status documents of the kept hosts; a host without one (or with one
/// that does not parse) as `Unknown`.
fn statuses(app: &App, now: &str) -> Vec<HostStatus> {
    kept_hosts(app)
        .into_iter()
        .map(|h| match app.state_dir.read_status(&h) {
            Ok(Some(s)) => s,
            _ => HostStatus::new(h, now),
        })
        .collect()
}

/// `fleet.json`, or one made from the status files before it was written.
fn fleet_doc(app: &App) -> FleetStatus {
    if let Ok(Some(f)) = app.state_dir.read_fleet() {
        return f;
    }
    let now = crate::clock::now_rfc3339();
    FleetStatus::from_statuses(now.clone(), statuses(app, &now).iter())
}

async fn metrics(State(app): State<App>) -> Response {
    let text = read(move || {
        let now = crate::clock::now_rfc3339();
        let st = statuses(&app, &now);
        let rollout = app
            .state_dir
            .read_fleet()
            .ok()
            .flatten()
            .and_then(|f| f.rollout);
        let view = FleetView::from_statuses(st.iter(), rollout.as_ref(), app.pulse.queue_depth());
        app.metrics.render(&view)
    })
    .await;
    match text {
        Ok(t) => respond(StatusCode::OK, metrics::CONTENT_TYPE, t),
        Err(r) => r,
    }
}

async fn healthz(State(app): State<App>) -> Response {
    let limit = pulse::HEALTHY_WITHIN.as_secs();
    match app.pulse.since_beat() {
        Some(d) if app.pulse.healthy() => respond(
            StatusCode::OK,
            TEXT,
            format!("ok: the controller loop beat {:.1}s ago\n", d.as_secs_f64()),
        ),
        Some(d) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!(
                "stale: the controller loop last beat {:.1}s ago (more than {limit}s)\n",
                d.as_secs_f64()
            ),
        ),
        None => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "stale: the controller loop has not started\n",
        ),
    }
}

async fn readyz(State(app): State<App>) -> Response {
    match app.pulse.readiness() {
        Readiness::Ready { hosts } => respond(
            StatusCode::OK,
            TEXT,
            format!("ready: every host ({hosts}) has had a pass\n"),
        ),
        Readiness::NotLoaded => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: the desired state is not loaded yet\n",
        ),
        Readiness::Waiting { hosts, of } => {
            let mut names = hosts
                .iter()
                .take(NAMES_SHOWN)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if hosts.len() > NAMES_SHOWN {
                names.push_str(&format!(" and {} more", hosts.len() - NAMES_SHOWN));
            }
            respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!(
                    "not ready: {} of {of} hosts have not had a pass yet: {names}\n",
                    hosts.len()
                ),
            )
        }
    }
}

async fn fleet(State(app): State<App>) -> Response {
    let body = read(move || match app.state_dir.fleet_bytes() {
        Ok(Some(b)) => Ok(b),
        Ok(None) => serde_json::to_vec_pretty(&fleet_doc(&app)).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    })
    .await;
    match body {
        Ok(Ok(b)) => respond(StatusCode::OK, JSON, b),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(r) => r,
    }
}

async fn host(State(app): State<App>, Path(name): Path<String>) -> Response {
    let body = read(move || -> Result<Vec<u8>, Response> {
        if !is_known_host(&name, &known_hosts(&app)) {
            return Err(error(
                StatusCode::NOT_FOUND,
                "no such host in the inventory or the state dir",
            ));
        }
        match app.state_dir.status_bytes(&name) {
            Ok(Some(b)) => Ok(b),
            // Kept, never probed: what `tend status` shows, `Unknown`.
            Ok(None) => {
                let s = HostStatus::new(name, &crate::clock::now_rfc3339());
                serde_json::to_vec_pretty(&s)
                    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
            }
            Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        }
    })
    .await;
    match body {
        Ok(Ok(b)) => respond(StatusCode::OK, JSON, b),
        Ok(Err(r)) | Err(r) => r,
    }
}

async fn runs(State(app): State<App>, RawQuery(query): RawQuery) -> Response {
    let limit = match parse_limit(query.as_deref()) {
        Ok(n) => n,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let body = read(move || list_runs(&app, limit)).await;
    match body {
        Ok(Ok(b)) => respond(StatusCode::OK, JSON, b),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(r) => r,
    }
}

/// The `result.json` of the newest `limit` finished runs, newest first (by
/// start time, from SQLite); a run still under way has none yet.
fn list_runs(app: &App, limit: usize) -> Result<Vec<u8>, String> {
    let sd = &app.state_dir;
    let db = Db::open_read_only(&sd.db_path()).map_err(|e| e.to_string())?;
    let mut docs = Vec::new();
    if let Some(db) = db {
        // Runs under way (at most one per pass running) are skipped: ask
        // for a few more rows than are wanted.
        let rows = db.runs(limit + 64).map_err(|e| e.to_string())?;
        for r in rows {
            if docs.len() == limit {
                break;
            }
            let id = &r.run.run_id;
            if !crate::clock::is_run_id(id) {
                continue;
            }
            match sd.run_result_bytes(id) {
                Ok(Some(b)) => match serde_json::from_slice::<serde_json::Value>(&b) {
                    Ok(v) => docs.push(v),
                    Err(e) => {
                        tracing::warn!(run_id = %id, error = %e, "http: result.json does not parse; left out")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(run_id = %id, error = %e, "http: result.json unreadable; left out")
                }
            }
        }
    }
    serde_json::to_vec_pretty(&docs).map_err(|e| e.to_string())
}

async fn run(State(app): State<App>, Path(id): Path<String>) -> Response {
    if !crate::clock::is_run_id(&id) {
        return error(StatusCode::NOT_FOUND, NOT_RUN_ID);
    }
    let body = read(move || app.state_dir.run_result_bytes(&id)).await;
    match body {
        Ok(Ok(Some(b))) => respond(StatusCode::OK, JSON, b),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            "no such run, or it has no result.json yet",
        ),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(r) => r,
    }
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no route {}: see / for the routes",
            uri.path().chars().take(200).collect::<String>()
        ),
    )
}

/// A stylesheet, a script and HTML pages: only from here, nothing inline,
/// nothing from elsewhere.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// Runs a host page lists (and charts).
const HOST_RUNS: usize = 20;
/// Bytes of a step log a page shows.
pub const LOG_MAX: usize = 256 * 1024;
/// Bytes of a timeline read for a page or `/api/runs/<id>/timeline`.
const TIMELINE_MAX: usize = 16 * 1024 * 1024;

fn html(status: StatusCode, page: String) -> Response {
    let mut r = respond(status, HTML, page);
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    r
}

/// An error as a page (for the HTML routes).
fn html_error(status: StatusCode, message: &str) -> Response {
    let main = format!(
        "<section class=\"summary st-bad\"><h1>{}</h1><p class=\"msg\">{}</p><p><a href=\"/\">the fleet</a></p></section>\n",
        status.as_u16(),
        pages::esc(message)
    );
    html(status, pages::layout("error", "", None, &main))
}

fn now_epoch() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The fleet page's `<main>`, from `fleet.json` (tags, rollout) and each
/// kept host's status file.
fn fleet_main(app: &App) -> String {
    let fleet = fleet_doc(app);
    let now = crate::clock::now_rfc3339();
    let mut hosts = kept_hosts(app);
    hosts.extend(fleet.hosts.iter().map(|h| h.host.clone()));
    hosts.sort();
    hosts.dedup();
    let statuses: BTreeMap<String, HostStatus> = hosts
        .into_iter()
        .filter(|h| is_host_name(h))
        .map(|h| {
            let s = match app.state_dir.read_status(&h) {
                Ok(Some(s)) => s,
                _ => HostStatus::new(h.clone(), &now),
            };
            (h, s)
        })
        .collect();
    pages::fleet_main(&fleet, &statuses, now_epoch())
}

async fn index(State(app): State<App>) -> Response {
    match read(move || pages::fleet_page(&fleet_main(&app))).await {
        Ok(page) => html(StatusCode::OK, page),
        Err(r) => r,
    }
}

async fn fleet_part(State(app): State<App>) -> Response {
    match read(move || fleet_main(&app)).await {
        Ok(part) => html(StatusCode::OK, part),
        Err(r) => r,
    }
}

/// The runs of `host` a page lists, newest first, with the durations from
/// each run's `result.json`.
fn host_runs(app: &App, host: &str) -> Vec<pages::HostRunView> {
    let Ok(Some(db)) = Db::open_read_only(&app.state_dir.db_path()) else {
        return Vec::new();
    };
    let rows = db.host_runs(host, HOST_RUNS).unwrap_or_default();
    rows.into_iter()
        .map(|(run_id, started_at, outcome, reason)| {
            let o = crate::clock::is_run_id(&run_id)
                .then(|| app.state_dir.read_run_result(&run_id).ok().flatten())
                .flatten()
                .and_then(|r| r.host_outcomes.into_iter().find(|o| o.host == host));
            pages::HostRunView {
                run_id,
                started_at,
                outcome,
                reason,
                probe_ms: o.as_ref().and_then(|o| o.probe_ms),
                apply_ms: o.as_ref().and_then(|o| o.apply_ms),
            }
        })
        .collect()
}

/// The host page's `<main>`, or None for a host that is neither kept nor
/// has a status file.
fn host_main(app: &App, name: &str) -> Option<String> {
    if !is_known_host(name, &known_hosts(app)) {
        return None;
    }
    let st = match app.state_dir.read_status(name) {
        Ok(Some(s)) => s,
        _ => HostStatus::new(name, &crate::clock::now_rfc3339()),
    };
    let pending = app.state_dir.read_pending(name).ok().flatten();
    let runs = host_runs(app, name);
    Some(pages::host_main(
        &st,
        pending.as_deref(),
        &runs,
        now_epoch(),
    ))
}

const NO_HOST: &str = "no such host in the inventory or the state dir";

async fn host_page(State(app): State<App>, Path(name): Path<String>) -> Response {
    let n = name.clone();
    match read(move || host_main(&app, &n)).await {
        Ok(Some(main)) => {
            let crumbs = format!(" / <a href=\"/hosts/{0}\">{0}</a>", pages::esc(&name));
            let live = format!("/parts/hosts/{name}");
            html(
                StatusCode::OK,
                pages::layout(&name, &crumbs, Some(&live), &main),
            )
        }
        Ok(None) => html_error(StatusCode::NOT_FOUND, NO_HOST),
        Err(r) => r,
    }
}

async fn host_part(State(app): State<App>, Path(name): Path<String>) -> Response {
    match read(move || host_main(&app, &name)).await {
        Ok(Some(main)) => html(StatusCode::OK, main),
        Ok(None) => error(StatusCode::NOT_FOUND, NO_HOST),
        Err(r) => r,
    }
}

async fn host_runs_api(State(app): State<App>, Path(name): Path<String>) -> Response {
    let body = read(move || {
        if !is_known_host(&name, &known_hosts(&app)) {
            return None;
        }
        let runs: Vec<Value> = host_runs(&app, &name)
            .into_iter()
            .map(|r| {
                json!({
                    "run_id": r.run_id,
                    "started_at": r.started_at,
                    "outcome": r.outcome,
                    "reason": r.reason,
                    "probe_ms": r.probe_ms,
                    "apply_ms": r.apply_ms,
                })
            })
            .collect();
        Some(json!({ "host": name, "runs": runs }).to_string())
    })
    .await;
    match body {
        Ok(Some(b)) => respond(StatusCode::OK, JSON, b),
        Ok(None) => error(StatusCode::NOT_FOUND, NO_HOST),
        Err(r) => r,
    }
}

async fn host_plan_api(State(app): State<App>, Path(name): Path<String>) -> Response {
    let body = read(move || {
        if !is_known_host(&name, &known_hosts(&app)) {
            return None;
        }
        let text = app.state_dir.read_pending(&name).ok().flatten();
        Some(json!({ "host": name, "pending_plan": text }).to_string())
    })
    .await;
    match body {
        Ok(Some(b)) => respond(StatusCode::OK, JSON, b),
        Ok(None) => error(StatusCode::NOT_FOUND, NO_HOST),
        Err(r) => r,
    }
}

/// A run's timeline events as JSON values, at most `TIMELINE_MAX` bytes of
/// them; None when the run has no timeline.
fn read_timeline(app: &App, id: &str) -> Option<Vec<Value>> {
    use std::io::Read;
    let path = app.state_dir.run_dir(id).join("timeline.jsonl");
    let f = std::fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    f.take(TIMELINE_MAX as u64).read_to_end(&mut buf).ok()?;
    Some(
        buf.split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect(),
    )
}

async fn timeline_api(State(app): State<App>, Path(id): Path<String>) -> Response {
    if !crate::clock::is_run_id(&id) {
        return error(StatusCode::NOT_FOUND, NOT_RUN_ID);
    }
    match read(move || read_timeline(&app, &id).map(|t| Value::Array(t).to_string())).await {
        Ok(Some(b)) => respond(StatusCode::OK, JSON, b),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such run, or it has no timeline"),
        Err(r) => r,
    }
}

const NOT_RUN_ID: &str = "not a run id (r-YYYYMMDDTHHMMSSZ-xxxx)";

async fn run_page(State(app): State<App>, Path(id): Path<String>) -> Response {
    if !crate::clock::is_run_id(&id) {
        return html_error(StatusCode::NOT_FOUND, NOT_RUN_ID);
    }
    let i = id.clone();
    let page = read(move || {
        let r = app.state_dir.read_run_result(&i).ok().flatten()?;
        let tl = read_timeline(&app, &i).unwrap_or_default();
        Some(pages::run_main(&r, &tl))
    })
    .await;
    match page {
        Ok(Some(main)) => {
            let crumbs = format!(" / run <a href=\"/runs/{0}\">{0}</a>", pages::esc(&id));
            html(StatusCode::OK, pages::layout(&id, &crumbs, None, &main))
        }
        Ok(None) => html_error(
            StatusCode::NOT_FOUND,
            "no such run, or it has no result.json yet",
        ),
        Err(r) => r,
    }
}

async fn step_log(
    State(app): State<App>,
    Path((id, host, file)): Path<(String, String, String)>,
) -> Response {
    if !crate::clock::is_run_id(&id) || !is_host_name(&host) || !pages::is_log_name(&file) {
        return error(StatusCode::NOT_FOUND, "no such step log");
    }
    match read(move || app.state_dir.read_step_log(&id, &host, &file, LOG_MAX)).await {
        Ok(Ok(Some((mut bytes, more)))) => {
            if more {
                bytes.extend_from_slice(
                    format!("\n… (cut at {LOG_MAX} bytes: the whole log is in the state dir)\n")
                        .as_bytes(),
                );
            }
            respond(StatusCode::OK, TEXT, bytes)
        }
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "no such step log"),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(r) => r,
    }
}

async fn css() -> Response {
    respond(
        StatusCode::OK,
        "text/css; charset=utf-8",
        include_str!("assets/dash.css"),
    )
}

async fn js() -> Response {
    respond(
        StatusCode::OK,
        "text/javascript; charset=utf-8",
        include_str!("assets/dash.js"),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::controller::pulse::Pulse;
    use crate::metrics::Metrics;
    use crate::store::StateDir;

    #[test]
    fn limits_parse_within_bounds() {
        assert_eq!(parse_limit(None), Ok(DEFAULT_LIMIT));
        assert_eq!(parse_limit(Some("")), Ok(DEFAULT_LIMIT));
        assert_eq!(parse_limit(Some("limit=5")), Ok(5));
        assert_eq!(parse_limit(Some("x=1&limit=200")), Ok(200));
        for bad in [
            "limit=0",
            "limit=201",
            "limit=-1",
            "limit=",
            "limit",
            "limit=abc",
            "limit=1e3",
            "limit=%31",
            "limit=99999999999999999999999",
            "limit=1&limit=2",
        ] {
            assert!(parse_limit(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_known_host_names_are_served() {
        let known = vec!["a".to_string(), "web-1".to_string()];
        assert!(is_known_host("a", &known));
        assert!(is_known_host("web-1", &known));
        for bad in [
            "b", "", ".", "..", "../a", "a/..", "A", "fleet", "a.json", "a\0",
        ] {
            assert!(!is_known_host(bad, &known), "{bad:?}");
        }
        // A name that is not a host name is refused even when a file has it.
        assert!(!is_known_host("..", &["..".to_string()]));
        assert!(!is_known_host("fleet", &["fleet".to_string()]));
    }

    /// A request through the router, without a socket.
    async fn get(app: &App, uri: &str) -> (StatusCode, String, String) {
        use tower::ServiceExt;
        let req = axum::http::Request::get(uri)
            .body(axum::body::Body::empty())
            .unwrap();
        let res = router(app.clone()).oneshot(req).await.unwrap();
        let status = res.status();
        let ctype = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, ctype, String::from_utf8_lossy(&body).into_owned())
    }

    fn app(dir: &std::path::Path) -> App {
        let sd = StateDir::new(dir);
        sd.ensure().unwrap();
        App {
            state_dir: sd,
            pulse: Arc::new(Pulse::new()),
            metrics: Arc::new(Metrics::new("0.1.0", "test")),
        }
    }

    #[tokio::test]
    async fn routes_answer_with_their_status_and_type() {
        let tmp = tempfile::tempdir().unwrap();
        let app = app(tmp.path());
        // Before the loop started: not healthy, not ready.
        assert_eq!(
            get(&app, "/healthz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            get(&app, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        app.pulse.beat();
        app.pulse.set_hosts(&["a".into()]);
        assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
        let (code, _, body) = get(&app, "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("1 of 1 hosts") && body.contains(": a"),
            "{body}"
        );
        app.pulse.passed("a");
        assert_eq!(get(&app, "/readyz").await.0, StatusCode::OK);

        let (code, ctype, body) = get(&app, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(ctype, metrics::CONTENT_TYPE);
        assert!(body.contains("tend_hosts{phase=\"Unknown\"} 1"), "{body}");

        // A kept host that was never probed is `Unknown`; others are 404.
        let (code, ctype, body) = get(&app, "/api/hosts/a").await;
        assert_eq!((code, ctype.as_str()), (StatusCode::OK, JSON));
        assert!(body.contains("\"phase\": \"Unknown\""), "{body}");
        for uri in [
            "/api/hosts/b",
            "/api/hosts/..",
            "/api/hosts/..%2F..%2Fetc%2Fpasswd",
            "/api/hosts/fleet",
            "/api/runs/..%2F..",
            "/api/runs/r-20261203T100000Z-aaaa",
            "/api/runs/r-20261203T100000Z-aaaa%2F..",
            "/api/runs/a/b",
            "/nope",
        ] {
            let (code, ctype, _) = get(&app, uri).await;
            assert_eq!(
                (code, ctype.as_str()),
                (StatusCode::NOT_FOUND, JSON),
                "{uri}"
            );
        }
        let (code, ctype, body) = get(&app, "/api/fleet").await;
        assert_eq!((code, ctype.as_str()), (StatusCode::OK, JSON));
        assert!(body.contains("\"host\": \"a\""), "{body}");
        let (code, _, body) = get(&app, "/api/runs").await;
        assert_eq!((code, body.trim()), (StatusCode::OK, "[]"));
        assert_eq!(
            get(&app, "/api/runs?limit=0").await.0,
            StatusCode::BAD_REQUEST
        );
        let (code, ctype, body) = get(&app, "/").await;
        assert_eq!((code, ctype.as_str()), (StatusCode::OK, HTML));
        assert!(body.contains("href=\"/hosts/a\""), "{body}");
        assert!(body.contains("data-live=\"/parts/fleet\""), "{body}");
        for route in ["/api/fleet", "/api/runs", "/metrics", "/healthz", "/readyz"] {
            assert!(body.contains(&format!("href=\"{route}\"")), "{route}");
        }
        assert!(!body.contains("<script>"), "no inline script");
        for (uri, ctype) in [
            ("/parts/fleet", HTML),
            ("/hosts/a", HTML),
            ("/parts/hosts/a", HTML),
            ("/assets/dash.css", "text/css; charset=utf-8"),
            ("/assets/dash.js", "text/javascript; charset=utf-8"),
            ("/api/hosts/a/runs", JSON),
            ("/api/hosts/a/plan", JSON),
        ] {
            let (code, got, _) = get(&app, uri).await;
            assert_eq!((code, got.as_str()), (StatusCode::OK, ctype), "{uri}");
        }
        // Pages that name nothing known are 404 pages; logs and timelines
        // are only of the shape the state dir writes.
        for (uri, ctype) in [
            ("/hosts/b", HTML),
            ("/hosts/..", HTML),
            ("/runs/r-20261203T100000Z-aaaa", HTML),
            ("/runs/..%2F..%2Fetc", HTML),
            ("/parts/hosts/b", JSON),
            ("/api/hosts/b/runs", JSON),
            ("/api/hosts/..%2Fa/plan", JSON),
            ("/api/runs/r-20261203T100000Z-aaaa/timeline", JSON),
            ("/api/runs/..%2F..%2Fetc/timeline", JSON),
            ("/runs/r-20261203T100000Z-aaaa/logs/a/0-x.log", JSON),
            (
                "/runs/r-20261203T100000Z-aaaa/logs/a/..%2F..%2Fresult.json",
                JSON,
            ),
            (
                "/runs/r-20261203T100000Z-aaaa/logs/..%2F..%2F..%2Fstatus/a.json",
                JSON,
            ),
            ("/runs/r-20261203T100000Z-aaaa/logs/a/0-x.log%2F..", JSON),
        ] {
            let (code, got, _) = get(&app, uri).await;
            assert_eq!(
                (code, got.as_str()),
                (StatusCode::NOT_FOUND, ctype),
                "{uri}"
            );
        }
    }

    #[tokio::test]
    async fn nothing_but_get_is_served() {
        use tower::ServiceExt;
        let tmp = tempfile::tempdir().unwrap();
        let app = app(tmp.path());
        for method in ["POST", "PUT", "DELETE", "PATCH"] {
            let req = axum::http::Request::builder()
                .method(method)
                .uri("/api/fleet")
                .body(axum::body::Body::from("{}"))
                .unwrap();
            let res = router(app.clone()).oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        }
    }
}
