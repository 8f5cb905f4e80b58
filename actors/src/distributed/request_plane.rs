//! The worker's TCP request plane (interop spec §3–§5): the worker serves its engines as one
//! endpoint of dynamix-wire's [`EndpointServer`], the same server the Python SDK's workers use. The
//! server answers each request frame (an ACK, or `Server unavailable: ...` for an unknown path, a
//! draining worker, an envelope without a usable call-home address), dials the requester back and
//! writes the replies; [`EngineHandler`] turns each request into a route through the worker's
//! router and the engine's outputs into replies, with Dynamo's `completion_usage` on the first and
//! last. A request the worker cannot serve (a body that does not decode, a routing failure) is
//! answered on the stream with an error item carrying Dynamo's `error` object: a Dynamo frontend
//! waits forever on an ACK text, and takes a prologue error for a dead worker.
//!
//! If the local engine dies mid-stream (its channel closes before a finish), the stream ends without
//! `complete_final` ([`Reply::Abandon`]): the frontend migrates the request, exactly as for a killed
//! worker. So does a panic while relaying an output (`request_plane_panic`): it ends that stream
//! alone and counts as a restart of the tree's `request_plane` child.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;
use serde_json::Value;
use tokio::sync::mpsc;

use super::wire::response::{CompletionUsageWire, PromptTokensDetailsWire};
use super::wire::{PreprocessedRequest, StreamItem};
use crate::error::{ApiError, ErrorClass};
use crate::faults::FaultInjector;
use crate::protocol::engine::{EngineEvent, EngineRequest};
use crate::router::{KvRouterActor, Route};
use crate::supervision::{catch_panic, RestartTracker};
use dynamix_wire::endpoint::{
    EncodeItem, EndpointServer, EndpointState, Handler, Replies, Reply, Request, ServerSettings,
};
use dynamix_wire::{PayloadCodec, PayloadEncodeError};

/// What the endpoint needs.
#[derive(Clone)]
pub struct EndpointSettings {
    /// `/{ns}/{comp}/{ep}`: frames must carry `{instance_id:x}` followed by this.
    pub path_suffix: String,
    /// Request-plane frame limit (`DYN_TCP_MAX_MESSAGE_SIZE`).
    pub max_message_size: usize,
    /// Dialling the requester back.
    pub connect_timeout: Duration,
    /// Capacity of each request's token channel.
    pub stream_buffer: usize,
    /// Heartbeats of multiplexed connections.
    pub mux: dynamix_wire::mux::MuxSettings,
    /// Fault injection (`request_plane_panic`).
    pub faults: Arc<FaultInjector>,
    /// Where a stream's failure is counted (the tree's `request_plane` child).
    pub supervision: Arc<Mutex<RestartTracker>>,
}

/// A listening endpoint.
pub struct WorkerEndpoint {
    /// Bound port.
    pub port: u16,
    /// In-flight accounting and drain.
    pub state: Arc<EndpointState>,
    server: Arc<EndpointServer>,
    suffix: String,
    /// The instance id the endpoint's path carries now (0 until registered).
    current: Arc<AtomicU64>,
}

impl WorkerEndpoint {
    /// Listen on `host:port` and serve requests through `router`.
    pub async fn serve(
        host: &str,
        port: u16,
        settings: EndpointSettings,
        router: Addr<KvRouterActor>,
    ) -> std::io::Result<Self> {
        let server = EndpointServer::bind(
            host,
            port,
            ServerSettings {
                max_message_size: settings.max_message_size,
                connect_timeout: settings.connect_timeout,
                mux: settings.mux.clone(),
            },
        )
        .await?;
        let handler = EngineHandler {
            router,
            stream_buffer: settings.stream_buffer.max(1),
            guard: Arc::new(Guard {
                faults: settings.faults,
                supervision: settings.supervision,
            }),
        };
        let suffix = settings.path_suffix;
        let state = server
            .register(&format!("0{suffix}"), Arc::new(handler))
            .map_err(std::io::Error::other)?;
        Ok(WorkerEndpoint {
            port: server.port(),
            state,
            server,
            suffix,
            current: Arc::default(),
        })
    }

    /// Something to call with each new instance id (lease) before its record is put: from then on
    /// the endpoint answers frames addressed to that id.
    pub fn instance_switch(&self) -> impl Fn(u64) + Send + Sync + 'static {
        let (server, suffix, current) = (
            self.server.clone(),
            self.suffix.clone(),
            self.current.clone(),
        );
        move |id| {
            let old = current.swap(id, Ordering::SeqCst);
            if old != id {
                if let Err(e) =
                    server.rename(&format!("{old:x}{suffix}"), &format!("{id:x}{suffix}"))
                {
                    tracing::error!(error = %e, "cannot move the endpoint to its new instance id");
                }
            }
        }
    }
}

/// Serves each request through the worker's router.
struct EngineHandler {
    router: Addr<KvRouterActor>,
    stream_buffer: usize,
    guard: Arc<Guard>,
}

