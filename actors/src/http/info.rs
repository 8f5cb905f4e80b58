//! The non-inference routes: models, health, liveness, metrics, and the JSON answers for unmatched
//! routes and wrong methods (the OpenAPI document is in [`super::openapi`]).

use actix_web::http::header::CONTENT_TYPE;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::request::error_response;
use super::AppState;
use crate::error::{ApiError, ErrorClass};

fn model_object(name: &str, context_window: u64) -> Value {
    json!({
        "id": name,
        "object": "model",
        "created": crate::protocol::unix_now(),
        "owned_by": "dynamix",
        "context_window": context_window,
    })
}

/// Every served model: the chat model, then the embedding model when that family is on, then the
/// workers' other Tokens models and their Text models.
fn model_objects(state: &AppState) -> Vec<(String, Value)> {
    let mut models = Vec::new();
    // A frontend of workers lists its model only while a worker serves it, as Dynamo's does: a
    // model whose last worker stopped leaves the list.
    let frontend = state.cluster.status.get().is_some();
    if !frontend || state.engines.snapshot().iter().any(serving) {
        let context = u64::from(state.model.context_length);
        for name in std::iter::once(&state.model.name).chain(&state.model.aliases) {
            models.push((name.clone(), model_object(name, context)));
        }
    }
    if let Some(card) = state.embeddings.as_ref().map(|e| e.card()) {
        models.push((
            card.name.clone(),
            model_object(&card.name, card.max_tokens as u64),
        ));
    }
    if let Some(lanes) = state.cluster.lanes.get() {
        for (name, lane) in lanes.list() {
            if !models.iter().any(|(listed, _)| *listed == name) {
                let object = model_object(&name, u64::from(lane.context_length));
                models.push((name, object));
            }
        }
    }
    if let Some(text) = state.cluster.text_models.get() {
        for model in text.list() {
            if !models.iter().any(|(name, _)| *name == model.name) {
                let object = model_object(&model.name, model.context_length);
                models.push((model.name, object));
            }
        }
    }
    models
}

