//! The drill's own cluster, for faults that live between processes (`request_plane_panic`): etcd
//! and NATS on free loopback ports (the pinned PyPI builds when they are not installed), [`WORKERS`]
//! workers serving the config's engines on the TCP request plane, and a frontend routing to them,
//! all in this process and each its own supervision tree, exactly as `dynamix worker` and
//! `dynamix frontend` build them.

use std::time::{Duration, Instant};

use dynamix_actors::distributed::infra::{EtcdServer, NatsServer};
use dynamix_actors::supervisor::RunningService;

use crate::config::Config;
use crate::RunError;

/// Workers: a request whose stream breaks migrates to another, and the frontend keeps the broken
/// one out of routing until it answers a probe (about half a second).
pub(super) const WORKERS: usize = 3;

/// Why the drill's cluster did not come up.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// The thread that starts etcd and NATS died.
    #[error("the thread starting the drill's etcd and NATS failed: {0}")]
    InfraThread(#[from] actix_rt::task::JoinError),
    /// The frontend gave up waiting for the workers' card.
    #[error("the drill's frontend stopped before it started")]
    FrontendStopped,
    /// Not every worker reached the frontend's routing in time.
    #[error("the drill's frontend routes to {found} of {expected} workers after 30 s")]
    Workers {
        /// Workers routed to.
        found: usize,
        /// Workers started.
        expected: usize,
    },
}

/// A running cluster; dropping it stops etcd and NATS.
pub(super) struct Cluster {
    pub(super) frontend: RunningService,
    pub(super) workers: Vec<RunningService>,
    _etcd: EtcdServer,
    _nats: NatsServer,
}

impl Cluster {
    /// Stop the frontend, then the workers, then etcd and NATS.
    pub(super) async fn shutdown(self) {
        self.frontend.shutdown().await;
        for worker in self.workers {
            worker.shutdown().await;
        }
    }
}

/// Start etcd, NATS, the workers and the frontend from `config`; the frontend's faults are off.
pub(super) async fn start(config: &Config) -> Result<Cluster, RunError> {
    let (etcd, nats) = actix_rt::task::spawn_blocking(|| {
        Ok::<_, RunError>((EtcdServer::start()?, NatsServer::start()?))
    })
    .await
    .map_err(DrillError::from)??;
    let mut config = config.clone();
    let d = &mut config.distributed;
    d.etcd_endpoints = vec![etcd.url()];
    d.nats_url = nats.url();
    d.host = "127.0.0.1".into();
    d.request_plane_port = 0;
    d.response_stream_port = 0;
    // The drill's workers stop at once: nothing else routes to them.
    d.graceful_shutdown_grace_period_secs = 0.0;
    let mut workers = Vec::with_capacity(WORKERS);
    for _ in 0..WORKERS {
        workers.push(crate::start_worker(&config).await?);
    }
    let mut frontend_config = config.clone();
    frontend_config.faults.enabled = false;
    frontend_config.faults.admin_endpoint = false;
    let mut never = std::pin::pin!(std::future::pending::<()>());
    let Some((frontend, _)) = crate::start_frontend(frontend_config, false, &mut never).await?
    else {
        return Err(DrillError::FrontendStopped.into());
    };
    // Until the frontend routes to every worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    while frontend.engines.len() < WORKERS {
        if Instant::now() > deadline {
            return Err(DrillError::Workers {
                found: frontend.engines.len(),
                expected: WORKERS,
            }
            .into());
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Cluster {
        frontend,
        workers,
        _etcd: etcd,
        _nats: nats,
    })
}
