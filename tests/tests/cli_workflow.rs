//! The seed's "Silver Plan" workflow with the gateway's own CLI: real `gateway` processes
//! for the server and every command, a real upstream, and curl on the data plane.
//!
//! A gateway started with no model serves an empty configuration; the CLI builds the API,
//! plan and key through the admin API, and each step is checked where a client would see
//! it. Failures are checked as a user meets them: one `error:` line on stderr and a
//! non-zero exit.

use std::{
    net::TcpListener,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use gateway_tests::{Gateway, Upstream, curl, gateway_bin, utc_today};
use serde_json::Value;

const LISTEN: [&str; 4] = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];

/// What one CLI run did.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `gateway ARGS` with the connection settings in `env` only (nothing of the
/// caller's GATEWAY_* environment leaks in).
fn gateway(env: &[(&str, &str)], args: &[&str]) -> Result<Run> {
    let mut command = Command::new(gateway_bin());
    for name in [
        "GATEWAY_ADMIN_URL",
        "GATEWAY_DATA_URL",
        "GATEWAY_ADMIN_ACCESS_KEY_ID",
        "GATEWAY_ADMIN_SECRET_ACCESS_KEY",
        "GATEWAY_LOG",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied()).args(args);
    let started = Instant::now();
    let out = command
        .output()
        .with_context(|| format!("cannot run {}", gateway_bin().display()))?;
    Ok(Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    })
}

/// The CLI pointed at one gateway's admin API.
struct Cli {
    env: Vec<(&'static str, String)>,
}

impl Cli {
    fn new(gw: &Gateway) -> Cli {
        Cli {
            env: vec![
                ("GATEWAY_ADMIN_URL", format!("http://{}", gw.admin)),
                ("GATEWAY_DATA_URL", format!("http://{}", gw.data)),
            ],
        }
    }

    fn run(&self, args: &[&str]) -> Result<Run> {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        gateway(&env, args)
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let run = self.run(args)?;
        ensure!(
            run.code == Some(0),
            "gateway {} exited {:?}\nstderr: {}\nstdout: {}",
            args.join(" "),
            run.code,
            run.stderr,
            run.stdout
        );
        Ok(run.stdout)
    }

    /// Runs a command with `--json`; returns the parsed output.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.ok(&args)?;
        serde_json::from_str(&out)
            .with_context(|| format!("gateway {} printed no JSON: {out}", args.join(" ")))
    }

    /// Runs a command that must fail with exit status 1 and one `error:` line; returns it.
    fn fails(&self, args: &[&str]) -> Result<String> {
        let run = self.run(args)?;
        one_error_line(&run, 1).with_context(|| format!("gateway {}", args.join(" ")))
    }
}

/// Checks a failed run: exit `code`, nothing on stdout, exactly one line `error: ...` on
/// stderr; returns that line.
fn one_error_line(run: &Run, code: i32) -> Result<String> {
    ensure!(
        run.code == Some(code),
        "exit {:?}, want {code}; stderr: {}",
        run.code,
        run.stderr
    );
    ensure!(run.stdout.is_empty(), "stdout: {}", run.stdout);
    let lines: Vec<&str> = run.stderr.lines().collect();
    ensure!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "want one `error:` line, got: {:?}",
        run.stderr
    );
    Ok(lines[0].to_string())
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Result<&'a str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .with_context(|| format!("no string at {pointer} in {v}"))
}

/// Calls the data plane; returns (status, body).
fn call(url: &str, key: Option<&str>) -> Result<(u16, String)> {
    match key {
        Some(k) => curl(None, &["-H", &format!("x-api-key: {k}"), url]),
        None => curl(None, &[url]),
    }
}

