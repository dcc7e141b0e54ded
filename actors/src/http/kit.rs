//! What every route of the API shares: its settings and state, the
//! extractors that check who asks (keys, namespaces, hosts), and the readers
//! of bodies and query strings with this API's errors.

use std::collections::HashMap;
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use actix_web::dev::Payload;
use actix_web::error::JsonPayloadError;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};

use super::error::{self, ApiError};
use super::metrics::Metrics;
use crate::chat::handle::ChatHandle;

/// Settings of the API layer.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// Accepted bearer keys; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Keys bound to a namespace: such a caller works only inside it.
    pub key_namespaces: HashMap<String, String>,
    /// Whether /metrics needs a key too (when keys are set).
    pub metrics_require_key: bool,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// This replica's name, sent as `X-Modelpool-Node` with every `/chat`
    /// answer (a proxy's consistent hashing keeps a conversation on one node).
    pub node: String,
    /// Host names (without port) requests may name in `Host`; none: any.
    /// A server on loopback answers only for loopback names by default, so a
    /// web page that rebinds its own DNS name to 127.0.0.1 reads nothing.
    pub allowed_hosts: Option<Vec<String>>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            key_namespaces: HashMap::new(),
            metrics_require_key: false,
            max_body_bytes: 1 << 20,
            node: "modelpool".into(),
            allowed_hosts: None,
        }
    }
}

/// A whole number as JSON may write it: `3`, or `3.0` (JSON Schema's
/// `integer` holds both, and clients that compute a count send either).
pub(crate) fn whole(v: &serde_json::Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_f64().filter(|x| x.fract() == 0.0 && x.abs() < 9.0e15).map(|x| x as i64))
}

/// Deserializes an optional whole number written either way ([`whole`]).
pub(crate) fn de_whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    let v: Option<serde_json::Value> = serde::Deserialize::deserialize(d)?;
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => whole(&v).map(Some).ok_or_else(|| D::Error::custom(format!("expected a whole number, got {v}"))),
    }
}

/// A whole body of at most `limit` bytes; past it, a 413 in this API's shape
/// (actix's own answer to an oversized `Bytes` body is plain text).
pub(crate) async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    use futures::StreamExt;
    let mut buf = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::BadRequest { param: None, message: format!("could not read the body: {e}") })?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// A query parameter: absent or empty (`?limit=`, as forms and
/// docs/http-api.md's `?before=&limit=` write it) is none; otherwise it must parse.
pub(crate) fn de_query<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    use serde::de::Error;
    let raw: Option<String> = serde::Deserialize::deserialize(d)?;
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|e| D::Error::custom(format!("{e}: {v:?}"))),
    }
}

/// What the routes share.
#[derive(Clone)]
pub struct ApiState {
    /// Set once the pool and the chat layer are up; until then the API answers 503.
    chat: Arc<OnceLock<ChatHandle>>,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<ApiSettings>,
    draining: Arc<AtomicBool>,
}

impl ApiState {
    /// State for routes in front of a running chat layer.
    pub fn new(chat: ChatHandle, settings: ApiSettings) -> Self {
        let state = Self::loading(settings);
        state.attach(chat);
        state
    }

