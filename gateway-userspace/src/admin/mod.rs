//! The admin listener: Amazon API Gateway's control-plane API (REST, 2015-07-09, rest-json) for
//! API keys, usage plans, usage and the REST API resources plans apply to, plus Prometheus
//! `/metrics`. It never shares a listener with the data plane.
//!
//! Wire rules (see `shared/reference/aws-usage-plans.md` §2): JSON in and out, lists as
//! `{"item": [...], "position": ...}`, Create* 201, Delete* 202, errors as status +
//! `x-amzn-ErrorType` + `{"message": ...}`, and `x-amzn-RequestId` on every response.
//!
//! Security: with credentials configured every request but `GET /metrics` must carry a valid
//! SigV4 signature (service `apigateway`, any region); without credentials `serve` refuses to
//! bind anything but loopback.
//!
//! Limits: request bodies up to [`MAX_BODY_BYTES`], request heads read within
//! [`HEADER_READ_TIMEOUT`]. Handlers run on the blocking pool because a change waits for the
//! disk before it is answered.

mod apis;
mod keys;
mod plans;
mod tags;
pub mod wire;

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::{
    control::Control,
    metrics::Metrics,
    proxy::{ProxyBody, REQUEST_ID, full},
    sigv4::{self, Credentials},
};
use wire::{ApiError, Req};

/// Largest admin request body (ImportApiKeys CSV included), in bytes.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Longest wait for a request head, in seconds.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a whole request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What the admin handlers share.
pub struct Ctx {
    /// The configuration writer.
    pub control: Arc<Control>,
    /// Prometheus registry.
    pub metrics: Arc<Metrics>,
    /// SigV4 credentials; `None` accepts unsigned requests.
    pub credentials: Option<Credentials>,
}

/// A handler's successful answer.
pub struct Reply {
    status: StatusCode,
    body: Option<Value>,
}

impl Reply {
    /// 200 with a JSON body.
    pub fn ok(body: Value) -> Reply {
        Reply::json(StatusCode::OK, body)
    }

    /// `status` with a JSON body.
    pub fn json(status: StatusCode, body: Value) -> Reply {
        Reply {
            status,
            body: Some(body),
        }
    }

    /// 202 with an empty body (Delete*).
    pub fn accepted() -> Reply {
        Reply {
            status: StatusCode::ACCEPTED,
            body: None,
        }
    }

    /// 204 with an empty body (TagResource, UntagResource).
    pub fn no_content() -> Reply {
        Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
        }
    }
}

