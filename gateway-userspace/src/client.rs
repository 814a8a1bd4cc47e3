//! Client side of the admin API: what the `gateway api|plan|key|usage` commands use to talk to
//! a running gateway.
//!
//! [`AdminClient`] speaks the admin API's wire format (API Gateway REST, rest-json): JSON bodies,
//! `Accept: application/json`, path labels percent-encoded, lists followed through `position`
//! to the end, and errors read the way botocore reads them (`x-amzn-ErrorType`, then the body's
//! `code`/`__type`; the body's `message`). With credentials every request is SigV4-signed.
//!
//! Bounds: connecting gives up after [`CONNECT_TIMEOUT`], a whole request (connect, send and
//! read the answer) after [`REQUEST_TIMEOUT`]; an answer body larger than [`MAX_ANSWER_BYTES`]
//! is refused. Nothing here retries: every admin change is a single request, and a retried
//! create could make a second object.
//!
//! [`commands`] turns parsed command lines into requests and renders the answers.

pub mod commands;
mod table;

use std::{error::Error as _, fmt, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use crate::sigv4::{self, Credentials};

/// Longest wait for the TCP connection to the admin API.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a whole request: connecting, sending and reading the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer body accepted, in bytes (a page of 500 keys is well under 1 MiB).
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Page size asked for when following a list to its end (the API's maximum).
pub const PAGE_LIMIT: u32 = 500;

/// Everything but RFC 3986's unreserved characters is percent-encoded in path labels and
/// query values, as botocore encodes them.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A base URL of one of the gateway's listeners (the admin API, or the data plane for printed
/// invoke URLs): `http://HOST[:PORT][/PREFIX]`, kept without a trailing slash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    base: String,
}

impl Endpoint {
    /// Parses and checks a base URL: scheme `http` (the gateway's listeners have no TLS), a
    /// host, no query or fragment.
    pub fn parse(raw: &str) -> Result<Endpoint, String> {
        let uri: Uri = raw.parse().map_err(|e| format!("not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "scheme `{other}` is not supported, the gateway listens on plain http"
                ));
            }
            None => return Err("needs a scheme and a host, e.g. http://127.0.0.1:9180".into()),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err("needs a host".into());
        }
        if uri.query().is_some() || raw.contains('#') {
            return Err("must not have a query or a fragment".into());
        }
        Ok(Endpoint {
            base: raw.trim_end_matches('/').to_string(),
        })
    }

    /// The URL of `path` (which starts with `/`) under this endpoint.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// What a failed admin request reports; each variant renders as the one line the CLI prints
/// after `error: `.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The admin API refused the request: status, AWS error type and message.
    #[error("{} ({code}, HTTP {status}){}", first_line(message), hint(code, *signed))]
    Api {
        /// HTTP status.
        status: u16,
        /// AWS error type (`NotFoundException`, ...).
        code: String,
        /// The message as sent; a signature mismatch carries the canonical request after the
        /// first line.
        message: String,
        /// Whether the request was signed (decides the hint on a missing signature).
        signed: bool,
    },
    /// No answer: the connection failed, broke, or the request timed out.
    #[error(
        "cannot reach the admin API at {endpoint}: {reason}; is `gateway serve` running, and \
         is this its --admin-listen address? (set it with --endpoint or GATEWAY_ADMIN_URL)"
    )]
    Unreachable {
        /// The endpoint as given.
        endpoint: String,
        /// Why, in the operating system's or the HTTP library's words.
        reason: String,
    },
    /// An answer that is not the admin API's format (another server on that port?).
    #[error("the admin API at {endpoint} answered {what}")]
    BadAnswer {
        /// The endpoint as given.
        endpoint: String,
        /// What was wrong with the answer.
        what: String,
    },
    /// The request could not be built or signed (a value that cannot go in a URL or header).
    #[error("cannot send the request: {0}")]
    Request(String),
    /// A check of ours refused the command before (or between) requests.
    #[error("{0}")]
    Refused(String),
    /// A command of several requests failed part-way and left something behind.
    #[error("{error}; {note}")]
    Partial {
        /// The failure.
        error: Box<ClientError>,
        /// What was left and how to clean it up.
        note: String,
    },
}

fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or("").trim_end()
}

fn hint(code: &str, signed: bool) -> &'static str {
    if code == "MissingAuthenticationTokenException" && !signed {
        "; either this admin API wants signed requests (pass --access-key-id and \
         --secret-access-key) or --endpoint names the data plane (`serve --listen`) instead of \
         the admin API (`serve --admin-listen`)"
    } else {
        ""
    }
}

/// How to reach and authenticate to the admin API.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Base URL.
    pub endpoint: Endpoint,
    /// SigV4 credentials; `None` sends unsigned requests.
    pub credentials: Option<Credentials>,
    /// Region named in the credential scope (any non-empty name).
    pub region: String,
}

/// One admin API request: method, path labels (encoded here), query and JSON body.
#[derive(Clone, Debug)]
pub struct Call {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    body: Option<Value>,
}

impl Call {
    /// `method` on the path made of `labels`, each percent-encoded (`["usageplans", id]` is
    /// `/usageplans/{id}`).
    pub fn new(method: Method, labels: &[&str]) -> Call {
        let mut path = String::new();
        for label in labels {
            path.push('/');
            path.extend(utf8_percent_encode(label, ENCODE));
        }
        Call {
            method,
            path,
            query: Vec::new(),
            body: None,
        }
    }

    /// GET on `labels`.
    pub fn get(labels: &[&str]) -> Call {
        Call::new(Method::GET, labels)
    }

    /// Adds the query parameter `name=value`.
    pub fn query(mut self, name: &str, value: impl Into<String>) -> Call {
        self.query.push((name.to_string(), value.into()));
        self
    }

    /// Adds the query parameter when `value` is `Some`.
    pub fn query_opt(self, name: &str, value: Option<impl Into<String>>) -> Call {
        match value {
            Some(v) => self.query(name, v),
            None => self,
        }
    }

    /// Sets the JSON body.
    pub fn body(mut self, body: Value) -> Call {
        self.body = Some(body);
        self
    }

    /// The path and query as sent.
    fn path_and_query(&self) -> String {
        if self.query.is_empty() {
            return self.path.clone();
        }
        let query: Vec<String> = self
            .query
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    utf8_percent_encode(k, ENCODE),
                    utf8_percent_encode(v, ENCODE)
                )
            })
            .collect();
        format!("{}?{}", self.path, query.join("&"))
    }
}

/// A JSON-patch-like operation of an Update* request; the value is always a string on the
/// wire.
pub fn patch_op(op: &str, path: &str, value: Option<String>) -> Value {
    match value {
        Some(v) => json!({"op": op, "path": path, "value": v}),
        None => json!({"op": op, "path": path}),
    }
}

