use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::client::{Event, MuxPeer};
use super::*;
use crate::endpoint::{EndpointServer, Handler, Replies, Reply, Request, ServerSettings};
use crate::error::DynamoError;

const PATH: &str = "1/ns/backend/generate";

#[test]
fn frames_round_trip_and_bad_heads_are_named() {
    let mut codec = FrameCodec::new(1024);
    let mut wire = BytesMut::new();
    for frame in [
        Frame::new(Kind::Data, 7, &b"abc"[..]),
        Frame::empty(Kind::End, 7),
        Frame::credit(9, 32),
    ] {
        codec.encode(frame.clone(), &mut wire).unwrap();
        assert_eq!(codec.decode(&mut wire).unwrap(), Some(frame));
    }
    assert_eq!(Frame::credit(1, 32).count(), Some(32));

    // Partial input consumes nothing.
    encode(&Frame::new(Kind::Data, 1, &b"xyz"[..]), &mut wire);
    let mut partial = wire.split_to(6);
    assert_eq!(codec.decode(&mut partial).unwrap(), None);
    assert_eq!(partial.len(), 6);

    let mut short = BytesMut::from(&[0, 0, 0, 2, 1, 0][..]);
    assert!(matches!(
        codec.decode(&mut short),
        Err(MuxError::TooShort(2))
    ));

    // An oversized frame is reported for its stream and skipped, however it arrives; the next
    // frame decodes.
    let mut sized = FrameCodec::new(16);
    let limit = 16 + REQUEST_OVERHEAD;
    let mut wire = BytesMut::new();
    encode(
        &Frame::new(Kind::Request, 3, vec![7u8; limit + 1]),
        &mut wire,
    );
    encode(&Frame::empty(Kind::Ping, 0), &mut wire);
    let mut got = Vec::new();
    let mut buffer = BytesMut::new();
    for chunk in wire.chunks(1000) {
        buffer.extend_from_slice(chunk);
        while let Some(frame) = sized.decode(&mut buffer).unwrap() {
            got.push(frame);
        }
    }
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].kind, got[0].stream), (Kind::TooLarge, 3));
    assert_eq!(got[0].oversize(), Some((limit + 1 + HEAD) as u64));
    assert_eq!(got[1], Frame::empty(Kind::Ping, 0));

    let mut unknown = BytesMut::from(&[0, 0, 0, 5, 42, 0, 0, 0, 1][..]);
    assert_eq!(
        codec.decode(&mut unknown).unwrap_err().to_string(),
        "unknown frame kind 42"
    );
}

#[test]
fn requests_round_trip_and_truncation_names_the_field() {
    let request = MuxRequest {
        window: 16,
        codec: PayloadCodec::Msgpack,
        id: "req-1".into(),
        path: PATH.into(),
        headers: BTreeMap::from([("traceparent".to_string(), "00-ab".to_string())]),
        metadata: Some(serde_json::Map::from_iter([("k".to_string(), json!(1))])),
        body: Bytes::from_static(b"\x81\xa1n\x01"),
    };
    let bytes = request.encode().unwrap();
    assert_eq!(MuxRequest::decode(bytes.clone()).unwrap(), request);

    let bare = MuxRequest {
        headers: BTreeMap::new(),
        metadata: None,
        ..request
    };
    assert_eq!(MuxRequest::decode(bare.encode().unwrap()).unwrap(), bare);

    let e = MuxRequest::decode(bytes.slice(..10)).unwrap_err();
    assert_eq!(e.to_string(), "request frame truncated in its id field");
    let mut bad_codec = bytes.to_vec();
    bad_codec[4] = 9;
    let e = MuxRequest::decode(Bytes::from(bad_codec)).unwrap_err();
    assert!(e.to_string().contains("unknown payload codec 9"), "{e}");
}

