//! The OpenAPI document of the routes this server answers (`GET /openapi.json`) and the page that
//! renders it (`GET /docs`, self-contained: no CDN).

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::AppState;

/// `GET /openapi.json`.
pub async fn openapi(state: web::Data<AppState>) -> HttpResponse {
    let embedding_model = state.embeddings.as_ref().map(|e| e.card().name.as_str());
    HttpResponse::Ok().json(openapi_document(
        &state.config.paths,
        &state.model.name,
        embedding_model,
    ))
}

/// `GET /docs`: a self-contained page that renders `/openapi.json` (no CDN: works offline).
pub async fn docs() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(DOCS_PAGE)
}

const DOCS_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>dynamix API</title>
<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}code,pre{background:#f4f4f4;padding:2px 4px}
.op{border:1px solid #ddd;margin:1em 0;padding:.5em 1em}.m{font-weight:bold;text-transform:uppercase;margin-right:1em}</style>
</head><body><h1 id="title">API</h1><div id="ops">Loading /openapi.json ...</div>
<script>
fetch('/openapi.json').then(r=>r.json()).then(doc=>{
  document.getElementById('title').textContent=doc.info.title+' '+doc.info.version;
  const ops=document.getElementById('ops');ops.textContent='';
  for(const [path,item] of Object.entries(doc.paths)){for(const [method,op] of Object.entries(item)){
    const d=document.createElement('div');d.className='op';
    const h=document.createElement('div');h.innerHTML='<span class="m"></span><code></code>';
    h.querySelector('.m').textContent=method;h.querySelector('code').textContent=path;d.appendChild(h);
    const s=document.createElement('p');s.textContent=op.summary||'';d.appendChild(s);
    if(op.requestBody){const p=document.createElement('pre');
      p.textContent=JSON.stringify(op.requestBody.content['application/json'].example,null,2);d.appendChild(p);}
    ops.appendChild(d);}}
}).catch(e=>{document.getElementById('ops').textContent='Failed to load /openapi.json: '+e});
</script></body></html>"#;

/// The OpenAPI 3 document of the routes as configured (embeddings only when that family is on).
pub fn openapi_document(
    paths: &super::HttpPaths,
    model: &str,
    embedding_model: Option<&str>,
) -> Value {
    let error_ref = json!({"$ref": "#/components/schemas/Error"});
    let responses = |ok: Value| {
        json!({
            "200": ok,
            "400": {"description": "Bad request or validation failure", "content": {"application/json": {"schema": error_ref}}},
            "404": {"description": "Model or route not found", "content": {"application/json": {"schema": error_ref}}},
            "503": {"description": "Service not ready or draining", "content": {"application/json": {"schema": error_ref}}},
        })
    };
    let json_ok = |schema: &str| {
        json!({"description": "Success", "content": {
            "application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}},
            "text/event-stream": {"schema": {"type": "string", "description": "SSE stream when `stream` is true"}},
        }})
    };
    let post = |path: &str, summary: &str, schema: &str, example: Value, ok: Value| {
        let op_id = format!("post{}", path.replace('/', "_"));
        (
            path.to_string(),
            json!({"post": {
                "operationId": op_id,
                "summary": summary,
                "requestBody": {"required": true, "content": {"application/json": {
                    "schema": {"$ref": format!("#/components/schemas/{schema}")},
                    "example": example,
                }}},
                "responses": responses(ok),
            }}),
        )
    };
    let get = |path: &str, summary: &str| {
        let op_id = format!("get{}", path.replace('/', "_"));
        (
            path.to_string(),
            json!({"get": {"operationId": op_id, "summary": summary, "responses": responses(json!({"description": "Success"}))}}),
        )
    };
    let mut doc_paths = serde_json::Map::new();
    for (path, item) in [
        post(
            &paths.chat,
            "Create a chat completion",
            "ChatCompletionRequest",
            json!({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}),
            json_ok("ChatCompletion"),
        ),
        post(
            &paths.completions,
            "Create a completion",
            "CompletionRequest",
            json!({"model": model, "prompt": "Once upon a time", "max_tokens": 32}),
            json_ok("Completion"),
        ),
        post(
            &paths.responses,
            "Create a response",
            "ResponsesRequest",
            json!({"model": model, "input": "Hello!"}),
            json!({"description": "Success"}),
        ),
        get(&paths.models, "List models"),
        get(
            &format!("{}/{{model_id}}", paths.models.trim_end_matches('/')),
            "Retrieve a model",
        ),
        get(&paths.health, "Readiness"),
        get(&paths.live, "Liveness"),
        get(&paths.metrics, "Prometheus metrics"),
        get("/openapi.json", "This document"),
        get("/docs", "API documentation page"),
    ] {
        doc_paths.insert(path, item);
    }
    if let Some(embedding_model) = embedding_model {
        let (path, item) = post(
            &paths.embeddings,
            "Create embeddings",
            "EmbeddingRequest",
            json!({"model": embedding_model, "input": ["A cat sits on the mat"]}),
            json!({"description": "Success", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/EmbeddingResponse"}}}}),
        );
        doc_paths.insert(path, item);
    }
    if let Some(item) = doc_paths.get_mut(&format!(
        "{}/{{model_id}}",
        paths.models.trim_end_matches('/')
    )) {
        item["get"]["parameters"] = json!([{"name": "model_id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "dynamix OpenAI-compatible Frontend", "version": env!("CARGO_PKG_VERSION"),
                 "license": {"name": "Apache-2.0"}},
        "paths": doc_paths,
        "components": {"schemas": schemas()},
    })
}

fn schemas() -> Value {
    let message = json!({"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}], "nullable": true},
        "name": {"type": "string"}}});
    let sampling = json!({
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": 1, "maximum": 128},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 32}]},
        "max_tokens": {"type": "integer", "minimum": 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "seed": {"type": "integer"},
        "user": {"type": "string"},
        "ignore_eos": {"type": "boolean"},
        "top_k": {"type": "integer", "minimum": -1},
        "min_tokens": {"type": "integer", "minimum": 0},
        "nvext": {"type": "object"}
    });
    let mut chat_props = sampling.as_object().cloned().unwrap_or_default();
    chat_props.insert("model".into(), json!({"type": "string"}));
    chat_props.insert(
        "messages".into(),
        json!({"type": "array", "minItems": 1, "items": message}),
    );
    chat_props.insert(
        "max_completion_tokens".into(),
        json!({"type": "integer", "minimum": 1}),
    );
    let mut cmpl_props = sampling.as_object().cloned().unwrap_or_default();
    cmpl_props.insert("model".into(), json!({"type": "string"}));
    cmpl_props.insert("prompt".into(), json!({"oneOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}}, {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]}));
    cmpl_props.insert("echo".into(), json!({"type": "boolean"}));
    let usage = json!({"type": "object", "properties": {
        "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}});
    json!({
        "Error": {"type": "object", "required": ["message", "type", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "integer"}, "details": {"type": "object"}}},
        "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": chat_props},
        "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": cmpl_props},
        "EmbeddingRequest": {"type": "object", "required": ["model", "input"], "properties": {
            "model": {"type": "string"},
            "input": {"oneOf": [
                {"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 2048},
                {"type": "array", "items": {"type": "integer", "minimum": 0}},
                {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}, "maxItems": 2048}]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": {"type": "integer"}, "user": {"type": "string"}, "nvext": {"type": "object"}}},
        "EmbeddingResponse": {"type": "object", "properties": {
            "object": {"type": "string", "enum": ["list"]}, "model": {"type": "string"},
            "data": {"type": "array", "items": {"type": "object", "properties": {
                "object": {"type": "string", "enum": ["embedding"]}, "index": {"type": "integer"},
                "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}}}},
            "usage": {"type": "object", "properties": {
                "prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}}}},
        "ResponsesRequest": {"type": "object", "required": ["model", "input"], "properties": {
            "model": {"type": "string"},
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
            "instructions": {"type": "string"}, "stream": {"type": "boolean"},
            "max_output_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "top_p": {"type": "number", "minimum": 0, "maximum": 1}}},
        "ChatCompletion": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion"]},
            "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "finish_reason": {"type": "string", "nullable": true},
                "message": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}}}},
            "usage": usage}},
        "Completion": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["text_completion"]},
            "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": {"type": "string", "nullable": true}}}},
            "usage": usage}},
    })
}