/// A client of one admin API.
pub struct AdminClient {
    config: ClientConfig,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// A client with the module's timeouts. Must be created inside a tokio runtime with timers.
    pub fn new(config: ClientConfig) -> AdminClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(10))
            .build(connector);
        AdminClient { config, http }
    }

    /// The endpoint requests go to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.config.endpoint
    }

    /// Sends `call` and returns the answer's JSON (`{}` for an empty body, as Delete* sends).
    pub async fn send(&self, call: Call) -> Result<Value, ClientError> {
        let request = self.build(&call)?;
        let endpoint = self.config.endpoint.to_string();
        let exchange = async {
            let response =
                self.http
                    .request(request)
                    .await
                    .map_err(|e| ClientError::Unreachable {
                        endpoint: endpoint.clone(),
                        reason: describe(&e),
                    })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| ClientError::Unreachable {
                    endpoint: endpoint.clone(),
                    reason: format!("the answer broke off: {e}"),
                })?
                .to_bytes();
            Ok::<_, ClientError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Unreachable {
                endpoint: endpoint.clone(),
                reason: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
            })??;
        if !parts.status.is_success() {
            return Err(api_error(
                parts.status,
                &parts.headers,
                &body,
                self.config.credentials.is_some(),
            )
            .unwrap_or_else(|| ClientError::BadAnswer {
                endpoint: endpoint.clone(),
                what: format!(
                    "HTTP {} without an AWS error; is it the gateway's admin address \
                     (`gateway serve --admin-listen`)?",
                    parts.status
                ),
            }));
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(json!({}));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer {
            endpoint,
            what: format!("HTTP {} with a body that is not JSON: {e}", parts.status),
        })
    }

    /// Follows a list operation (`GET` with `limit`/`position`) to its last page and returns
    /// every `item`.
    pub async fn list_all(&self, call: Call) -> Result<Vec<Value>, ClientError> {
        let mut items = Vec::new();
        let mut position: Option<String> = None;
        loop {
            let page = self
                .send(
                    call.clone()
                        .query("limit", PAGE_LIMIT.to_string())
                        .query_opt("position", position.clone()),
                )
                .await?;
            match page.get("item") {
                Some(Value::Array(page_items)) => items.extend(page_items.iter().cloned()),
                None | Some(Value::Null) => {}
                Some(_) => return Err(self.bad_answer("a list whose `item` is not an array")),
            }
            let next = page
                .get("position")
                .and_then(Value::as_str)
                .map(str::to_string);
            match next {
                None => return Ok(items),
                Some(p) if position.as_ref() == Some(&p) => {
                    return Err(self.bad_answer("the same `position` twice"));
                }
                Some(p) => position = Some(p),
            }
        }
    }

    /// A [`ClientError::BadAnswer`] for this endpoint.
    pub fn bad_answer(&self, what: &str) -> ClientError {
        ClientError::BadAnswer {
            endpoint: self.config.endpoint.to_string(),
            what: what.to_string(),
        }
    }

    fn build(&self, call: &Call) -> Result<Request<Full<Bytes>>, ClientError> {
        let url = self.config.endpoint.url(&call.path_and_query());
        let body = match &call.body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let mut builder = Request::builder()
            .method(call.method.clone())
            .uri(&url)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("gateway-cli/", env!("CARGO_PKG_VERSION")),
            );
        if call.body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(())
            .map_err(|e| ClientError::Request(format!("{url}: {e}")))?;
        let (mut parts, ()) = request.into_parts();
        if let Some(creds) = &self.config.credentials {
            sigv4::sign(
                &mut parts,
                &body,
                creds,
                &self.config.region,
                std::time::SystemTime::now(),
            )
            .map_err(|e| ClientError::Request(e.message()))?;
        }
        Ok(Request::from_parts(parts, Full::new(body)))
    }
}

/// Reads an error answer as botocore does: the code from `x-amzn-ErrorType` (text after `:`
/// and from `#` dropped), else the body's `code`, `Code` or `__type`; the message from the
/// body's `message` or `Message`. `None` when the answer has neither a code nor a message: it
/// did not come from an AWS-style API.
fn api_error(
    status: StatusCode,
    headers: &http::HeaderMap,
    body: &[u8],
    signed: bool,
) -> Option<ClientError> {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let text = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| json.get(*n).and_then(Value::as_str))
            .map(str::to_string)
    };
    let code = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let v = v.split(':').next().unwrap_or(v);
            v.split('#').next().unwrap_or(v).to_string()
        })
        .filter(|v| !v.is_empty())
        .or_else(|| text(&["code", "Code", "__type"]));
    let message = text(&["message", "Message"]);
    if code.is_none() && message.is_none() {
        return None;
    }
    Some(ClientError::Api {
        status: status.as_u16(),
        code: code.unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("Error")
                .replace(' ', "")
        }),
        message: message.unwrap_or_else(|| "(no message)".to_string()),
        signed,
    })
}

