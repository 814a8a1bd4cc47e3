//! The data plane: accepts client connections and forwards requests upstream.
//!
//! Owns everything between the client socket and the upstream connection pool: the
//! HTTP server (HTTP/1.1 and h2c), hop-by-hop header hygiene, `X-Forwarded-*`, the
//! AWS-style JSON error bodies, and `x-amzn-RequestId` on every response.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use rustls::pki_types::CertificateDer;
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    engine::{Decision, Engine, ForbiddenReason, Limits as EngineLimits, Quotas, Route},
    fastpath::{Connection, FastPath},
    limit::Layer,
    metrics::{Metrics, RequestLabels},
};

/// Body of every data-plane response: streamed from upstream or a small JSON error.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Error of a [`ProxyBody`]: the upstream's, or a stalled upstream body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the data plane answers and forwards.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Resource limits of the listener.
    pub limits: Limits,
    /// Send IETF `RateLimit` / `RateLimit-Policy` on keyed responses and `Retry-After`
    /// on 429 (off: strict AWS parity).
    pub rate_limit_headers: bool,
    /// Forward the client's `x-api-key` header upstream (AWS does; off by default so
    /// that key values never leave the gateway).
    pub forward_api_key: bool,
    /// Certificate authorities trusted for `https` integrations besides the system's.
    pub upstream_ca: Vec<CertificateDer<'static>>,
}

/// Limits that keep one client from holding the data plane's resources.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest time a client may take to send a complete request head, and longest time
    /// an idle keep-alive connection stays open waiting for the next one (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request head (request line plus headers), in bytes; larger gets 431.
    /// hyper's floor is 8192.
    pub max_header_bytes: usize,
    /// Largest request body, in bytes (AWS: 10 MiB); larger gets 413.
    pub max_body_bytes: u64,
    /// Most client connections open at once; further clients wait in the accept queue.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 10 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            max_connections: 10_000,
        }
    }
}

/// Shared state of the data plane.
pub struct Proxy {
    config: ProxyConfig,
    engine: Arc<Engine>,
    client: Client<HttpsConnector<HttpConnector>, Limited<Incoming>>,
    metrics: Arc<Metrics>,
    /// Health of the fleet's shared store (`--store`); `None` with the embedded store.
    store_health: Option<Arc<crate::fleet::Health>>,
    /// The kernel fast path (`--xdp-iface`): flow binding and shedding.
    fast_path: Option<Arc<FastPath>>,
}

