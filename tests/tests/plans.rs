//! Usage plans on the wire: a real gateway process loaded with a JSON model, a real
//! upstream, curl and raw keep-alive sockets as clients. Every refusal is checked for
//! AWS's exact status, `x-amzn-ErrorType` and body.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::Context as _;
use gateway::plan::{ApiKey, Method, Model, QuotaPeriod, RestApi, Stage, UsagePlan};
use gateway_tests::{Gateway, TempDir, Upstream, curl};

const API: &str = "a1b2c3d4e5";
const SILVER: &str = "silver-key-0000000000000001";
const DISABLED: &str = "disabled-key-00000000000002";
const NO_PLAN: &str = "noplan-key-000000000000003";
const OTHER: &str = "other-key-0000000000000004";

/// API `a1b2c3d4e5`, stage `prod`: `GET /pets/{id}` and `ANY /{proxy+}` need a key,
/// `GET /public` and `GET /legacy` (sent upstream as POST) do not. Plan `silver` (rate 1/s,
/// burst 3, quota 5/day) holds the silver and disabled keys; plan `other` (no limits) holds
/// the other key.
fn model(upstream: &Upstream) -> Model {
    let up = format!("http://{}", upstream.addr);
    let mut legacy = Method::http_proxy(format!("{up}/legacy"));
    if let Some(integration) = legacy.method_integration.as_mut() {
        integration.http_method = Some("POST".into());
    }
    Model::new()
        .api(
            RestApi::new(API, "pets")
                .method(
                    "/pets/{id}",
                    "GET",
                    Method::http_proxy(format!("{up}/pets/{{id}}")).key_required(true),
                )
                .method("/public", "GET", Method::http_proxy(format!("{up}/public")))
                .method("/legacy", "GET", legacy)
                .method(
                    "/{proxy+}",
                    "ANY",
                    Method::http_proxy(format!("{up}/{{proxy}}")).key_required(true),
                )
                .stage(Stage::new("prod")),
        )
        .plan(
            UsagePlan::new("silver", "Silver")
                .stage(API, "prod")
                .throttle(1.0, 3)
                .quota(5, QuotaPeriod::Day),
        )
        .plan(UsagePlan::new("other", "Other").stage(API, "prod"))
        .key(ApiKey::new("ksilver", SILVER))
        .key(ApiKey::new("kdisabled", DISABLED).enabled(false))
        .key(ApiKey::new("knoplan", NO_PLAN))
        .key(ApiKey::new("kother", OTHER))
        .plan_key("silver", "ksilver")
        .plan_key("silver", "kdisabled")
        .plan_key("other", "kother")
}

fn start(upstream: &Upstream, extra: &[&str]) -> anyhow::Result<(Gateway, TempDir)> {
    start_with(&serde_json::to_value(model(upstream))?, extra)
}

/// Starts a gateway on the configuration file `json`; the file lives in the returned dir.
fn start_with(json: &serde_json::Value, extra: &[&str]) -> anyhow::Result<(Gateway, TempDir)> {
    let dir = TempDir::new("model")?;
    let path = dir.path.join("model.json");
    std::fs::write(&path, serde_json::to_string_pretty(json)?)?;
    let path = path.display().to_string();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--config",
        &path,
    ];
    args.extend_from_slice(extra);
    Ok((Gateway::start(None, &args)?, dir))
}

