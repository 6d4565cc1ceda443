//! The routes of `tend run --listen` (SPEC 8.6) and the checks on what a
//! request names.
//!
//! Invariant: a path under the state dir is built only from a name that
//! passed its check here (a host of the inventory or the status dir, a run
//! id of exactly the run-id shape), never from raw input; every file read
//! runs on a blocking thread under `WORK_TIMEOUT`; every list is capped.

use std::time::Duration;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::App;
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
        return error(
            StatusCode::NOT_FOUND,
            "not a run id (r-YYYYMMDDTHHMMSSZ-xxxx)",
        );
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

/// Text for HTML: `&`, `<`, `>`, `"` and `'` escaped.
fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The placeholder page: each host's phase from `fleet.json`, and links to
/// the other routes. No script, nothing fetched from elsewhere.
fn index_page(f: &FleetStatus) -> String {
    let mut rows = String::new();
    for h in &f.hosts {
        let name = html_escape(&h.host);
        let p = &h.pending;
        rows.push_str(&format!(
            "<tr><td><a href=\"/api/hosts/{name}\">{name}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            html_escape(&metrics::word(&h.phase)),
            if h.converged { "yes" } else { "no" },
            p.create + p.update + p.delete,
        ));
    }
    let rollout = match &f.rollout {
        Some(r) => format!(
            "<p>Rollout of {}: {}, wave {} of {}.</p>\n",
            html_escape(&r.revision),
            html_escape(&r.state),
            r.wave,
            r.waves
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html>
<html lang=\"en\">
<head><meta charset=\"utf-8\"><title>tend</title></head>
<body>
<h1>tend</h1>
<p>{} host(s), as of {}. A read-only page; the dashboard is to come.</p>
{rollout}<table>
<tr><th>host</th><th>phase</th><th>converged</th><th>pending</th></tr>
{rows}</table>
<ul>
<li><a href=\"/api/fleet\">/api/fleet</a> (fleet.json)</li>
<li><a href=\"/api/runs\">/api/runs</a> (recent runs; ?limit=N, at most {MAX_LIMIT})</li>
<li><a href=\"/metrics\">/metrics</a> (Prometheus)</li>
<li><a href=\"/healthz\">/healthz</a>, <a href=\"/readyz\">/readyz</a></li>
</ul>
</body>
</html>
",
        f.hosts.len(),
        html_escape(&f.generated_at),
    )
}

async fn index(State(app): State<App>) -> Response {
    match read(move || index_page(&fleet_doc(&app))).await {
        Ok(page) => {
            let mut r = respond(StatusCode::OK, HTML, page);
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'"),
            );
            r
        }
        Err(r) => r,
    }
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

    #[test]
    fn the_page_escapes_and_links_each_host() {
        let mut s = HostStatus::new("web-1", "now");
        s.phase = crate::core::report::Phase::Running;
        let mut f = FleetStatus::from_statuses("2026-12-03T10:00:00.000Z", [&s]);
        f.generated_at = "<b>".into();
        let page = index_page(&f);
        assert!(page.contains("<a href=\"/api/hosts/web-1\">web-1</a></td><td>Running</td>"));
        assert!(page.contains("&lt;b&gt;") && !page.contains("<b>"));
        assert!(!page.contains("<script"));
        for route in ["/api/fleet", "/api/runs", "/metrics", "/healthz", "/readyz"] {
            assert!(page.contains(&format!("href=\"{route}\"")), "{route}");
        }
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
        assert!(body.contains("/api/hosts/a"), "{body}");
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
