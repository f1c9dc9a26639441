//! The HTTP face of the console: the router, the JSON API under `/api/` and the embedded
//! pages. Every `/api/` route but `POST /api/login` goes through [`require_session`]:
//! no live session cookie → 401; a POST, PUT or DELETE whose `X-CSRF-Token` header does not
//! match the session's token → 403. The session cookie is also `SameSite=Strict`, so a
//! cross-site page can neither send it nor read the token. Handlers call the [`Console`].

use crate::auth::{self, LoginError, SessionInfo, Sessions, CSRF_HEADER};
use crate::console::{self, Console, ConsoleError, GcOrder};
use crate::gis_link::GisCallError;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use bids_protocols::admin::{AdminErrorKind, GcPolicy, HostCommand};
use libp2p::PeerId;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Number};
use std::sync::Arc;
use std::time::Instant;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub sessions: Arc<Sessions>,
    pub console: Arc<Console>,
}

/// An API error: a status and a message, sent as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ConsoleError> for ApiError {
    fn from(e: ConsoleError) -> Self {
        let status = match &e {
            ConsoleError::BadInput(_) => StatusCode::BAD_REQUEST,
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ConsoleError::Gis(GisCallError::Transport(_)) => StatusCode::BAD_GATEWAY,
            ConsoleError::Gis(GisCallError::Refused { kind, .. }) => match kind {
                AdminErrorKind::BadRequest => StatusCode::BAD_REQUEST,
                AdminErrorKind::UnknownHost => StatusCode::NOT_FOUND,
                AdminErrorKind::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
                AdminErrorKind::Failed => StatusCode::UNPROCESSABLE_ENTITY,
                // The console itself was refused: its key or clock is wrong.
                AdminErrorKind::Forbidden
                | AdminErrorKind::BadSignature
                | AdminErrorKind::Stale => StatusCode::BAD_GATEWAY,
            },
        };
        ApiError(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A JSON request body whose every rejection is a JSON error: 400 for a body that is not
/// JSON or does not fit (with the field and what was expected), 415 without a JSON content
/// type, instead of axum's plain-text messages.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => Err(body_error(r)),
        }
    }
}

fn body_error(r: JsonRejection) -> ApiError {
    let text = r.body_text();
    let detail = text
        .split_once(": ")
        .map(|(_, d)| d.to_string())
        .unwrap_or(text);
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as JSON with Content-Type: application/json".into(),
        ),
        _ => ApiError::bad(format!("bad request body: {detail}")),
    }
}

fn query_error(r: QueryRejection) -> ApiError {
    ApiError::bad(format!("bad query string: {}", r.body_text()))
}

/// A whole number from 0 to `max` in a JSON body, or a 400 that says so.
fn whole(name: &str, n: &Number, max: u64, unit: &str) -> ApiResult<u64> {
    match n.as_u64() {
        Some(v) if v <= max => Ok(v),
        _ => Err(ApiError::bad(format!(
            "{name} must be a whole number of {unit} from 0 to {max}, got {n}"
        ))),
    }
}

/// The highest rate limit accepted (1 TB/s): anything above is a unit mistake.
const MAX_RATE_BPS: u64 = 1_000_000_000_000;

/// The whole router: pages, assets and API.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/api/session", get(session))
        .route("/api/logout", post(logout))
        .route("/api/hosts", get(hosts))
        .route("/api/images", get(images))
        .route("/api/stats", get(stats))
        .route("/api/hosts/{peer}/limits", post(set_limits))
        .route("/api/hosts/{peer}/sharing", post(set_sharing))
        .route("/api/hosts/{peer}/fetch", post(fetch))
        .route("/api/hosts/{peer}/publish", post(publish))
        .route("/api/hosts/{peer}/remove", post(remove))
        .route("/api/idcs/{idc}/bridgeheads", put(set_bridgeheads))
        .route("/api/gc", post(gc))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_session,
        ));
    Router::new()
        .route("/api/login", post(login))
        .merge(protected)
        .merge(crate::assets::routes())
        .fallback(not_found)
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such page or API route".into())
}

/// Pages may load only their own scripts and styles, and never inside a frame.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(auth::token_from_cookie_header)
}

