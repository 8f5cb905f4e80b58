//! The worker's TCP request plane (interop spec §3–§5): one listener per worker process. Each
//! request frame gets exactly one reply, in order: an empty ACK once the worker can answer on a
//! response stream, else a `Server unavailable: ...` text (unknown endpoint path, draining, an
//! envelope without a usable call-home address). An accepted request runs in its own task: dial back
//! to the requester's response-stream server, handshake, prologue, then one data frame per engine
//! output in the request's codec, `complete_final` and the sentinel. A request the worker cannot
//! serve (a body that does not decode, a routing failure) is answered on the stream with an error
//! item carrying Dynamo's `error` object: a Dynamo frontend waits forever on an ACK text, and takes
//! a prologue error for a dead worker.
//!
//! If the local engine dies mid-stream (its channel closes before a finish), the stream ends without
//! `complete_final`: the frontend migrates the request, exactly as for a killed worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, FramedRead, FramedWrite};

use super::wire::response::{CompletionUsageWire, PromptTokensDetailsWire};
use super::wire::{PayloadCodec, PreprocessedRequest, StreamItem};
use crate::codec::messages::{
    CallHomeHandshake, ControlMessage, ResponseStreamPrologue, StreamType, TcpStreamConnectionInfo,
};
use crate::codec::{
    MessageKind, TcpCodecError, TcpRequestCodec, TcpResponseCodec, TcpResponseMessage,
    TwoPartCodec, TwoPartMessage,
};
use crate::error::{ApiError, ErrorClass};
use crate::protocol::engine::EngineRequest;
use crate::router::{KvRouterActor, Route};
use dynamix_wire::endpoint::{
    accept_as, dial, header_frame as header, EndpointState, InflightGuard,
};

/// What the endpoint needs.
#[derive(Clone)]
pub struct EndpointSettings {
    /// `/{ns}/{comp}/{ep}`: frames must carry `{instance_id:x}` followed by this.
    pub path_suffix: String,
    /// The current instance id (the lease id; 0 until registered, changes on re-registration).
    pub instance_id: Arc<AtomicU64>,
    /// Request-plane frame limit (`DYN_TCP_MAX_MESSAGE_SIZE`).
    pub max_message_size: usize,
    /// Dialling the requester back.
    pub connect_timeout: Duration,
    /// Capacity of each request's token channel.
    pub stream_buffer: usize,
}

/// A listening endpoint.
pub struct WorkerEndpoint {
    /// Bound port.
    pub port: u16,
    /// In-flight accounting and drain.
    pub state: Arc<EndpointState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WorkerEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WorkerEndpoint {
    /// Listen on `host:port` and serve requests through `router`.
    pub async fn serve(
        host: &str,
        port: u16,
        settings: EndpointSettings,
        router: Addr<KvRouterActor>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind((host, port)).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(EndpointState::default());
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::new(settings),
            router,
            state.clone(),
        ));
        Ok(WorkerEndpoint { port, state, task })
    }
}