/// Calls `url` until the status is `want` or `within` has passed; returns the last answer.
fn call_until(url: &str, key: Option<&str>, want: u16, within: Duration) -> Result<(u16, String)> {
    let deadline = Instant::now() + within;
    loop {
        let answer = call(url, key)?;
        if answer.0 == want || Instant::now() > deadline {
            return Ok(answer);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn silver_plan_workflow_with_the_gateway_cli() -> Result<()> {
    let upstream = Upstream::start()?;
    let gw = Gateway::start(None, &LISTEN)?;
    let cli = Cli::new(&gw);

    // 1. An API whose every method requires a key, deployed to prod.
    let upstream_url = format!("http://{}", upstream.addr);
    let created = cli.json(&[
        "api",
        "create",
        "--name",
        "shop",
        "--upstream",
        &upstream_url,
    ])?;
    let api = str_at(&created, "/restApi/id")?.to_string();
    assert_eq!(str_at(&created, "/stage")?, "prod");
    let invoke = format!("http://{}/restapis/{api}/prod/_user_request_/", gw.data);
    assert_eq!(str_at(&created, "/invokeUrl")?, invoke);
    let listed = cli.ok(&["api", "list"])?;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&api) && l.contains("shop") && l.contains("prod")),
        "{listed}"
    );
    let hello = format!("{invoke}hello");
    let (status, body) = call(&hello, None)?;
    assert_eq!((status, body.as_str()), (403, r#"{"message":"Forbidden"}"#));

    // 2-3. The Silver plan on that stage.
    let stage = format!("{api}:prod");
    let plan = cli.json(&[
        "plan", "create", "--name", "Silver", "--rate", "50", "--burst", "100", "--quota", "5000",
        "--period", "MONTH", "--stage", &stage,
    ])?;
    let plan_id = str_at(&plan, "/id")?.to_string();
    assert_eq!(
        plan["throttle"],
        serde_json::json!({"burstLimit": 100, "rateLimit": 50.0})
    );
    assert_eq!(
        plan["quota"],
        serde_json::json!({"limit": 5000, "offset": 0, "period": "MONTH"})
    );
    assert_eq!(
        plan["apiStages"],
        serde_json::json!([{"apiId": api, "stage": "prod"}])
    );

    // 4. A key for a customer, in the plan; enabled without asking.
    let key = cli.json(&["key", "create", "--name", "acme"])?;
    let key_id = str_at(&key, "/id")?.to_string();
    let value = str_at(&key, "/value")?.to_string();
    assert_eq!(key["enabled"], Value::Bool(true));
    let added = cli.ok(&["plan", "add-key", &plan_id, &key_id])?;
    assert!(added.contains(&format!(
        "API key {key_id} (acme) is in usage plan {plan_id}"
    )));
    let shown = cli.ok(&["plan", "show", &plan_id])?;
    for want in [
        "50 requests/s, bursts up to 100",
        "5000 requests per month",
        stage.as_str(),
        key_id.as_str(),
    ] {
        assert!(shown.contains(want), "`{want}` missing from:\n{shown}");
    }

    // 5. The customer sends x-api-key and reaches the upstream; without it, 403.
    let (status, body) = call_until(&hello, Some(&value), 200, Duration::from_secs(2))?;
    assert_eq!(status, 200, "{body}");
    let echoed: Value = serde_json::from_str(&body)?;
    assert_eq!(
        (echoed["upstream"].as_str(), echoed["path"].as_str()),
        (Some("test"), Some("/hello"))
    );
    for _ in 0..2 {
        assert_eq!(call(&hello, Some(&value))?.0, 200);
    }
    assert_eq!(call(&hello, None)?.0, 403);
    assert_eq!(call(&hello, Some("not-a-key-of-this-gateway"))?.0, 403);

    // Usage shows the three admitted requests (counters are flushed every second).
    let day = utc_today();
    let deadline = Instant::now() + Duration::from_secs(3);
    let usage = loop {
        let usage = cli.json(&["usage", &plan_id])?;
        if usage["values"][&key_id] == serde_json::json!([[3, 4997]]) || Instant::now() > deadline {
            break usage;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        usage["values"][&key_id],
        serde_json::json!([[3, 4997]]),
        "{usage}"
    );
    assert_eq!(
        (str_at(&usage, "/startDate")?, str_at(&usage, "/endDate")?),
        (day.as_str(), day.as_str())
    );
    assert_eq!(str_at(&usage, "/usagePlanId")?, plan_id);
    let table = cli.ok(&[
        "usage", &plan_id, "--key", &key_id, "--from", &day, "--to", &day,
    ])?;
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with(&key_id))
        .with_context(|| format!("no row for the key in:\n{table}"))?
        .split_whitespace()
        .collect();
    assert_eq!(row, [key_id.as_str(), "acme", day.as_str(), "3", "4997"]);

    // A quota extension of 2: two more requests pass, the third is over the quota.
    let extended = cli.json(&["usage", "extend", &plan_id, &key_id, "--remaining", "2"])?;
    assert_eq!(
        extended["values"][&key_id],
        serde_json::json!([[3, 2]]),
        "{extended}"
    );
    for _ in 0..2 {
        assert_eq!(call(&hello, Some(&value))?.0, 200);
    }
    let (status, body) = call(&hello, Some(&value))?;
    assert_eq!(
        (status, body.as_str()),
        (429, r#"{"message":"Limit Exceeded"}"#)
    );

    // A disabled key is refused within a second; enabled again, it is back to the quota.
    let disabled = cli.ok(&["key", "disable", &key_id])?;
    assert!(disabled.contains("is disabled"), "{disabled}");
    let (status, _) = call_until(&hello, Some(&value), 403, Duration::from_secs(1))?;
    assert_eq!(status, 403);
    cli.ok(&["key", "enable", &key_id])?;
    let (status, _) = call_until(&hello, Some(&value), 429, Duration::from_secs(1))?;
    assert_eq!(status, 429);

    // --json prints the admin API's objects.
    let keys = cli.json(&["key", "list", "--name-prefix", "ac"])?;
    assert_eq!(str_at(&keys, "/item/0/id")?, key_id);
    assert!(
        keys["item"][0].get("value").is_none(),
        "values stay hidden: {keys}"
    );
    let keys = cli.json(&["key", "list", "--show-values"])?;
    assert_eq!(str_at(&keys, "/item/0/value")?, value);
    let shown = cli.json(&["key", "show", &key_id])?;
    assert_eq!(shown["usagePlanIds"], serde_json::json!([plan_id]));
    let shown = cli.json(&["plan", "show", &plan_id])?;
    assert_eq!(str_at(&shown, "/name")?, "Silver");
    assert_eq!(str_at(&shown, "/keys/0/id")?, key_id);
    let plans = cli.json(&["plan", "list"])?;
    assert_eq!(str_at(&plans, "/item/0/id")?, plan_id);
    let apis = cli.json(&["api", "list"])?;
    assert_eq!(str_at(&apis, "/item/0/id")?, api);

    // Changing the plan: a bigger tier.
    let set = cli.json(&[
        "plan", "set", &plan_id, "--rate", "100", "--burst", "200", "--quota", "10000",
    ])?;
    assert_eq!(
        set["throttle"],
        serde_json::json!({"burstLimit": 200, "rateLimit": 100.0})
    );
    assert_eq!(set["quota"]["limit"], 10000);

    // Errors come back as one line with AWS's message, type and status.
    let line = cli.fails(&["plan", "show", "nosuch"])?;
    assert_eq!(
        line,
        "error: Invalid Usage Plan ID specified (NotFoundException, HTTP 404)"
    );
    let line = cli.fails(&["plan", "add-key", "nosuch", &key_id])?;
    assert!(line.contains("Invalid Usage Plan ID specified"), "{line}");
    let line = cli.fails(&["plan", "delete", &plan_id])?;
    assert!(
        line.contains("Cannot delete Usage Plan")
            && line.contains("(BadRequestException, HTTP 400)"),
        "{line}"
    );
    let line = cli.fails(&["api", "delete", &api])?;
    assert!(line.contains("(BadRequestException, HTTP 400)"), "{line}");

    // Tearing down: --force removes the plan's stages first.
    let deleted = cli.ok(&["plan", "delete", &plan_id, "--force"])?;
    assert!(
        deleted.contains(&format!("after removing its stages {stage}")),
        "{deleted}"
    );
    cli.ok(&["key", "delete", &key_id])?;
    cli.ok(&["api", "delete", &api])?;
    assert!(cli.json(&["api", "list"])?["item"] == serde_json::json!([]));
    assert_eq!(call(&hello, Some(&value))?.0, 403);
    Ok(())
}

#[test]
fn an_unreachable_admin_api_is_one_line_and_fast() -> Result<()> {
    // A port nothing listens on: bound, then released.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let run = gateway(&[], &["plan", "list", "--endpoint", &endpoint])?;
    let line = one_error_line(&run, 1)?;
    assert!(
        line.starts_with(&format!(
            "error: cannot reach the admin API at {endpoint}: "
        )),
        "{line}"
    );
    assert!(line.contains("--endpoint or GATEWAY_ADMIN_URL"), "{line}");
    assert!(run.took < Duration::from_secs(5), "took {:?}", run.took);
    Ok(())
}

#[test]
fn bad_flag_values_are_refused_before_any_request() -> Result<()> {
    // An admin endpoint that records connections: none may arrive.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "plan", "create", "--name", "x", "--quota", "5", "--period", "YEAR",
            ],
            "--period",
        ),
        (
            &["plan", "create", "--name", "x", "--stage", "foo"],
            "--stage",
        ),
        (
            &[
                "plan", "create", "--name", "x", "--rate", "-1", "--burst", "1",
            ],
            "--rate",
        ),
        (
            &["usage", "extend", "p", "k", "--remaining", "many"],
            "--remaining",
        ),
        (&["usage", "p", "--from", "yesterday"], "--from"),
        (
            &[
                "api",
                "create",
                "--name",
                "x",
                "--upstream",
                "localhost:9000",
            ],
            "--upstream",
        ),
    ];
    for (argv, flag) in cases {
        let mut args = argv.to_vec();
        args.extend(["--endpoint", &endpoint]);
        let run = gateway(&[], &args)?;
        assert_eq!(run.code, Some(2), "{argv:?}: {}", run.stderr);
        assert!(run.stdout.is_empty());
        let first = run.stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error: ") && first.contains(&format!("'{flag} ")),
            "{argv:?}: {}",
            run.stderr
        );
    }
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Ok((_, peer)) => bail!("a refused command connected to the admin API from {peer}"),
        Err(e) => Err(e.into()),
    }
}