/// Sends `body.n` items, then an error item when `body.fail` is set; counts the items it produced
/// and keeps each request's control.
struct Counter {
    produced: Arc<AtomicUsize>,
    controls: Arc<Mutex<Vec<Arc<crate::endpoint::Control>>>>,
    delay: Duration,
}

impl Handler for Counter {
    fn call(&self, request: Request) -> Replies {
        let n = request.body["n"].as_u64().unwrap_or(0);
        let fail = request.body["fail"].as_bool().unwrap_or(false);
        let (produced, delay) = (self.produced.clone(), self.delay);
        self.controls.lock().unwrap().push(request.control.clone());
        Box::pin(futures_util::stream::unfold(0u64, move |i| {
            let produced = produced.clone();
            async move {
                if i > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if i == n {
                    return fail.then(|| {
                        let error = DynamoError::new(
                            "InvalidArgument",
                            "InvalidRequest",
                            "request.invalid_argument",
                            "ValueError: no",
                        );
                        (Reply::Error(error), n + 1)
                    });
                }
                if i > n {
                    return None;
                }
                produced.fetch_add(1, Ordering::SeqCst);
                Some((Reply::Data(json!(i)), i + 1))
            }
        }))
    }
}

struct Fixture {
    server: Arc<EndpointServer>,
    produced: Arc<AtomicUsize>,
    controls: Arc<Mutex<Vec<Arc<crate::endpoint::Control>>>>,
}

async fn serve(delay: Duration) -> Fixture {
    let server = EndpointServer::bind(
        "127.0.0.1",
        0,
        ServerSettings {
            max_message_size: 1 << 20,
            connect_timeout: Duration::from_secs(5),
            mux: MuxSettings::default(),
        },
    )
    .await
    .unwrap();
    let produced = Arc::new(AtomicUsize::new(0));
    let controls = Arc::new(Mutex::new(Vec::new()));
    server
        .register(
            PATH,
            Arc::new(Counter {
                produced: produced.clone(),
                controls: controls.clone(),
                delay,
            }),
        )
        .unwrap();
    Fixture {
        server,
        produced,
        controls,
    }
}

fn peer(server: &EndpointServer, settings: MuxSettings) -> MuxPeer {
    MuxPeer::new(&server.address(), settings, Duration::from_secs(5), 1 << 20)
}

fn request(body: Value, window: u32) -> MuxRequest {
    MuxRequest {
        window,
        codec: PayloadCodec::Json,
        id: uuid::Uuid::new_v4().to_string(),
        path: PATH.into(),
        headers: BTreeMap::new(),
        metadata: None,
        body: Bytes::from(serde_json::to_vec(&body).unwrap()),
    }
}

/// The value of a Data event's item (`{"data": {"data": v}, "complete_final": false}`).
fn value(event: &Event) -> Value {
    match event {
        Event::Data(bytes) => {
            let item: Value = serde_json::from_slice(bytes).unwrap();
            assert_eq!(item["complete_final"], json!(false));
            item["data"].clone()
        }
        other => panic!("not data: {other:?}"),
    }
}

#[tokio::test]
async fn a_request_streams_its_items_and_completes() {
    let fixture = serve(Duration::ZERO).await;
    let peer = peer(&fixture.server, MuxSettings::default());
    let mut stream = peer.open(&request(json!({"n": 3}), 64)).await.unwrap();
    for i in 0..3 {
        assert_eq!(value(&stream.next().await.unwrap()), json!({"data": i}));
    }
    assert_eq!(stream.next().await, Some(Event::End));
    assert_eq!(stream.next().await, None);

    // An error item ends the stream, then End.
    let mut failing = peer
        .open(&request(json!({"n": 1, "fail": true}), 64))
        .await
        .unwrap();
    assert_eq!(value(&failing.next().await.unwrap()), json!({"data": 0}));
    let error = value(&failing.next().await.unwrap());
    assert_eq!(error["event"], json!("error"));
    assert_eq!(error["error"]["message"], json!("ValueError: no"));
    assert_eq!(failing.next().await, Some(Event::End));
}

