//! What users rely on from the state directory, end to end: a real gateway configured only
//! through its admin API, a real upstream, and restarts on the same `--state-dir`.
//!
//! - A clean restart (SIGTERM) brings back every resource as the admin API showed it, and
//!   today's usage exactly; quotas keep counting where they were.
//! - `kill -9` under load loses at most the requests admitted during one usage flush interval.
//! - An admin change is live on the data plane within a second of its 2xx answer, and is
//!   still in force after a restart.
//! - One state directory serves one gateway: a second one refuses to start, saying why.
//! - A full disk fails the changes that need room (503, nothing half written) and the store
//!   works again once there is room, without a restart.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use gateway_tests::{
    Gateway, KeepAlive, ProxyApi, TempDir, Upstream, admin, admin_ok, create_plan, create_plan_key,
    create_proxy_api, gateway_bin, run_bounded, utc_today,
};
use serde_json::{Value, json};

/// How often the gateway writes usage counters to the store.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Allowance on top of the flush interval for the flush's own write and fsync.
const FLUSH_MARGIN: Duration = Duration::from_millis(250);
/// How soon an admin change must be visible on the data plane.
const PROPAGATION: Duration = Duration::from_secs(1);
/// How long a SIGTERM-ed gateway may take to drain and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Starts a gateway serving the configuration stored in `state` (no --demo/--config/--upstream).
fn start(state: &Path) -> Result<Gateway> {
    let dir = state.display().to_string();
    Gateway::start(
        None,
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--state-dir",
            &dir,
        ],
    )
}

/// Stops `gw` with SIGTERM and requires a clean exit.
fn stop(gw: &mut Gateway) -> Result<()> {
    let status = gw.stop(STOP_TIMEOUT)?;
    ensure!(
        status.success(),
        "gateway exited with {status}; stderr:\n{}",
        gw.stderr()
    );
    Ok(())
}

/// GetUsage of `plan` for today: `{keyId: [[used, remaining]]}`.
fn usage_today(addr: SocketAddr, plan: &str) -> Result<Value> {
    let today = utc_today();
    let usage = admin_ok(
        addr,
        "GET",
        &format!("/usageplans/{plan}/usage?startDate={today}&endDate={today}"),
        None,
    )?;
    Ok(usage["values"].clone())
}

/// Today's used count of `key` in `plan`.
fn used_today(addr: SocketAddr, plan: &str, key: &str) -> Result<u64> {
    let values = usage_today(addr, plan)?;
    values[key][0][0]
        .as_u64()
        .with_context(|| format!("no usage for {key} today: {values}"))
}

/// The TagResource/GetTags path of a resource (`/restapis/a1`), its ARN encoded as botocore
/// sends it.
fn tags_path(resource: &str) -> String {
    let arn = format!("arn:aws:apigateway:us-east-1::{resource}");
    format!("/tags/{}", arn.replace(':', "%3A").replace('/', "%2F"))
}

/// Every admin read that shows the configuration, as (path, answer).
fn snapshot(
    addr: SocketAddr,
    api: &ProxyApi,
    plan: &str,
    keys: &[&str],
) -> Result<Vec<(String, Value)>> {
    let id = &api.id;
    let method = format!("/restapis/{id}/resources/{}/methods/ANY", api.proxy);
    let mut paths = vec![
        "/restapis".to_owned(),
        format!("/restapis/{id}"),
        format!("/restapis/{id}/resources"),
        format!("/restapis/{id}/resources?embed=methods"),
        format!("/restapis/{id}/resources/{}", api.root),
        format!("/restapis/{id}/resources/{}", api.proxy),
        method.clone(),
        format!("{method}/integration"),
        format!("/restapis/{id}/deployments"),
        format!("/restapis/{id}/stages"),
        format!("/restapis/{id}/stages/prod"),
        "/usageplans".to_owned(),
        format!("/usageplans/{plan}"),
        format!("/usageplans/{plan}/keys"),
        "/apikeys?includeValues=true".to_owned(),
        "/account".to_owned(),
        tags_path(&format!("/restapis/{id}")),
        tags_path(&format!("/restapis/{id}/stages/prod")),
        tags_path(&format!("/usageplans/{plan}")),
    ];
    for key in keys {
        paths.push(format!("/apikeys/{key}?includeValue=true"));
        paths.push(format!("/usageplans/{plan}/keys/{key}"));
    }
    paths
        .into_iter()
        .map(|path| {
            let answer = admin_ok(addr, "GET", &path, None)?;
            Ok((path, answer))
        })
        .collect()
}