/// What turns a panic while relaying an output into the end of that stream alone.
struct Guard {
    faults: Arc<FaultInjector>,
    supervision: Arc<Mutex<RestartTracker>>,
}

impl Guard {
    /// The reply for `event`; a panic while building it ends the stream with [`Reply::Abandon`]
    /// (the requester migrates the request, as for a dead worker) and counts as a restart of the
    /// request plane, whose other streams carry on.
    fn relay(&self, usage: &mut Usage, event: &EngineEvent) -> Result<Reply, ()> {
        let relayed = catch_panic(|| {
            if self.faults.on_request_plane() {
                panic!("injected fault: the request plane panics while relaying an output");
            }
            reply(usage.annotate(event))
        });
        relayed.map_err(|reason| {
            tracing::error!(%reason, "request plane stream panicked; abandoning it");
            self.supervision
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .resume_after(reason);
        })
    }
}

/// The engine request a body asks for, or why it cannot be served (a 400 on the requester's side).
fn engine_request(id: &str, body: Value) -> Result<EngineRequest, ApiError> {
    let bad = |message: String| ApiError::new(ErrorClass::BadRequest, message);
    serde_json::from_value::<PreprocessedRequest>(body)
        .map_err(|e| {
            bad(format!(
                "the request body is not a PreprocessedRequest: {e}"
            ))
        })?
        .into_engine_request(id.to_string())
        .map_err(|e| bad(e.to_string()))
}

/// A stream item as the reply that carries it: encoded straight from its type into the
/// request's codec, once per token, with no JSON value in between.
fn reply(item: StreamItem) -> Reply {
    match item.data {
        Some(_) => Reply::Item(Arc::new(Output(item))),
        None => Reply::Abandon,
    }
}

/// One output's data frame body (`data` set, `complete_final` false).
#[derive(Debug)]
struct Output(StreamItem);

impl EncodeItem for Output {
    fn encode(&self, codec: PayloadCodec) -> Result<Vec<u8>, PayloadEncodeError> {
        codec.encode(&self.0)
    }

    fn annotated(&self) -> Value {
        serde_json::to_value(&self.0.data).unwrap_or(Value::Null)
    }
}

enum Phase {
    /// Route the request, then stream.
    Start(Request),
    /// Stream the engine's outputs.
    Running {
        outputs: mpsc::Receiver<EngineEvent>,
        usage: Usage,
        finished: bool,
    },
    Done,
}

impl Handler for EngineHandler {
    fn call(&self, request: Request) -> Replies {
        let router = self.router.clone();
        let buffer = self.stream_buffer;
        let guard = self.guard.clone();
        Box::pin(futures_util::stream::unfold(
            Phase::Start(request),
            move |phase| {
                let (router, guard) = (router.clone(), guard.clone());
                async move {
                    match phase {
                        Phase::Start(request) => {
                            let id = request.id.clone();
                            match start(&router, request, buffer).await {
                                Ok(running) => next_output(running, &guard).await,
                                Err(error) => {
                                    tracing::debug!(request = %id, error = %error.message, "request failed before generation");
                                    Some((reply(StreamItem::of(&Err(error))), Phase::Done))
                                }
                            }
                        }
                        running @ Phase::Running { .. } => next_output(running, &guard).await,
                        Phase::Done => None,
                    }
                }
            },
        ))
    }
}

/// Route `request`; its outputs come on the returned phase's channel.
async fn start(
    router: &Addr<KvRouterActor>,
    request: Request,
    buffer: usize,
) -> Result<Phase, ApiError> {
    let engine = engine_request(&request.id, request.body)?;
    let usage = Usage {
        prompt: u32::try_from(engine.token_ids.len()).unwrap_or(u32::MAX),
        ..Usage::default()
    };
    let (tx, rx) = mpsc::channel(buffer);
    router
        .send(Route {
            request: engine,
            output: tx,
            exclude: Vec::new(),
        })
        .await
        .map_err(|e| ApiError::new(ErrorClass::Unavailable, format!("router unavailable: {e}")))
        .and_then(|r| r)?;
    Ok(Phase::Running {
        outputs: rx,
        usage,
        finished: false,
    })
}