/// (status, lower-cased head, body) of one curl request with an optional key.
fn get(
    gw: &Gateway,
    path: &str,
    key: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<(u16, String, String)> {
    let url = format!("http://{}{path}", gw.data);
    let header = key.map(|k| format!("X-Api-Key: {k}"));
    let mut args: Vec<&str> = vec!["-i"];
    if let Some(h) = &header {
        args.extend(["-H", h.as_str()]);
    }
    args.extend_from_slice(extra);
    args.push(&url);
    let (status, text) = curl(None, &args)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((status, head.to_ascii_lowercase(), body.to_owned()))
}

/// The upstream's echo of a request that must answer 200.
fn echo(
    gw: &Gateway,
    path: &str,
    key: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let (status, head, body) = get(gw, path, key, extra)?;
    anyhow::ensure!(status == 200, "{path} answered {status}: {head}\n{body}");
    Ok(serde_json::from_str(&body)?)
}

fn assert_refusal(got: (u16, String, String), status: u16, error_type: &str, message: &str) {
    let (code, head, body) = got;
    assert_eq!(code, status, "{head}\n{body}");
    assert!(
        head.contains(&format!(
            "x-amzn-errortype: {}",
            error_type.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(head.contains("x-amzn-requestid: "), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert_eq!(body, format!(r#"{{"message":"{message}"}}"#));
}

#[test]
fn every_refusal_has_aws_status_type_and_body() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let (gw, _dir) = start(&upstream, &[])?;
    let forbidden = |got| assert_refusal(got, 403, "ForbiddenException", "Forbidden");
    forbidden(get(&gw, "/prod/pets/1", None, &[])?);
    forbidden(get(
        &gw,
        "/prod/pets/1",
        Some("unknown-key-000000000000000"),
        &[],
    )?);
    forbidden(get(&gw, "/prod/pets/1", Some(DISABLED), &[])?);
    forbidden(get(&gw, "/prod/pets/1", Some(NO_PLAN), &[])?);
    assert_refusal(
        get(&gw, "/staging/pets/1", Some(SILVER), &[])?,
        403,
        "MissingAuthenticationTokenException",
        "Missing Authentication Token",
    );
    assert_eq!(
        upstream.requests(),
        0,
        "refused requests must not reach upstream"
    );

    // A method without apiKeyRequired needs no key, and a key does not meter it.
    let (status, head, _) = get(&gw, "/public", None, &[])?;
    assert_eq!(status, 403, "no stage in the path: {head}");
    let (status, _, body) = get(&gw, "/prod/public", None, &[])?;
    assert_eq!(status, 200, "{body}");

    // Throttle: burst 3, then 429 Too Many Requests with Retry-After.
    for i in 0..3 {
        let (status, head, body) = get(&gw, &format!("/prod/pets/{i}"), Some(SILVER), &[])?;
        assert_eq!(status, 200, "{body}");
        assert!(
            head.contains("ratelimit-policy: \"quota\";q=5;w=86400, \"throttle\";q=3;w=3"),
            "{head}"
        );
        let echo: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(echo["path"], format!("/pets/{i}"));
        assert_eq!(
            echo["xApiKey"],
            serde_json::Value::Null,
            "key values stay at the gateway"
        );
    }
    let throttled = get(&gw, "/prod/pets/9", Some(SILVER), &[])?;
    assert!(throttled.1.contains("retry-after: 1"), "{}", throttled.1);
    assert_refusal(
        throttled,
        429,
        "TooManyRequestsException",
        "Too Many Requests",
    );

    // Quota: 5 a day. Two more after the bucket refills, then Limit Exceeded.
    std::thread::sleep(Duration::from_millis(2100));
    for _ in 0..2 {
        assert_eq!(get(&gw, "/prod/pets/1", Some(SILVER), &[])?.0, 200);
    }
    std::thread::sleep(Duration::from_millis(1100));
    let exceeded = get(&gw, "/prod/pets/1", Some(SILVER), &[])?;
    assert!(
        exceeded.1.contains("ratelimit: \"quota\";r=0;"),
        "{}",
        exceeded.1
    );
    assert_refusal(exceeded, 429, "LimitExceededException", "Limit Exceeded");
    assert_eq!(upstream.requests(), 1 + 3 + 2);

    // Another key's plan is untouched by the silver key's exhaustion.
    assert_eq!(get(&gw, "/prod/pets/1", Some(OTHER), &[])?.0, 200);
    Ok(())
}

#[test]
fn paths_that_could_climb_and_doubled_keys_are_refused() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let (gw, _dir) = start(&upstream, &[])?;
    // An open route followed by `..` would name the keyed `/pets/1` to an upstream that
    // resolves dot segments; refused whatever the spelling, key or no key.
    for path in [
        "/prod/public/../pets/1",
        "/prod/public/%2e%2e/pets/1",
        "/prod/public%2F..%2Fpets/1",
        "/prod/./public",
    ] {
        assert_refusal(
            get(&gw, path, None, &["--path-as-is"])?,
            400,
            "BadRequestException",
            "Bad Request",
        );
        assert_refusal(
            get(&gw, path, Some(OTHER), &["--path-as-is"])?,
            400,
            "BadRequestException",
            "Bad Request",
        );
    }
    // Two keys in one request: refused even though each is valid alone.
    let two = format!("X-Api-Key: {OTHER}");
    assert_refusal(
        get(&gw, "/prod/pets/1", Some(SILVER), &["-H", &two])?,
        403,
        "ForbiddenException",
        "Forbidden",
    );
    assert_eq!(upstream.requests(), 0);
    // Dots inside a segment are ordinary characters.
    let seen = echo(&gw, "/prod/files/report.v2.json", Some(OTHER), &[])?;
    assert_eq!(seen["path"], "/files/report.v2.json");
    Ok(())
}

#[test]
fn a_misspelt_member_in_the_config_file_stops_the_start() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let mut json = serde_json::to_value(model(&upstream))?;
    json["usagePlans"][0]["throtle"] = json["usagePlans"][0]["throttle"].take();
    let error = start_with(&json, &[])
        .err()
        .context("a plan without its throttle was served")?;
    let text = format!("{error:#}");
    assert!(text.contains("usagePlans.0.throtle"), "{text}");
    Ok(())
}

#[test]
fn the_integration_method_is_the_upstream_method() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let (gw, _dir) = start(&upstream, &[])?;
    let seen = echo(&gw, "/prod/legacy", None, &[])?;
    assert_eq!(
        (seen["method"].as_str(), seen["path"].as_str()),
        (Some("POST"), Some("/legacy"))
    );
    // `ANY` (or no method) sends the client's.
    let seen = echo(&gw, "/prod/pets/1", Some(OTHER), &["-X", "DELETE"])?;
    assert_eq!(seen["method"], "DELETE");
    Ok(())
}

#[test]
fn a_body_declared_too_large_costs_no_quota() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let (gw, _dir) = start(&upstream, &["--max-body-bytes", "1000"])?;
    let body = "b".repeat(2000);
    assert_refusal(
        get(&gw, "/prod/pets/1", Some(SILVER), &["--data-binary", &body])?,
        413,
        "RequestTooLargeException",
        "Request Too Long",
    );
    let (status, head, _) = get(&gw, "/prod/pets/1", Some(SILVER), &[])?;
    assert_eq!(status, 200);
    assert!(head.contains("ratelimit: \"quota\";r=4;"), "{head}");
    assert_eq!(upstream.requests(), 1);
    Ok(())
}

#[test]
fn strict_aws_parity_leaves_out_rate_limit_headers() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let (gw, _dir) = start(&upstream, &["--no-rate-limit-headers"])?;
    for _ in 0..3 {
        let (status, head, _) = get(&gw, "/prod/pets/1", Some(SILVER), &[])?;
        assert_eq!(status, 200);
        assert!(!head.contains("ratelimit"), "{head}");
    }
    let (status, head, _) = get(&gw, "/prod/pets/1", Some(SILVER), &[])?;
    assert_eq!(status, 429);
    assert!(
        !head.contains("retry-after") && !head.contains("ratelimit"),
        "{head}"
    );
    Ok(())
}

#[test]
fn the_three_addressing_forms_reach_the_same_method() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let (gw, _dir) = start(&upstream, &[])?;
    let host = format!("Host: {API}.execute-api.example.internal");
    let forms: [(&str, &[&str]); 3] = [
        ("/prod/pets/7", &[]),
        ("/prod/pets/7", &["-H", host.as_str()]),
        (&format!("/restapis/{API}/prod/_user_request_/pets/7"), &[]),
    ];
    for (path, extra) in forms {
        let (status, _, body) = get(&gw, path, Some(OTHER), extra)?;
        assert_eq!(status, 200, "{path}: {body}");
        let echo: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(echo["path"], "/pets/7", "{path}");
    }
    // Greedy {proxy+} takes the rest of the path; the stage root has no method.
    let (status, _, body) = get(&gw, "/prod/a/b/c?x=1", Some(OTHER), &[])?;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        (echo["path"].as_str(), echo["query"].as_str()),
        (Some("/a/b/c"), Some("x=1"))
    );
    let wrong_host = "Host: zzzzzzzzzz.execute-api.example.internal";
    let (status, _, body) = get(&gw, "/prod/pets/7", Some(OTHER), &["-H", wrong_host])?;
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"message":"Missing Authentication Token"}"#)
    );
    Ok(())
}