#[test]
fn restart_keeps_every_resource_and_todays_usage() -> Result<()> {
    const KEY_A: &str = "persist-key-a-0123456789abcdef";
    const KEY_B: &str = "persist-key-b-0123456789abcdef";
    const N: u64 = 5;
    const M: u64 = 3;
    const QUOTA: u64 = N + 2;
    let upstream = Upstream::start()?;
    let state = TempDir::new("persist-restart")?;
    let dir = state.path.join("state");

    let mut gw = start(&dir)?;
    let api = create_proxy_api(gw.admin, &upstream, "persisted")?;
    // Beyond the basics, settings of every kind the admin API keeps: stage throttles and
    // variables, the account throttle, a plan's per-method throttle, descriptions, tags.
    let patch = |ops: Value| json!({ "patchOperations": ops });
    admin_ok(
        gw.admin,
        "PATCH",
        &format!("/restapis/{}/stages/prod", api.id),
        Some(&patch(json!([
            {"op": "replace", "path": "/*/*/throttling/rateLimit", "value": "500"},
            {"op": "replace", "path": "/*/*/throttling/burstLimit", "value": "400"},
            {"op": "replace", "path": "/variables/backend", "value": "blue"},
            {"op": "replace", "path": "/description", "value": "production"},
        ]))),
    )?;
    admin_ok(
        gw.admin,
        "PATCH",
        "/account",
        Some(&patch(json!([
            {"op": "replace", "path": "/throttleSettings/rateLimit", "value": "9000"},
            {"op": "replace", "path": "/throttleSettings/burstLimit", "value": "4000"},
        ]))),
    )?;
    // A redeploy with the first deployment deleted, and tags on the API and its stage.
    let stage_path = format!("/restapis/{}/stages/prod", api.id);
    let first = admin_ok(gw.admin, "GET", &stage_path, None)?["deploymentId"].clone();
    let first = first.as_str().context("deployment id")?.to_owned();
    admin_ok(
        gw.admin,
        "POST",
        &format!("/restapis/{}/deployments", api.id),
        Some(&json!({"stageName": "prod", "description": "second"})),
    )?;
    admin_ok(
        gw.admin,
        "DELETE",
        &format!("/restapis/{}/deployments/{first}", api.id),
        None,
    )?;
    for (resource, tags) in [
        (
            format!("/restapis/{}", api.id),
            json!({"owner": "api-team"}),
        ),
        (stage_path.clone(), json!({"env": "production"})),
    ] {
        admin_ok(
            gw.admin,
            "PUT",
            &tags_path(&resource),
            Some(&json!({ "tags": tags })),
        )?;
    }
    let plan = admin_ok(
        gw.admin,
        "POST",
        "/usageplans",
        Some(&json!({
            "name": "persisted-plan",
            "description": "five a day and two more",
            "throttle": {"rateLimit": 100, "burstLimit": 100},
            "quota": {"limit": QUOTA, "period": "DAY"},
            "apiStages": [{
                "apiId": api.id,
                "stage": "prod",
                "throttle": {"/{proxy+}/ANY": {"rateLimit": 50, "burstLimit": 50}},
            }],
            "tags": {"tier": "silver"},
        })),
    )?;
    let plan = plan["id"].as_str().context("plan id")?.to_owned();
    let key_a = admin_ok(
        gw.admin,
        "POST",
        "/apikeys",
        Some(&json!({
            "name": "key-a",
            "description": "first customer",
            "enabled": true,
            "value": KEY_A,
            "customerId": "customer-1",
            "stageKeys": [{"restApiId": api.id, "stageName": "prod"}],
            "tags": {"team": "a"},
        })),
    )?;
    let key_a = key_a["id"].as_str().context("key id")?.to_owned();
    admin_ok(
        gw.admin,
        "POST",
        &format!("/usageplans/{plan}/keys"),
        Some(&json!({"keyId": key_a, "keyType": "API_KEY"})),
    )?;
    let key_b = create_plan_key(gw.admin, &plan, "key-b", KEY_B)?;

    let mut client = KeepAlive::new(gw.data);
    for (key, count) in [(KEY_A, N), (KEY_B, M)] {
        for i in 0..count {
            let (status, body) = client.get(&api.path(), Some(key))?;
            ensure!(status == 200, "request {i} with {key}: {status} {body}");
        }
    }
    let before = snapshot(gw.admin, &api, &plan, &[&key_a, &key_b])?;
    // Usage is deliberately not read before the stop: GetUsage flushes, and the counts must
    // survive on their own (periodic flush, then the one at shutdown).
    stop(&mut gw)?;
    drop(gw);

    let gw = start(&dir)?;
    let after = snapshot(gw.admin, &api, &plan, &[&key_a, &key_b])?;
    for ((path, was), (_, is)) in before.iter().zip(&after) {
        assert_eq!(is, was, "GET {path} differs after the restart");
    }
    let stage_tags = admin_ok(gw.admin, "GET", &tags_path(&stage_path), None)?;
    assert_eq!(stage_tags, json!({"tags": {"env": "production"}}));
    let deployments = admin_ok(
        gw.admin,
        "GET",
        &format!("/restapis/{}/deployments", api.id),
        None,
    )?;
    let ids: Vec<&Value> = deployments["item"]
        .as_array()
        .context("items")?
        .iter()
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "the deleted deployment came back: {deployments}"
    );
    assert_ne!(ids[0]["id"], json!(first));

    let usage = usage_today(gw.admin, &plan)?;
    assert_eq!(usage[&key_a], json!([[N, QUOTA - N]]), "{usage}");
    assert_eq!(usage[&key_b], json!([[M, QUOTA - M]]), "{usage}");

    // The same key value is admitted, and its quota goes on from N: two more, then refused.
    let mut client = KeepAlive::new(gw.data);
    for i in 0..QUOTA - N {
        let (status, body) = client.get(&api.path(), Some(KEY_A))?;
        assert_eq!(status, 200, "request {} of the day: {body}", N + i + 1);
        let echo: Value = serde_json::from_str(&body)?;
        assert_eq!(echo["path"], "/anything", "{body}");
    }
    let (status, body) = client.get(&api.path(), Some(KEY_A))?;
    assert_eq!(
        (status, body.as_str()),
        (429, r#"{"message":"Limit Exceeded"}"#)
    );
    // Quotas are per key: B still has room.
    let (status, body) = client.get(&api.path(), Some(KEY_B))?;
    assert_eq!(status, 200, "{body}");

    let usage = usage_today(gw.admin, &plan)?;
    assert_eq!(usage[&key_a], json!([[QUOTA, 0]]), "{usage}");
    assert_eq!(usage[&key_b], json!([[M + 1, QUOTA - M - 1]]), "{usage}");
    Ok(())
}

