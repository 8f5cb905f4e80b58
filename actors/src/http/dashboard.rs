//! `/dashboard`: one self-contained page (no build step, no CDN) showing the supervision tree, the
//! engines, the router's view of them, the requests in flight, and the recent restarts and
//! migrations. `GET /dashboard/events` streams the same picture as SSE (`event: state`, one frame
//! at each change of the tree and at least every [`TICK`], while the server is not draining); `GET /dashboard/state` answers it once as JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::AppState;

/// The page.
const PAGE: &str = include_str!("dashboard.html");

/// How often the event stream sends the picture when nothing happens (a restart, migration or
/// escalation sends it at once).
pub const TICK: Duration = Duration::from_millis(500);

/// `GET /dashboard`.
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("cache-control", "no-store"))
        .body(PAGE)
}

/// `GET /dashboard/state`.
pub async fn state(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("cache-control", "no-store"))
        .json(picture(&state).await)
}

/// `GET /dashboard/events`.
pub async fn events(state: web::Data<AppState>) -> HttpResponse {
    let frames = futures_util::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = state.supervisor.changed() => {}
            }
        }
        // A drain must not wait on dashboards: their streams end with it.
        if state.lifecycle.is_draining() {
            return None;
        }
        let frame = format!("event: state\ndata: {}\n\n", picture(&state).await);
        Some((
            Ok::<_, actix_web::Error>(web::Bytes::from(frame)),
            (state, false),
        ))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .insert_header(("x-accel-buffering", "no"))
        .streaming(frames)
}

/// Everything the page shows.
async fn picture(state: &AppState) -> Value {
    let snapshot = state.supervisor.snapshot().await;
    let (_, engines) = super::info::endpoints_and_instances(state);
    let at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64;
    json!({
        "model": state.model.name,
        "at_ms": at_ms,
        "tree": snapshot.as_ref().map(|s| &s.tree),
        "timeline": snapshot.as_ref().map(|s| s.timeline.as_slice()).unwrap_or_default(),
        "engines": engines,
        "requests_in_flight": state.lifecycle.in_flight(),
        "faults": state.faults.status(),
    })
}