/// `GET /v1/models`.
pub async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    if state.lifecycle.is_draining() {
        return error_response(&ApiError::not_ready(), state.config.overload_status_code);
    }
    let data: Vec<Value> = model_objects(&state).into_iter().map(|(_, m)| m).collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}` (ids may contain `/`; `<id>/ready` gives readiness detail).
pub async fn get_model(path: web::Path<String>, state: web::Data<AppState>) -> HttpResponse {
    let id = path.into_inner();
    let id = id.trim_start_matches('/');
    if let Some((_, object)) = model_objects(&state)
        .into_iter()
        .find(|(name, _)| name == id)
    {
        if state.lifecycle.is_draining() {
            return error_response(&ApiError::not_ready(), state.config.overload_status_code);
        }
        return HttpResponse::Ok().json(object);
    }
    if id.strip_suffix("/ready") == Some(state.model.name.as_str()) {
        let ready = !state.lifecycle.is_draining() && !state.engines.is_empty();
        return HttpResponse::Ok().json(json!({
            "model": state.model.name,
            "ready": ready,
            "namespaces": [{"namespace": "dynamix", "ready": ready, "instances": state.engines.len()}],
        }));
    }
    if let Some(card) = state
        .embeddings
        .as_ref()
        .map(|e| e.card())
        .filter(|card| id.strip_suffix("/ready") == Some(card.name.as_str()))
    {
        let ready = !state.lifecycle.is_draining();
        return HttpResponse::Ok().json(json!({
            "model": card.name,
            "ready": ready,
            "namespaces": [{"namespace": "dynamix", "ready": ready, "instances": 1}],
        }));
    }
    error_response(
        &ApiError::model_not_found(),
        state.config.overload_status_code,
    )
}

/// Whether an engine still serves (not retired by its supervisor).
fn serving(engine: &crate::engine::registry::EngineInfo) -> bool {
    !engine
        .load
        .retired
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// The engines of the frontend's own model, then those of its other Tokens models (a worker that
/// serves several of them is listed once).
fn all_engines(state: &AppState) -> Vec<crate::engine::registry::EngineInfo> {
    let mut engines = state.engines.snapshot();
    if let Some(lanes) = state.cluster.lanes.get() {
        for (_, lane) in lanes.list() {
            for engine in lane.engines.snapshot() {
                if !engines.iter().any(|e| e.instance_id == engine.instance_id) {
                    engines.push(engine);
                }
            }
        }
    }
    engines
}

/// The live instances of the workers' Text models, as `/health` lists instances.
fn text_instances(state: &AppState, listed: &[Value]) -> Vec<Value> {
    let mut instances: Vec<Value> = Vec::new();
    let Some(text) = state.cluster.text_models.get() else {
        return instances;
    };
    for model in text.list() {
        for instance in model.instances {
            let id = json!(instance.instance_id);
            if listed
                .iter()
                .chain(&instances)
                .any(|i| i["instance_id"] == id)
            {
                continue;
            }
            instances.push(json!({
                "namespace": instance.namespace,
                "component": instance.component,
                "endpoint": instance.endpoint,
                "instance_id": instance.instance_id,
                "transport": format!("tcp://{}", instance.tcp_address().unwrap_or_default()),
                "engine": "text",
            }));
        }
    }
    instances
}

pub(crate) fn endpoints_and_instances(state: &AppState) -> (Vec<String>, Vec<Value>) {
    let engines = all_engines(state);
    let mut endpoints: Vec<String> = engines
        .iter()
        .map(|e| format!("dyn://{}", e.endpoint_id.join(".")))
        .collect();
    let mut instances: Vec<Value> = engines
        .iter()
        .filter(|e| serving(e))
        .map(|e| {
            let mut instance = json!({
                "namespace": e.endpoint_id[0],
                "component": e.endpoint_id[1],
                "endpoint": e.endpoint_id[2],
                "instance_id": e.instance_id,
                "transport": e.transport,
                "engine": e.engine,
                "device": e.device,
                "active_requests": e.load.active(),
                "generated_tokens": e.load.generated_tokens.load(std::sync::atomic::Ordering::Relaxed),
                "cancelled_requests": e.load.cancelled.load(std::sync::atomic::Ordering::Relaxed),
                "inflight_requests": state.inflight.on_engine(e.instance_id).len(),
                "restarts": e.load.restarts.load(std::sync::atomic::Ordering::Relaxed),
            });
            if let Some(plane) = e.request_plane {
                instance["request_plane"] = json!(plane);
            }
            if let Some(mocker) = &e.mocker {
                // The simulated engine's own view of its cache and queues (read-only snapshot).
                instance["kv_cache"] = json!({
                    "active_blocks": mocker.active_decode_blocks(),
                    "inactive_blocks": mocker.inactive_blocks(),
                    "waiting_requests": mocker.waiting_requests(),
                    "running_requests": mocker.running_requests(),
                    "prefill_tokens": mocker.prefill_tokens(),
                    "preemptions": mocker.preemptions(),
                    "prefix_hit_rate": mocker.prefix_hit_rate(),
                });
            }
            if let Some(load) = e.remote.as_ref().and_then(|r| r.lock().ok().and_then(|l| l.clone())) {
                instance["load_metrics"] = json!(load);
            }
            if let Some(model) = &e.model {
                use std::sync::atomic::Ordering::Relaxed;
                instance["batch"] = json!({
                    "waiting_requests": model.waiting.load(Relaxed),
                    "running_requests": model.running.load(Relaxed),
                    "kv_tokens": model.kv_tokens.load(Relaxed),
                    "steps": model.steps.load(Relaxed),
                    "prefill_tokens": model.prefill_tokens.load(Relaxed),
                    "decode_tokens": model.decode_tokens.load(Relaxed),
                });
            }
            if let Some(gpu) = &e.gpu {
                use std::sync::atomic::Ordering::Relaxed;
                instance["gpu"] = json!({
                    "name": gpu.device_name(),
                    "memory_total_bytes": gpu.memory_total.load(Relaxed),
                    "memory_used_bytes": gpu.memory_used.load(Relaxed),
                    "kv_blocks_used": gpu.kv_blocks_used.load(Relaxed),
                    "kv_blocks_total": gpu.kv_blocks_total.load(Relaxed),
                    "running_requests": gpu.running.load(Relaxed),
                    "waiting_requests": gpu.waiting.load(Relaxed),
                    "tokens_per_second": gpu.tokens_per_second(),
                    "steps": gpu.steps.load(Relaxed),
                    "prefill_tokens": gpu.prefill_tokens.load(Relaxed),
                    "cached_prompt_tokens": gpu.cached_tokens.load(Relaxed),
                    "decode_tokens": gpu.decode_tokens.load(Relaxed),
                    "preemptions": gpu.preemptions.load(Relaxed),
                    "weights_load_ms": gpu.load_ms.load(Relaxed),
                });
            }
            instance
        })
        .collect();
    let text = text_instances(state, &instances);
    endpoints.extend(text.iter().map(|i| {
        format!(
            "dyn://{}.{}.{}",
            i["namespace"].as_str().unwrap_or_default(),
            i["component"].as_str().unwrap_or_default(),
            i["endpoint"].as_str().unwrap_or_default()
        )
    }));
    endpoints.sort();
    endpoints.dedup();
    instances.extend(text);
    (endpoints, instances)
}

/// `GET /health`: readiness. Engines given up on by their supervisor are listed under
/// `failed_instances` with the reason; with none left to serve, the service is unhealthy (503).
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let (endpoints, instances) = endpoints_and_instances(&state);
    let failed: Vec<_> = state
        .engines
        .snapshot()
        .iter()
        .filter_map(|e| {
            e.load.failure().map(|reason| {
                json!({
                    "instance_id": e.instance_id,
                    "device": e.device,
                    "reason": reason,
                    "restarts": e.load.restarts.load(std::sync::atomic::Ordering::Relaxed),
                })
            })
        })
        .collect();
    let serving = instances.len();
    let (mut response, status, message) = if state.lifecycle.is_draining() {
        (
            HttpResponse::ServiceUnavailable(),
            "shutting_down",
            "Service is shutting down".to_string(),
        )
    } else if serving == 0 {
        let why = failed
            .iter()
            .map(|f| f["reason"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>();
        let message = if state.cluster.status.get().is_some() {
            // A frontend of workers (upstream's wording); `cluster` below says why.
            "No endpoints available: no worker is registered".to_string()
        } else if why.is_empty() {
            "No engine is serving: every engine has been removed".to_string()
        } else {
            format!("No engine is serving: {}", why.join("; "))
        };
        (HttpResponse::ServiceUnavailable(), "unhealthy", message)
    } else {
        (
            HttpResponse::Ok(),
            "healthy",
            "Service is healthy".to_string(),
        )
    };
    let mut body = json!({
        "status": status,
        "message": message,
        "initial_discovery_complete": true,
        "initial_discovery_error": null,
        "endpoints": endpoints,
        "instances": instances,
        "failed_instances": failed,
        "inflight_requests": state.inflight.len(),
    });
    if let Some(cluster) = state.cluster.status.get() {
        body["cluster"] = cluster();
    }
    response.json(body)
}

/// `GET /live`: liveness.
pub async fn live(state: web::Data<AppState>) -> HttpResponse {
    if state.lifecycle.is_draining() {
        return HttpResponse::ServiceUnavailable()
            .json(json!({"status": "shutting_down", "message": "Service is shutting down"}));
    }
    HttpResponse::Ok().json(json!({"status": "live", "message": "Service is live"}))
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.metrics.set_model_ready(
        &state.model.name,
        !state.lifecycle.is_draining() && !state.engines.is_empty(),
    );
    match state.metrics.render() {
        Ok(mut text) => {
            text.push_str(&gpu_metrics(&state));
            HttpResponse::Ok()
                .insert_header((CONTENT_TYPE, crate::metrics::CONTENT_TYPE))
                .body(text)
        }
        Err(e) => {
            tracing::error!(error = %e, "failed to encode metrics");
            HttpResponse::InternalServerError()
                .content_type("text/plain")
                .body("Failed to encode metrics")
        }
    }
}

/// Per-GPU gauges (`dynamix_gpu_*`, one series per GPU engine), in Prometheus text; empty without
/// GPU engines.
fn gpu_metrics(state: &AppState) -> String {
    let engines: Vec<_> = state
        .engines
        .snapshot()
        .iter()
        .filter_map(|e| e.gpu.clone().map(|g| (e.instance_id, e.device.clone(), g)))
        .collect();
    render_gpu_metrics(&engines)
}

/// The `dynamix_gpu_*` families for `(instance_id, device, state)` of each GPU engine.
fn render_gpu_metrics(
    engines: &[(u64, String, std::sync::Arc<crate::engine::gpu::GpuLoad>)],
) -> String {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    type Read = fn(&crate::engine::gpu::GpuLoad) -> f64;
    if engines.is_empty() {
        return String::new();
    }
    let families: [(&str, &str, Read); 7] = [
        (
            "kv_blocks_used",
            "KV cache blocks held by running requests",
            |g| g.kv_blocks_used.load(Relaxed) as f64,
        ),
        (
            "kv_blocks_total",
            "KV cache blocks in the GPU's pool",
            |g| g.kv_blocks_total.load(Relaxed) as f64,
        ),
        (
            "running_requests",
            "Requests in the GPU engine's running batch",
            |g| g.running.load(Relaxed) as f64,
        ),
        (
            "waiting_requests",
            "Requests waiting for a slot in the running batch",
            |g| g.waiting.load(Relaxed) as f64,
        ),
        (
            "tokens_per_second",
            "Tokens sampled per second over the last second",
            |g| g.tokens_per_second(),
        ),
        ("memory_total_bytes", "Total device memory", |g| {
            g.memory_total.load(Relaxed) as f64
        }),
        (
            "memory_used_bytes",
            "Device memory in use once the engine allocated its pool",
            |g| g.memory_used.load(Relaxed) as f64,
        ),
    ];
    let mut out = String::new();
    for (name, help, read) in families {
        let _ = writeln!(out, "# HELP dynamix_gpu_{name} {help}");
        let _ = writeln!(out, "# TYPE dynamix_gpu_{name} gauge");
        for (id, device, g) in engines {
            let label = g.device_name().replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "dynamix_gpu_{name}{{instance_id=\"{id}\",device=\"{device}\",name=\"{label}\"}} {}",
                read(g)
            );
        }
    }
    out
}

/// Unmatched route: JSON 404 `Route not found: <METHOD> <path>`.
pub async fn route_not_found(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let error = ApiError::new(
        ErrorClass::NotFound,
        format!("Route not found: {} {}", req.method(), req.path()),
    );
    error_response(&error, state.config.overload_status_code)
}

/// Known route, wrong method: JSON 405.
pub async fn method_not_allowed(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let error = ApiError::new(
        ErrorClass::MethodNotAllowed,
        format!("Method {} is not allowed on {}", req.method(), req.path()),
    );
    error_response(&error, state.config.overload_status_code)
}

#[cfg(test)]
mod gpu_metrics_tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    use crate::engine::gpu::GpuLoad;

    #[test]
    fn each_gpu_engine_is_one_labelled_series_per_family() {
        assert_eq!(super::render_gpu_metrics(&[]), "");
        let load = Arc::new(GpuLoad::default());
        *load.device.lock().unwrap_or_else(|e| e.into_inner()) = "NVIDIA \"H200\"".into();
        load.kv_blocks_total.store(4096, Relaxed);
        load.kv_blocks_used.store(17, Relaxed);
        let text = super::render_gpu_metrics(&[(3, "cuda:1".into(), load)]);
        assert!(
            text.contains("# TYPE dynamix_gpu_kv_blocks_total gauge"),
            "{text}"
        );
        assert!(
            text.contains(
                "dynamix_gpu_kv_blocks_total{instance_id=\"3\",device=\"cuda:1\",name=\"NVIDIA \\\"H200\\\"\"} 4096"
            ),
            "{text}"
        );
        assert!(
            text.contains("dynamix_gpu_kv_blocks_used{instance_id=\"3\""),
            "{text}"
        );
        assert_eq!(text.matches("# HELP dynamix_gpu_").count(), 7);
    }
}
