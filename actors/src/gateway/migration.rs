//! Request migration (frontend spec §6): one [`ChoiceStream`] per routed choice reads the engine's token
//! channel and, when the stream fails in a migratable way — the engine died (channel closed before a
//! finish), reported a migratable error (engine shutdown, unreachable), or stalled past
//! `migration.stall_timeout_secs` — re-routes the request with the tokens delivered so far appended to
//! the prompt and `max_tokens` reduced by them, under the same request id, with the failed engine
//! excluded. Above this layer nothing notices: the decoder sees one uninterrupted sequence of outputs.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::engine::{RequestProgress, RequestStage};
use crate::error::{ApiError, ErrorClass};
use crate::gateway::inflight::{InflightHandle, InflightRegistry};
use crate::metrics::{FrontendMetrics, MigrationOutcome, MigrationType};
use crate::protocol::engine::{EngineEvent, EngineRequest};
use crate::router::{Routed, Router};
use crate::setting::InvalidSetting;
use crate::supervision::ActorKind;

/// `[migration]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationConfig {
    /// Migrations allowed per request (`--migration-limit`, `DYN_MIGRATION_LIMIT`); 0 = off. Attempts
    /// allowed = limit + 1.
    pub limit: u32,
    /// An engine that produces no output for this long is treated as failed (seconds; 0 = never).
    pub stall_timeout_secs: f64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            limit: 0,
            stall_timeout_secs: 0.0,
        }
    }
}

impl MigrationConfig {
    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(self.stall_timeout_secs.is_finite() && self.stall_timeout_secs >= 0.0) {
            return Err(InvalidSetting::new(
                "migration.stall_timeout_secs",
                self.stall_timeout_secs,
                "must be a non-negative number of seconds",
            ));
        }
        Ok(())
    }

    fn stall_timeout(&self) -> Option<Duration> {
        (self.stall_timeout_secs > 0.0).then(|| Duration::from_secs_f64(self.stall_timeout_secs))
    }
}

/// What the serving path needs to migrate requests.
pub struct Migrator {
    /// Settings.
    pub config: MigrationConfig,
    /// Where requests are routed (and re-routed), without a mailbox hop.
    pub router: Arc<Router>,
    /// Migration metrics.
    pub metrics: Option<Arc<FrontendMetrics>>,
    /// Served model name (metric label).
    pub model: String,
    /// The in-flight registry.
    pub inflight: Arc<InflightRegistry>,
    /// Capacity of each token channel.
    pub stream_buffer: usize,
    /// The root supervisor, told of each migration (its timeline).
    pub events: Option<crate::supervision::SupervisorEvents>,
}

impl Migrator {
    fn report(
        &self,
        request_id: &str,
        from_engine: u64,
        to_engine: Option<u64>,
        cause: &'static str,
    ) {
        if let Some(events) = &self.events {
            let _ = events.send(crate::supervision::SupervisorEvent::Migrated {
                request_id: request_id.to_string(),
                from_engine,
                to_engine,
                cause,
            });
        }
    }
}

/// One migration that recovered: when it happened and how long the client waited between the last
/// output before the failure and the first one after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Recovery {
    /// Choice index.
    pub choice: u32,
    /// Engine that failed.
    pub from_engine: u64,
    /// Engine that continued.
    pub to_engine: u64,
    /// What failed: `engine_stopped` (panic, restart or removal), `engine_error` or `stalled`.
    pub cause: &'static str,
    /// Last output before the failure → first output after it (None until that first output).
    pub gap: Option<Duration>,
}

/// Recoveries of one request, shared by its choice streams.
pub type Recoveries = Arc<Mutex<Vec<Recovery>>>;

