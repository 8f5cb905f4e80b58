//! A worker's system server (`DYN_SYSTEM_PORT`, interop spec §2.3): it serves the model card's
//! files at `/v1/metadata/{ns}/{comp}/{ep}/{slug}/_base/{file}` (`application/octet-stream`), so a
//! frontend on another machine can fetch and checksum them, and answers `/live` and `/health`.
//! The card then names those URLs instead of local paths.

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};

use super::card::{self, ModelCard};
use super::ClusterError;

/// The running server; dropping it stops it.
pub struct MetadataServer {
    handle: actix_web::dev::ServerHandle,
    /// The bound address (`host:port`).
    pub address: std::net::SocketAddr,
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        // The stop command is sent when `stop` is called; awaiting would only wait for it.
        drop(self.handle.stop(false));
    }
}

/// Serves `card`'s files on `host:port` and rewrites the card's file references to their URLs
/// (under `advertise`, the `host:port` frontends dial). Every file is read once, here, and its
/// checksum checked against the card; the error names the file.
pub fn serve(
    host: &str,
    port: u16,
    advertise_host: &str,
    names: (&str, &str, &str),
    card: &mut ModelCard,
) -> Result<MetadataServer, ClusterError> {
    let (namespace, component, endpoint) = names;
    let mut files = HashMap::new();
    let listen = |source| ClusterError::Listen {
        what: "the model card's files (DYN_SYSTEM_PORT)",
        address: format!("{host}:{port}"),
        source,
    };
    let listener = std::net::TcpListener::bind((host, port)).map_err(listen)?;
    let address = listener.local_addr().map_err(listen)?;
    let authority = format!("{advertise_host}:{}", address.port());
    let slug = card.slug.clone();
    for file in card.file_refs_mut() {
        let name = file.file_name().to_string();
        let bytes = std::fs::read(&file.path).map_err(|e| ClusterError::CardFile {
            path: file.path.clone(),
            why: format!("cannot read it: {e}"),
        })?;
        let sum = card::checksum(&bytes);
        if sum != file.checksum {
            return Err(ClusterError::CardFile {
                path: file.path.clone(),
                why: format!("changed: checksum {sum}, the card says {}", file.checksum),
            });
        }
        let url = card::metadata_url(&authority, namespace, component, endpoint, &slug, &name);
        let path = format!("/v1/metadata/{namespace}/{component}/{endpoint}/{slug}/_base/{name}");
        files.insert(path, web::Bytes::from(bytes));
        file.path = url;
    }
    let files = Arc::new(files);
    let server = HttpServer::new(move || {
        let files = files.clone();
        App::new()
            .route(
                "/live",
                web::get().to(|| async { HttpResponse::Ok().body("live") }),
            )
            .route(
                "/health",
                web::get().to(|| async {
                    HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))
                }),
            )
            .default_service(web::to(move |request: actix_web::HttpRequest| {
                let found = files.get(request.path()).cloned();
                async move {
                    match found {
                        Some(bytes) if request.method() == actix_web::http::Method::GET => {
                            HttpResponse::Ok()
                                .content_type("application/octet-stream")
                                .body(bytes)
                        }
                        Some(_) => HttpResponse::MethodNotAllowed().finish(),
                        None => HttpResponse::NotFound().body("no such metadata file"),
                    }
                }
            }))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .map_err(listen)?
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    tracing::info!(%address, "system server serving the model card's files");
    Ok(MetadataServer { handle, address })
}
