//! Front ends that do not speak HTTP: `in=text` (interactive chat in the terminal, keeping the
//! conversation) and `in=batch:FILE` (JSONL prompts in, JSONL results out). Both use the same serving
//! path as HTTP (validator → router → engine) through the [`Gateway`](dynamix_actors::gateway::Gateway).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use dynamix_actors::error::ApiError;
use dynamix_actors::protocol::chat::{ChatCompletionRequest, ChatMessage, MessageContent, Role};
use dynamix_actors::supervisor::RunningService;
use dynamix_actors::validator::{ChatInput, RequestContext, ValidateChat};
use serde_json::json;

use crate::RunError;

fn message(role: Role, text: &str) -> ChatMessage {
    serde_json::from_value(json!({"role": role, "content": text})).unwrap_or(ChatMessage {
        role,
        content: Some(MessageContent::Text(text.to_string())),
        name: None,
        tool_calls: None,
        tool_call_id: None,
        reasoning_content: None,
        refusal: None,
        function_call: None,
    })
}

/// Why a terminal or batch front end failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A file could not be read or written.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// `read batch file`, `create`, `write`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The chat request could not be built from the conversation.
    #[error("cannot build a chat request: {0}")]
    Request(#[source] serde_json::Error),
    /// The input does not fit the process's role.
    #[error("{0}")]
    Input(&'static str),
}

fn chat_request(model: &str, messages: &[ChatMessage]) -> Result<ChatCompletionRequest, RunError> {
    serde_json::from_value(json!({"model": model, "messages": messages, "stream": true}))
        .map_err(|e| FrontendError::Request(e).into())
}

/// Run one chat turn; `on_text` receives each delta. Returns the reply and (prompt, completion) tokens.
async fn turn(
    service: &RunningService,
    request: ChatCompletionRequest,
    mut on_text: impl FnMut(&str),
) -> Result<(String, u32, u32), ApiError> {
    let context = RequestContext {
        request_id: uuid::Uuid::new_v4().to_string(),
        pinned_engine: None,
    };
    let validated = service
        .gateway
        .validate_chat(ValidateChat {
            input: ChatInput::Parsed(Box::new(request)),
            context,
        })
        .await?;
    let mut generation = service.gateway.generate(&validated).await?;
    let mut reply = String::new();
    while let Some(item) = generation.next().await {
        let delta = item?;
        on_text(&delta.delta.text);
        reply.push_str(&delta.delta.text);
    }
    let usage = generation.usage();
    Ok((reply, usage.prompt_tokens, usage.completion_tokens))
}

/// Interactive chat on stdin/stdout until EOF (Ctrl-D).
pub async fn text(service: &RunningService, model: &str) -> Result<(), RunError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
    // Blocking stdin reads stay off the async runtime.
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut history: Vec<ChatMessage> = Vec::new();
    let prompt = || {
        print!("✔ User · ");
        let _ = std::io::stdout().flush();
    };
    prompt();
    while let Some(line) = rx.recv().await {
        let line = line.trim().to_string();
        if line.is_empty() {
            prompt();
            continue;
        }
        history.push(message(Role::User, &line));
        let request = chat_request(model, &history)?;
        let result = turn(service, request, |t| {
            print!("{t}");
            let _ = std::io::stdout().flush();
        })
        .await;
        match result {
            Ok((reply, _, _)) => {
                println!();
                history.push(message(Role::Assistant, &reply));
            }
            Err(e) => {
                println!();
                eprintln!("error: {e}");
                history.pop();
            }
        }
        prompt();
    }
    println!();
    Ok(())
}

/// Read JSONL prompts (`{"text": ...}`, or `{"prompt": ...}`, or `{"messages": [...]}`) from `file`,
/// write one JSONL result per line to `output.jsonl` beside it.
pub async fn batch(service: &RunningService, model: &str, file: &Path) -> Result<(), RunError> {
    let input = std::fs::read_to_string(file).map_err(|source| FrontendError::Io {
        what: "read batch file",
        path: file.to_path_buf(),
        source,
    })?;
    let out_path = file.parent().unwrap_or(Path::new(".")).join("output.jsonl");
    let mut out = std::fs::File::create(&out_path).map_err(|source| FrontendError::Io {
        what: "create",
        path: out_path.clone(),
        source,
    })?;
    let started = Instant::now();
    let (mut ok, mut failed, mut tokens_out) = (0usize, 0usize, 0u64);
    for (number, line) in input.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                failed += 1;
                writeln_json(
                    &mut out,
                    &json!({"line": number + 1, "error": format!("not valid JSON: {e}")}),
                    &out_path,
                )?;
                continue;
            }
        };
        let messages: Vec<ChatMessage> = if let Some(m) = entry.get("messages") {
            match serde_json::from_value(m.clone()) {
                Ok(m) => m,
                Err(e) => {
                    failed += 1;
                    writeln_json(
                        &mut out,
                        &json!({"line": number + 1, "error": format!("bad messages: {e}")}),
                        &out_path,
                    )?;
                    continue;
                }
            }
        } else if let Some(text) = entry
            .get("text")
            .or_else(|| entry.get("prompt"))
            .and_then(|t| t.as_str())
        {
            vec![message(Role::User, text)]
        } else {
            failed += 1;
            writeln_json(
                &mut out,
                &json!({"line": number + 1, "error": "expected a `text`, `prompt` or `messages` field"}),
                &out_path,
            )?;
            continue;
        };
        let t0 = Instant::now();
        let result = turn(service, chat_request(model, &messages)?, |_| {}).await;
        let record = match result {
            Ok((reply, tokens_in, out_tokens)) => {
                ok += 1;
                tokens_out += u64::from(out_tokens);
                json!({"line": number + 1, "request": entry, "response": reply, "tokens_in": tokens_in,
                       "tokens_out": out_tokens, "elapsed_ms": t0.elapsed().as_millis() as u64})
            }
            Err(e) => {
                failed += 1;
                json!({"line": number + 1, "request": entry, "error": e.message})
            }
        };
        writeln_json(&mut out, &record, &out_path)?;
    }
    eprintln!(
        "batch: {ok} ok, {failed} failed, {tokens_out} tokens out in {:.2}s; results in {}",
        started.elapsed().as_secs_f64(),
        out_path.display()
    );
    Ok(())
}

fn writeln_json(
    out: &mut std::fs::File,
    value: &serde_json::Value,
    path: &Path,
) -> Result<(), RunError> {
    writeln!(out, "{value}").map_err(|source| {
        FrontendError::Io {
            what: "write",
            path: path.to_path_buf(),
            source,
        }
        .into()
    })
}