impl Proxy {
    pub fn new(config: ProxyConfig, engine: Arc<Engine>, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // No connect timeout of its own: the integration timeout covers connecting too, so an
        // upstream that never accepts is a 504 like one that never answers.
        connector.enforce_http(false);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(upstream_tls(&config.upstream_ca))
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            config,
            engine,
            client,
            metrics,
            store_health: None,
            fast_path: None,
        }
    }

    /// Reports every keyed decision and connection close to the kernel fast path.
    pub fn with_fast_path(mut self, fast_path: Option<Arc<FastPath>>) -> Self {
        self.fast_path = fast_path;
        self
    }

    /// Follows the shared store's failure mode: `closed` answers keyed methods 503 and `open`
    /// waives quota refusals while the store is unreachable.
    pub fn with_store_health(mut self, health: Option<Arc<crate::fleet::Health>>) -> Self {
        self.store_health = health;
        self
    }

    /// Serves connections from `listener` until `shutdown` resolves, then lets in-flight
    /// requests finish for at most `drain` before returning.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        drain: Duration,
    ) {
        let graceful = GracefulShutdown::new();
        let limits = &self.config.limits;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // A hard bound on buffered head bytes; the exact limit is checked per request.
            .max_buf_size((2 * limits.max_header_bytes).max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(limits.header_read_timeout);
        let connections = Arc::new(Semaphore::new(limits.max_connections));
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                permit = connections.clone().acquire_owned() => {
                    permit.expect("the connection semaphore is never closed")
                }
                () = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Out of fds or similar: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let conn_id = stream
                .local_addr()
                .ok()
                .map(|local| Arc::new(Connection::new(local, peer)));
            let proxy = self.clone();
            let closing = (self.fast_path.clone(), conn_id.clone());
            let service = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                let conn_id = conn_id.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, peer, conn_id.as_deref()).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn.into_owned());
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                metrics.open_connections.inc();
                if let Err(error) = conn.await {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                metrics.open_connections.dec();
                if let (Some(fast_path), Some(conn_id)) = &closing {
                    fast_path.closed(conn_id);
                }
                drop(permit);
            });
        }
        drop(listener);
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("data plane drained"),
            () = tokio::time::sleep(drain) => {
                tracing::warn!(?drain, "drain deadline passed with requests in flight")
            }
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        conn: Option<&Connection>,
    ) -> Response<ProxyBody> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let method = req.method().clone();
        let (labels, mut response) = self.process(req, peer, conn).await;
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        tracing::info!(
            target: "access",
            request_id,
            %peer,
            method = %method,
            api = labels.api,
            stage = labels.stage,
            resource = labels.resource,
            key_id = labels.key_id.as_deref().unwrap_or("-"),
            status,
            outcome = labels.outcome,
            micros = elapsed.as_micros() as u64,
        );
        // The labels move into the metric: no copies per request.
        self.metrics.request(
            RequestLabels {
                api: labels.api,
                stage: labels.stage,
                resource: labels.resource,
                status,
                outcome: labels.outcome,
            },
            elapsed,
        );
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID, value);
        }
        response
    }

    /// Routes, decides and forwards one request.
    async fn process(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        conn: Option<&Connection>,
    ) -> (Seen, Response<ProxyBody>) {
        let (mut parts, body) = req.into_parts();
        let mut labels = Seen::default();
        if head_size(&parts) > self.config.limits.max_header_bytes {
            return labels.rejected(
                "header_too_large",
                error(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "RequestHeaderFieldsTooLargeException",
                    "Request Header Fields Too Large",
                ),
            );
        }
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.host());
        let path = parts.uri.path();
        if has_dot_segment(path) {
            return labels.rejected(
                "bad_path",
                error(
                    StatusCode::BAD_REQUEST,
                    "BadRequestException",
                    "Bad Request",
                ),
            );
        }
        let route = address(host, path).and_then(|a| {
            self.engine
                .resolve(a.api_id, a.stage, parts.method.as_str(), a.resource_path)
        });
        let Some(route) = route else {
            return labels.rejected("no_route", missing_token());
        };
        labels.api = route.rest_api_id.clone();
        labels.stage = route.stage.clone();
        labels.resource = format!("{}/{}", route.resource_path, route.declared_method);

        // A body declared too large is refused before the decision, so it costs no token and
        // no quota (one that turns out too large while streaming has been counted already).
        if declared_length(&parts.headers)
            .is_some_and(|len| len > self.config.limits.max_body_bytes)
        {
            return labels.rejected("too_large", too_large());
        }
        let mut key_values = parts.headers.get_all(API_KEY).iter();
        let api_key = key_values.next().and_then(|v| v.to_str().ok());
        let several_keys = key_values.next().is_some();
        let store = self.store_health.as_deref();
        if route.api_key_required && store.is_some_and(|h| h.refuse_keyed()) {
            return labels.rejected(
                "store_unavailable",
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableException",
                    "Service Unavailable",
                ),
            );
        }
        let decision = if several_keys && route.api_key_required {
            // Refused rather than picking one: an upstream reading another of them would act
            // on a key nobody checked.
            Decision::Forbidden {
                reason: ForbiddenReason::InvalidKey,
                key: None,
            }
        } else if store.is_some_and(|h| h.waive_quota()) {
            self.engine.decide_with(&route, api_key, Quotas::Waive)
        } else {
            self.engine.decide(&route, api_key)
        };
        if let (Some(fast_path), Some(conn)) = (&self.fast_path, conn) {
            fast_path.observed(conn, &decision);
        }
        labels.key_id = decision.key().map(|k| k.id.as_str().to_owned());
        let limits = decision.limits().copied();
        let mut response = match decision {
            Decision::Allow { .. } => {
                labels.outcome = "allowed";
                if !self.config.forward_api_key {
                    parts.headers.remove(API_KEY);
                }
                self.forward(&route, parts, body, peer, &mut labels).await
            }
            refused => {
                labels.outcome = match refused {
                    Decision::Forbidden { .. } => "forbidden",
                    Decision::Throttled { layer, .. } => match layer {
                        Layer::PlanMethod => "throttled_plan_method",
                        Layer::Plan => "throttled_plan",
                        Layer::StageMethod => "throttled_stage_method",
                        Layer::Account => "throttled_account",
                    },
                    _ => "quota_exceeded",
                };
                let status =
                    StatusCode::from_u16(refused.status()).expect("engine statuses are valid");
                let mut response = error(
                    status,
                    refused.error_type().unwrap_or("ForbiddenException"),
                    refused.message().unwrap_or("Forbidden"),
                );
                if self.config.rate_limit_headers
                    && let Some(secs) = refused.retry_after_secs(self.engine.now())
                    && secs < u64::MAX / 2
                {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                response
            }
        };
        if self.config.rate_limit_headers
            && let Some(limits) = limits
        {
            add_rate_limit_headers(response.headers_mut(), &limits);
        }
        (labels, response)
    }

    /// Sends an admitted request to the route's integration and streams the answer back.
    async fn forward(
        &self,
        route: &Route,
        mut parts: http::request::Parts,
        body: Incoming,
        peer: SocketAddr,
        labels: &mut Seen,
    ) -> Response<ProxyBody> {
        let Some(integration) = &route.integration else {
            // MOCK or no integration: an empty 200, as an unmapped MOCK answers.
            return Response::new(full(Bytes::new()));
        };
        // A declared length over the limit was refused before the decision.
        let max_body = self.config.limits.max_body_bytes;
        let body = Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX));
        let Some(uri) = route
            .upstream_url()
            .and_then(|url| integration_uri(&url, parts.uri.query()))
        else {
            labels.outcome = "upstream_error";
            tracing::warn!(uri = %integration.uri, "integration URI is not a valid http URI");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerErrorException",
                "Internal server error",
            );
        };
        // HTTP/2 names the host in the URI (`:authority`), HTTP/1.1 in `Host`.
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        strip_hop_by_hop(&mut parts.headers);
        add_forwarded(&mut parts.headers, peer, original_host);
        if let Some(authority) = uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        if let Some(method) = &integration.http_method {
            parts.method = method.clone();
        }
        let timeout = Duration::from_millis(u64::from(integration.timeout_ms.max(1)));
        let upstream = self.client.request(Request::from_parts(parts, body));
        match tokio::time::timeout(timeout, upstream).await {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, IdleTimeout::new(body, timeout).boxed())
            }
            Ok(Err(err)) if caused_by_body_limit(&err) => {
                labels.outcome = "too_large";
                too_large()
            }
            Ok(Err(err)) => {
                labels.outcome = "upstream_error";
                tracing::warn!(error = %err, "upstream request failed");
                error(
                    StatusCode::BAD_GATEWAY,
                    "InternalServerErrorException",
                    "Internal server error",
                )
            }
            Err(_) => {
                labels.outcome = "upstream_timeout";
                error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "InternalServerErrorException",
                    "Endpoint request timed out",
                )
            }
        }
    }
}

