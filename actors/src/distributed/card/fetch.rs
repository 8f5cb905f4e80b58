//! Frontend side: fetching a card's files (local path, `file://`, `http://`), verifying their
//! checksums, caching them, and building the model's tokenizer.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::models::ModelStore;
use crate::tokenizer::{HfTokenizerFiles, ModelTokenizer, TokenizerError};

/// How [`fetch_file`] and [`load_model_with`] fetch card files.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Where files fetched over HTTP are kept, named by checksum, so that a restart does not
    /// fetch them again; `None`: no cache.
    pub cache_dir: Option<PathBuf>,
    /// Largest file accepted: a bogus card must not fill memory.
    pub max_bytes: u64,
    /// Longest wait for one file: a worker that accepts connections but never answers must not
    /// stall the frontend's model discovery.
    pub timeout: Duration,
}

impl Default for FetchOptions {
    /// Caches under the default model store (`<home>/cards/fetched`), 64 MiB, 30 s.
    fn default() -> Self {
        Self {
            cache_dir: Some(ModelStore::default_home().join("cards").join("fetched")),
            max_bytes: DEFAULT_MAX_FILE_BYTES,
            timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }
}

/// Reads the file `file` references — a local path, a `file://` URL or an `http://` URL — and
/// verifies its blake3 checksum. Files fetched over HTTP are served from, and saved to,
/// `options.cache_dir`.
pub async fn fetch_file(file: &FileRef, options: &FetchOptions) -> Result<Vec<u8>, CardError> {
    let expected = checksum_hex(&file.checksum).ok_or_else(|| CardError::InvalidField {
        field: format!("checksum of {}", file.path),
        reason: format!(
            "{:?} is not \"blake3:\" and 64 lowercase hex digits",
            file.checksum
        ),
    })?;
    if file.size.is_some_and(|size| size > options.max_bytes) {
        return Err(CardError::TooLarge {
            file: file.path.clone(),
            limit: options.max_bytes,
        });
    }
    if file.path.starts_with("http://") {
        fetch_http(file, expected, options).await
    } else if file.path.starts_with("https://") {
        Err(CardError::Fetch {
            url: file.path.clone(),
            reason: "https is not supported; serve card files over http or a shared path"
                .to_string(),
        })
    } else {
        let bytes = fetch_local(file, options.max_bytes).await?;
        verify(file, &bytes)?;
        Ok(bytes)
    }
}

/// An `http://` file: from the cache when a verified copy is there, else fetched, verified and
/// cached.
async fn fetch_http(
    file: &FileRef,
    expected_hex: &str,
    options: &FetchOptions,
) -> Result<Vec<u8>, CardError> {
    let cached = options.cache_dir.as_ref().map(|dir| dir.join(expected_hex));
    if let Some(bytes) = cached
        .as_deref()
        .and_then(|path| read_cached(path, expected_hex))
    {
        return Ok(bytes);
    }
    let url = file.path.trim_start_matches("http://");
    let bytes = tokio::time::timeout(options.timeout, http_get(url, options.max_bytes))
        .await
        .map_err(|_| CardError::Fetch {
            url: file.path.clone(),
            reason: format!("no complete answer within {:?}", options.timeout),
        })?
        .map_err(|error| match error {
            HttpError::TooLarge => CardError::TooLarge {
                file: file.path.clone(),
                limit: options.max_bytes,
            },
            HttpError::Other(reason) => CardError::Fetch {
                url: file.path.clone(),
                reason,
            },
        })?;
    verify(file, &bytes)?;
    if let Some(path) = cached {
        // A cache that cannot be written only costs a fetch next time.
        let saved = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(|e| CardError::io("create", &path, e))
            .and_then(|()| write_atomically(&path, &bytes));
        if let Err(error) = saved {
            tracing::warn!(%error, "cannot cache a model card file");
        }
    }
    Ok(bytes)
}

/// A local file: a path or a `file://` URL.
async fn fetch_local(file: &FileRef, limit: u64) -> Result<Vec<u8>, CardError> {
    let path = PathBuf::from(file.path.strip_prefix("file://").unwrap_or(&file.path));
    tokio::task::spawn_blocking(move || read_local(&path, limit))
        .await
        .map_err(|e| CardError::Fetch {
            url: file.path.clone(),
            reason: format!("the reading task failed: {e}"),
        })?
        .map_err(|error| match error {
            LocalError::TooLarge => CardError::TooLarge {
                file: file.path.clone(),
                limit,
            },
            LocalError::Io(e) => CardError::Io {
                action: "read",
                path: file.path.clone(),
                source: e,
            },
        })
}

fn verify(file: &FileRef, bytes: &[u8]) -> Result<(), CardError> {
    let actual = checksum(bytes);
    if actual != file.checksum {
        return Err(CardError::ChecksumMismatch {
            file: file.path.clone(),
            expected: file.checksum.clone(),
            actual,
        });
    }
    Ok(())
}

/// The cached copy of a file, if present and still matching its checksum.
fn read_cached(path: &Path, expected_hex: &str) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    (blake3::hash(&bytes).to_hex().as_str() == expected_hex).then_some(bytes)
}

