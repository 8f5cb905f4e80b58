//! Dynamo's echo engines (runtime spec §5.1): deterministic, used by tests and benchmarks.
//!
//! - `echo_full` emits the last user message's text (the prompt for completions), one Unicode character per
//!   step, then a `stop`.
//! - `echo_core` emits the templated prompt's token ids, one per step, then a `stop`; it ignores
//!   `max_tokens` (the backend stage enforces it) and relies on the backend's EOS handling, so with the chat
//!   template it stops at the first `<|im_end|>` unless `ignore_eos` is set.
//!
//! A migrated request (`resumed_outputs` > 0) continues after the outputs already delivered, so a stream
//! that moved engines reads exactly like one that did not.
//!
//! Each step waits the configured delay first (`DYN_TOKEN_ECHO_DELAY_MS`); a step is abandoned as soon as
//! the consumer goes away.

use std::time::Duration;

use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;

use super::{Engine, TokenSink};
use crate::protocol::engine::{EngineOutput, EngineRequest};
use crate::protocol::FinishReason;

/// Echo the text.
pub struct EchoFull {
    delay: Duration,
}

impl EchoFull {
    /// With `delay` before each character.
    pub fn new(delay: Duration) -> Self {
        EchoFull { delay }
    }
}

impl Engine for EchoFull {
    fn name(&self) -> &'static str {
        "echo_full"
    }

    fn generate(&mut self, request: EngineRequest, sink: TokenSink) -> LocalBoxFuture<'static, ()> {
        let delay = self.delay;
        async move {
            let mut buf = [0u8; 4];
            // After a migration, continue where the failed attempt stopped.
            let skip = request.resumed_outputs as usize;
            for ch in request.echo_text.chars().skip(skip) {
                if sink.pause(delay).await.is_err() {
                    return;
                }
                let out = EngineOutput {
                    text: Some(ch.encode_utf8(&mut buf).to_string()),
                    ..Default::default()
                };
                if sink.send(out).await.is_err() {
                    return;
                }
            }
            let _ = sink
                .send(EngineOutput {
                    finish_reason: Some(FinishReason::Stop),
                    ..Default::default()
                })
                .await;
        }
        .boxed_local()
    }
}

/// Echo the prompt's token ids.
pub struct EchoCore {
    delay: Duration,
}

impl EchoCore {
    /// With `delay` before each token.
    pub fn new(delay: Duration) -> Self {
        EchoCore { delay }
    }
}

impl Engine for EchoCore {
    fn name(&self) -> &'static str {
        "echo_core"
    }

    fn generate(&mut self, request: EngineRequest, sink: TokenSink) -> LocalBoxFuture<'static, ()> {
        let delay = self.delay;
        async move {
            // After a migration the delivered tokens were appended to the prompt: echo the original
            // prompt from where the failed attempt stopped.
            let resumed = request.resumed_outputs as usize;
            let original = request.token_ids.len().saturating_sub(resumed);
            for &token in request.token_ids[..original].iter().skip(resumed) {
                if sink.pause(delay).await.is_err() {
                    return;
                }
                if sink
                    .send(EngineOutput {
                        token_ids: vec![token],
                        ..Default::default()
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = sink
                .send(EngineOutput {
                    finish_reason: Some(FinishReason::Stop),
                    ..Default::default()
                })
                .await;
        }
        .boxed_local()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::EngineLoad;

    fn request(tokens: Vec<u32>, text: &str) -> EngineRequest {
        EngineRequest {
            request_id: "r".into(),
            model: "m".into(),
            token_ids: tokens,
            echo_text: text.into(),
            sampling: Default::default(),
            stop: Default::default(),
            pinned_engine: None,
            resumed_outputs: 0,
        }
    }

    #[actix_rt::test]
    async fn echo_full_emits_chars_then_stop() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let load = Arc::new(EngineLoad::default());
        EchoFull::new(Duration::ZERO)
            .generate(request(vec![], "hé!"), TokenSink::new(tx, load.clone()))
            .await;
        let mut texts = Vec::new();
        let mut finish = None;
        while let Some(Ok(out)) = rx.recv().await {
            if let Some(t) = out.text {
                texts.push(t);
            }
            finish = out.finish_reason.or(finish);
        }
        assert_eq!(texts, vec!["h", "é", "!"]);
        assert_eq!(finish, Some(FinishReason::Stop));
        assert_eq!(
            load.generated_tokens
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
    }

    async fn outputs(engine: &mut dyn Engine, request: EngineRequest) -> Vec<EngineOutput> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        engine
            .generate(request, TokenSink::new(tx, Arc::new(EngineLoad::default())))
            .await;
        let mut all = Vec::new();
        while let Some(Ok(out)) = rx.recv().await {
            all.push(out);
        }
        all
    }

    #[actix_rt::test]
    async fn a_resumed_request_continues_where_the_failed_attempt_stopped() {
        // echo_full: two characters were delivered before the migration.
        let mut full = EchoFull::new(Duration::ZERO);
        let whole = outputs(&mut full, request(vec![], "abcd")).await;
        let mut resumed = request(vec![], "abcd");
        resumed.resumed_outputs = 2;
        let rest = outputs(&mut full, resumed).await;
        assert_eq!(rest, whole[2..].to_vec());

        // echo_core: the delivered tokens 5, 6 were appended to the prompt by the migration.
        let mut core = EchoCore::new(Duration::ZERO);
        let whole = outputs(&mut core, request(vec![5, 6, 7, 8], "")).await;
        let mut resumed = request(vec![5, 6, 7, 8, 5, 6], "");
        resumed.resumed_outputs = 2;
        let rest = outputs(&mut core, resumed).await;
        assert_eq!(rest, whole[2..].to_vec());
        assert_eq!(rest.len(), 3, "7, 8 and the stop");
    }

    #[actix_rt::test]
    async fn echo_core_stops_when_consumer_leaves() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let load = Arc::new(EngineLoad::default());
        drop(rx);
        EchoCore::new(Duration::from_millis(5))
            .generate(request(vec![1, 2, 3], ""), TokenSink::new(tx, load.clone()))
            .await;
        assert_eq!(
            load.generated_tokens
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert_eq!(load.cancelled.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