/// Route `request` (a retry after a router or engine failure is a new-request migration). Router
/// restarts are retried a few times whatever the limit: no engine was involved and nothing was produced.
pub(crate) async fn route(
    migrator: &Migrator,
    request: &EngineRequest,
    output: &mpsc::Sender<EngineEvent>,
    exclude: Vec<u64>,
    migrations_left: &mut u32,
) -> Result<Routed, ApiError> {
    const ROUTER_RESTART_RETRIES: u32 = 3;
    let mut router_restarts = 0;
    loop {
        let result = migrator.router.route(request, output, &exclude);
        let error = match result {
            Ok(routed) => return Ok(routed),
            Err(error) => error,
        };
        if error.restarted == Some(ActorKind::Router) && router_restarts < ROUTER_RESTART_RETRIES {
            router_restarts += 1;
            continue;
        }
        // No engine at all: retrying at once would spend the attempts in microseconds (a stream
        // being migrated waits for one instead, in `route_waiting`).
        if error.class.is_migratable() && !error.no_engine && *migrations_left > 0 {
            *migrations_left -= 1;
            if let Some(metrics) = &migrator.metrics {
                metrics.migration(&migrator.model, MigrationType::NewRequest);
            }
            continue;
        }
        return Err(error);
    }
}

/// How long a migrating stream waits for an engine when none can be routed to (a frontend keeps a
/// worker whose stream broke out of routing until it answers a probe, every 500 ms).
const NO_ENGINE_WAIT: Duration = Duration::from_secs(3);

/// [`route`] for a stream being migrated off `failed`: when no engine can be routed to, it waits (up
/// to [`NO_ENGINE_WAIT`], polling) for one to come back, `failed` included, rather than failing the
/// client's stream half-way.
async fn route_waiting(
    migrator: &Migrator,
    request: &EngineRequest,
    output: &mpsc::Sender<EngineEvent>,
    failed: u64,
    migrations_left: &mut u32,
) -> Result<Routed, ApiError> {
    const POLL: Duration = Duration::from_millis(50);
    let deadline = Instant::now() + NO_ENGINE_WAIT;
    let mut exclude = vec![failed];
    loop {
        match route(migrator, request, output, exclude, migrations_left).await {
            Err(error) if error.no_engine && Instant::now() + POLL < deadline => {
                tokio::time::sleep(POLL).await;
                // An engine that failed this stream but answers again (a worker's request plane
                // that dropped one stream) may take it back.
                exclude = Vec::new();
            }
            done => return done,
        }
    }
}

/// Why a stream failed.
enum Failure {
    /// The engine reported a migratable error.
    Error(ApiError),
    /// The channel closed before the choice finished (the engine stopped: panic, restart, removal).
    Closed,
    /// No output for the stall timeout.
    Stalled(Duration),
}

impl Failure {
    fn cause(&self) -> &'static str {
        match self {
            Failure::Error(_) => "engine_error",
            Failure::Closed => "engine_stopped",
            Failure::Stalled(_) => "stalled",
        }
    }

    /// The item the client gets when the failure cannot be migrated.
    fn into_event(self, engine: u64) -> Option<EngineEvent> {
        match self {
            Failure::Error(e) => Some(Err(e)),
            Failure::Closed => None,
            Failure::Stalled(after) => Some(Err(ApiError::new(
                ErrorClass::Timeout,
                format!(
                    "Engine {engine} produced no output for {:.1} s",
                    after.as_secs_f64()
                ),
            ))),
        }
    }
}

/// One choice's stream over however many engines it takes.
pub(crate) struct ChoiceStream {
    index: usize,
    migrator: Arc<Migrator>,
    request: EngineRequest,
    rx: mpsc::Receiver<EngineEvent>,
    engine_id: u64,
    migrations_left: u32,
    inflight: InflightHandle,
    recoveries: Recoveries,
    last_output: Instant,
    /// Set by a migration until the first output after it arrives.
    recovering_since: Option<(Instant, usize)>,
    done: bool,
}

