//! The HTTP side of a daemon's metrics: `/metrics` (Prometheus/OpenMetrics text, encoded by
//! `prometheus-client`), `/healthz` (the process answers) and `/readyz` (it can do its job,
//! as the daemon judges). Each daemon owns its registry and its metrics; this crate only
//! serves them, and gives tests a strict reader of the text format ([`text`]).

pub mod text;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing;
use axum::Router;
pub use prometheus_client;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;

/// The content type of the OpenMetrics text `prometheus-client` writes; Prometheus reads it.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Says whether the daemon is ready, and if not, why (shown by `/readyz`).
pub type ReadyFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;
/// Updates values that are read rather than counted (disk space, say) just before a scrape.
/// Runs on the blocking pool: it may touch the disk.
pub type RefreshFn = Arc<dyn Fn() + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}; choose another --metrics address (e.g. 127.0.0.1:9100) or stop the process using it")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What one daemon exposes.
#[derive(Clone)]
pub struct Endpoint {
    pub registry: Arc<Registry>,
    pub ready: ReadyFn,
    pub refresh: Option<RefreshFn>,
}

impl Endpoint {
    /// The registry's current text, after the refresh hook ran.
    pub async fn render(&self) -> Result<String, String> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(r) = &this.refresh {
                r();
            }
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &this.registry)
                .map_err(|e| format!("encoding metrics: {e}"))?;
            Ok(out)
        })
        .await
        .map_err(|e| format!("metrics task: {e}"))?
    }

    /// `/metrics`, `/healthz` and `/readyz`, for a daemon's own listener or to merge into a
    /// bigger router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/metrics", routing::get(metrics))
            .route("/healthz", routing::get(|| async { "ok\n" }))
            .route("/readyz", routing::get(readyz))
            .with_state(self)
    }
}

async fn metrics(State(ep): State<Endpoint>) -> Response {
    match ep.render().await {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics scrape failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

async fn readyz(State(ep): State<Endpoint>) -> Response {
    match (ep.ready)() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// A running metrics listener; dropping it stops it.
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `ep` there until the returned server is dropped.
pub async fn serve(addr: SocketAddr, ep: Endpoint) -> Result<MetricsServer, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let app = ep.router();
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    });
    tracing::info!(addr = %local, "serving metrics at /metrics, health at /healthz and /readyz");
    Ok(MetricsServer { addr: local, task })
}

/// Answers bigger than this are refused by [`get`].
pub const MAX_ANSWER: u64 = 16 << 20;

/// One `GET path` to a metrics listener (HTTP/1.1, connection closed after it): the status
/// code and the body. For tests and probes of our own listeners, which answer with a
/// `Content-Length` body; at most [`MAX_ANSWER`] bytes are read.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    (&mut s).take(MAX_ANSWER).read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).map_err(|_| bad("answer is not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("answer has no header end"))?;
    let code = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("answer has no HTTP/1.1 status line"))?;
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        super::get(addr, path).await.unwrap()
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let mut reg = Registry::default();
        let c = Counter::<u64>::default();
        reg.register("things", "Things seen", c.clone());
        c.inc_by(41);
        let ready = Arc::new(AtomicBool::new(false));
        let r = ready.clone();
        let refresh_ran = Arc::new(AtomicBool::new(false));
        let rr = refresh_ran.clone();
        let ep = Endpoint {
            registry: Arc::new(reg),
            ready: Arc::new(move || {
                if r.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("no GIS yet".into())
                }
            }),
            refresh: Some(Arc::new(move || {
                c.inc();
                rr.store(true, Ordering::SeqCst);
            })),
        };
        let srv = serve("127.0.0.1:0".parse().unwrap(), ep).await.unwrap();
        let addr = srv.local_addr();
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(refresh_ran.load(Ordering::SeqCst));
        let scrape = text::parse(&body).unwrap();
        assert_eq!(scrape.value("things_total", &[]), Some(42.0));
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("no GIS yet"));
        ready.store(true, Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await.0, 200);
    }

    #[tokio::test]
    async fn a_taken_address_is_a_clear_error() {
        let ep = Endpoint {
            registry: Arc::new(Registry::default()),
            ready: Arc::new(|| Ok(())),
            refresh: None,
        };
        let first = serve("127.0.0.1:0".parse().unwrap(), ep.clone())
            .await
            .unwrap();
        let Err(e) = serve(first.local_addr(), ep).await else {
            panic!("a second listener on a taken port must fail");
        };
        let msg = e.to_string();
        assert!(msg.contains(&first.local_addr().to_string()), "{msg}");
        assert!(msg.contains("--metrics"), "{msg}");
    }
}