/// What the load client saw.
struct Load {
    /// When each 200 arrived.
    admitted: Vec<Instant>,
    /// Requests sent, answered or not.
    sent: u64,
    /// Answers other than 200, with the first of them.
    refused: u64,
    first_refusal: Option<(u16, String)>,
    started: Instant,
    /// Whether the load ended because the gateway went away (not at one of its bounds).
    cut: bool,
}

#[test]
fn kill_9_under_load_loses_at_most_one_flush_interval() -> Result<()> {
    const KEY: &str = "load-key-0123456789abcdefgh";
    /// Bounds of the load, whichever comes first.
    const MAX_REQUESTS: u64 = 20_000;
    const MAX_LOAD: Duration = Duration::from_secs(5);
    /// The kill comes this long into the load plus a jitter below one second, or sooner if
    /// the load nears its request bound.
    const KILL_AFTER: Duration = Duration::from_secs(2);
    let upstream = Upstream::start()?;
    let state = TempDir::new("persist-kill")?;
    let dir = state.path.join("state");

    let mut gw = start(&dir)?;
    let api = create_proxy_api(gw.admin, &upstream, "loaded")?;
    let plan = create_plan(
        gw.admin,
        &api.id,
        "loaded-plan",
        (10_000.0, 5_000),
        Some(10_000_000),
    )?;
    let key = create_plan_key(gw.admin, &plan, "load", KEY)?;

    let sent = Arc::new(AtomicU64::new(0));
    let load = {
        let sent = sent.clone();
        let (data, path) = (gw.data, api.path());
        std::thread::spawn(move || {
            let mut client = KeepAlive::new(data);
            let mut load = Load {
                admitted: Vec::with_capacity(MAX_REQUESTS as usize),
                sent: 0,
                refused: 0,
                first_refusal: None,
                started: Instant::now(),
                cut: false,
            };
            while load.sent < MAX_REQUESTS && load.started.elapsed() < MAX_LOAD {
                load.sent += 1;
                sent.store(load.sent, Ordering::Relaxed);
                match client.get(&path, Some(KEY)) {
                    Ok((200, _)) => load.admitted.push(Instant::now()),
                    Ok(answer) => {
                        load.refused += 1;
                        load.first_refusal.get_or_insert(answer);
                    }
                    // The gateway is gone.
                    Err(_) => {
                        load.cut = true;
                        break;
                    }
                }
            }
            load
        })
    };
    // Each run kills at another point of the one-second flush cycle: 2 s plus 0-999 ms.
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_millis())
        .unwrap_or(0);
    let deadline = Instant::now() + KILL_AFTER + Duration::from_millis(u64::from(jitter));
    while Instant::now() < deadline && sent.load(Ordering::Relaxed) < MAX_REQUESTS * 3 / 4 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed_at = Instant::now();
    let status = gw.kill()?;
    ensure!(!status.success(), "SIGKILL-ed gateway exited with {status}");
    let load = load.join().expect("the load thread does not panic");
    drop(gw);
    ensure!(
        load.refused == 0,
        "{} of {} requests refused, first: {:?}",
        load.refused,
        load.sent,
        load.first_refusal
    );
    ensure!(
        load.cut,
        "the load ended at its bounds ({} requests) before the kill",
        load.sent
    );
    let admitted = load.admitted.len() as u64;
    ensure!(admitted > 0, "no request was admitted before the kill");

    let gw = start(&dir)?;
    let persisted = used_today(gw.admin, &plan, &key)?;

    // Loss is measured against the traffic of the last flush interval (plus a margin for
    // the flush's own write and fsync) before the kill, as the client counted it. Answers
    // still in the socket when the signal went out were admitted before it, so they count.
    let window = FLUSH_INTERVAL + FLUSH_MARGIN;
    let recent = load
        .admitted
        .iter()
        .filter(|&&t| t + window >= killed_at)
        .count();
    let rate = recent as f64 / window.as_secs_f64();
    let ran = killed_at.duration_since(load.started).as_secs_f64();
    let lost = admitted as i64 - persisted as i64;
    // One connection answers in order, so the persisted count is a prefix of the admissions:
    // the lost ones are those after it, and their span is how stale the store was.
    let stale = usize::try_from(persisted)
        .ok()
        .and_then(|n| load.admitted.get(n))
        .map_or(Duration::ZERO, |&t| killed_at.saturating_duration_since(t));
    eprintln!(
        "kill -9 under load: {admitted} admitted in {ran:.2} s (average {:.0}/s, {rate:.0}/s \
         over the last {:.2} s), {persisted} persisted: {lost} lost = {:.3} s of traffic; the \
         lost ones were admitted in the last {:.3} s before the kill",
        admitted as f64 / ran,
        window.as_secs_f64(),
        lost as f64 / rate,
        stale.as_secs_f64(),
    );
    // The one request on the wire at the kill may have been counted and flushed without its
    // answer reaching the client.
    assert!(
        persisted <= admitted + 1,
        "{persisted} persisted but only {admitted} admitted"
    );
    assert!(
        stale <= window,
        "the lost requests go back {stale:?} before the kill, more than one flush interval \
         ({FLUSH_INTERVAL:?} + {FLUSH_MARGIN:?})"
    );
    let bound = rate * window.as_secs_f64();
    assert!(
        lost as f64 <= bound,
        "lost {lost} requests, more than one flush interval ({FLUSH_INTERVAL:?} + \
         {FLUSH_MARGIN:?}) of traffic at {rate:.0}/s = {bound:.0}"
    );

    // The restarted gateway counts on from what it persisted.
    let mut client = KeepAlive::new(gw.data);
    let (status, body) = client.get(&api.path(), Some(KEY))?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(used_today(gw.admin, &plan, &key)?, persisted + 1);
    Ok(())
}

