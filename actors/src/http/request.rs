//! What every inference route does before the serving path (content type, body limit, request id,
//! routing headers, metadata headers) and [`error_response`], the one place an [`ApiError`] becomes an
//! HTTP response.

use actix_web::http::header::{HeaderMap, CONTENT_TYPE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::error::{ApiError, ErrorClass};
use crate::validator::RequestContext;

/// A second handle on a connection's socket, used to notice a client that hangs up while a unary
/// response is still being generated: actix-web only notices when it writes, which for a unary
/// response is after generation has finished (the spec's "connection handle", §2.5).
///
/// One per connection, living on its HTTP worker: the duplicate is registered with the worker's
/// reactor when a request first watches it and stays registered for the connection's later
/// requests, so a keep-alive request costs no `dup`, `epoll_ctl` or `close` of its own.
#[derive(Clone)]
pub struct PeerSocket(std::rc::Rc<PeerWatch>);

struct PeerWatch {
    /// The duplicate, until its first watch registers it.
    unregistered: std::cell::Cell<Option<std::net::TcpStream>>,
    /// The registered duplicate; `None` inside when the reactor refused it.
    registered: std::cell::OnceCell<Option<tokio::net::TcpStream>>,
}

impl PeerSocket {
    /// Duplicate the connection's socket (None if the OS refuses).
    pub fn watch(tcp: &actix_web::rt::net::TcpStream) -> Option<Self> {
        let duplicate = socket2::SockRef::from(tcp).try_clone().ok()?;
        Some(PeerSocket(std::rc::Rc::new(PeerWatch {
            unregistered: std::cell::Cell::new(Some(duplicate.into())),
            registered: std::cell::OnceCell::new(),
        })))
    }

    /// Resolves when the peer has closed the connection. Never resolves if the state cannot be
    /// observed (for example the client already sent more bytes: a pipelined request).
    pub async fn closed(self) {
        let pending = std::future::pending::<()>;
        let watch = &*self.0;
        let registered = watch.registered.get_or_init(|| {
            // The duplicate shares the connection's non-blocking mode, as `from_std` needs.
            let socket = watch.unregistered.take()?;
            tokio::net::TcpStream::from_std(socket).ok()
        });
        let Some(stream) = registered else {
            return pending().await;
        };
        let mut byte = [0u8; 1];
        loop {
            // An earlier request's readiness may still be set: `peek` finds the socket drained
            // (actix-web read that request), clears it and waits for the next event.
            if stream.readable().await.is_err() {
                return;
            }
            match stream.peek(&mut byte).await {
                Ok(0) => return,
                Ok(_) => return pending().await,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
    }
}

const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_BYTES: usize = 64 * 1024;

/// Render `error` as the flat JSON error body with its status.
pub fn error_response(error: &ApiError, overload_status: u16) -> HttpResponse {
    let status = error.status(overload_status);
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(code).json(error.body(overload_status))
}

/// `application/json` or `application/*+json` (parameters ignored), else 415.
pub fn check_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    let ok = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().as_bytes())
        .is_some_and(|mime| {
            let prefix = b"application/";
            mime.eq_ignore_ascii_case(b"application/json")
                || (mime.len() >= prefix.len()
                    && mime[..prefix.len()].eq_ignore_ascii_case(prefix)
                    && mime.len() >= 5
                    && mime[mime.len() - 5..].eq_ignore_ascii_case(b"+json"))
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorClass::UnsupportedMediaType,
            "Expected request with Content-Type application/json",
        ))
    }
}

