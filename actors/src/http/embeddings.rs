//! `POST /v1/embeddings` (frontend spec §3.1): gate, the common first steps, validation and
//! tokenization on the blocking pool, then the embedding engine.

use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

use super::openai::{accept, reject};
use super::request::{error_response, PeerSocket};
use super::AppState;
use crate::error::ApiError;
use crate::metrics::{Endpoint, RequestType};

/// `POST /v1/embeddings`.
pub async fn embeddings(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    // A disabled endpoint family answers 404 with an empty body before anything else (§1.2).
    let Some(service) = state.embeddings.clone() else {
        return HttpResponse::NotFound().finish();
    };
    let accepted = match accept(&state, &req, payload).await {
        Ok(a) => a,
        Err(e) => return reject(&state, Endpoint::Embeddings, None, false, &e),
    };
    let started = Instant::now();
    let body = accepted.body.clone();
    let validating = service.clone();
    // JSON parsing and WordPiece over up to 2048 inputs: off the HTTP workers.
    let validated = web::block(move || validating.validate(&body))
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("validation task failed: {e}"))));
    let validated = match validated {
        Ok(v) => v,
        Err(e) => {
            return reject(
                &state,
                Endpoint::Embeddings,
                Some(&accepted.body),
                false,
                &e,
            )
        }
    };
    let model = validated.model.clone();
    let mut guard = state
        .metrics
        .request_guard(&model, Endpoint::Embeddings, RequestType::Unary);
    let work = service.embed(validated);
    let result = match req.conn_data::<PeerSocket>().cloned() {
        None => work.await,
        Some(peer) => tokio::select! {
            result = work => result,
            // The client hung up: dropping the request's future lets the engine skip its rows if
            // they have not been computed yet. Nobody reads this response.
            _ = peer.closed() => {
                guard.client_disconnected();
                return HttpResponse::build(StatusCode::from_u16(499).unwrap_or_default()).finish();
            }
        },
    };
    match result {
        Ok(response) => {
            guard.mark_success();
            state
                .metrics
                .observe_embedding_latency(&model, started.elapsed().as_secs_f64());
            HttpResponse::Ok().json(response)
        }
        Err(error) => {
            guard.mark_error(error.class.metric_label());
            error_response(&error, state.config.overload_status_code)
        }
    }
}