async fn accept_loop(
    listener: TcpListener,
    settings: Arc<EndpointSettings>,
    router: Addr<KvRouterActor>,
    state: Arc<EndpointState>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(
                    stream,
                    settings.clone(),
                    router.clone(),
                    state.clone(),
                    peer,
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "request-plane accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    settings: Arc<EndpointSettings>,
    router: Addr<KvRouterActor>,
    state: Arc<EndpointState>,
    peer: std::net::SocketAddr,
) {
    let (read, write) = stream.into_split();
    let max = Some(settings.max_message_size);
    let mut frames = FramedRead::new(read, TcpRequestCodec::new(max));
    let mut replies = FramedWrite::new(write, TcpResponseCodec::new(None));
    while let Some(frame) = frames.next().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                // The decoder cannot resynchronise after a bad frame: say why, then close.
                let text = match &e {
                    TcpCodecError::TooLarge { .. } => e.to_string(),
                    _ => format!("cannot decode the request frame: {e}"),
                };
                tracing::warn!(%peer, error = %e, "request-plane frame rejected; closing the connection");
                let _ = replies.send(TcpResponseMessage::unavailable(&text)).await;
                return;
            }
        };
        let expected = format!(
            "{:x}{}",
            settings.instance_id.load(Ordering::Relaxed),
            settings.path_suffix
        );
        if frame.endpoint_path != expected {
            tracing::warn!(%peer, path = %frame.endpoint_path, %expected, "request for an endpoint this worker does not serve");
            let _ = replies
                .send(TcpResponseMessage::unavailable(&format!(
                    "unknown endpoint {}",
                    frame.endpoint_path
                )))
                .await;
            continue;
        }
        if state.is_draining() {
            let _ = replies
                .send(TcpResponseMessage::unavailable("worker is shutting down"))
                .await;
            continue;
        }
        match accept(&frame.payload) {
            Ok(accepted) => {
                if replies.send(TcpResponseMessage::ack()).await.is_err() {
                    return;
                }
                let guard = state.enter();
                tokio::spawn(handle(accepted, settings.clone(), router.clone(), guard));
            }
            Err(text) => {
                tracing::warn!(%peer, %text, "request rejected");
                if replies
                    .send(TcpResponseMessage::unavailable(&text))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// A request the worker will answer on a response stream: where to call home, in which codec, and
/// the request, or why it cannot be served (sent as an error item).
struct Accepted {
    id: String,
    info: TcpStreamConnectionInfo,
    codec: PayloadCodec,
    request: Result<EngineRequest, ApiError>,
}

/// Decodes a request envelope (dynamix-wire's [`accept_as`]) and maps its body to an
/// [`EngineRequest`]. `Err` when there is no usable call-home address (the ACK text says why); a
/// body that cannot be served is `Ok` with the error, answered on the stream.
fn accept(payload: &Bytes) -> Result<Accepted, String> {
    let accepted = accept_as::<PreprocessedRequest>(payload)?;
    let id = accepted.id;
    let request = accepted
        .body
        .and_then(|body| body.into_engine_request(id.clone()))
        .map_err(|e| ApiError::new(ErrorClass::BadRequest, e));
    Ok(Accepted {
        id,
        info: accepted.info,
        codec: accepted.codec,
        request,
    })
}

fn data(codec: PayloadCodec, item: &StreamItem) -> Result<TwoPartMessage, String> {
    codec
        .encode(item)
        .map(|body| TwoPartMessage::data_only(Bytes::from(body)))
}

async fn handle(
    accepted: Accepted,
    settings: Arc<EndpointSettings>,
    router: Addr<KvRouterActor>,
    _guard: InflightGuard,
) {
    let Accepted {
        id,
        info,
        codec,
        request,
    } = accepted;
    let stream = match dial(&info.address, settings.connect_timeout).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(request = %id, error = %e, "Failed to create response stream");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, TwoPartCodec::new(None));
    let handshake = CallHomeHandshake {
        subject: info.subject.clone(),
        stream_type: StreamType::Response,
    };
    if framed.send(header(&handshake)).await.is_err() {
        return;
    }
    if framed
        .send(header(&ResponseStreamPrologue { error: None }))
        .await
        .is_err()
    {
        return;
    }
    let (tx, mut rx) = mpsc::channel(settings.stream_buffer.max(1));
    let mut usage = Usage {
        prompt: request
            .as_ref()
            .map(|r| u32::try_from(r.token_ids.len()).unwrap_or(u32::MAX))
            .unwrap_or(0),
        ..Usage::default()
    };
    let routed = match request {
        Ok(request) => router
            .send(Route {
                request,
                output: tx,
                exclude: Vec::new(),
            })
            .await
            .map_err(|e| ApiError::new(ErrorClass::Unavailable, format!("router unavailable: {e}")))
            .and_then(|r| r),
        Err(error) => Err(error),
    };
    let (mut sink, mut control) = framed.split();
    if let Err(error) = routed {
        tracing::debug!(request = %id, error = %error.message, "request failed before generation");
        if let Ok(frame) = data(codec, &StreamItem::of(&Err(error))) {
            if sink.send(frame).await.is_ok() {
                finish(&mut sink, codec).await;
            }
        }
        return;
    }
    let mut finished = false;
    loop {
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                finished |= match &event {
                    Ok(output) => output.finish_reason.is_some(),
                    Err(_) => true,
                };
                let frame = match data(codec, &usage.annotate(&event)) {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::error!(request = %id, error = %e, "cannot encode an output");
                        return;
                    }
                };
                if sink.send(frame).await.is_err() {
                    // The requester is gone: dropping the channel stops generation.
                    tracing::debug!(request = %id, "response stream broke; stopping generation");
                    return;
                }
            }
            message = control.next() => match message {
                Some(Ok(frame)) if frame.kind() == MessageKind::HeaderOnly => {
                    match serde_json::from_slice::<ControlMessage>(frame.header()) {
                        Ok(ControlMessage::Stop) | Ok(ControlMessage::Kill) => {
                            tracing::debug!(request = %id, "stopped by the requester");
                            return;
                        }
                        other => {
                            tracing::warn!(request = %id, message = ?other, "protocol violation on a response stream; closing it");
                            return;
                        }
                    }
                }
                Some(Ok(_)) => {
                    tracing::warn!(request = %id, "data from the requester on a response stream; closing it");
                    return;
                }
                Some(Err(_)) | None => {
                    tracing::debug!(request = %id, "requester closed the response stream; stopping generation");
                    return;
                }
            }
        }
    }
    if !finished {
        // The local engine stopped without finishing (panic, removal): no complete_final, so the
        // requester migrates the request.
        tracing::warn!(request = %id, "engine stopped before finishing; ending the stream without completion");
        return;
    }
    finish(&mut sink, codec).await;
}