/// What one request was, for its metric and access-log line.
#[derive(Default)]
struct Seen {
    api: String,
    stage: String,
    /// `{resource path template}/{declared method}`, e.g. `/pets/{id}/GET`.
    resource: String,
    /// The API key's id (never its value).
    key_id: Option<String>,
    outcome: &'static str,
}

impl Seen {
    fn rejected(
        mut self,
        outcome: &'static str,
        response: Response<ProxyBody>,
    ) -> (Self, Response<ProxyBody>) {
        self.outcome = outcome;
        (self, response)
    }
}

/// The request header that carries the API key (matched case-insensitively).
pub const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Whether `path` has a `.` or `..` segment, also when its dots are percent-encoded or it is
/// set off by `%2F`, `\` or `%5C`, which upstreams may decode or treat as separators. Such a
/// path could name one route here and another upstream (`/open/../keyed`), so it is refused.
fn has_dot_segment(path: &str) -> bool {
    if !path.contains(['.', '%']) {
        return false;
    }
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    decoded
        .split(|b| *b == b'/' || *b == b'\\')
        .any(|segment| segment == b"." || segment == b"..")
}

/// AWS's answer when no API, stage, resource or method matches.
fn missing_token() -> Response<ProxyBody> {
    error(
        StatusCode::FORBIDDEN,
        "MissingAuthenticationTokenException",
        "Missing Authentication Token",
    )
}

