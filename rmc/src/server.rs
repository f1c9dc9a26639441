//! Running a console: bind the HTTP listener (loopback unless told otherwise), serve the
//! router, and sample the GIS periodically into the history, until shut down. What the
//! console does lives in `console`; who may do it in `auth`.

use crate::api::{self, AppState};
use crate::auth::{AuthConfig, Sessions};
use crate::console::Console;
use crate::gis_link::AdminGis;
use crate::metrics::RmcMetrics;
use libp2p::identity::Keypair;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum RmcError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] bids_metrics::MetricsError),
    #[error("the console's HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(
        "the GIS refuses {peer} as its admin ({message}); start the console with the admin's \
         key, the one whose peer id the GIS got as --admin-peer"
    )]
    NotAdmin {
        peer: libp2p::PeerId,
        message: String,
    },
}

/// Everything a console needs besides its link to the GIS.
#[derive(Clone, Debug)]
pub struct RmcConfig {
    /// Where the web server listens; `127.0.0.1:8080` by default.
    pub listen: SocketAddr,
    pub auth: AuthConfig,
    /// The admin identity: signs bridgehead certificates (and, in the GIS link, commands).
    pub admin: Keypair,
    /// How often the history samples the GIS.
    pub sample_interval: Duration,
    /// Lifetime of the bridgehead certificates the console issues.
    pub cert_validity: Duration,
    /// Certificates that end within this long are flagged in the pages and the API.
    pub cert_warn: Duration,
    /// Serve the console's Prometheus metrics, `/healthz` and `/readyz` here (off by default).
    pub metrics: Option<SocketAddr>,
}

impl RmcConfig {
    pub fn new(admin: Keypair, password: String) -> Self {
        RmcConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            auth: AuthConfig::new(password),
            admin,
            sample_interval: Duration::from_millis(500),
            cert_validity: Duration::from_secs(30 * 86_400),
            cert_warn: crate::console::DEFAULT_CERT_WARN,
            metrics: None,
        }
    }
}

/// A running console. Dropping it stops the server and the sampler too, without waiting.
pub struct RmcHandle {
    addr: SocketAddr,
    metrics: Option<bids_metrics::MetricsServer>,
    console: Arc<Console>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), RmcError>>,
}

impl RmcHandle {
    /// The address the web server listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the console's `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.local_addr())
    }

    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    /// Stops serving and sampling; returns the server's error, if it failed.
    pub async fn shutdown(self) -> Result<(), RmcError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(RmcError::Serve(std::io::Error::other(e.to_string()))),
        }
    }

    /// Waits until the server stops on its own (it only does on an error).
    pub async fn wait(&mut self) -> Result<(), RmcError> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(RmcError::Serve(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Starts a console on `cfg.listen` talking to the GIS through `gis`.
pub async fn start(cfg: RmcConfig, gis: Arc<dyn AdminGis>) -> Result<RmcHandle, RmcError> {
    check_admin(&cfg, gis.as_ref()).await?;
    if !cfg.listen.ip().is_loopback() {
        tracing::warn!(addr = %cfg.listen, "the console listens beyond loopback; put TLS in front of it");
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| RmcError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| RmcError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let console = Arc::new(
        Console::new(
            gis,
            cfg.admin.clone(),
            cfg.sample_interval,
            cfg.cert_validity,
        )
        .with_cert_warn(cfg.cert_warn),
    );
    let state = AppState {
        sessions: Arc::new(Sessions::new(cfg.auth.clone())),
        console: console.clone(),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(RmcMetrics::new(&mut registry));
    let metrics_server = match cfg.metrics {
        Some(addr) => Some(bids_metrics::serve(addr, metrics.endpoint(Arc::new(registry))).await?),
        None => None,
    };
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(sample_loop(
        console.clone(),
        cfg.sample_interval,
        stopped.clone(),
        metrics,
    ));
    let app = api::router(state);
    let mut stopped_srv = stopped;
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped_srv.wait_for(|s| *s).await;
            })
            .await
            .map_err(RmcError::Serve)
    });
    tracing::info!(%addr, "console listening");
    Ok(RmcHandle {
        addr,
        metrics: metrics_server,
        console,
        stop,
        task,
    })
}

/// A console whose key is not the GIS's admin could do nothing but be refused: ask the GIS
/// once, at start, and refuse to start then. A GIS that does not answer now is no reason to
/// stop (the sampler retries); only its refusal is.
async fn check_admin(cfg: &RmcConfig, gis: &dyn AdminGis) -> Result<(), RmcError> {
    use crate::gis_link::GisCallError;
    use bids_protocols::admin::AdminErrorKind;
    match gis.stats().await {
        Err(GisCallError::Refused {
            kind: AdminErrorKind::Forbidden,
            message,
        }) => Err(RmcError::NotAdmin {
            peer: cfg.admin.public().to_peer_id(),
            message,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "the GIS did not answer the console's first request; starting anyway");
            Ok(())
        }
        Ok(_) => Ok(()),
    }
}

/// Samples the GIS every `interval` into the history; a failed sample is logged once per
/// outage and skipped, so a GIS restart leaves a gap, not a dead console.
async fn sample_loop(
    console: Arc<Console>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<RmcMetrics>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let started = std::time::Instant::now();
        let sampled = console.sample().await;
        metrics.sampled(sampled.is_ok(), started.elapsed());
        match sampled {
            Ok(()) => {
                if failing {
                    tracing::info!("sampling the GIS works again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "sampling the GIS failed; retrying every interval");
                }
                failing = true;
            }
        }
    }
}