/// The causes of a transport error, outermost wrapper left out: e.g. `tcp connect error:
/// Connection refused (os error 111)`.
fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.contains(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// Runs one admin command to completion on a single-threaded runtime of its own.
pub fn execute(
    config: ClientConfig,
    command: commands::AdminCommand,
) -> Result<commands::Output, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Request(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        let client = AdminClient::new(config);
        commands::run(&client, command).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_value(v: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(v).expect("test header values are ASCII")
    }

    /// Serves `GET /apikeys` in pages of two from five keys, as the admin API pages: the
    /// `position` of the next page, none on the last.
    async fn paging_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                    let query = req.uri().query().unwrap_or("").to_string();
                    async move {
                        assert!(query.contains("limit=500"), "{query}");
                        let start: usize = query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("position="))
                            .map_or(0, |p| p.parse().unwrap());
                        let end = (start + 2).min(5);
                        let mut page = json!({
                            "item": (start..end).map(|i| json!({"id": format!("k{i}")})).collect::<Vec<_>>()
                        });
                        if end < 5 {
                            page["position"] = end.to_string().into();
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(page.to_string()),
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    #[test]
    fn lists_are_followed_to_the_last_page() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let addr = paging_server().await;
            let client = AdminClient::new(ClientConfig {
                endpoint: Endpoint::parse(&format!("http://{addr}")).unwrap(),
                credentials: None,
                region: "us-east-1".into(),
            });
            let items = client.list_all(Call::get(&["apikeys"])).await.unwrap();
            let ids: Vec<&str> = items.iter().map(|k| k["id"].as_str().unwrap()).collect();
            assert_eq!(ids, ["k0", "k1", "k2", "k3", "k4"]);
        });
    }

    #[test]
    fn endpoints_must_be_plain_http_urls() {
        let e = Endpoint::parse("http://127.0.0.1:9180/").unwrap();
        assert_eq!(e.url("/usageplans"), "http://127.0.0.1:9180/usageplans");
        let e = Endpoint::parse("http://admin.internal/gw").unwrap();
        assert_eq!(e.url("/apikeys"), "http://admin.internal/gw/apikeys");
        for bad in [
            "https://127.0.0.1:9180",
            "127.0.0.1:9180",
            "http://127.0.0.1:9180/?x=1",
            "http://",
            "not a url",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_and_query_values_are_percent_encoded() {
        let call = Call::get(&["usageplans", "a/b:c", "keys"])
            .query("name", "silver plan")
            .query("position", "25");
        assert_eq!(
            call.path_and_query(),
            "/usageplans/a%2Fb%3Ac/keys?name=silver%20plan&position=25"
        );
    }

    #[test]
    fn errors_are_read_as_botocore_reads_them() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-amzn-errortype",
            header_value("NotFoundException:http://internal.amazon.com/#x"),
        );
        let e = api_error(
            StatusCode::NOT_FOUND,
            &headers,
            br#"{"message":"Invalid Usage Plan ID specified"}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            e.to_string(),
            "Invalid Usage Plan ID specified (NotFoundException, HTTP 404)"
        );
        let e = api_error(
            StatusCode::FORBIDDEN,
            &http::HeaderMap::new(),
            br#"{"__type":"InvalidSignatureException","Message":"The request signature we calculated does not match.\n\nThe Canonical String ..."}"#,
            true,
        )
        .unwrap();
        assert_eq!(
            e.to_string(),
            "The request signature we calculated does not match. (InvalidSignatureException, HTTP 403)"
        );
        // Not an AWS-style answer at all: the caller says so instead.
        assert!(api_error(StatusCode::NOT_FOUND, &http::HeaderMap::new(), b"", false).is_none());
        let e = api_error(
            StatusCode::BAD_REQUEST,
            &http::HeaderMap::new(),
            br#"{"message":"Invalid limit"}"#,
            false,
        );
        assert_eq!(
            e.unwrap().to_string(),
            "Invalid limit (BadRequest, HTTP 400)"
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-amzn-errortype",
            header_value("MissingAuthenticationTokenException"),
        );
        let e = api_error(
            StatusCode::FORBIDDEN,
            &headers,
            br#"{"message":"Missing Authentication Token"}"#,
            false,
        )
        .unwrap();
        assert!(e.to_string().contains("--access-key-id"), "{e}");
        assert!(!e.to_string().contains('\n'));
    }
}