/// Read the body up to the configured limit (413 past it, 400 when it cannot be read).
pub async fn read_body(mut payload: web::Payload, limit_mb: u64) -> Result<Bytes, ApiError> {
    let limit = (limit_mb as usize).saturating_mul(1024 * 1024);
    let too_large = || {
        ApiError::new(
            ErrorClass::PayloadTooLarge,
            format!(
                "Request body exceeds the limit of {limit_mb} MB set by DYN_HTTP_BODY_LIMIT_MB"
            ),
        )
    };
    // A small body arrives in one chunk, which is kept as it is; a second chunk starts a copy.
    let mut first: Option<Bytes> = None;
    let mut body = BytesMut::new();
    let mut len = 0;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            tracing::debug!(error = %e, "failed to read request body");
            ApiError::new(ErrorClass::BadRequest, "Failed to read request body")
        })?;
        len += chunk.len();
        if len > limit {
            return Err(too_large());
        }
        match first.take() {
            None if body.is_empty() => first = Some(chunk),
            None => body.extend_from_slice(&chunk),
            Some(earlier) => {
                body.extend_from_slice(&earlier);
                body.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| body.freeze()))
}

/// Canonical request id: `request-id`, else the deprecated `x-dynamo-request-id`, when it is a UUID;
/// otherwise a new UUIDv4.
pub fn request_id(headers: &HeaderMap) -> String {
    let parse = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| uuid::Uuid::parse_str(v.trim()).ok())
    };
    if let Some(id) = parse("request-id") {
        return id.to_string();
    }
    if let Some(id) = parse("x-dynamo-request-id") {
        tracing::warn!("the x-dynamo-request-id header is deprecated; use request-id");
        return id.to_string();
    }
    uuid::Uuid::new_v4().to_string()
}

/// Build the request context from headers: id, routing override, metadata limits (431).
pub fn request_context(headers: &HeaderMap) -> Result<RequestContext, ApiError> {
    let (mut entries, mut bytes) = (0usize, 0usize);
    for (name, value) in headers {
        if name.as_str().starts_with("x-dynamo-meta-") {
            entries += 1;
            bytes += name.as_str().len() - "x-dynamo-meta-".len() + value.len();
        }
    }
    if entries > MAX_METADATA_ENTRIES {
        return Err(ApiError::new(
            ErrorClass::HeadersTooLarge,
            format!("metadata headers exceed the limit of {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    if bytes > MAX_METADATA_BYTES {
        return Err(ApiError::new(
            ErrorClass::HeadersTooLarge,
            format!("metadata headers exceed the limit of {MAX_METADATA_BYTES} bytes"),
        ));
    }
    let pinned_engine = ["x-dynamo-worker-instance-id", "x-worker-instance-id"]
        .iter()
        .find_map(|h| {
            headers
                .get(*h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
    Ok(RequestContext {
        request_id: request_id(headers),
        pinned_engine,
    })
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    #[test]
    fn content_types() {
        let ok = TestRequest::default()
            .insert_header((CONTENT_TYPE, "application/json; charset=utf-8"))
            .to_http_request();
        assert!(check_content_type(&ok).is_ok());
        let vendor = TestRequest::default()
            .insert_header((CONTENT_TYPE, "application/vnd.api+json"))
            .to_http_request();
        assert!(check_content_type(&vendor).is_ok());
        let bad = TestRequest::default()
            .insert_header((CONTENT_TYPE, "text/plain"))
            .to_http_request();
        assert_eq!(
            check_content_type(&bad).map_err(|e| e.class),
            Err(ErrorClass::UnsupportedMediaType)
        );
        let none = TestRequest::default().to_http_request();
        assert!(check_content_type(&none).is_err());
    }

    #[test]
    fn request_id_only_accepts_uuids() {
        let id = "3f0c2b8e-8a9b-4c1d-9e2f-0123456789ab";
        let req = TestRequest::default()
            .insert_header(("request-id", id))
            .to_http_request();
        assert_eq!(request_id(req.headers()), id);
        let req = TestRequest::default()
            .insert_header(("request-id", "not-a-uuid"))
            .to_http_request();
        let generated = request_id(req.headers());
        assert_ne!(generated, "not-a-uuid");
        assert!(uuid::Uuid::parse_str(&generated).is_ok());
    }
}