/// Token counts of one request, reported as Dynamo's `completion_usage` on its first and last
/// outputs (a Dynamo frontend takes the cached-token count from there).
#[derive(Default)]
struct Usage {
    prompt: u32,
    generated: u32,
    cached: Option<u32>,
    first_sent: bool,
}

impl Usage {
    /// The item for `event`, with usage when it is the first or the last output.
    fn annotate(&mut self, event: &crate::protocol::engine::EngineEvent) -> StreamItem {
        let item = StreamItem::of(event);
        let Ok(output) = event else {
            return item;
        };
        let tokens = output
            .token_ids
            .len()
            .max(usize::from(output.text.is_some()));
        self.generated = self
            .generated
            .saturating_add(u32::try_from(tokens).unwrap_or(u32::MAX));
        self.cached = self.cached.or(output.cached_tokens);
        let first = !std::mem::replace(&mut self.first_sent, true);
        if !first && output.finish_reason.is_none() {
            return item;
        }
        item.with_usage(CompletionUsageWire {
            prompt_tokens: self.prompt,
            completion_tokens: self.generated,
            total_tokens: self.prompt.saturating_add(self.generated),
            prompt_tokens_details: Some(PromptTokensDetailsWire {
                audio_tokens: None,
                cached_tokens: Some(self.cached.unwrap_or(0)),
            }),
        })
    }
}

