use super::*;
use crate::client::{Call, CallError, ClientSettings, EndpointClient};
use crate::record::TcpTarget;
use crate::PayloadCodec;

fn settings() -> (ServerSettings, ClientSettings) {
    (
        ServerSettings {
            max_message_size: 1 << 20,
            connect_timeout: Duration::from_secs(5),
            mux: crate::mux::MuxSettings::default(),
        },
        ClientSettings {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_message_size: 1 << 20,
            mux: Some(crate::mux::MuxSettings::default()),
        },
    )
}

/// Echoes `body.n` items, then fails when `body.fail` is set; records stops.
fn counter(stops: Arc<Mutex<Vec<(bool, bool)>>>) -> Arc<dyn Handler> {
    Arc::new(move |request: Request| -> Replies {
        let n = request.body["n"].as_u64().unwrap_or(0);
        let fail = request.body["fail"].as_bool().unwrap_or(false);
        let control = request.control.clone();
        let stops = stops.clone();
        Box::pin(futures_util::stream::unfold(0u64, move |i| {
            let control = control.clone();
            let stops = stops.clone();
            async move {
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
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if control.is_stopped() {
                    stops
                        .lock()
                        .unwrap()
                        .push((control.is_stopped(), control.is_killed()));
                    return None;
                }
                Some((Reply::Data(json!(i)), i + 1))
            }
        }))
    })
}

#[tokio::test]
async fn calls_stream_items_errors_and_stops_over_tcp() {
    calls_stream_items_errors_and_stops(false).await;
}

#[tokio::test]
async fn calls_stream_items_errors_and_stops_over_the_multiplexed_plane() {
    calls_stream_items_errors_and_stops(true).await;
}

async fn calls_stream_items_errors_and_stops(mux: bool) {
    let (server_settings, client_settings) = settings();
    let server = EndpointServer::bind("127.0.0.1", 0, server_settings)
        .await
        .unwrap();
    let stops = Arc::new(Mutex::new(Vec::new()));
    let state = server
        .register("7/ns/comp/ep", counter(stops.clone()))
        .unwrap();
    assert!(server
        .register("7/ns/comp/ep", counter(stops.clone()))
        .is_err());
    let client = EndpointClient::new("127.0.0.1", client_settings)
        .await
        .unwrap();
    let target = TcpTarget {
        address: server.address(),
        path: "7/ns/comp/ep".into(),
    };
    for codec in [PayloadCodec::Json, PayloadCodec::Msgpack] {
        let body = json!({"n": 3});
        let mut stream = client
            .call(Call {
                target: &target,
                codec,
                id: "r1",
                body: &body,
                headers: BTreeMap::new(),
                mux,
            })
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(item) = stream.next().await {
            got.push(item.unwrap()["data"].clone());
        }
        assert_eq!(got, vec![json!(0), json!(1), json!(2)], "{codec:?}");
    }

    let body = json!({"n": 1, "fail": true});
    let mut stream = client
        .call(Call {
            target: &target,
            codec: PayloadCodec::Json,
            id: "r2",
            body: &body,
            headers: BTreeMap::new(),
            mux,
        })
        .await
        .unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap()["data"], json!(0));
    match stream.next().await {
        Some(Err(CallError::Remote(error))) => {
            assert_eq!(error.class.as_deref(), Some("InvalidRequest"));
            assert_eq!(error.text(), "ValueError: no");
        }
        other => panic!("expected the handler's error, got {other:?}"),
    }
    assert!(stream.next().await.is_none());

    // A stop reaches the handler's control; the stream then ends cleanly.
    let body = json!({"n": 1000});
    let mut stream = client
        .call(Call {
            target: &target,
            codec: PayloadCodec::Json,
            id: "r3",
            body: &body,
            headers: BTreeMap::new(),
            mux,
        })
        .await
        .unwrap();
    assert!(stream.next().await.unwrap().is_ok());
    stream.control().stop().await;
    while let Some(item) = stream.next().await {
        assert!(item.is_ok(), "{item:?}");
    }
    assert!(state.wait_idle(Some(Duration::from_secs(5))).await);

    // Unknown paths and draining endpoints are refused in the ACK.
    let unknown = TcpTarget {
        address: server.address(),
        path: "7/ns/comp/other".into(),
    };
    let refused = client
        .call(Call {
            target: &unknown,
            codec: PayloadCodec::Json,
            id: "r4",
            body: &body,
            headers: BTreeMap::new(),
            mux,
        })
        .await
        .err()
        .unwrap();
    assert!(
        refused
            .to_string()
            .contains("unknown endpoint 7/ns/comp/other"),
        "{refused}"
    );
    state.drain();
    let refused = client
        .call(Call {
            target: &target,
            codec: PayloadCodec::Json,
            id: "r5",
            body: &body,
            headers: BTreeMap::new(),
            mux,
        })
        .await
        .err()
        .unwrap();
    assert!(refused.to_string().contains("shutting down"), "{refused}");
}

#[tokio::test]
async fn a_dropped_stream_kills_the_handler() {
    a_dropped_stream_kills(false).await;
}

#[tokio::test]
async fn a_dropped_multiplexed_stream_kills_the_handler() {
    a_dropped_stream_kills(true).await;
}

async fn a_dropped_stream_kills(mux: bool) {
    let (server_settings, client_settings) = settings();
    let server = EndpointServer::bind("127.0.0.1", 0, server_settings)
        .await
        .unwrap();
    let stops = Arc::new(Mutex::new(Vec::new()));
    let state = server.register("1/a/b/c", counter(stops.clone())).unwrap();
    let client = EndpointClient::new("127.0.0.1", client_settings)
        .await
        .unwrap();
    let target = TcpTarget {
        address: server.address(),
        path: "1/a/b/c".into(),
    };
    let body = json!({"n": 1000});
    let mut stream = client
        .call(Call {
            target: &target,
            codec: PayloadCodec::Json,
            id: "d1",
            body: &body,
            headers: BTreeMap::new(),
            mux,
        })
        .await
        .unwrap();
    assert!(stream.next().await.unwrap().is_ok());
    drop(stream);
    assert!(state.wait_idle(Some(Duration::from_secs(5))).await);
    assert_eq!(state.inflight(), 0);
}