/// The next output as a reply; at the channel's end nothing more (the server completes the
/// stream), or [`Reply::Abandon`] when the engine stopped before finishing.
async fn next_output(phase: Phase, guard: &Guard) -> Option<(Reply, Phase)> {
    let Phase::Running {
        mut outputs,
        mut usage,
        mut finished,
    } = phase
    else {
        return None;
    };
    match outputs.recv().await {
        Some(event) => {
            finished |= match &event {
                Ok(output) => output.finish_reason.is_some(),
                Err(_) => true,
            };
            let Ok(item) = guard.relay(&mut usage, &event) else {
                // Dropping the outputs tells the engine that nobody reads them any more.
                return Some((Reply::Abandon, Phase::Done));
            };
            Some((
                item,
                Phase::Running {
                    outputs,
                    usage,
                    finished,
                },
            ))
        }
        None if finished => None,
        // The local engine stopped without finishing (panic, removal): no complete_final, so the
        // requester migrates the request.
        None => Some((Reply::Abandon, Phase::Done)),
    }
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
    fn annotate(&mut self, event: &EngineEvent) -> StreamItem {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::codec::messages::{
        ConnectionInfo, RequestControlMessage, RequestType, ResponseType, StreamType,
        TcpStreamConnectionInfo,
    };
    use crate::codec::{TwoPartCodec, TwoPartMessage};
    use bytes::Bytes;
    use dynamix_wire::endpoint::accept;
    use dynamix_wire::PayloadCodec;

    /// What the worker makes of a request envelope: the engine request, or the error its stream
    /// answers with (a body the server cannot decode, or one that is no engine request).
    fn served(payload: &Bytes) -> Result<EngineRequest, String> {
        let accepted = accept(payload).unwrap();
        let body = accepted.body.map_err(|e| e.to_string())?;
        engine_request(&accepted.id, body).map_err(|e| e.message)
    }

    /// A small tokenized request named `id` (also the remote engine's tests').
    pub(crate) fn request(id: &str) -> EngineRequest {
        EngineRequest {
            request_id: id.into(),
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
        let wire = PreprocessedRequest::from_engine_request(&request("req-1"), true);
        for (name, codec) in [
            (None, PayloadCodec::Json),
            (Some("msgpack"), PayloadCodec::Msgpack),
        ] {
            let body = codec.encode(&wire).unwrap();
            let payload = envelope("req-1", "tcp_server", name, &body);
            let accepted = accept(&payload).unwrap();
            assert_eq!(accepted.info.subject, "s");
            assert_eq!(accepted.codec, codec);
            assert_eq!(served(&payload).unwrap(), request("req-1"));
        }
    }

    #[test]
    fn envelopes_without_a_call_home_address_are_refused_with_the_reason() {
        let body = serde_json::to_vec(&PreprocessedRequest::from_engine_request(
            &request("req-1"),
            true,
        ))
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
            let error = accept(&payload).err().unwrap().to_string();
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

    /// A panic while relaying an output ends that stream without completion (the requester
    /// migrates it), drops the engine's channel, and counts as a restart of the request plane; the
    /// next stream is served.
    #[actix_rt::test]
    async fn a_panic_while_relaying_abandons_that_stream_and_counts_a_restart() {
        use crate::faults::{FaultKind, FaultSpec, FaultsConfig};
        use crate::protocol::engine::EngineOutput;
        use crate::supervision::{ActorKind, SupervisionConfig, SupervisorEvent};
        let faults = FaultInjector::new(FaultsConfig {
            enabled: true,
            ..FaultsConfig::default()
        });
        let (events, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let mut tracker = RestartTracker::new(ActorKind::RequestPlane, "0");
        tracker.supervise(&SupervisionConfig::default(), events);
        let guard = Guard {
            faults: faults.clone(),
            supervision: Arc::new(Mutex::new(tracker)),
        };
        let running = |tx_capacity| {
            let (tx, rx) = mpsc::channel(tx_capacity);
            let phase = Phase::Running {
                outputs: rx,
                usage: Usage::default(),
                finished: false,
            };
            (tx, phase)
        };
        let output = Ok(EngineOutput {
            token_ids: vec![7],
            ..EngineOutput::default()
        });

        let (tx, phase) = running(4);
        tx.send(output.clone()).await.expect("open");
        faults
            .arm(FaultSpec::new(FaultKind::RequestPlanePanic))
            .expect("armed");
        let (reply, phase) = next_output(phase, &guard).await.expect("a reply");
        assert!(matches!(reply, Reply::Abandon), "{reply:?}");
        assert!(matches!(phase, Phase::Done));
        drop(phase);
        assert!(
            tx.is_closed(),
            "the engine learns that nobody reads its outputs"
        );
        match reports.try_recv() {
            Ok(SupervisorEvent::Restarted { actor, reason, .. }) => {
                assert_eq!(actor, ActorKind::RequestPlane);
                assert!(reason.contains("injected fault"), "{reason}");
            }
            other => panic!("expected a restart report, got {other:?}"),
        }

        let (tx, phase) = running(4);
        tx.send(output).await.expect("open");
        let (reply, _) = next_output(phase, &guard).await.expect("a reply");
        assert!(matches!(reply, Reply::Item(_)), "{reply:?}");
        assert_eq!(
            reply.annotated()["data"]["token_ids"],
            serde_json::json!([7])
        );
    }

    #[test]
    fn bodies_that_cannot_be_served_are_answered_on_the_stream() {
        for (codec, body, expected) in [
            (None, b"{\"nope\":1}".to_vec(), "token_ids"),
            (Some("msgpack"), b"\xc1".to_vec(), "msgpack"),
            (Some("cbor"), b"{}".to_vec(), "cbor"),
            (None, b"{\"token_ids\": []}".to_vec(), "token_ids is empty"),
        ] {
            let error = served(&envelope("req-1", "tcp_server", codec, &body)).unwrap_err();
            assert!(
                error.contains(expected),
                "{error} should mention {expected}"
            );
        }
    }
}
