//! Data-plane protection on a real socket: slowloris and idle keep-alive timeouts, body
//! and header size limits with streamed bodies, pipelining, 504, and a SIGTERM drain.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use gateway_tests::{Gateway, TempDir, Upstream, curl};

fn gateway(upstream: &Upstream, extra: &[&str]) -> anyhow::Result<Gateway> {
    Gateway::start_upstream(&format!("http://{}", upstream.addr), extra)
}

/// Reads until the peer closes or `limit` passes; returns what arrived and when it closed.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 8192];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return (received, Some(start.elapsed())),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (received, Some(start.elapsed())),
        }
    }
    (received, None)
}

#[test]
fn slowloris_and_idle_connections_are_cut_by_the_header_timeout() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let gw = gateway(&upstream, &["--header-read-timeout-secs", "1"])?;

    // A head that trickles in, one header line every 200 ms, never finishing.
    let mut slow = TcpStream::connect(gw.data)?;
    slow.write_all(b"GET /prod/x HTTP/1.1\r\nHost: a\r\n")?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        if slow.write_all(b"X-Slow: 1\r\n").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(3));
    let total = start.elapsed();
    assert!(closed.is_some(), "slow head still open after {total:?}");
    assert!(total < Duration::from_secs(6), "cut too late: {total:?}");
    assert_eq!(
        upstream.requests(),
        0,
        "a partial head must never reach upstream"
    );

    // An idle keep-alive connection after one complete request.
    let mut idle = TcpStream::connect(gw.data)?;
    idle.write_all(b"GET /prod/x HTTP/1.1\r\nHost: a\r\n\r\n")?;
    let (response, closed) = read_until_closed(&mut idle, Duration::from_secs(5));
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    let closed = closed.expect("idle keep-alive connection closed");
    assert!(
        closed >= Duration::from_millis(900),
        "closed too early: {closed:?}"
    );
    Ok(())
}

#[test]
fn pipelined_requests_are_answered_in_order() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let gw = gateway(&upstream, &[])?;
    let mut stream = TcpStream::connect(gw.data)?;
    let mut batch = Vec::new();
    for i in 0..5 {
        // The first request is the slowest, so out-of-order answers would show.
        let sleep = if i == 0 { 200 } else { 0 };
        batch.extend_from_slice(
            format!("GET /prod/p{i}?sleep_ms={sleep} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
        );
    }
    batch.extend_from_slice(b"GET /prod/last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    stream.write_all(&batch)?;
    let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(10));
    assert!(closed.is_some());
    let text = String::from_utf8_lossy(&response);
    let paths: Vec<&str> = text
        .match_indices("\"path\":\"")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    assert_eq!(paths, ["/p0", "/p1", "/p2", "/p3", "/p4", "/last"]);
    Ok(())
}

#[test]
fn bodies_stream_within_the_limit_and_get_413_beyond_it() -> anyhow::Result<()> {
    const MIB: usize = 1024 * 1024;
    let dir = TempDir::new("bodies")?;
    let file = dir.path.join("50mib");
    std::fs::write(&file, vec![b'a'; 50 * MIB])?;
    let upload = format!("@{}", file.display());
    let upstream = Upstream::start()?;

    // Default limit (AWS's 10 MiB): a 50 MiB upload is refused, declared or chunked.
    let strict = gateway(&upstream, &[])?;
    let url = format!("http://{}/prod/upload", strict.data);
    let (status, body) = curl(None, &["--data-binary", &upload, &url])?;
    assert_eq!(
        (status, body.as_str()),
        (413, r#"{"message":"Request Too Long"}"#)
    );
    let chunked = [
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &upload,
        &url,
    ];
    let (status, body) = curl(None, &chunked)?;
    assert_eq!(
        (status, body.as_str()),
        (413, r#"{"message":"Request Too Long"}"#)
    );

    // Raised limit: 50 MiB streams through both ways.
    let roomy = gateway(&upstream, &["--max-body-bytes", &(64 * MIB).to_string()])?;
    let url = format!("http://{}/prod/upload", roomy.data);
    let (status, body) = curl(
        None,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &upload,
            &url,
        ],
    )?;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(echo["bodyBytes"], 50 * MIB);
    let out = dir.path.join("download");
    let url = format!("http://{}/prod/download?bytes={}", roomy.data, 50 * MIB);
    let (status, _) = curl(None, &["-o", &out.display().to_string(), &url])?;
    assert_eq!(status, 200);
    assert_eq!(std::fs::metadata(&out)?.len(), 50 * MIB as u64);
    Ok(())
}

#[test]
fn oversized_headers_get_431() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let gw = gateway(&upstream, &[])?;
    let big = format!("X-Big: {}", "b".repeat(12 * 1024));
    let (status, _) = curl(None, &["-H", &big, &format!("http://{}/prod/x", gw.data)])?;
    assert_eq!(status, 431);
    assert_eq!(upstream.requests(), 0);
    Ok(())
}

#[test]
fn slow_upstream_is_a_504_after_the_integration_timeout() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let gw = gateway(&upstream, &["--integration-timeout-ms", "300"])?;
    let start = Instant::now();
    let url = format!("http://{}/prod/slow?sleep_ms=3000", gw.data);
    let (status, body) = curl(None, &["-i", &url])?;
    assert_eq!(status, 504, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(
        body.to_ascii_lowercase()
            .contains("x-amzn-errortype: internalservererrorexception")
    );
    assert!(
        body.ends_with(r#"{"message":"Endpoint request timed out"}"#),
        "{body}"
    );
    Ok(())
}

#[test]
fn upstream_that_stalls_mid_body_has_the_connection_cut() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let gw = gateway(&upstream, &["--integration-timeout-ms", "300"])?;
    let mut client = TcpStream::connect(gw.data)?;
    client.write_all(b"GET /prod/stall?stall_after=10 HTTP/1.1\r\nHost: a\r\n\r\n")?;
    let (received, closed) = read_until_closed(&mut client, Duration::from_secs(6));
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("xxxxxxxxxx"),
        "the 10 bytes sent arrive: {text}"
    );
    let closed = closed.context("the gateway held the stalled response open")?;
    assert!(closed < Duration::from_secs(3), "cut after {closed:?}");
    // A slow body that keeps flowing is not cut: 4 chunks 200 ms apart, 800 ms > 300 ms.
    let (status, body) = curl(
        None,
        &[&format!(
            "http://{}/prod/drip?drip_ms=200&chunks=4",
            gw.data
        )],
    )?;
    assert_eq!((status, body.as_str()), (200, "xxxx"));
    Ok(())
}

#[test]
fn sigterm_drains_in_flight_requests() -> anyhow::Result<()> {
    let upstream = Upstream::start()?;
    let mut gw = gateway(&upstream, &[])?;
    let data = gw.data;
    let in_flight: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                curl(
                    None,
                    &[&format!("http://{data}/prod/drain{i}?sleep_ms=800")],
                )
            })
        })
        .collect();
    // Let the requests reach the upstream, then ask the gateway to stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.requests() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = gw.stop(Duration::from_secs(10))?;
    assert!(status.success(), "exit {status}: {}", gw.stderr());
    for handle in in_flight {
        let (status, body) = handle.join().expect("client thread")?;
        assert_eq!(status, 200, "an in-flight request was lost: {body}");
    }
    // After the drain the listener is gone.
    assert!(TcpStream::connect(data).is_err());
    Ok(())
}