    /// State for a server that listens while the model loads: the health
    /// checks answer 503 "loading", other routes 503, until [`Self::attach`].
    pub fn loading(settings: ApiSettings) -> Self {
        Self {
            chat: Arc::new(OnceLock::new()),
            metrics: Arc::new(Metrics::new()),
            settings: Arc::new(settings),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The chat layer is up: start serving.
    pub fn attach(&self, chat: ChatHandle) {
        let _ = self.chat.set(chat);
    }

    /// The chat layer, or 503 while it is still loading.
    pub fn chat(&self) -> Result<&ChatHandle, ApiError> {
        self.chat.get().ok_or(ApiError::Loading { retry_after_secs: error::RETRY_AFTER_SECS })
    }

    /// From now on: readiness fails and new generation requests get 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Refuses new work while draining.
    pub(crate) fn admit(&self) -> Result<(), ApiError> {
        if self.is_draining() {
            return Err(ApiError::Draining { retry_after_secs: error::RETRY_AFTER_SECS });
        }
        Ok(())
    }
}

/// The bearer token of `Authorization: Bearer <token>` (the scheme in any case).
fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(actix_web::http::header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The configured key the request carries, compared in constant time: every
/// key is compared, and what is compared is the SHA-256 of each (32 bytes
/// whatever the key's length: a slice compare returns early on a length
/// mismatch, which would tell a caller how long the keys are).
fn check_key<'k>(req: &HttpRequest, keys: &'k [String]) -> Result<Option<&'k str>, ApiError> {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    if keys.is_empty() {
        return Ok(None);
    }
    let given = Sha256::digest(bearer(req).ok_or(ApiError::Unauthorized)?.as_bytes());
    let mut found = None;
    for key in keys {
        if bool::from(Sha256::digest(key.as_bytes()).as_slice().ct_eq(given.as_slice())) {
            found = Some(key.as_str());
        }
    }
    found.map(Some).ok_or(ApiError::Unauthorized)
}

fn state_of(req: &HttpRequest) -> Result<&ApiState, ApiError> {
    req.app_data::<web::Data<ApiState>>()
        .map(|d| d.get_ref())
        .ok_or_else(|| ApiError::Internal("ApiState is not registered".into()))
}

/// Extractor: the request carries a valid API key (or none are configured),
/// with the namespace that key is bound to, if any.
pub struct Authorized {
    pub namespace: Option<String>,
    /// Who asks, for the per-client share of the pool: the API key, or
    /// without keys the peer address (a hash of it).
    pub client: Option<u64>,
}

impl Authorized {
    /// The namespace a request works in: the key's own, or (for a key without
    /// one, or an open server) the one in the body. A body naming another
    /// namespace than the key's is refused.
    pub fn namespace(&self, from_body: Option<String>) -> Result<Option<String>, ApiError> {
        if let Some(ns) = &from_body {
            validate_namespace(ns)?;
        }
        match (&self.namespace, from_body) {
            (Some(bound), Some(asked)) if *bound != asked => Err(ApiError::Forbidden(format!(
                "namespace {asked:?} is not the namespace of this API key; omit it or send the key's own"
            ))),
            (Some(bound), _) => Ok(Some(bound.clone())),
            (None, asked) => Ok(asked),
        }
    }

    /// Whether this caller may see a conversation of `namespace`.
    pub fn may_see(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|own| own == namespace)
    }
}

/// Longest namespace, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 64;

/// A namespace is 1 to 64 bytes of ASCII letters, digits and `_ - . @ :`.
pub fn validate_namespace(ns: &str) -> Result<(), ApiError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "_-.@:".contains(c);
    if ns.is_empty() || ns.len() > MAX_NAMESPACE_BYTES || !ns.chars().all(ok_char) {
        let shown: String = ns.chars().take(80).collect();
        return Err(ApiError::bad(
            "namespace",
            format!(
                "invalid namespace: must be 1 to {MAX_NAMESPACE_BYTES} characters of letters, digits and _ - . @ :, got {shown:?} ({} bytes)",
                ns.len()
            ),
        ));
    }
    Ok(())
}

impl FromRequest for Authorized {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(state_of(req).and_then(|s| {
            check_host(req, s.settings.allowed_hosts.as_deref())?;
            let key = check_key(req, &s.settings.api_keys)?;
            let client = match key {
                Some(k) => Some(client_id(("key", k))),
                None => req.peer_addr().map(|a| client_id(("peer", a.ip()))),
            };
            Ok(Authorized { namespace: key.and_then(|k| s.settings.key_namespaces.get(k).cloned()), client })
        }))
    }
}

/// A client's id for the pool's per-client share.
fn client_id(who: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(who)
}

/// The names a server bound to a loopback address answers for by default.
pub const LOOPBACK_HOSTS: [&str; 4] = ["localhost", "127.0.0.1", "::1", "[::1]"];