/// Sends one request on a kept-alive socket and reads exactly one response.
fn exchange(reader: &mut BufReader<TcpStream>, path: &str, key: &str) -> anyhow::Result<u16> {
    write!(
        reader.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: gw\r\nx-api-key: {key}\r\n\r\n"
    )?;
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line.split(' ').nth(1).unwrap_or("0").parse()?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(status)
}

#[test]
fn the_key_may_change_between_requests_on_one_connection() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let (gw, _dir) = start(&upstream, &[])?;
    let stream = TcpStream::connect(gw.data)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut conn = BufReader::new(stream);
    assert_eq!(exchange(&mut conn, "/prod/pets/1", OTHER)?, 200);
    assert_eq!(exchange(&mut conn, "/prod/pets/1", NO_PLAN)?, 403);
    assert_eq!(exchange(&mut conn, "/prod/pets/1", OTHER)?, 200);
    for _ in 0..3 {
        assert_eq!(exchange(&mut conn, "/prod/pets/1", SILVER)?, 200);
    }
    assert_eq!(exchange(&mut conn, "/prod/pets/1", SILVER)?, 429);
    // The silver key's empty bucket does not throttle the next key on the same socket.
    assert_eq!(exchange(&mut conn, "/prod/pets/1", OTHER)?, 200);
    Ok(())
}