/// Admits requests with a live session; state-changing ones also need the CSRF token.
async fn require_session(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(info) =
        session_token(req.headers()).and_then(|t| st.sessions.check(t, Instant::now()))
    else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "login required: POST /api/login".into(),
        )
        .into_response();
    };
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if changes_state {
        let sent = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !auth::secrets_equal(sent, &info.csrf) {
            tracing::warn!(session = %info.tag, method = %req.method(), path = %req.uri().path(), "refused: missing or wrong CSRF token");
            return ApiError(
                StatusCode::FORBIDDEN,
                format!("missing or wrong {CSRF_HEADER} header (take it from the login answer or GET /api/session)"),
            )
            .into_response();
        }
        tracing::info!(user = %info.user, session = %info.tag, method = %req.method(), path = %req.uri().path(), "console request");
    }
    req.extensions_mut().insert(info);
    next.run(req).await
}

#[derive(Deserialize)]
struct LoginBody {
    user: String,
    password: String,
}

async fn login(State(st): State<AppState>, Body(b): Body<LoginBody>) -> Response {
    match st.sessions.login(&b.user, &b.password, Instant::now()) {
        Ok(s) => {
            tracing::info!(user = %b.user, session = %&s.token[..8], "login");
            let cookie = auth::set_cookie(&s.token, st.sessions.cookie_max_age());
            let mut r = Json(json!({
                "user": auth::ADMIN_USER,
                "csrf_token": s.csrf,
                "expires_in_s": st.sessions.cookie_max_age(),
                "idle_timeout_s": st.sessions.config().idle.as_secs(),
            }))
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(LoginError::Refused) => {
            tracing::warn!(user = %b.user, "login refused");
            ApiError(StatusCode::UNAUTHORIZED, "wrong user or password".into()).into_response()
        }
        Err(e @ LoginError::TokenSpent) => {
            tracing::warn!(user = %b.user, "login with the spent one-time token refused");
            ApiError(StatusCode::UNAUTHORIZED, e.to_string()).into_response()
        }
        Err(e @ LoginError::Throttled(_)) => {
            tracing::warn!(user = %b.user, "login throttled");
            ApiError(StatusCode::TOO_MANY_REQUESTS, e.to_string()).into_response()
        }
    }
}

async fn session(Extension(info): Extension<SessionInfo>) -> Json<serde_json::Value> {
    Json(json!({ "user": info.user, "csrf_token": info.csrf }))
}

async fn logout(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(t) = session_token(&headers) {
        st.sessions.logout(t);
    }
    let mut r = Json(json!({ "logged_out": true })).into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `GET /api/hosts[?q=&idc=&role=&alive=&sort=&order=&offset=&limit=]`: the matching hosts
/// (one page when `limit` is given); `X-Total-Count` says how many matched.
async fn hosts(
    State(st): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(pairs) = query.map_err(query_error)?;
    let q = crate::query::HostQuery::parse(&pairs).map_err(ApiError::bad)?;
    let (total, page) = st.console.hosts_page(&q).await?;
    let mut r = Json(json!(page)).into_response();
    r.headers_mut()
        .insert("x-total-count", HeaderValue::from(total as u64));
    Ok(r)
}

async fn images(State(st): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!(st.console.images().await?)))
}

async fn stats(State(st): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(json!(st.console.stats().await?)))
}

fn peer_of(s: &str) -> ApiResult<PeerId> {
    s.parse()
        .map_err(|e| ApiError::bad(format!("{s:?} is not a peer id: {e}")))
}

async fn run_command(
    st: &AppState,
    who: &SessionInfo,
    peer: PeerId,
    cmd: HostCommand,
) -> ApiResult<Json<serde_json::Value>> {
    let what = cmd.describe();
    tracing::info!(user = %who.user, session = %who.tag, %peer, command = %what, "command sent");
    match st.console.command(peer, cmd).await {
        Ok(o) => {
            tracing::info!(%peer, command = %what, "command done");
            Ok(Json(
                json!({ "peer": peer.to_string(), "outcome": crate::model::outcome_json(&o) }),
            ))
        }
        Err(e) => {
            tracing::warn!(%peer, command = %what, error = %e, "command failed");
            Err(e.into())
        }
    }
}

#[derive(Deserialize)]
struct LimitsBody {
    upload_bps: Number,
    download_bps: Number,
}

async fn set_limits(
    State(st): State<AppState>,
    Extension(who): Extension<SessionInfo>,
    Path(peer): Path<String>,
    Body(b): Body<LimitsBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let cmd = HostCommand::SetLimits {
        upload_bps: whole(
            "upload_bps",
            &b.upload_bps,
            MAX_RATE_BPS,
            "bytes/s (0 = unlimited)",
        )?,
        download_bps: whole(
            "download_bps",
            &b.download_bps,
            MAX_RATE_BPS,
            "bytes/s (0 = unlimited)",
        )?,
    };
    run_command(&st, &who, peer_of(&peer)?, cmd).await
}