/// Polls `probe` until `done` accepts its answer or `PROPAGATION` (plus slack for the probe
/// itself) has passed since `since`; returns the accepted answer and when it came.
fn within_propagation<T: std::fmt::Debug>(
    since: Instant,
    what: &str,
    mut probe: impl FnMut() -> Result<T>,
    done: impl Fn(&T) -> bool,
) -> Result<(T, Duration)> {
    let mut last = None;
    for _ in 0..1_000 {
        let answer = probe()?;
        let took = since.elapsed();
        if done(&answer) {
            ensure!(took <= PROPAGATION, "{what} took {took:?}");
            return Ok((answer, took));
        }
        last = Some(answer);
        if took > PROPAGATION {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("{what}: not within {PROPAGATION:?}; last answer {last:?}")
}

#[test]
fn admin_changes_reach_the_data_plane_within_one_second() -> Result<()> {
    const KEY_A: &str = "live-key-a-0123456789abcdef";
    const KEY_B: &str = "live-key-b-0123456789abcdef";
    const KEY_C: &str = "live-key-c-0123456789abcdef";
    let upstream = Upstream::start()?;
    let state = TempDir::new("persist-live")?;
    let dir = state.path.join("state");

    let mut gw = start(&dir)?;
    let api = create_proxy_api(gw.admin, &upstream, "live")?;
    let plan = create_plan(gw.admin, &api.id, "live-plan", (1_000.0, 1_000), None)?;
    let key_a = create_plan_key(gw.admin, &plan, "a", KEY_A)?;
    create_plan_key(gw.admin, &plan, "b", KEY_B)?;
    let path = api.path();
    let mut client = KeepAlive::new(gw.data);
    let burst = |client: &mut KeepAlive, key: &str| -> Result<Vec<(u16, String)>> {
        (0..3).map(|_| client.get(&path, Some(key))).collect()
    };

    // (a) A disabled key is refused.
    assert_eq!(client.get(&path, Some(KEY_A))?.0, 200);
    admin_ok(
        gw.admin,
        "PATCH",
        &format!("/apikeys/{key_a}"),
        Some(
            &json!({"patchOperations": [{"op": "replace", "path": "/enabled", "value": "false"}]}),
        ),
    )?;
    let since = Instant::now();
    let ((_, body), disabled) = within_propagation(
        since,
        "disabled key refused",
        || client.get(&path, Some(KEY_A)),
        |(status, _)| *status == 403,
    )?;
    assert_eq!(body, r#"{"message":"Forbidden"}"#);

    // (b) A lower plan throttle throttles.
    let before = burst(&mut client, KEY_B)?;
    assert!(before.iter().all(|(s, _)| *s == 200), "{before:?}");
    admin_ok(
        gw.admin,
        "PATCH",
        &format!("/usageplans/{plan}"),
        Some(&json!({"patchOperations": [
            {"op": "replace", "path": "/throttle/rateLimit", "value": "1"},
            {"op": "replace", "path": "/throttle/burstLimit", "value": "1"},
        ]})),
    )?;
    let since = Instant::now();
    let (answers, throttled) = within_propagation(
        since,
        "burst of 3 throttled",
        || burst(&mut client, KEY_B),
        |answers| answers.iter().any(|(s, _)| *s == 429),
    )?;
    let (_, body) = answers
        .iter()
        .find(|(s, _)| *s == 429)
        .expect("accepted answers hold a 429");
    assert_eq!(body, r#"{"message":"Too Many Requests"}"#);

    // (c) A new key in the plan is admitted.
    let (status, _) = client.get(&path, Some(KEY_C))?;
    assert_eq!(status, 403, "a key that does not exist yet");
    let key_c = create_plan_key(gw.admin, &plan, "c", KEY_C)?;
    let since = Instant::now();
    let ((_, body), added) = within_propagation(
        since,
        "new key admitted",
        || client.get(&path, Some(KEY_C)),
        |(status, _)| *status == 200,
    )?;
    let echo: Value = serde_json::from_str(&body)?;
    assert_eq!(echo["path"], "/anything", "{body}");

    eprintln!(
        "live apply (2xx answer -> first matching data-plane answer): key disabled -> 403 in \
         {disabled:?}, throttle lowered -> 429 in {throttled:?}, key added -> 200 in {added:?}"
    );

    // Each change was answered 2xx, so each survives a restart.
    stop(&mut gw)?;
    drop(gw);
    let gw = start(&dir)?;
    let mut client = KeepAlive::new(gw.data);
    assert_eq!(
        client.get(&path, Some(KEY_A))?,
        (403, r#"{"message":"Forbidden"}"#.to_owned())
    );
    let answers = burst(&mut client, KEY_B)?;
    assert!(answers.iter().any(|(s, _)| *s == 429), "{answers:?}");
    assert_eq!(client.get(&path, Some(KEY_C))?.0, 200);
    let stored = admin_ok(gw.admin, "GET", &format!("/usageplans/{plan}"), None)?;
    assert_eq!(
        stored["throttle"],
        json!({"rateLimit": 1.0, "burstLimit": 1}),
        "{stored}"
    );
    let key = admin_ok(gw.admin, "GET", &format!("/apikeys/{key_a}"), None)?;
    assert_eq!(key["enabled"], false, "{key}");
    admin_ok(
        gw.admin,
        "GET",
        &format!("/usageplans/{plan}/keys/{key_c}"),
        None,
    )?;
    Ok(())
}

#[test]
fn second_gateway_on_a_state_dir_in_use_refuses_to_start() -> Result<()> {
    const KEY: &str = "lock-key-0123456789abcdefgh";
    let upstream = Upstream::start()?;
    let state = TempDir::new("persist-lock")?;
    let dir = state.path.join("state");
    let mut first = start(&dir)?;
    let api = create_proxy_api(first.admin, &upstream, "locked")?;
    let plan = create_plan(first.admin, &api.id, "locked-plan", (100.0, 100), None)?;
    create_plan_key(first.admin, &plan, "lock", KEY)?;

    let mut second = std::process::Command::new(gateway_bin());
    second.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    second.arg("--state-dir").arg(&dir);
    // What a user sees by default: no backtrace requested from the environment.
    second
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    // Bounded: a second gateway that started serving would be killed and reported.
    let (status, output) = run_bounded(&mut second, Duration::from_secs(30))?;
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    eprintln!("second gateway: {status}: {output}");
    assert!(!status.success(), "the second gateway exited with {status}");
    assert_eq!(lines.len(), 1, "one line of error, got:\n{output}");
    let line = lines[0];
    assert!(
        line.contains(&dir.display().to_string()) && line.contains("--state-dir"),
        "the error names the state dir and the flag: {line}"
    );
    assert!(line.contains("in use"), "the error says why: {line}");

    // The first gateway is unaffected and still owns the directory.
    let (status, _) = admin(first.admin, "GET", "/apikeys", None)?;
    assert_eq!(status, 200);
    let (status, body) = KeepAlive::new(first.data).get(&api.path(), Some(KEY))?;
    assert_eq!(status, 200, "{body}");

    // Once it stops, the directory is free again.
    stop(&mut first)?;
    drop(first);
    let again = start(&dir)?;
    let (status, body) = KeepAlive::new(again.data).get(&api.path(), Some(KEY))?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

/// Sets the soft file-size limit of process `pid` (`prlimit --fsize`): to the file it writes,
/// a limit reached looks like a full disk.
fn limit_file_size(pid: u32, bytes: &str) -> Result<()> {
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--fsize={bytes}:unlimited"),
        ])
        .status()
        .context("cannot run prlimit")?;
    ensure!(status.success(), "prlimit --fsize={bytes} failed: {status}");
    Ok(())
}

#[test]
fn a_full_disk_fails_changes_until_there_is_room_again() -> Result<()> {
    let state = TempDir::new("full-disk")?;
    let mut gw = start(&state.path)?;
    let key = |name: &str, value: &str| json!({"name": name, "enabled": true, "value": value});
    admin_ok(
        gw.admin,
        "POST",
        "/apikeys",
        Some(&key("before", "full-disk-key-0000000001")),
    )?;
    let size = std::fs::metadata(state.path.join("gateway.redb"))?.len();
    limit_file_size(gw.pid(), &size.to_string())?;

    // 20,000 keys need room the file may not take: refused, and none of them exists.
    let csv: String = std::iter::once("Name,Key\n".to_owned())
        .chain((0..20_000).map(|i| format!("bulk-{i},bulk-import-key-{i:012}\n")))
        .collect();
    let csv_path = state.path.join("keys.csv");
    std::fs::write(&csv_path, csv)?;
    let url = format!("http://{}/apikeys?mode=import&format=csv", gw.admin);
    let (status, body) = gateway_tests::curl(
        None,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: text/csv",
            "--data-binary",
            &format!("@{}", csv_path.display()),
            &url,
        ],
    )?;
    ensure!(
        status == 503,
        "import on a full disk answered {status}: {body}"
    );

    // Room again: the next change is stored, without a restart.
    limit_file_size(gw.pid(), "unlimited")?;
    admin_ok(
        gw.admin,
        "POST",
        "/apikeys",
        Some(&key("after", "full-disk-key-0000000002")),
    )?;
    stop(&mut gw)?;
    let gw = start(&state.path)?;
    let keys = admin_ok(gw.admin, "GET", "/apikeys?limit=500", None)?;
    let mut names: Vec<&str> = keys["item"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    names.sort_unstable();
    ensure!(
        names == ["after", "before"],
        "keys after the restart: {names:?}"
    );
    Ok(())
}
