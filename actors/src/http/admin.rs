//! `/admin/faults` (only with `faults.enabled` and `faults.admin_endpoint`): `GET` shows what is armed
//! and what has fired; `POST` arms one fault, body a [`FaultSpec`] such as
//! `{"kind": "engine_panic", "engine": 0, "after_tokens": 5}`.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::request::error_response;
use super::AppState;
use crate::error::ApiError;
use crate::faults::{FaultKind, FaultSpec};

/// `GET /admin/faults`.
pub async fn faults_status(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.faults.status())
}

/// `POST /admin/faults`.
pub async fn arm_fault(state: web::Data<AppState>, body: web::Bytes) -> HttpResponse {
    let overload = state.config.overload_status_code;
    let spec: FaultSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(e) => {
            let kinds: Vec<&str> = FaultKind::ALL.iter().map(|k| k.as_str()).collect();
            return error_response(
                &ApiError::bad_json(format!(
                    "{e} (expected a fault such as {{\"kind\": \"engine_panic\", \"engine\": 0, \"after_tokens\": 5}}; kinds: {})",
                    kinds.join(", ")
                )),
                overload,
            );
        }
    };
    if let Some(engine) = spec.engine {
        if !state.engines.contains(engine) {
            return error_response(
                &ApiError::validation(format!("no engine with instance id {engine}")),
                overload,
            );
        }
    }
    match state.faults.arm(spec.clone()) {
        Ok(()) => HttpResponse::Ok().json(json!({"armed": spec})),
        Err(error) => error_response(&error.into(), overload),
    }
}