#[derive(Deserialize)]
struct SharingBody {
    enabled: bool,
}

async fn set_sharing(
    State(st): State<AppState>,
    Extension(who): Extension<SessionInfo>,
    Path(peer): Path<String>,
    Body(b): Body<SharingBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let cmd = HostCommand::SetSharing { enabled: b.enabled };
    run_command(&st, &who, peer_of(&peer)?, cmd).await
}

#[derive(Deserialize)]
struct ImageBody {
    /// `name:version`.
    image: String,
}

async fn fetch(
    State(st): State<AppState>,
    Extension(who): Extension<SessionInfo>,
    Path(peer): Path<String>,
    Body(b): Body<ImageBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let image = console::image_ref(&b.image, None)?;
    run_command(&st, &who, peer_of(&peer)?, HostCommand::Fetch { image }).await
}

async fn remove(
    State(st): State<AppState>,
    Extension(who): Extension<SessionInfo>,
    Path(peer): Path<String>,
    Body(b): Body<ImageBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let image = console::image_ref(&b.image, None)?;
    run_command(&st, &who, peer_of(&peer)?, HostCommand::Remove { image }).await
}

#[derive(Deserialize)]
struct PublishBody {
    /// Path of the file on the host.
    file: String,
    name: String,
    version: String,
    /// A version the host holds (bare version of `name`, or `name:version`) to build a delta from.
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    chunk_size: Option<u32>,
}

async fn publish(
    State(st): State<AppState>,
    Extension(who): Extension<SessionInfo>,
    Path(peer): Path<String>,
    Body(b): Body<PublishBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let image = bids_protocols::ImageRef::new(&b.name, &b.version).map_err(ApiError::bad)?;
    let from = match b.from.as_deref().filter(|s| !s.is_empty()) {
        Some(f) => Some(console::image_ref(f, Some(&b.name))?),
        None => None,
    };
    let cmd = HostCommand::Publish {
        file: b.file,
        image,
        from,
        chunk_size: b.chunk_size.unwrap_or(0),
    };
    run_command(&st, &who, peer_of(&peer)?, cmd).await
}

#[derive(Deserialize)]
struct BridgeheadsBody {
    /// Peer ids that shall be the IDC's bridgeheads from now on.
    peers: Vec<String>,
}

async fn set_bridgeheads(
    State(st): State<AppState>,
    Extension(who): Extension<SessionInfo>,
    Path(idc): Path<String>,
    Body(b): Body<BridgeheadsBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let peers = b
        .peers
        .iter()
        .map(|p| peer_of(p))
        .collect::<ApiResult<Vec<_>>>()?;
    tracing::info!(user = %who.user, session = %who.tag, idc = %idc, peers = ?b.peers, "bridgehead change ordered");
    Ok(Json(json!(st.console.set_bridgeheads(&idc, &peers).await?)))
}

#[derive(Deserialize)]
struct GcBody {
    policy: String,
    #[serde(default)]
    keep: Option<Number>,
    #[serde(default)]
    free_target: Option<Number>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    idc: Option<String>,
    #[serde(default)]
    peers: Option<Vec<String>>,
}

async fn gc(
    State(st): State<AppState>,
    Extension(who): Extension<SessionInfo>,
    Body(b): Body<GcBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let policy: GcPolicy = b.policy.parse().map_err(ApiError::bad)?;
    let keep = match &b.keep {
        Some(n) => Some(whole("keep", n, u64::from(u32::MAX), "images")? as u32),
        None => None,
    };
    let free_target = match &b.free_target {
        Some(n) => Some(whole("free_target", n, u64::MAX, "bytes")?),
        None => None,
    };
    let peers = match &b.peers {
        Some(ps) => Some(
            ps.iter()
                .map(|p| peer_of(p))
                .collect::<ApiResult<Vec<_>>>()?,
        ),
        None => None,
    };
    tracing::info!(user = %who.user, session = %who.tag, policy = %b.policy, keep = ?keep, free_target = ?free_target, dry_run = b.dry_run, "gc ordered");
    let v = st
        .console
        .gc(GcOrder {
            policy,
            keep,
            free_target,
            dry_run: b.dry_run,
            seed: b.seed,
            idc: b.idc,
            peers,
        })
        .await?;
    Ok(Json(json!(v)))
}
