//! The gateway as a user first meets it: a real process on loopback forwarding to a
//! real upstream, and the built-in demo that answers with no configuration at all.

use std::time::Duration;

use anyhow::Context as _;
use gateway_tests::{Gateway, TempDir, Upstream, curl, metric};

#[test]
fn forwards_to_the_upstream_and_counts_the_request() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let mut gateway = Gateway::start_upstream(&format!("http://{}", upstream.addr), &[])?;
    let url = format!("http://{}/prod/pets?limit=2", gateway.data);
    let (status, body) = curl(None, &["-i", &url])?;
    assert_eq!(status, 200, "{body}");
    let lower = body.to_ascii_lowercase();
    assert!(lower.contains("x-amzn-requestid: "), "{body}");
    let json_start = body.find('{').expect("a JSON body");
    let echo: serde_json::Value = serde_json::from_str(&body[json_start..])?;
    assert_eq!(
        echo["path"], "/pets",
        "the stage is not part of the upstream path"
    );
    assert_eq!(echo["query"], "limit=2");
    assert_eq!(echo["xForwardedFor"], "127.0.0.1");
    assert_eq!(upstream.requests(), 1);

    let (status, metrics) = curl(None, &[&format!("http://{}/metrics", gateway.admin)])?;
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &metrics,
            "gateway_requests_total{api=\"default\",stage=\"prod\",resource=\"/{proxy+}/ANY\",status=\"200\",outcome=\"allowed\"}"
        ),
        Some(1),
        "{metrics}"
    );

    let status = gateway.stop(Duration::from_secs(10))?;
    assert!(status.success(), "exit {status}: {}", gateway.stderr());
    Ok(())
}

#[test]
fn demo_mode_serves_on_its_own() -> anyhow::Result<()> {
    let gateway = Gateway::start(
        None,
        &[
            "--demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    )?;
    let demo = gateway
        .banner
        .iter()
        .find(|line| line.starts_with("demo "))
        .expect("the demo banner names the demo key");
    assert!(demo.contains("key="), "{demo}");
    let url = format!("http://{}/prod/hello", gateway.data);
    let (status, body) = curl(None, &["-H", "x-api-key: demo-key-0123456789abcdef", &url])?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello from the demo upstream"), "{body}");
    Ok(())
}

#[test]
fn unreachable_upstream_is_a_502_with_an_aws_body() -> anyhow::Result<()> {
    // Bind and drop a listener to get a loopback port nobody serves.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let gateway = Gateway::start_upstream(&format!("http://127.0.0.1:{port}"), &[])?;
    let (status, body) = curl(None, &["-i", &format!("http://{}/prod/x", gateway.data)])?;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.to_ascii_lowercase()
            .contains("x-amzn-errortype: internalservererrorexception")
    );
    assert!(
        body.ends_with(r#"{"message":"Internal server error"}"#),
        "{body}"
    );
    Ok(())
}

#[test]
fn https_upstream_is_verified_against_the_trusted_authorities() -> anyhow::Result<()> {
    let (upstream, ca_pem) = Upstream::start_tls()?;
    let dir = TempDir::new("upstream-ca")?;
    let ca_file = dir.path.join("ca.pem");
    std::fs::write(&ca_file, ca_pem)?;
    let ca_file = ca_file.display().to_string();
    let url = format!("https://localhost:{}", upstream.addr.port());
    let start = |extra: &[&str]| Gateway::start_upstream(&url, extra);

    let trusting = start(&["--upstream-ca-file", &ca_file])?;
    let (status, body) = curl(
        None,
        &[&format!("http://{}/prod/pets?limit=2", trusting.data)],
    )?;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        (echo["path"].as_str(), echo["query"].as_str()),
        (Some("/pets"), Some("limit=2"))
    );
    assert_eq!(upstream.requests(), 1);

    // Only the system's authorities: the upstream's certificate is refused, nothing is sent.
    let system_only = start(&[])?;
    let (status, body) = curl(None, &[&format!("http://{}/prod/pets", system_only.data)])?;
    assert_eq!(
        (status, body.as_str()),
        (502, r#"{"message":"Internal server error"}"#)
    );
    assert_eq!(upstream.requests(), 1);

    // A file without a certificate is a start-up error naming the flag.
    let empty = dir.path.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n")?;
    let error = start(&["--upstream-ca-file", &empty.display().to_string()])
        .err()
        .context("the gateway started with an empty CA file")?;
    assert!(
        format!("{error:#}").contains("--upstream-ca-file"),
        "{error:#}"
    );
    Ok(())
}