/// The host name of a `Host` header, without its port.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [::1]:8080
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.contains(':') => name,
        _ => host,
    }
}

/// Refuses a request whose `Host` is not one this server answers for (DNS rebinding).
fn check_host(req: &HttpRequest, allowed: Option<&[String]>) -> Result<(), ApiError> {
    let Some(allowed) = allowed else { return Ok(()) };
    let host = req.headers().get(actix_web::http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let name = host_name(host).trim_end_matches('.');
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(name) || a.trim_matches(['[', ']']).eq_ignore_ascii_case(name)) {
        return Ok(());
    }
    let shown: String = host.chars().take(80).collect();
    Err(ApiError::Forbidden(format!(
        "Host {shown:?} is not one this server answers for ({}); add it to server.allowed_hosts",
        allowed.join(", ")
    )))
}

/// Extractor: /metrics access (open unless `metrics_require_key`).
pub struct MetricsAccess;

impl FromRequest for MetricsAccess {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            state_of(req)
                .and_then(|s| {
                    check_host(req, s.settings.allowed_hosts.as_deref())?;
                    if s.settings.metrics_require_key {
                        check_key(req, &s.settings.api_keys).map(|_| ())
                    } else {
                        Ok(())
                    }
                })
                .map(|_| MetricsAccess),
        )
    }
}

/// JSON bodies: size limit → 413, anything malformed → 400 naming the problem.
pub(crate) fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default().limit(limit).error_handler(move |err, _| body_error(err, limit).into())
}

/// What was wrong with a JSON body.
pub(crate) fn body_error(err: JsonPayloadError, limit: usize) -> ApiError {
    match &err {
        JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
            ApiError::PayloadTooLarge { limit }
        }
        JsonPayloadError::ContentType => {
            ApiError::bad("Content-Type", "the body must be JSON with Content-Type: application/json")
        }
        JsonPayloadError::Deserialize(e) => {
            ApiError::BadRequest { param: None, message: format!("invalid JSON body: {e}") }
        }
        other => ApiError::BadRequest { param: None, message: format!("could not read the body: {other}") },
    }
}

pub(crate) fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err, _| {
        ApiError::BadRequest { param: None, message: format!("invalid query string: {err}") }.into()
    })
}

pub(crate) fn path_config() -> web::PathConfig {
    web::PathConfig::default()
        .error_handler(|err, _| ApiError::BadRequest { param: None, message: format!("invalid path: {err}") }.into())
}

/// The resource at `path`: a method it does not serve (`allow` lists those
/// it does) is a 405 saying so, not a 404 as if the path did not exist.
pub(crate) fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move |req: HttpRequest| async move {
        Err::<HttpResponse, _>(ApiError::MethodNotAllowed {
            method: req.method().to_string(),
            path: req.path().chars().take(200).collect(),
            allow,
        })
    }))
}

/// How long a streaming request waits for a slot before its answer starts
/// (with SSE comments every [`super::sse::KEEP_ALIVE`] while it waits on).
pub(crate) const HEADERS_WHILE_QUEUED: std::time::Duration = std::time::Duration::from_secs(2);

/// Seconds since the Unix epoch (OpenAI's `created`).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The first 60 characters of a JSON value, for error messages.
pub(crate) fn short_json(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s,
    }
}

/// Checks a request's `model` against the served one, whose id is the GGUF
/// file's stem (`SmolLM2-135M-Instruct.Q4_1`); the stem without its last
/// `.suffix` (`SmolLM2-135M-Instruct`) names it too. Absent or empty: the served one.
pub(crate) fn check_model(asked: Option<&str>, served: &str) -> Result<(), ApiError> {
    match asked {
        Some(m) if !m.is_empty() && m != served && served.rsplit_once('.').map(|(base, _)| base) != Some(m) => {
            Err(ApiError::ModelNotFound(m.chars().take(200).collect()))
        }
        _ => Ok(()),
    }
}