#[tokio::test]
async fn bad_requests_are_refused_or_answered_with_an_error_item() {
    let fixture = serve(Duration::ZERO).await;
    let peer = peer(&fixture.server, MuxSettings::default());
    let mut unknown = peer
        .open(&MuxRequest {
            path: "2/ns/backend/generate".into(),
            ..request(json!({"n": 1}), 8)
        })
        .await
        .unwrap();
    assert_eq!(
        unknown.next().await,
        Some(Event::Refused(
            "unknown endpoint 2/ns/backend/generate".into()
        ))
    );

    let mut undecodable = peer
        .open(&MuxRequest {
            body: Bytes::from_static(b"{not json"),
            ..request(json!({}), 8)
        })
        .await
        .unwrap();
    let error = value(&undecodable.next().await.unwrap());
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("cannot decode the request body (json)"),
        "{error}"
    );
    assert_eq!(undecodable.next().await, Some(Event::End));
    // The connection carries on after both.
    let mut fine = peer.open(&request(json!({"n": 1}), 8)).await.unwrap();
    assert!(matches!(fine.next().await, Some(Event::Data(_))));
}

#[tokio::test]
async fn an_oversized_request_fails_alone() {
    let server = EndpointServer::bind(
        "127.0.0.1",
        0,
        ServerSettings {
            max_message_size: 1024,
            connect_timeout: Duration::from_secs(5),
            mux: MuxSettings::default(),
        },
    )
    .await
    .unwrap();
    server
        .register(
            PATH,
            Arc::new(Counter {
                produced: Arc::default(),
                controls: Arc::default(),
                delay: Duration::from_millis(5),
            }),
        )
        .unwrap();
    let peer = MuxPeer::new(
        &server.address(),
        MuxSettings {
            connections: 1,
            ..MuxSettings::default()
        },
        Duration::from_secs(5),
        1 << 24,
    );
    let mut running = peer.open(&request(json!({"n": 50}), 64)).await.unwrap();
    assert!(matches!(running.next().await, Some(Event::Data(_))));
    for size in [2000, 200_000] {
        let mut oversized = peer
            .open(&request(json!({"n": 1, "pad": "x".repeat(size)}), 64))
            .await
            .unwrap();
        match oversized.next().await {
            Some(Event::Refused(text)) => {
                assert!(text.starts_with("Request too large"), "{text}")
            }
            other => panic!("{other:?}"),
        }
    }
    let mut items = 1;
    while let Some(Event::Data(_)) = running.next().await {
        items += 1;
    }
    assert_eq!(items, 50, "the running stream went on");
}

