//! Fetching the card's files from disk and over HTTP from a local server, verified and cached.

use super::*;

#[tokio::test]
async fn local_files_are_read_and_verified() {
    let tmp = TempDir::new("card-local");
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(&path, b"{\"hello\": 1}").expect("write");
    let good = FileRef::for_bytes(path.to_string_lossy(), b"{\"hello\": 1}");
    assert_eq!(
        fetch_file(&good, &no_cache()).await.expect("fetch"),
        b"{\"hello\": 1}"
    );
    let url = FileRef {
        path: format!("file://{}", path.display()),
        ..good.clone()
    };
    assert_eq!(
        fetch_file(&url, &no_cache()).await.expect("fetch").len(),
        12
    );

    let wrong = FileRef {
        checksum: checksum(b"something else"),
        ..good.clone()
    };
    let error = fetch_file(&wrong, &no_cache()).await.expect_err("mismatch");
    let message = error.to_string();
    assert!(
        matches!(error, CardError::ChecksumMismatch { .. }),
        "{message}"
    );
    assert!(
        message.contains(&wrong.checksum)
            && message.contains(&good.checksum)
            && message.contains("tokenizer.json"),
        "{message}"
    );

    let small = FetchOptions {
        max_bytes: 4,
        ..no_cache()
    };
    let error = fetch_file(
        &FileRef {
            size: None,
            ..good.clone()
        },
        &small,
    )
    .await
    .expect_err("too large");
    assert!(matches!(error, CardError::TooLarge { .. }), "{error}");

    let absent = FileRef {
        path: tmp
            .path()
            .join("absent.json")
            .to_string_lossy()
            .into_owned(),
        ..good
    };
    let error = fetch_file(&absent, &no_cache()).await.expect_err("absent");
    assert!(error.to_string().contains("absent.json"), "{error}");
    assert!(error.is_retryable());
}

/// How the test server frames its answer.
#[derive(Clone, Copy)]
enum Framing {
    ContentLength,
    /// `Content-Length`, then the connection stays open.
    KeepAlive,
    Chunked,
    NotFound,
    Silent,
}

/// Serves `body` for every GET on `127.0.0.1:<port>` until dropped; counts the requests.
async fn serve(body: &'static [u8], framing: Framing) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            assert!(request.starts_with(b"GET /v1/metadata/"), "{request:?}");
            let answer = match framing {
                Framing::ContentLength | Framing::KeepAlive => {
                    let mut a = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                         content-length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    a.extend_from_slice(body);
                    a
                }
                Framing::Chunked => {
                    let mut a = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    for chunk in body.chunks(5) {
                        a.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                        a.extend_from_slice(chunk);
                        a.extend_from_slice(b"\r\n");
                    }
                    a.extend_from_slice(b"0\r\n\r\n");
                    a
                }
                Framing::NotFound => {
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()
                }
                Framing::Silent => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Vec::new()
                }
            };
            let _ = stream.write_all(&answer).await;
            if let Framing::KeepAlive = framing {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            let _ = stream.shutdown().await;
        }
    });
    (address, requests)
}

#[tokio::test]
async fn http_files_are_fetched_verified_and_cached() {
    const BODY: &[u8] = b"{\"model_type\": \"llama\", \"vocab_size\": 368}";
    let tmp = TempDir::new("card-http");
    let options = FetchOptions {
        cache_dir: Some(tmp.path().join("fetched")),
        ..FetchOptions::default()
    };
    let (address, requests) = serve(BODY, Framing::ContentLength).await;
    let url = metadata_url(
        &address,
        "dynamo",
        "backend",
        "generate",
        "m",
        "config.json",
    );
    let file = FileRef::for_bytes(url, BODY);
    assert_eq!(fetch_file(&file, &options).await.expect("fetch"), BODY);
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    let hex = file.checksum.trim_start_matches("blake3:");
    assert_eq!(
        std::fs::read(tmp.path().join("fetched").join(hex)).expect("cached"),
        BODY
    );
    // The second read comes from the cache.
    assert_eq!(fetch_file(&file, &options).await.expect("fetch"), BODY);
    assert_eq!(requests.load(Ordering::SeqCst), 1);

    let (address, _) = serve(BODY, Framing::Chunked).await;
    let url = metadata_url(
        &address,
        "dynamo",
        "backend",
        "generate",
        "m",
        "config.json",
    );
    let file = FileRef::for_bytes(url, BODY);
    assert_eq!(fetch_file(&file, &no_cache()).await.expect("fetch"), BODY);

    let (address, _) = serve(BODY, Framing::KeepAlive).await;
    let url = metadata_url(
        &address,
        "dynamo",
        "backend",
        "generate",
        "m",
        "config.json",
    );
    let impatient = FetchOptions {
        timeout: Duration::from_secs(5),
        ..no_cache()
    };
    let kept_open = FileRef::for_bytes(url, BODY);
    assert_eq!(
        fetch_file(&kept_open, &impatient).await.expect("fetch"),
        BODY
    );

    let wrong = FileRef {
        checksum: checksum(b"other"),
        ..file
    };
    let error = fetch_file(&wrong, &options).await.expect_err("mismatch");
    assert!(
        matches!(error, CardError::ChecksumMismatch { .. }),
        "{error}"
    );

    let (address, _) = serve(BODY, Framing::NotFound).await;
    let url = metadata_url(
        &address,
        "dynamo",
        "backend",
        "generate",
        "m",
        "config.json",
    );
    let error = fetch_file(&FileRef::for_bytes(url, BODY), &no_cache())
        .await
        .expect_err("404");
    assert!(error.to_string().contains("404"), "{error}");

    let (address, _) = serve(BODY, Framing::Silent).await;
    let url = metadata_url(
        &address,
        "dynamo",
        "backend",
        "generate",
        "m",
        "config.json",
    );
    let impatient = FetchOptions {
        timeout: Duration::from_millis(200),
        ..no_cache()
    };
    let error = fetch_file(&FileRef::for_bytes(url, BODY), &impatient)
        .await
        .expect_err("timeout");
    assert!(
        matches!(&error, CardError::Fetch { reason, .. } if reason.contains("no complete answer")),
        "{error}"
    );

    let error = fetch_file(
        &FileRef::for_bytes("https://example.invalid/x", BODY),
        &no_cache(),
    )
    .await
    .expect_err("https");
    assert!(error.to_string().contains("https"), "{error}");
}