/// `complete_final`, the sentinel, close.
async fn finish(
    sink: &mut futures_util::stream::SplitSink<Framed<TcpStream, TwoPartCodec>, TwoPartMessage>,
    codec: PayloadCodec,
) {
    if let Ok(frame) = data(codec, &StreamItem::complete()) {
        if sink.send(frame).await.is_err() {
            return;
        }
    }
    let _ = sink.send(header(&ControlMessage::Sentinel)).await;
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::messages::{
        ConnectionInfo, RequestControlMessage, RequestType, ResponseType,
    };

    fn request() -> EngineRequest {
        EngineRequest {
            request_id: "req-1".into(),
            model: "m".into(),
            token_ids: vec![1, 2, 3],
            echo_text: "hi".into(),
            sampling: Default::default(),
            stop: Default::default(),
            pinned_engine: None,
            resumed_outputs: 0,
        }
    }

    fn envelope(context: &str, transport: &str, codec: Option<&str>, body: &[u8]) -> Bytes {
        let info = TcpStreamConnectionInfo {
            address: "127.0.0.1:1".into(),
            subject: "s".into(),
            context: context.into(),
            stream_type: StreamType::Response,
        };
        let control = RequestControlMessage {
            id: "req-1".into(),
            request_type: RequestType::SingleIn,
            response_type: ResponseType::ManyOut,
            connection_info: ConnectionInfo {
                transport: transport.into(),
                info: serde_json::to_string(&info).unwrap(),
            },
            payload_codec: codec.map(str::to_string),
            metadata: None,
            frontend_send_ts_ns: None,
        };
        TwoPartCodec::new(None)
            .encode_message(TwoPartMessage::new(
                serde_json::to_vec(&control).unwrap(),
                body,
            ))
            .unwrap()
    }

    #[test]
    fn well_formed_envelopes_are_accepted_in_both_codecs() {
        let wire = PreprocessedRequest::from_engine_request(&request(), true);
        for (name, codec) in [
            (None, PayloadCodec::Json),
            (Some("msgpack"), PayloadCodec::Msgpack),
        ] {
            let body = codec.encode(&wire).unwrap();
            let accepted = accept(&envelope("req-1", "tcp_server", name, &body)).unwrap();
            assert_eq!(accepted.info.subject, "s");
            assert_eq!(accepted.codec, codec);
            assert_eq!(accepted.request.unwrap(), request());
        }
    }

    #[test]
    fn envelopes_without_a_call_home_address_are_refused_with_the_reason() {
        let body = serde_json::to_vec(&PreprocessedRequest::from_engine_request(&request(), true))
            .unwrap();
        let cases: Vec<(Bytes, &str)> = vec![
            (Bytes::from_static(b"junk"), "request envelope"),
            (
                TwoPartCodec::new(None)
                    .encode_message(TwoPartMessage::header_only(b"{}".to_vec()))
                    .unwrap(),
                "control header and a body",
            ),
            (
                envelope("other", "tcp_server", None, &body),
                "does not match the request id",
            ),
            (
                envelope("req-1", "nats", None, &body),
                "connection_info.transport",
            ),
        ];
        for (payload, expected) in cases {
            let error = accept(&payload).err().unwrap();
            assert!(
                error.contains(expected),
                "{error} should mention {expected}"
            );
        }
    }

    #[test]
    fn usage_rides_on_the_first_and_the_last_output() {
        use crate::protocol::engine::EngineOutput;
        let mut usage = Usage {
            prompt: 10,
            ..Usage::default()
        };
        let output = |cached, finish| {
            Ok(EngineOutput {
                token_ids: vec![1],
                cached_tokens: cached,
                finish_reason: finish,
                ..EngineOutput::default()
            })
        };
        let usage_of = |item: StreamItem| {
            item.data
                .and_then(|i| i.data)
                .and_then(|d| d.completion_usage)
        };
        let first = usage_of(usage.annotate(&output(Some(8), None))).unwrap();
        assert_eq!((first.prompt_tokens, first.completion_tokens), (10, 1));
        assert_eq!(first.prompt_tokens_details.unwrap().cached_tokens, Some(8));
        assert!(usage_of(usage.annotate(&output(None, None))).is_none());
        let last =
            usage_of(usage.annotate(&output(None, Some(crate::protocol::FinishReason::Length))))
                .unwrap();
        assert_eq!((last.completion_tokens, last.total_tokens), (3, 13));
        assert_eq!(last.prompt_tokens_details.unwrap().cached_tokens, Some(8));
    }

    #[test]
    fn bodies_that_cannot_be_served_are_answered_on_the_stream() {
        for (codec, body, expected) in [
            (None, b"{\"nope\":1}".to_vec(), "token_ids"),
            (Some("msgpack"), b"\xc1".to_vec(), "msgpack"),
            (Some("cbor"), b"{}".to_vec(), "cbor"),
            (None, b"{\"token_ids\": []}".to_vec(), "token_ids is empty"),
        ] {
            let accepted = accept(&envelope("req-1", "tcp_server", codec, &body)).unwrap();
            let error = accepted.request.unwrap_err();
            assert_eq!(error.class, ErrorClass::BadRequest);
            assert!(
                error.message.contains(expected),
                "{} should mention {expected}",
                error.message
            );
        }
    }
}
