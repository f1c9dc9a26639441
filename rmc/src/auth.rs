//! Who may use the console: the login check (a configured password, or a one-time token made
//! at each start and refused once a login with it succeeded), in-memory sessions with an idle
//! and an absolute expiry, a throttle on failed logins, and the CSRF token that every
//! state-changing request must echo. The clock is passed in, so all of it is tested without
//! waiting; the HTTP glue lives in `api`.

use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Name of the session cookie (HttpOnly, SameSite=Strict, Path=/).
pub const SESSION_COOKIE: &str = "bids_rmc_session";
/// Header that must carry the session's CSRF token on POST, PUT and DELETE.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The only user name the console knows.
pub const ADMIN_USER: &str = "admin";

/// How logins and sessions behave.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// The secret `POST /api/login` expects for user `admin`.
    pub password: String,
    /// The secret is a token printed at start: the first successful login spends it, and
    /// logins with it are refused from then on (a restart makes a new one).
    pub single_use: bool,
    /// A session unused this long is gone.
    pub idle: Duration,
    /// A session is gone this long after login, used or not.
    pub max_age: Duration,
    /// Most live sessions; the oldest goes when a login would exceed it.
    pub max_sessions: usize,
    /// Failed logins allowed per `failure_window` before logins are refused for a while.
    pub max_failures: usize,
    pub failure_window: Duration,
}

impl AuthConfig {
    pub fn new(password: String) -> Self {
        AuthConfig {
            password,
            single_use: false,
            idle: Duration::from_secs(30 * 60),
            max_age: Duration::from_secs(12 * 3600),
            max_sessions: 64,
            max_failures: 5,
            failure_window: Duration::from_secs(60),
        }
    }
}

/// A random secret of 32 bytes, hex encoded: session ids, CSRF tokens, start-up tokens.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Compares two secrets in time independent of where they differ (both are hashed first, so
/// the length does not leak either).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    let (x, y) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("wrong user or password")]
    Refused,
    #[error("too many failed logins; wait {0:?} and try again")]
    Throttled(Duration),
    #[error("the one-time login token was already used; restart the console for a new one, or set BIDS_RMC_PASSWORD to choose a password")]
    TokenSpent,
}

/// What a successful login hands back.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Goes into the session cookie only; never into a response body.
    pub token: String,
    pub csrf: String,
}

/// A live session, as a request sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub user: String,
    pub csrf: String,
    /// Short, non-secret handle of the session for logs.
    pub tag: String,
}

struct Session {
    info: SessionInfo,
    created: Instant,
    last_used: Instant,
}

struct Inner {
    /// Keyed by SHA-256 of the cookie token, so a memory dump of the map alone logs nobody in.
    sessions: HashMap<[u8; 32], Session>,
    failures: VecDeque<Instant>,
    /// A single-use token has opened a session.
    spent: bool,
}

/// All sessions of one console. Cheap operations under a plain mutex, never held across an
/// `.await`.
pub struct Sessions {
    cfg: AuthConfig,
    inner: Mutex<Inner>,
}

fn key_of(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Sessions {
    pub fn new(cfg: AuthConfig) -> Self {
        Sessions {
            cfg,
            inner: Mutex::new(Inner {
                sessions: HashMap::new(),
                failures: VecDeque::new(),
                spent: false,
            }),
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves only plain data behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Checks the credentials and opens a session.
    pub fn login(
        &self,
        user: &str,
        password: &str,
        now: Instant,
    ) -> Result<NewSession, LoginError> {
        let mut g = self.lock();
        let window = self.cfg.failure_window;
        while g
            .failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            g.failures.pop_front();
        }
        if g.failures.len() >= self.cfg.max_failures {
            let wait = g
                .failures
                .front()
                .map(|t| window.saturating_sub(now.saturating_duration_since(*t)))
                .unwrap_or(window);
            return Err(LoginError::Throttled(wait));
        }
        // Both compared, always, so timing does not tell which one was wrong.
        let user_ok = secrets_equal(user, ADMIN_USER);
        let pass_ok = secrets_equal(password, &self.cfg.password);
        if !(user_ok && pass_ok) {
            g.failures.push_back(now);
            return Err(LoginError::Refused);
        }
        if self.cfg.single_use {
            if g.spent {
                // Whoever knows a spent token is not necessarily the one it was printed for.
                g.failures.push_back(now);
                return Err(LoginError::TokenSpent);
            }
            g.spent = true;
        }
        Self::expire(&self.cfg, &mut g, now);
        if g.sessions.len() >= self.cfg.max_sessions {
            let oldest = g
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                g.sessions.remove(&k);
            }
        }
        let token = random_token();
        let csrf = random_token();
        let tag = token[..8].to_string();
        g.sessions.insert(
            key_of(&token),
            Session {
                info: SessionInfo {
                    user: ADMIN_USER.to_string(),
                    csrf: csrf.clone(),
                    tag,
                },
                created: now,
                last_used: now,
            },
        );
        Ok(NewSession { token, csrf })
    }

    fn expire(cfg: &AuthConfig, g: &mut Inner, now: Instant) {
        g.sessions.retain(|_, s| {
            now.saturating_duration_since(s.last_used) < cfg.idle
                && now.saturating_duration_since(s.created) < cfg.max_age
        });
    }

    /// The session of a cookie token, if it is live; using it keeps it alive.
    pub fn check(&self, token: &str, now: Instant) -> Option<SessionInfo> {
        let mut g = self.lock();
        Self::expire(&self.cfg, &mut g, now);
        let s = g.sessions.get_mut(&key_of(token))?;
        s.last_used = now;
        Some(s.info.clone())
    }

    /// Ends a session.
    pub fn logout(&self, token: &str) {
        self.lock().sessions.remove(&key_of(token));
    }

    /// Seconds a fresh session may live at most (the cookie's Max-Age).
    pub fn cookie_max_age(&self) -> u64 {
        self.cfg.max_age.as_secs()
    }
}

/// The session token in a `Cookie` header value, if any.
pub fn token_from_cookie_header(header: &str) -> Option<&str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == SESSION_COOKIE && !v.is_empty()).then_some(v)
    })
}

