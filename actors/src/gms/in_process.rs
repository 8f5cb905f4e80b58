//! [`InProcessGms`]: a memory service run inside this process (`model_engine.gms_serve`).

use std::path::PathBuf;
use std::time::Duration;

use actix::prelude::*;

use super::server::{GmsConfig, GmsServer};
use super::GpuMemoryActor;

/// A memory service run inside this process (`model_engine.gms_serve`): host backend, its own Arbiter
/// thread, owned by the root supervisor, which stops it at shutdown. Other processes on the machine
/// attach to what this one publishes.
pub struct InProcessGms {
    arbiter: Arbiter,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Where it listens.
    pub socket: PathBuf,
    /// Its actor.
    pub actor: Addr<GpuMemoryActor>,
}

/// Why the in-process memory service could not start; the message names the socket.
#[derive(Debug, thiserror::Error)]
#[error("in-process GPU memory service at {}: {why}", socket.display())]
pub struct InProcessError {
    /// Where it would listen.
    pub socket: PathBuf,
    /// What went wrong.
    pub why: StartFailure,
}

/// What went wrong starting the in-process memory service.
#[derive(Debug, thiserror::Error)]
pub enum StartFailure {
    /// The host backend could not be opened.
    #[error(transparent)]
    Backend(#[from] super::backend::BackendError),
    /// The socket could not be bound.
    #[error(transparent)]
    Server(#[from] super::server::ServerError),
    /// Its thread did not start, or did not report within 10 s.
    #[error("the memory service thread did not start")]
    NotStarted,
}

impl InProcessGms {
    /// Start a host-backend service for `tag` on `socket`, on its own thread. Must run inside an
    /// actix System.
    pub async fn start(socket: PathBuf, tag: &str) -> Result<InProcessGms, InProcessError> {
        let tag = tag.to_string();
        let arbiter = Arbiter::new();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let path = socket.clone();
        let spawned = arbiter.spawn(async move {
            let config = GmsConfig {
                device: 0,
                tag,
                socket_path: path,
                alloc_retry_interval: Duration::from_millis(100),
                alloc_retry_timeout: Some(Duration::from_secs(30)),
            };
            let server = super::backend::open(super::BackendKind::Host, 0, None)
                .map_err(StartFailure::from)
                .and_then(|b| GmsServer::bind(config, b).map_err(StartFailure::from));
            match server {
                Ok(server) => {
                    let _ = bound_tx.send(Ok(server.actor()));
                    server
                        .serve(async move {
                            let _ = stopped.await;
                        })
                        .await;
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                }
            }
        });
        let not_started = || StartFailure::NotStarted;
        let bound = match spawned {
            true => tokio::time::timeout(Duration::from_secs(10), bound_rx)
                .await
                .map_err(|_| not_started())
                .and_then(|sent| sent.map_err(|_| not_started()))
                .and_then(|bound| bound),
            false => Err(not_started()),
        };
        match bound {
            Ok(actor) => Ok(InProcessGms {
                arbiter,
                stop: Some(stop),
                socket,
                actor,
            }),
            Err(why) => {
                arbiter.stop();
                Err(InProcessError { socket, why })
            }
        }
    }

    /// Puts the service under the tree: its panics are reported to `events` and count against
    /// `config`'s budget; `faults` can inject them.
    pub fn supervise(
        &self,
        config: &crate::supervision::SupervisionConfig,
        events: crate::supervision::SupervisorEvents,
        faults: std::sync::Arc<crate::faults::FaultInjector>,
    ) {
        self.actor.do_send(super::actor::Supervise {
            config: config.clone(),
            events,
            faults,
        });
    }

    /// Stop serving (the socket file is removed) and end its thread; dropping it does the same.
    pub fn stop(self) {}
}

impl Drop for InProcessGms {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.arbiter.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::faults::{FaultInjector, FaultKind, FaultSpec, FaultsConfig};
    use crate::gms::{GmsClient, RequestedLockType};
    use crate::supervision::{ActorKind, SupervisionConfig, SupervisorEvent};

    /// Runs a blocking client session off the actix thread (the service lives on it).
    async fn session<T: Send + 'static>(
        socket: &std::path::Path,
        lock: RequestedLockType,
        work: impl FnOnce(&mut GmsClient) -> Result<T, crate::gms::ClientError> + Send + 'static,
    ) -> Result<T, String> {
        let socket = socket.to_path_buf();
        actix_rt::task::spawn_blocking(move || {
            let mut client = GmsClient::connect(&socket, lock, Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            work(&mut client).map_err(|e| e.to_string())
        })
        .await
        .expect("join")
    }

    #[actix_rt::test]
    async fn a_panicking_request_fails_alone_and_the_service_resumes_with_its_tables() {
        let socket = std::env::temp_dir().join(format!(
            "gms-supervised-{}.sock",
            uuid::Uuid::new_v4().simple()
        ));
        let gms = InProcessGms::start(socket.clone(), "weights")
            .await
            .expect("starts");
        let (events, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let faults = FaultInjector::new(FaultsConfig {
            enabled: true,
            ..FaultsConfig::default()
        });
        gms.supervise(&SupervisionConfig::default(), events, faults.clone());

        // A writer lays out one allocation and commits it.
        let committed = socket.clone();
        actix_rt::task::spawn_blocking(move || {
            let mut writer = GmsClient::connect(
                &committed,
                RequestedLockType::Rw,
                Some(Duration::from_secs(5)),
            )?;
            writer.allocate(4096, "weights")?;
            writer.commit()
        })
        .await
        .expect("join")
        .expect("committed");

        // The next request panics the service: that request fails, naming why.
        faults
            .arm(FaultSpec::new(FaultKind::MemoryServicePanic))
            .expect("armed");
        let failed = session(&socket, RequestedLockType::Ro, |reader| {
            reader.allocation_count()
        })
        .await
        .expect_err("the panicking request fails");
        assert!(failed.contains("memory service failed"), "{failed}");
        let report = tokio::time::timeout(Duration::from_secs(5), reports.recv())
            .await
            .expect("reported in time")
            .expect("a report");
        assert!(
            matches!(report, SupervisorEvent::Restarted { actor: ActorKind::MemoryService, ref reason, .. } if reason.contains("injected fault")),
            "{report:?}"
        );

        // It resumed with its tables: the committed layout is still there for readers.
        let count = session(&socket, RequestedLockType::Ro, |reader| {
            reader.allocation_count()
        })
        .await
        .expect("a reader after the panic");
        assert_eq!(count, 1);
        gms.stop();
    }
}