#[test]
fn signed_admin_api_takes_the_right_credentials_only() -> Result<()> {
    let mut args = LISTEN.to_vec();
    args.extend([
        "--admin-access-key-id",
        "AK",
        "--admin-secret-access-key",
        "SK",
    ]);
    let gw = Gateway::start(None, &args)?;
    let endpoint = format!("http://{}", gw.admin);
    let with = |id: &str, secret: &str, command: &[&str]| {
        let mut argv = command.to_vec();
        argv.extend([
            "--endpoint",
            &endpoint,
            "--access-key-id",
            id,
            "--secret-access-key",
            secret,
        ]);
        gateway(&[], &argv)
    };

    let run = with(
        "AK",
        "SK",
        &["key", "create", "--name", "signed key", "--json"],
    )?;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let key: Value = serde_json::from_str(&run.stdout)?;
    let key_id = str_at(&key, "/id")?;
    // A query string and a label with characters that need encoding are signed too.
    let run = with(
        "AK",
        "SK",
        &["key", "list", "--name-prefix", "signed k", "--json"],
    )?;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let listed: Value = serde_json::from_str(&run.stdout)?;
    assert_eq!(str_at(&listed, "/item/0/id")?, key_id);
    let run = with("AK", "SK", &["plan", "show", "no/such:plan"])?;
    let line = one_error_line(&run, 1)?;
    assert!(line.contains("(NotFoundException, HTTP 404)"), "{line}");

    // Credentials from the environment work the same.
    let env = [
        ("GATEWAY_ADMIN_URL", endpoint.as_str()),
        ("GATEWAY_ADMIN_ACCESS_KEY_ID", "AK"),
        ("GATEWAY_ADMIN_SECRET_ACCESS_KEY", "SK"),
    ];
    let run = gateway(&env, &["key", "show", key_id])?;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("signed key"), "{}", run.stdout);

    let run = with("AK", "wrong", &["key", "list"])?;
    let line = one_error_line(&run, 1)?;
    assert!(
        line.contains("(InvalidSignatureException, HTTP 403)"),
        "{line}"
    );
    let run = with("OTHER", "SK", &["key", "list"])?;
    let line = one_error_line(&run, 1)?;
    assert!(
        line.contains("(UnrecognizedClientException, HTTP 403)"),
        "{line}"
    );
    let run = gateway(&[], &["key", "list", "--endpoint", &endpoint])?;
    let line = one_error_line(&run, 1)?;
    assert!(
        line.contains("(MissingAuthenticationTokenException, HTTP 403)")
            && line.contains("--access-key-id"),
        "{line}"
    );
    Ok(())
}