#[tokio::test]
async fn many_streams_share_the_connections() {
    let fixture = serve(Duration::from_millis(1)).await;
    let peer = Arc::new(peer(
        &fixture.server,
        MuxSettings {
            connections: 2,
            ..MuxSettings::default()
        },
    ));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let peer = peer.clone();
            tokio::spawn(async move {
                let mut stream = peer.open(&request(json!({"n": 20}), 4)).await.unwrap();
                let mut items = 0;
                loop {
                    match stream.next().await {
                        Some(Event::Data(_)) => items += 1,
                        Some(Event::End) => return items,
                        other => panic!("{other:?}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 20);
    }
    assert_eq!(peer.open_connections(), 2);
    assert_eq!(fixture.produced.load(Ordering::SeqCst), 64 * 20);
}

#[tokio::test]
async fn a_stream_nobody_reads_stalls_alone_within_its_window() {
    let fixture = serve(Duration::ZERO).await;
    let peer = peer(
        &fixture.server,
        MuxSettings {
            connections: 1,
            ..MuxSettings::default()
        },
    );
    let mut stalled = peer.open(&request(json!({"n": 10_000}), 8)).await.unwrap();
    assert!(matches!(stalled.next().await, Some(Event::Data(_))));
    let mut other = peer.open(&request(json!({"n": 500}), 8)).await.unwrap();
    let mut items = 0;
    while let Some(Event::Data(_)) = other.next().await {
        items += 1;
    }
    assert_eq!(items, 500);
    // The unread stream got its window (8) and a credit for the half it took (4) at most.
    let produced_by_stalled = fixture.produced.load(Ordering::SeqCst) - 500;
    assert!(
        produced_by_stalled <= 8 + 4 + 1,
        "the unread stream produced {produced_by_stalled} items"
    );
}

#[tokio::test]
async fn dropping_a_stream_kills_its_handler() {
    let fixture = serve(Duration::from_millis(10)).await;
    let peer = peer(&fixture.server, MuxSettings::default());
    let mut stream = peer.open(&request(json!({"n": 1000}), 64)).await.unwrap();
    assert!(matches!(stream.next().await, Some(Event::Data(_))));
    drop(stream);
    let control = |i: usize| fixture.controls.lock().unwrap()[i].clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !control(0).is_killed() {
        assert!(tokio::time::Instant::now() < deadline, "handler not killed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut stopped = peer.open(&request(json!({"n": 1000}), 64)).await.unwrap();
    assert!(matches!(stopped.next().await, Some(Event::Data(_))));
    stopped.cancel(false);
    assert_eq!(stopped.next().await, None);
    tokio::time::timeout(Duration::from_secs(5), control(1).stopped())
        .await
        .expect("handler stopped");
    assert!(!control(1).is_killed());
}

#[tokio::test]
async fn a_silent_worker_is_taken_for_dead_and_its_streams_reset() {
    // Answers the preface, then reads and says nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut preface = [0u8; 8];
        socket.read_exact(&mut preface).await.unwrap();
        socket.write_all(PREFACE).await.unwrap();
        let mut sink = vec![0u8; 4096];
        while socket.read(&mut sink).await.map(|n| n > 0).unwrap_or(false) {}
    });
    let peer = MuxPeer::new(
        &address,
        MuxSettings {
            heartbeat: Duration::from_millis(50),
            dead_after: Duration::from_millis(300),
            ..MuxSettings::default()
        },
        Duration::from_secs(5),
        1 << 20,
    );
    let mut stream = peer.open(&request(json!({"n": 1}), 8)).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    match event {
        Some(Event::Reset(reason)) => assert!(reason.contains("taken for dead"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_lost_worker_resets_its_streams_and_the_next_request_cannot_dial() {
    // Answers the preface and one item for stream 1, then closes (a killed worker), and listens
    // no more.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        drop(listener);
        let mut preface = [0u8; 8];
        socket.read_exact(&mut preface).await.unwrap();
        socket.write_all(PREFACE).await.unwrap();
        let mut frames = BytesMut::new();
        encode(&Frame::new(Kind::Data, 1, &b"{}"[..]), &mut frames);
        socket.write_all(&frames).await.unwrap();
    });
    let peer = MuxPeer::new(
        &address,
        MuxSettings::default(),
        Duration::from_secs(5),
        1 << 20,
    );
    let mut stream = peer.open(&request(json!({"n": 1000}), 64)).await.unwrap();
    assert_eq!(
        stream.next().await,
        Some(Event::Data(Bytes::from_static(b"{}")))
    );
    match stream.next().await {
        Some(Event::Reset(reason)) => assert!(reason.contains("closed the connection"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(peer.open_connections(), 0);
    let e = peer.open(&request(json!({"n": 1}), 8)).await.err().unwrap();
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

#[tokio::test]
async fn a_peer_that_does_not_answer_the_preface_is_named() {
    // A Dynamo worker reads the preface as the start of a request frame and waits for the rest.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (_socket, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let peer = MuxPeer::new(
        &address,
        MuxSettings::default(),
        Duration::from_millis(200),
        1 << 20,
    );
    let e = peer.open(&request(json!({"n": 1}), 8)).await.err().unwrap();
    assert!(e.to_string().contains("timed out"), "{e}");
}