#[test]
fn http2_prior_knowledge_gets_the_same_answers_on_one_connection() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let (gw, _dir) = start(&upstream, &[])?;
    let url = |path: &str| {
        format!(
            "http://{}/restapis/{API}/prod/_user_request_{path}",
            gw.data
        )
    };

    // A refusal over h2c carries AWS's type and body like HTTP/1.1.
    let path = format!("/restapis/{API}/prod/_user_request_/pets/1");
    let refused = get(&gw, &path, None, &["--http2-prior-knowledge"])?;
    assert!(refused.1.starts_with("http/2 403"), "{}", refused.1);
    assert_refusal(refused, 403, "ForbiddenException", "Forbidden");

    // Four streams on one h2c connection with the silver key (burst 3): the bucket is the
    // key's, not the connection's, so exactly one of the four is throttled. (hyper's client
    // rather than curl: curl 7.88 cannot reuse a prior-knowledge connection, curl#10634.)
    let statuses = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(h2c_requests(
            gw.data,
            &[
                url("/pets/1"),
                url("/pets/2"),
                url("/pets/1"),
                url("/pets/2"),
            ],
        ))?;
    let mut sorted = statuses.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [200, 200, 200, 429], "{statuses:?}");
    assert_eq!(upstream.requests(), 3);
    Ok(())
}

/// Sends GETs with the silver key as concurrent streams of ONE h2c (prior knowledge)
/// connection; returns their statuses, checking each response is HTTP/2.
async fn h2c_requests(addr: std::net::SocketAddr, urls: &[String]) -> anyhow::Result<Vec<u16>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    let driver = tokio::spawn(conn);
    let requests = urls.iter().map(|url| {
        let mut sender = sender.clone();
        let request = http::Request::get(url.as_str())
            .header("x-api-key", SILVER)
            .body(http_body_util::Empty::<bytes::Bytes>::new());
        async move {
            let response = sender.send_request(request?).await?;
            anyhow::ensure!(response.version() == http::Version::HTTP_2);
            anyhow::Ok(response.status().as_u16())
        }
    });
    let mut statuses = Vec::new();
    for request in requests.map(tokio::spawn).collect::<Vec<_>>() {
        statuses.push(request.await??);
    }
    driver.abort();
    Ok(statuses)
}