/// Serves the admin API on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let ctx = ctx.clone();
        let service = hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(handle(ctx, req).await) }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<ProxyBody> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut response = match answer(ctx, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    tracing::debug!(target: "admin", %method, %path, status = response.status().as_u16(), %request_id);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

async fn answer(ctx: Arc<Ctx>, req: Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
    if req.method() == Method::GET && req.uri().path() == "/metrics" {
        return Ok(Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(full(ctx.metrics.encode()))
            .expect("static header values are valid"));
    }
    let (parts, body) = req.into_parts();
    let body = read_body(body).await?;
    if let Some(creds) = &ctx.credentials {
        sigv4::verify(&parts, &body, creds, std::time::SystemTime::now()).map_err(|e| {
            ApiError {
                status: StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN),
                code: e.error_type(),
                message: e.message(),
            }
        })?;
    }
    let req = decode(parts, body)?;
    let reply = tokio::task::spawn_blocking(move || route(&ctx, &req))
        .await
        .map_err(|e| ApiError::unavailable(format!("the admin handler failed: {e}")))??;
    let mut response = Response::new(match &reply.body {
        Some(v) => full(v.to_string()),
        None => full(Bytes::new()),
    });
    *response.status_mut() = reply.status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    let limited = Limited::new(body, MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
        Err(_) => Err(ApiError::bad_request("Timed out reading the request body")),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "RequestTooLargeException",
            message: format!("Request body exceeds the {MAX_BODY_BYTES} byte limit"),
        }),
        Ok(Err(e)) => Err(ApiError::bad_request(format!(
            "Could not read the request body: {e}"
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn decode(parts: http::request::Parts, body: Bytes) -> Result<Req, ApiError> {
    let segments = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ApiError::bad_request("Invalid percent-encoding in the path"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let query = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    Ok(Req {
        method: parts.method,
        segments,
        query,
        body,
    })
}

fn error_response(e: &ApiError) -> Response<ProxyBody> {
    crate::proxy::error(e.status, e.code, &e.message)
}

fn route(ctx: &Ctx, req: &Req) -> Result<Reply, ApiError> {
    use Method as M;
    let seg: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let m = &req.method;
    match (seg.as_slice(), m) {
        (["apikeys"], &M::POST) if req.param("mode") == Some("import") => keys::import(ctx, req),
        (["apikeys"], &M::POST) => keys::create(ctx, req),
        (["apikeys"], &M::GET) => keys::list(ctx, req),
        (["apikeys", id], &M::GET) => keys::get(ctx, req, id),
        (["apikeys", id], &M::PATCH) => keys::update(ctx, req, id),
        (["apikeys", id], &M::DELETE) => keys::delete(ctx, id),

        (["usageplans"], &M::POST) => plans::create(ctx, req),
        (["usageplans"], &M::GET) => plans::list(ctx, req),
        (["usageplans", id], &M::GET) => plans::get(ctx, id),
        (["usageplans", id], &M::PATCH) => plans::update(ctx, req, id),
        (["usageplans", id], &M::DELETE) => plans::delete(ctx, id),
        (["usageplans", id, "keys"], &M::POST) => plans::create_key(ctx, req, id),
        (["usageplans", id, "keys"], &M::GET) => plans::list_keys(ctx, req, id),
        (["usageplans", id, "keys", key], &M::GET) => plans::get_key(ctx, id, key),
        (["usageplans", id, "keys", key], &M::DELETE) => plans::delete_key(ctx, id, key),
        (["usageplans", id, "keys", key, "usage"], &M::PATCH) => {
            plans::update_usage(ctx, req, id, key)
        }
        (["usageplans", id, "usage"], &M::GET) => plans::usage(ctx, req, id),

        (["restapis"], &M::POST) => apis::create_api(ctx, req),
        (["restapis"], &M::GET) => apis::list_apis(ctx, req),
        (["restapis", id], &M::GET) => apis::get_api(ctx, id),
        (["restapis", id], &M::PATCH) => apis::update_api(ctx, req, id),
        (["restapis", id], &M::DELETE) => apis::delete_api(ctx, id),
        (["restapis", id, "resources"], &M::GET) => apis::list_resources(ctx, req, id),
        (["restapis", id, "resources", r], &M::GET) => apis::get_resource(ctx, id, r),
        (["restapis", id, "resources", r], &M::POST) => apis::create_resource(ctx, req, id, r),
        (["restapis", id, "resources", r], &M::DELETE) => apis::delete_resource(ctx, id, r),
        (["restapis", id, "resources", r, "methods", v], &M::PUT) => {
            apis::put_method(ctx, req, id, r, v)
        }
        (["restapis", id, "resources", r, "methods", v], &M::GET) => {
            apis::get_method(ctx, id, r, v)
        }
        (["restapis", id, "resources", r, "methods", v], &M::PATCH) => {
            apis::update_method(ctx, req, id, r, v)
        }
        (["restapis", id, "resources", r, "methods", v], &M::DELETE) => {
            apis::delete_method(ctx, id, r, v)
        }
        (["restapis", id, "resources", r, "methods", v, "integration"], &M::PUT) => {
            apis::put_integration(ctx, req, id, r, v)
        }
        (["restapis", id, "resources", r, "methods", v, "integration"], &M::GET) => {
            apis::get_integration(ctx, id, r, v)
        }
        (["restapis", id, "resources", r, "methods", v, "integration"], &M::PATCH) => {
            apis::update_integration(ctx, req, id, r, v)
        }
        (["restapis", id, "resources", r, "methods", v, "integration"], &M::DELETE) => {
            apis::delete_integration(ctx, id, r, v)
        }
        (["restapis", id, "deployments"], &M::POST) => apis::create_deployment(ctx, req, id),
        (["restapis", id, "deployments"], &M::GET) => apis::list_deployments(ctx, req, id),
        (["restapis", id, "deployments", d], &M::GET) => apis::get_deployment(ctx, id, d),
        (["restapis", id, "deployments", d], &M::PATCH) => apis::update_deployment(ctx, req, id, d),
        (["restapis", id, "deployments", d], &M::DELETE) => apis::delete_deployment(ctx, id, d),
        (["restapis", id, "stages"], &M::POST) => apis::create_stage(ctx, req, id),
        (["restapis", id, "stages"], &M::GET) => apis::list_stages(ctx, req, id),
        (["restapis", id, "stages", s], &M::GET) => apis::get_stage(ctx, id, s),
        (["restapis", id, "stages", s], &M::PATCH) => apis::update_stage(ctx, req, id, s),
        (["restapis", id, "stages", s], &M::DELETE) => apis::delete_stage(ctx, id, s),

        // botocore sends the ARN as one encoded segment; a hand-written URL may not encode
        // its slashes.
        (["tags", arn @ ..], &M::PUT) if !arn.is_empty() => tags::tag(ctx, req, &arn.join("/")),
        (["tags", arn @ ..], &M::GET) if !arn.is_empty() => tags::get(ctx, &arn.join("/")),
        (["tags", arn @ ..], &M::DELETE) if !arn.is_empty() => {
            tags::untag(ctx, req, &arn.join("/"))
        }

        (["account"], &M::GET) => apis::get_account(ctx),
        (["account"], &M::PATCH) => apis::update_account(ctx, req),

        _ => Err(ApiError::not_found(format!(
            "No operation matches {} /{}",
            req.method,
            req.segments.join("/")
        ))),
    }
}