impl ChoiceStream {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: usize,
        migrator: Arc<Migrator>,
        request: EngineRequest,
        rx: mpsc::Receiver<EngineEvent>,
        routed: Routed,
        migrations_left: u32,
        recoveries: Recoveries,
    ) -> Self {
        let inflight =
            migrator
                .inflight
                .register(&request.request_id, index as u32, routed.engine_id);
        ChoiceStream {
            index,
            migrator,
            request,
            rx,
            engine_id: routed.engine_id,
            migrations_left,
            inflight,
            recoveries,
            last_output: Instant::now(),
            recovering_since: None,
            done: false,
        }
    }

    /// The stream of `(choice index, event)`; `(index, None)` when the engine's channel closed early
    /// and could not be migrated.
    pub(crate) fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = (usize, Option<EngineEvent>)> + Send {
        futures_util::stream::unfold(self, |mut this| async move {
            let item = this.next_item().await?;
            Some((item, this))
        })
    }

    async fn receive(&mut self) -> Result<Option<EngineEvent>, Duration> {
        match self.migrator.config.stall_timeout() {
            Some(limit) => tokio::time::timeout(limit, self.rx.recv())
                .await
                .map_err(|_| limit),
            None => Ok(self.rx.recv().await),
        }
    }

    /// The next `(choice index, event)`, as [`Self::into_stream`] yields them.
    pub(crate) async fn next_item(&mut self) -> Option<(usize, Option<EngineEvent>)> {
        if self.done {
            return None;
        }
        loop {
            let failure = match self.receive().await {
                Ok(Some(Ok(output))) => {
                    if let Some((since, at)) = self.recovering_since.take() {
                        if let Ok(mut recoveries) = self.recoveries.lock() {
                            if let Some(r) = recoveries.get_mut(at) {
                                r.gap = Some(since.elapsed());
                            }
                        }
                    }
                    // Only a migration reads it (the start of its recovery gap), and none can come
                    // once the attempts are spent: no clock read per output then.
                    if self.migrations_left > 0 {
                        self.last_output = Instant::now();
                    }
                    let tokens = output
                        .token_ids
                        .len()
                        .max(usize::from(output.text.is_some()));
                    self.inflight
                        .entry()
                        .tokens
                        .fetch_add(tokens as u64, Ordering::Relaxed);
                    if self.migrations_left > 0 && tokens > 0 {
                        // Continuation state (§6): delivered tokens become prompt.
                        self.request.token_ids.extend_from_slice(&output.token_ids);
                        self.request.resumed_outputs += 1;
                        if let Some(max) = &mut self.request.stop.max_tokens {
                            *max = max.saturating_sub(tokens as u32);
                        }
                    }
                    if output.finish_reason.is_some() {
                        self.done = true;
                    }
                    return Some((self.index, Some(Ok(output))));
                }
                Ok(Some(Err(error))) if error.class.is_migratable() => Failure::Error(error),
                Ok(Some(Err(error))) => {
                    self.done = true;
                    return Some((self.index, Some(Err(error))));
                }
                Ok(None) => Failure::Closed,
                Err(after) => Failure::Stalled(after),
            };
            // Whatever happens next, the failed engine no longer serves this request.
            self.migrator.router.progress(&RequestProgress {
                engine_id: self.engine_id,
                request_id: self.request.request_id.clone(),
                stage: RequestStage::Finished,
            });
            if let Err(event) = self.migrate(failure).await {
                self.done = true;
                return Some((self.index, event));
            }
        }
    }

    /// Continue on another engine, or give back the event the client must see.
    async fn migrate(&mut self, failure: Failure) -> Result<(), Option<EngineEvent>> {
        let failed = self.engine_id;
        if self.migrations_left == 0 {
            return Err(failure.into_event(failed));
        }
        self.migrations_left -= 1;
        let detected = Instant::now();
        let migrator = self.migrator.clone();
        if let Some(metrics) = &migrator.metrics {
            metrics.migration(&migrator.model, MigrationType::OngoingRequest);
        }
        self.inflight
            .entry()
            .migrations
            .fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(migrator.stream_buffer.max(1));
        let mut left = self.migrations_left;
        let routed = route_waiting(&migrator, &self.request, &tx, failed, &mut left).await;
        self.migrations_left = left;
        let outcome = match routed {
            Ok(routed) => {
                tracing::info!(
                    request_id = %self.request.request_id,
                    choice = self.index,
                    from = failed,
                    to = routed.engine_id,
                    delivered = self.request.resumed_outputs,
                    "request migrated"
                );
                migrator.report(
                    &self.request.request_id,
                    failed,
                    Some(routed.engine_id),
                    failure.cause(),
                );
                self.rx = rx;
                self.engine_id = routed.engine_id;
                self.inflight
                    .entry()
                    .engine_id
                    .store(routed.engine_id, Ordering::Relaxed);
                if let Ok(mut recoveries) = self.recoveries.lock() {
                    self.recovering_since = Some((self.last_output, recoveries.len()));
                    recoveries.push(Recovery {
                        choice: self.index as u32,
                        from_engine: failed,
                        to_engine: routed.engine_id,
                        cause: failure.cause(),
                        gap: None,
                    });
                }
                Ok(())
            }
            Err(error) => {
                tracing::warn!(request_id = %self.request.request_id, error = %error.message, "migration failed");
                migrator.report(&self.request.request_id, failed, None, failure.cause());
                Err(failure.into_event(failed))
            }
        };
        if let Some(metrics) = &migrator.metrics {
            metrics.observe_migration_duration(
                &migrator.model,
                MigrationType::OngoingRequest,
                if outcome.is_ok() {
                    MigrationOutcome::Recovered
                } else {
                    MigrationOutcome::Failed
                },
                detected.elapsed().as_secs_f64(),
            );
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use actix::prelude::*;

    use super::*;
    use crate::engine::{EngineLoad, Generate};
    use crate::router::{EngineAdded, EngineSlot, KvRouterActor, RouterConfig};

    /// An engine that takes requests and never answers.
    struct Idle;

    impl Actor for Idle {
        type Context = Context<Self>;
    }

    impl Handler<Generate> for Idle {
        type Result = ();

        fn handle(&mut self, _msg: Generate, _ctx: &mut Self::Context) {}
    }

    fn request() -> EngineRequest {
        EngineRequest {
            request_id: "r".into(),
            model: "m".into(),
            token_ids: vec![1, 2, 3],
            echo_text: String::new(),
            sampling: Default::default(),
            stop: Default::default(),
            pinned_engine: None,
            resumed_outputs: 0,
        }
    }

    /// With no engine at all, a plain route fails at once (the typed `no_engine` signal, no
    /// attempt spent); a migrating stream waits and takes the engine that comes back.
    #[actix_rt::test]
    async fn a_migration_waits_for_an_engine_when_none_is_routable() {
        let actor =
            KvRouterActor::new(&RouterConfig::default(), Vec::new(), None).expect("a router");
        let shared = actor.router();
        let router = actor.start();
        let migrator = Migrator {
            config: MigrationConfig::default(),
            router: shared,
            metrics: None,
            model: "m".into(),
            inflight: Arc::new(InflightRegistry::default()),
            stream_buffer: 4,
            events: None,
        };
        let (tx, _rx) = mpsc::channel(4);
        let mut left = 2;
        let error = route(&migrator, &request(), &tx, vec![7], &mut left)
            .await
            .expect_err("no engine");
        assert!(error.no_engine, "{error:?}");
        assert_eq!(left, 2, "no attempt spent on an empty router");

        let slot = EngineSlot {
            id: 7,
            addr: Idle.start().recipient(),
            direct: None,
            load: Arc::new(EngineLoad::default()),
            capacity: 4,
            device: "cpu:0".into(),
        };
        actix_rt::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            router.do_send(EngineAdded { slot });
        });
        let started = Instant::now();
        let routed = route_waiting(&migrator, &request(), &tx, 7, &mut left)
            .await
            .expect("routed once the engine is back");
        assert_eq!(
            routed.engine_id, 7,
            "the engine it failed on may take it back"
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
    }
}