/// Adds `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11)
/// for the plan's quota and throttle.
fn add_rate_limit_headers(headers: &mut HeaderMap, limits: &EngineLimits) {
    let policies: Vec<_> = [limits.quota_policy(), limits.throttle_policy()]
        .into_iter()
        .flatten()
        .collect();
    if policies.is_empty() {
        return;
    }
    let policy = policies
        .iter()
        .map(|p| format!("\"{}\";q={};w={}", p.name, p.limit, p.window_secs))
        .collect::<Vec<_>>()
        .join(", ");
    let current = policies
        .iter()
        .map(|p| format!("\"{}\";r={};t={}", p.name, p.remaining, p.reset_secs))
        .collect::<Vec<_>>()
        .join(", ");
    if let (Ok(policy), Ok(current)) = (
        HeaderValue::from_str(&policy),
        HeaderValue::from_str(&current),
    ) {
        headers.insert("ratelimit-policy", policy);
        headers.insert("ratelimit", current);
    }
}

/// TLS for `https` integrations: the system's trust store plus `extra`, TLS 1.2 and 1.3,
/// server names and certificates verified. Without any trusted authority every `https`
/// integration fails its handshake (502), which is logged here once.
fn upstream_tls(extra: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "cannot read a system CA certificate");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::warn!(ignored, "system CA certificates rustls cannot use");
    }
    for cert in extra {
        if let Err(error) = roots.add(cert.clone()) {
            tracing::warn!(%error, "an --upstream-ca-file certificate cannot be used");
        }
    }
    if roots.is_empty() {
        tracing::warn!("no trusted CA certificates: https integrations will fail (502)");
    }
    tracing::debug!(system = added, extra = extra.len(), "upstream TLS roots");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The integration URL (`http` or `https`) plus the client's query string, joined with `&`
/// when the URL already has a query.
fn integration_uri(url: &str, query: Option<&str>) -> Option<Uri> {
    let full = match query {
        Some(q) if url.contains('?') => format!("{url}&{q}"),
        Some(q) => format!("{url}?{q}"),
        None => url.to_owned(),
    };
    let uri: Uri = full.parse().ok()?;
    (matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()).then_some(uri)
}

/// Header AWS puts on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-amzn-requestid");
/// Header AWS uses to name the error type of a 4xx/5xx.
pub const ERROR_TYPE: HeaderName = HeaderName::from_static("x-amzn-errortype");

/// An AWS-style JSON error: `{"message": ...}` with `x-amzn-ErrorType`.
pub fn error(status: StatusCode, error_type: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "message": message }).to_string();
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = HeaderValue::from_str(error_type) {
        headers.insert(ERROR_TYPE, value);
    }
    response
}

