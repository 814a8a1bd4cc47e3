//! Privileged: the real XDP program attached natively to a veth in a network namespace,
//! real HTTP from a client namespace through the gateway to an upstream.

use std::time::{Duration, Instant};

use gateway_tests::{NetPair, Upstream, can_run_privileged, curl, ip, metric};

#[test]
fn xdp_counts_requests_through_veth_in_namespaces() -> anyhow::Result<()> {
    if !can_run_privileged("xdp_counts_requests_through_veth_in_namespaces")? {
        return Ok(());
    }
    let net = NetPair::create(1)?;
    let upstream = Upstream::start_in(Some(&net.gateway), "127.0.0.1:0".parse()?)?;
    let upstream_url = format!("http://{}", upstream.addr);
    let Some(mut gateway) = net.start_gateway_with_xdp(&["--upstream", &upstream_url])? else {
        return Ok(());
    };

    const REQUESTS: u64 = 5;
    for i in 0..REQUESTS {
        let url = format!("http://{}/prod/items/{i}", gateway.data);
        let (status, body) = curl(Some(&net.client), &[&url])?;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("\"path\":\"/items/{i}\"")), "{body}");
    }
    assert_eq!(upstream.requests(), REQUESTS);

    // Each request is at least SYN, the request segment, an ACK and FIN: the kernel
    // counter must have seen well over one packet per request (polled once a second).
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let deadline = Instant::now() + Duration::from_secs(5);
    let packets = loop {
        let (_, metrics) = curl(Some(&net.gateway), &[&metrics_url])?;
        let packets = metric(&metrics, "gateway_xdp_data_port_packets_total").unwrap_or(0);
        if packets >= 3 * REQUESTS || Instant::now() > deadline {
            break packets;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(packets >= 3 * REQUESTS, "XDP saw {packets} packets");

    let status = gateway.stop(Duration::from_secs(10))?;
    assert!(status.success(), "exit {status}: {}", gateway.stderr());
    assert!(
        gateway.stderr().contains("XDP counters"),
        "{}",
        gateway.stderr()
    );
    let link = ip(&["-n", &net.gateway, "link", "show", &net.gateway_if])?;
    assert!(
        !link.contains("prog/xdp"),
        "XDP still attached after exit: {link}"
    );
    Ok(())
}