/// `Set-Cookie` value that opens a session.
pub fn set_cookie(token: &str, max_age_s: u64) -> String {
    format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}")
}

/// `Set-Cookie` value that drops the session cookie.
pub fn clear_cookie() -> String {
    format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(AuthConfig::new("s3cret".into()))
    }

    #[test]
    fn right_password_opens_a_session_wrong_one_does_not() {
        let s = sessions();
        let t0 = Instant::now();
        assert_eq!(
            s.login("admin", "nope", t0).unwrap_err(),
            LoginError::Refused
        );
        assert_eq!(
            s.login("root", "s3cret", t0).unwrap_err(),
            LoginError::Refused
        );
        let n = s.login("admin", "s3cret", t0).unwrap();
        let info = s.check(&n.token, t0).unwrap();
        assert_eq!(info.user, "admin");
        assert_eq!(info.csrf, n.csrf);
        assert_ne!(n.token, n.csrf);
        assert!(s.check("not-a-token", t0).is_none());
        s.logout(&n.token);
        assert!(s.check(&n.token, t0).is_none());
    }

    #[test]
    fn sessions_expire_when_idle_and_when_old() {
        let s = sessions();
        let t0 = Instant::now();
        let idle = s.config().idle;
        let n = s.login("admin", "s3cret", t0).unwrap();
        // Used just before the idle limit, it lives on.
        let t1 = t0 + idle - Duration::from_secs(1);
        assert!(s.check(&n.token, t1).is_some());
        assert!(s.check(&n.token, t1 + idle).is_none());
        // Used steadily, it still ends at max_age.
        let n = s.login("admin", "s3cret", t0).unwrap();
        let mut t = t0;
        while t < t0 + s.config().max_age - idle {
            t += idle / 2;
            assert!(s.check(&n.token, t).is_some());
        }
        assert!(s.check(&n.token, t0 + s.config().max_age).is_none());
    }

    #[test]
    fn failed_logins_are_throttled_then_allowed_again() {
        let s = sessions();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(s.login("admin", "x", t0).unwrap_err(), LoginError::Refused);
        }
        // Even the right password waits now.
        assert!(matches!(
            s.login("admin", "s3cret", t0 + Duration::from_secs(1)),
            Err(LoginError::Throttled(_))
        ));
        assert!(s
            .login("admin", "s3cret", t0 + Duration::from_secs(61))
            .is_ok());
    }

    #[test]
    fn a_start_up_token_opens_one_session_only() {
        let mut cfg = AuthConfig::new(random_token());
        cfg.single_use = true;
        let token = cfg.password.clone();
        let s = Sessions::new(cfg);
        let t0 = Instant::now();
        // A wrong guess does not spend it.
        assert_eq!(
            s.login("admin", "guess", t0).unwrap_err(),
            LoginError::Refused
        );
        let first = s.login("admin", &token, t0).unwrap();
        assert!(s.check(&first.token, t0).is_some());
        assert_eq!(
            s.login("admin", &token, t0).unwrap_err(),
            LoginError::TokenSpent
        );
        // Still refused after the session ended, and after the failure window.
        s.logout(&first.token);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(
            s.login("admin", &token, later).unwrap_err(),
            LoginError::TokenSpent
        );
        // A configured password is not single-use.
        let s = sessions();
        for k in 0..3 {
            assert!(s
                .login("admin", "s3cret", t0 + Duration::from_secs(k))
                .is_ok());
        }
    }

    #[test]
    fn session_count_is_bounded() {
        let mut cfg = AuthConfig::new("p".into());
        cfg.max_sessions = 2;
        let s = Sessions::new(cfg);
        let t0 = Instant::now();
        let a = s.login("admin", "p", t0).unwrap();
        let b = s.login("admin", "p", t0 + Duration::from_secs(1)).unwrap();
        let c = s.login("admin", "p", t0 + Duration::from_secs(2)).unwrap();
        let t = t0 + Duration::from_secs(3);
        assert!(s.check(&a.token, t).is_none());
        assert!(s.check(&b.token, t).is_some());
        assert!(s.check(&c.token, t).is_some());
    }

    #[test]
    fn cookie_header_parsing() {
        assert_eq!(
            token_from_cookie_header("a=1; bids_rmc_session=abc; b=2"),
            Some("abc")
        );
        assert_eq!(token_from_cookie_header("bids_rmc_session="), None);
        assert_eq!(token_from_cookie_header("other=abc"), None);
        let c = set_cookie("abc", 60);
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Max-Age=60")
        );
    }

    #[test]
    fn secret_comparison() {
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "abcd"));
        assert_eq!(random_token().len(), 64);
        assert_ne!(random_token(), random_token());
    }
}