/// AWS's answer to a payload over the limit.
fn too_large() -> Response<ProxyBody> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestTooLargeException",
        "Request Too Long",
    )
}

/// Bytes of the request line and headers as the client sent them (give or take the
/// separators' white space).
fn head_size(parts: &http::request::Parts) -> usize {
    let line = parts.method.as_str().len()
        + parts.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + "  HTTP/1.1\r\n".len();
    parts.headers.iter().fold(line, |total, (name, value)| {
        total + name.as_str().len() + value.len() + ": \r\n".len()
    })
}

/// The body length the client declared, if any.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Whether an upstream failure was our own body limit cutting a streamed upload.
fn caused_by_body_limit(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(current) = source {
        if current.is::<LengthLimitError>() {
            return true;
        }
        source = current.source();
    }
    false
}

/// An upstream response body that fails when its next frame takes longer than `idle` (the
/// integration timeout) to arrive: the client's connection is then cut rather than held open
/// for as long as a stalled upstream keeps its socket. A body that keeps flowing may take as
/// long as it needs.
struct IdleTimeout {
    inner: Incoming,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimeout {
    fn new(inner: Incoming, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl Body for IdleTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    tracing::warn!(
                        idle_ms = this.idle.as_millis(),
                        "upstream response body stalled; connection cut"
                    );
                    Poll::Ready(Some(Err("upstream response body stalled".into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A complete in-memory body.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// How a request names its REST API and stage, in API Gateway's three forms.
#[derive(Debug, PartialEq, Eq)]
pub struct Address<'a> {
    /// The REST API id, when the request names one (host or `/restapis/` form).
    pub api_id: Option<&'a str>,
    /// The stage name: the first path segment after the API part.
    pub stage: &'a str,
    /// The resource path after the stage, starting with `/` (`/` for the stage root).
    pub resource_path: &'a str,
}

/// Splits a request into API, stage and resource path:
/// `/restapis/{id}/{stage}/_user_request_/{path}` with any host;
/// `Host: {id}.execute-api.{anything}` with `/{stage}/{path}`;
/// otherwise `/{stage}/{path}` (the only REST API, resolved by the engine).
pub fn address<'a>(host: Option<&'a str>, path: &'a str) -> Option<Address<'a>> {
    if let Some(rest) = path.strip_prefix("/restapis/") {
        let (api_id, rest) = rest.split_once('/')?;
        let (stage, rest) = rest.split_once('/')?;
        let resource = rest.strip_prefix("_user_request_")?;
        if api_id.is_empty()
            || stage.is_empty()
            || !(resource.is_empty() || resource.starts_with('/'))
        {
            return None;
        }
        let resource_path = if resource.is_empty() { "/" } else { resource };
        return Some(Address {
            api_id: Some(api_id),
            stage,
            resource_path,
        });
    }
    let api_id = host
        .map(|h| {
            h.rsplit_once(':').map_or(h, |(name, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    name
                } else {
                    h
                }
            })
        })
        .and_then(|h| h.split_once(".execute-api."))
        .map(|(id, _)| id)
        .filter(|id| !id.is_empty());
    let rest = path.strip_prefix('/')?;
    let (stage, resource_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if stage.is_empty() {
        return None;
    }
    Some(Address {
        api_id,
        stage,
        resource_path,
    })
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, including those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Appends the client to `X-Forwarded-For` and records the original protocol and host.
fn add_forwarded(headers: &mut HeaderMap, peer: SocketAddr, host: Option<HeaderValue>) {
    let client = peer.ip().to_canonical().to_string();
    // Every X-Forwarded-For line the client sent, in order, then the client itself.
    let mut forwarded_for = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    if !forwarded_for.is_empty() {
        forwarded_for.push_str(", ");
    }
    forwarded_for.push_str(&client);
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_in_every_spelling() {
        for path in [
            "/prod/open/../keyed",
            "/prod/open/..",
            "/prod/./keyed",
            "/prod/open/%2e%2E/keyed",
            "/prod/open/.%2e/keyed",
            "/prod/open/x%2F..%2Fkeyed",
            "/prod/open/x\\..\\keyed",
            "/prod/open/x%5C..%5Ckeyed",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/prod/pets/1",
            "/prod/files/report.v2.json",
            "/prod/files/...",
            "/prod/files/..hidden",
            "/prod/files/a%20b",
            "/prod/files/%252e%252e",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn the_three_addressing_forms() {
        let plain = address(Some("localhost:8080"), "/prod/pets/1").unwrap();
        assert_eq!(
            plain,
            Address {
                api_id: None,
                stage: "prod",
                resource_path: "/pets/1"
            }
        );
        let host = address(Some("a1b2c3.execute-api.example.com:8080"), "/dev").unwrap();
        assert_eq!(
            host,
            Address {
                api_id: Some("a1b2c3"),
                stage: "dev",
                resource_path: "/"
            }
        );
        let restapis = address(Some("x"), "/restapis/a1b2c3/prod/_user_request_/pets").unwrap();
        assert_eq!(
            restapis,
            Address {
                api_id: Some("a1b2c3"),
                stage: "prod",
                resource_path: "/pets"
            }
        );
        let root = address(None, "/restapis/a1b2c3/prod/_user_request_").unwrap();
        assert_eq!(root.resource_path, "/");
        assert_eq!(address(None, "/"), None);
        assert_eq!(address(None, "/restapis/a1b2c3/prod/pets"), None);
        assert_eq!(address(None, "//pets"), None);
    }

    #[test]
    fn integration_uri_keeps_the_query_and_refuses_non_http() {
        assert_eq!(
            integration_uri("http://127.0.0.1:9000/pets/1", Some("a=1")).unwrap(),
            "http://127.0.0.1:9000/pets/1?a=1"
        );
        assert_eq!(
            integration_uri("https://example.com/x?v=2", Some("a=1")).unwrap(),
            "https://example.com/x?v=2&a=1"
        );
        assert!(integration_uri("ftp://example.com/x", None).is_none());
        assert!(integration_uri("/relative", None).is_none());
    }

    #[test]
    fn rate_limit_headers_follow_the_draft_syntax() {
        use crate::engine::{QuotaStatus, ThrottleStatus};
        let limits = EngineLimits {
            quota: Some(QuotaStatus {
                limit: 5000,
                remaining: 4999,
                used: 1,
                period: crate::plan::QuotaPeriod::Month,
                reset_at_ns: 0,
                reset_secs: 100,
                window_secs: 2_592_000,
            }),
            throttle: Some(ThrottleStatus {
                rate: 50.0,
                burst: 100,
                remaining: 99,
                reset_secs: 1,
            }),
        };
        let mut headers = HeaderMap::new();
        add_rate_limit_headers(&mut headers, &limits);
        assert_eq!(
            headers["ratelimit-policy"],
            r#""quota";q=5000;w=2592000, "throttle";q=100;w=2"#
        );
        assert_eq!(
            headers["ratelimit"],
            r#""quota";r=4999;t=100, "throttle";r=99;t=1"#
        );
    }

    #[test]
    fn hop_by_hop_headers_and_connection_tokens_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-kept"], "yes");
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.0.0.2, 10.0.0.3"),
        );
        let peer: SocketAddr = "[::ffff:192.0.2.7]:5000".parse().unwrap();
        add_forwarded(
            &mut headers,
            peer,
            Some(HeaderValue::from_static("api.example")),
        );
        assert_eq!(
            headers["x-forwarded-for"],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 192.0.2.7"
        );
        assert_eq!(headers["x-forwarded-host"], "api.example");
        assert_eq!(headers["x-forwarded-proto"], "http");
    }
}
