//! The admin API as AWS's own clients see it: the pytest suite in `tests/py` drives a
//! real gateway with boto3 and the aws CLI (v1), and checks what it configures on the
//! data plane through a real upstream. A second gateway, started with admin
//! credentials, checks SigV4 verification.
//!
//! The Python tools live in the venv `cargo xtask setup` creates (`target/py`); without
//! it the test is skipped, or fails under `GATEWAY_REQUIRE_TOOLS=1`.

use std::{process::Command, time::Duration};

use anyhow::{Result, bail};
use gateway_tests::{Gateway, Upstream, run_bounded, test_python, workspace_root};

/// The admin credentials of the signed gateway.
const ACCESS_KEY_ID: &str = "AKIDGATEWAYSIGNEDTEST";
const SECRET_ACCESS_KEY: &str = "gateway-signed-test-secret-0123456789";
/// Bound on the whole suite; the gateway is expected to answer it in well under a minute.
const SUITE_TIMEOUT: Duration = Duration::from_secs(600);

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn boto3_and_the_aws_cli_drive_the_admin_api() -> Result<()> {
    let Some(python) = test_python("boto3_and_the_aws_cli_drive_the_admin_api")? else {
        return Ok(());
    };
    let upstream = Upstream::start()?;
    let listen = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    let gateway = Gateway::start(None, &listen)?;
    let mut signed_args = listen.to_vec();
    signed_args.extend([
        "--admin-access-key-id",
        ACCESS_KEY_ID,
        "--admin-secret-access-key",
        SECRET_ACCESS_KEY,
    ]);
    let signed = Gateway::start(None, &signed_args);

    let root = workspace_root();
    let mut pytest = Command::new(&python);
    pytest
        .current_dir(&root)
        .args(["-m", "pytest", "-q", "-rfE", "tests/py"])
        .env("GATEWAY_ADMIN_URL", format!("http://{}", gateway.admin))
        .env("GATEWAY_DATA_URL", format!("http://{}", gateway.data))
        .env("GATEWAY_UPSTREAM_URL", format!("http://{}", upstream.addr))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        // Nothing of the machine's AWS setup may leak into the clients.
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_DEFAULT_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_API_GATEWAY");
    match &signed {
        Ok(signed) => {
            pytest
                .env(
                    "GATEWAY_ADMIN_SIGNED_URL",
                    format!("http://{}", signed.admin),
                )
                .env("GATEWAY_ADMIN_SIGNED_AK", ACCESS_KEY_ID)
                .env("GATEWAY_ADMIN_SIGNED_SK", SECRET_ACCESS_KEY);
        }
        // The signed-mode tests fail with this reason; the rest still run.
        Err(error) => {
            pytest.env("GATEWAY_ADMIN_SIGNED_ERROR", format!("{error:#}"));
        }
    }

    let (status, output) = run_bounded(&mut pytest, SUITE_TIMEOUT)?;
    println!("{output}");
    if !status.success() {
        let signed_stderr = signed.as_ref().map(Gateway::stderr).unwrap_or_default();
        bail!(
            "pytest tests/py failed ({status}):\n{}\n\ngateway stderr (tail):\n{}\n\n\
             signed gateway stderr (tail):\n{}",
            tail(&output, 60),
            tail(&gateway.stderr(), 40),
            tail(&signed_stderr, 20),
        );
    }
    Ok(())
}