enum LocalError {
    TooLarge,
    Io(io::Error),
}

fn read_local(path: &Path, limit: u64) -> Result<Vec<u8>, LocalError> {
    let file = std::fs::File::open(path).map_err(LocalError::Io)?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, limit + 1), &mut bytes)
        .map_err(LocalError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(LocalError::TooLarge);
    }
    Ok(bytes)
}

enum HttpError {
    TooLarge,
    Other(String),
}

/// Room for the status line and headers on top of the body limit.
const MAX_HEADER_BYTES: u64 = 64 * 1024;

/// A minimal HTTP/1.1 GET of `rest` (the URL without `http://`) on its own connection. The body
/// is framed by `Content-Length`, chunked encoding, or the end of the connection; reading stops
/// as soon as it is complete, so a server that keeps the connection open is no problem.
async fn http_get(rest: &str, limit: u64) -> Result<Vec<u8>, HttpError> {
    let other = HttpError::Other;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(other("the URL has no host".to_string()));
    }
    let has_port = match authority.rfind(']') {
        Some(bracket) => authority[bracket..].contains(':'),
        None => authority.contains(':'),
    };
    let address = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .map_err(|e| other(format!("cannot connect to {address}: {e}")))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: */*\r\n\
         User-Agent: dynamix\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| other(format!("cannot send the request: {e}")))?;

    let cap = limit + MAX_HEADER_BYTES;
    let mut response = Vec::new();
    let mut head: Option<ResponseHead> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| other(format!("cannot read the answer: {e}")))?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        if response.len() as u64 > cap {
            return Err(HttpError::TooLarge);
        }
        if head.is_none() {
            head = ResponseHead::parse(&response).map_err(other)?;
        }
        if let Some(head) = &head {
            if let Some(body) = head
                .body(&response[head.body_start..], false)
                .map_err(other)?
            {
                return checked_body(body, limit);
            }
        }
    }
    let head = match head {
        Some(head) => head,
        None => return Err(other("the answer has no complete header".to_string())),
    };
    match head
        .body(&response[head.body_start..], true)
        .map_err(other)?
    {
        Some(body) => checked_body(body, limit),
        None => Err(other(
            "the connection closed before the body ended".to_string(),
        )),
    }
}

fn checked_body(body: Vec<u8>, limit: u64) -> Result<Vec<u8>, HttpError> {
    if body.len() as u64 > limit {
        return Err(HttpError::TooLarge);
    }
    Ok(body)
}

/// What the status line and headers say about the body.
struct ResponseHead {
    /// Where the body starts in the response bytes.
    body_start: usize,
    content_length: Option<usize>,
    chunked: bool,
}

impl ResponseHead {
    /// The head, once `response` holds all of it (`None` before); an error for any status but
    /// 200 or a malformed head.
    fn parse(response: &[u8]) -> Result<Option<Self>, String> {
        let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = String::from_utf8_lossy(&response[..head_end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| format!("malformed status line {status_line:?}"))?;
        if status != 200 {
            return Err(format!("the server answered {status_line:?}"));
        }
        let mut content_length = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| format!("malformed Content-Length {value:?}"))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
        Ok(Some(Self {
            body_start: head_end + 4,
            content_length,
            chunked,
        }))
    }

    /// The body if `received` completes it (`at_end`: the connection has closed, which ends an
    /// unframed body); `None` while more is to come.
    fn body(&self, received: &[u8], at_end: bool) -> Result<Option<Vec<u8>>, String> {
        if self.chunked {
            return dechunk(received);
        }
        match self.content_length {
            Some(length) if received.len() >= length => Ok(Some(received[..length].to_vec())),
            Some(length) if at_end => Err(format!(
                "the body ended after {} of {length} bytes",
                received.len()
            )),
            Some(_) => Ok(None),
            None if at_end => Ok(Some(received.to_vec())),
            None => Ok(None),
        }
    }
}

/// Decodes a chunked body (`<hex size>[;ext]\r\n<data>\r\n ... 0\r\n`); `None` while the last
/// chunk has not arrived.
fn dechunk(mut body: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&body[..line_end]);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("malformed chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        if body.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// A model served from a card: what the frontend needs to tokenize, route and validate.
#[derive(Clone, Debug)]
pub struct CardModel {
    /// The model name clients ask for (`display_name`).
    pub name: String,
    /// The tokenizer and chat template built from the card's files.
    pub tokenizer: Arc<ModelTokenizer>,
    /// Tokens per KV cache block (`kv_cache_block_size`).
    pub kv_block_size: u32,
    /// The context window to serve (see [`ModelCard::served_context_length`]; else the model's
    /// `config.json`).
    pub context_length: u32,
    /// Every id that ends a generation.
    pub eos_token_ids: Vec<u32>,
}

/// [`load_model_with`] with the default [`FetchOptions`].
pub async fn load_model(card: &ModelCard) -> Result<CardModel, CardError> {
    load_model_with(card, &FetchOptions::default()).await
}

/// Validates `card`, fetches and verifies its files, and builds the model's tokenizer.
pub async fn load_model_with(
    card: &ModelCard,
    options: &FetchOptions,
) -> Result<CardModel, CardError> {
    card.validate()?;
    let optional = |file: Option<&FileRef>| {
        let file = file.cloned();
        async move {
            match file {
                Some(file) => fetch_file(&file, options).await.map(Some),
                None => Ok(None),
            }
        }
    };
    let formatters = [&card.chat_template_file, &card.prompt_formatter];
    let formatter_file = |pick: fn(&PromptFormatterRef) -> Option<&FileRef>| {
        formatters.iter().filter_map(|f| f.as_ref()).find_map(pick)
    };
    let tokenizer_file = card
        .tokenizer_file()
        .ok_or_else(|| missing("card_json.tokenizer.hf_tokenizer_json"))?;

    let tokenizer_json = fetch_file(tokenizer_file, options).await?;
    let tokenizer_config =
        optional(formatter_file(|f| f.hf_tokenizer_config_json.as_ref())).await?;
    let template_jinja = optional(formatter_file(|f| {
        f.hf_chat_template.as_ref().map(|t| &t.file)
    }))
    .await?;
    let template_json = optional(formatter_file(|f| {
        f.hf_chat_template_json.as_ref().map(|t| &t.file)
    }))
    .await?;
    let generation_config = optional(
        card.gen_config
            .as_ref()
            .and_then(|g| g.hf_generation_config_json.as_ref()),
    )
    .await?;
    let config = optional(
        card.model_info
            .as_ref()
            .and_then(|m| m.hf_config_json.as_ref()),
    )
    .await?;

    let chat_template = match (template_jinja, template_json) {
        (Some(bytes), _) => {
            Some(
                String::from_utf8(bytes).map_err(|_| CardError::InvalidField {
                    field: "card_json.chat_template_file.hf_chat_template.file".to_string(),
                    reason: "the template is not UTF-8".to_string(),
                })?,
            )
        }
        (None, Some(bytes)) => Some(template_from_json(&bytes)?),
        (None, None) => None,
    };

    let tokenizer = tokio::task::spawn_blocking(move || {
        ModelTokenizer::from_hf(&HfTokenizerFiles {
            tokenizer_json: &tokenizer_json,
            tokenizer_config_json: tokenizer_config.as_deref(),
            chat_template: chat_template.as_deref(),
            generation_config_json: generation_config.as_deref(),
            config_json: config.as_deref(),
        })
    })
    .await
    .map_err(|e| {
        CardError::Tokenizer(TokenizerError::Build(format!(
            "the loading task failed: {e}"
        )))
    })??;

    Ok(CardModel {
        name: card.display_name.clone(),
        kv_block_size: card.kv_cache_block_size,
        context_length: card
            .served_context_length()
            .unwrap_or_else(|| tokenizer.context_length()),
        eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        tokenizer: Arc::new(tokenizer),
    })
}

/// The template of a `{"chat_template": ...}` file (a string, or `{name, template}` entries of
/// which "default" wins).
fn template_from_json(bytes: &[u8]) -> Result<String, CardError> {
    let field = "card_json.chat_template_file.hf_chat_template_json.file";
    let invalid = |reason: &str| CardError::InvalidField {
        field: field.to_string(),
        reason: reason.to_string(),
    };
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(&format!("not JSON: {e}")))?;
    match value.get("chat_template") {
        Some(Value::String(template)) => Ok(template.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|e| e.get("template")?.as_str())
            .map(str::to_string)
            .ok_or_else(|| invalid("chat_template lists no template")),
        _ => Err(invalid("no chat_template string")),
    }
}
