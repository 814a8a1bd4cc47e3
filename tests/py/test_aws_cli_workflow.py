"""The "Silver Plan" workflow with the real aws CLI (v1) pointed at the gateway:
API, resource, keyed method, HTTP_PROXY integration, deployment, usage plan with
throttle, quota and stage, API key, plan key; then keyed traffic, usage, a quota
extension and a disabled key, each seen on the data plane."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import DUMMY_AK, DUMMY_SK, REGION, eventually, today, unique


def aws_binary():
    beside = Path(sys.executable).parent / "aws"
    if beside.is_file():
        return str(beside)
    found = shutil.which("aws")
    if not found:
        pytest.fail("the aws CLI is not installed (cargo xtask setup installs it)", pytrace=False)
    return found


@pytest.fixture(scope="module")
def aws(gw, tmp_path_factory):
    """Runs `aws apigateway ARGS` against the gateway; returns the parsed JSON output."""
    binary = aws_binary()
    home = tmp_path_factory.mktemp("aws-home")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "AWS_ACCESS_KEY_ID": os.environ.get("GATEWAY_ADMIN_AK") or DUMMY_AK,
        "AWS_SECRET_ACCESS_KEY": os.environ.get("GATEWAY_ADMIN_SK") or DUMMY_SK,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_PAGER": "",
        "LC_ALL": "C.UTF-8",
    }

    def run(*args):
        command = [
            binary,
            "apigateway",
            *args,
            "--endpoint-url",
            gw.admin_url,
            "--region",
            REGION,
            "--output",
            "json",
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (
            f"aws apigateway {' '.join(args)} exited {done.returncode}\n"
            f"stderr: {done.stderr.strip()}\nstdout: {done.stdout.strip()}"
        )
        return json.loads(done.stdout) if done.stdout.strip() else {}

    return run


def test_silver_plan_workflow(gw, aws):
    api_id = aws("create-rest-api", "--name", unique("silver-api"))["id"]
    resources = aws("get-resources", "--rest-api-id", api_id)["items"]
    (root,) = [r for r in resources if r["path"] == "/"]
    pets = aws(
        "create-resource", "--rest-api-id", api_id, "--parent-id", root["id"], "--path-part", "pets"
    )
    assert pets["path"] == "/pets"
    method = aws(
        "put-method",
        "--rest-api-id", api_id,
        "--resource-id", pets["id"],
        "--http-method", "GET",
        "--authorization-type", "NONE",
        "--api-key-required",
    )
    assert method["apiKeyRequired"] is True
    integration = aws(
        "put-integration",
        "--rest-api-id", api_id,
        "--resource-id", pets["id"],
        "--http-method", "GET",
        "--type", "HTTP_PROXY",
        "--integration-http-method", "GET",
        "--uri", f"{gw.upstream_url}/pets",
    )
    assert integration["type"] == "HTTP_PROXY"
    deployment = aws("create-deployment", "--rest-api-id", api_id, "--stage-name", "prod")
    assert deployment["id"]

    plan = aws(
        "create-usage-plan",
        "--name", unique("Silver Plan"),
        "--throttle", "burstLimit=100,rateLimit=50",
        "--quota", "limit=5000,period=MONTH",
        "--api-stages", f"apiId={api_id},stage=prod",
    )
    assert plan["throttle"] == {"burstLimit": 100, "rateLimit": 50.0}
    assert plan["quota"] == {"limit": 5000, "offset": 0, "period": "MONTH"}
    assert plan["apiStages"] == [{"apiId": api_id, "stage": "prod"}]
    plan_arn = f"arn:aws:apigateway:{REGION}::/usageplans/{plan['id']}"
    aws("tag-resource", "--resource-arn", plan_arn, "--tags", "tier=silver,owner=sales")
    assert aws("get-tags", "--resource-arn", plan_arn)["tags"] == {
        "tier": "silver",
        "owner": "sales",
    }

    key = aws("create-api-key", "--name", unique("silver-customer"), "--enabled")
    assert key["enabled"] is True and key["value"]
    plan_key = aws(
        "create-usage-plan-key",
        "--usage-plan-id", plan["id"],
        "--key-id", key["id"],
        "--key-type", "API_KEY",
    )
    assert (plan_key["id"], plan_key["type"]) == (key["id"], "API_KEY")

    # The client sends x-api-key and reaches the upstream.
    first = gw.wait_admitted(api_id, "prod", key["value"])
    assert first.json["path"] == "/pets", first
    for _ in range(2):
        assert gw.invoke(api_id, "prod", "pets", key=key["value"]).status == 200
    assert gw.invoke(api_id, "prod", "pets").status == 403

    day = today().isoformat()

    def usage():
        return aws(
            "get-usage",
            "--usage-plan-id", plan["id"],
            "--start-date", day,
            "--end-date", day,
        )["items"].get(key["id"])

    eventually(usage, lambda v: v == [[3, 4997]], 3.0, "get-usage shows 3 requests")

    # A temporary extension: this month's remaining count goes above the limit.
    aws(
        "update-usage",
        "--usage-plan-id", plan["id"],
        "--key-id", key["id"],
        "--patch-operations", "op=replace,path=/remaining,value=6000",
    )
    eventually(usage, lambda v: v == [[3, 6000]], 3.0, "get-usage shows the extension")
    time.sleep(1.1)
    assert gw.invoke(api_id, "prod", "pets", key=key["value"]).status == 200
    eventually(usage, lambda v: v == [[4, 5999]], 3.0, "the extension is spent one by one")

    disabled = aws(
        "update-api-key",
        "--api-key", key["id"],
        "--patch-operations", "op=replace,path=/enabled,value=false",
    )
    assert disabled["enabled"] is False
    refused, _ = eventually(
        lambda: gw.invoke(api_id, "prod", "pets", key=key["value"]),
        lambda r: r.status == 403,
        1.0,
        "the disabled key is refused",
        interval=0.02,
    )
    assert refused.json == {"message": "Forbidden"}, refused


def test_update_stage_with_terraform_style_method_settings(gw, aws):
    """What `terraform apply` of aws_api_gateway_method_settings sends, through the CLI:
    metrics and logging settings mixed with the throttles in one update-stage."""
    api_id = gw.proxy_api(stage="prod")["api"]
    stage = aws(
        "update-stage",
        "--rest-api-id", api_id,
        "--stage-name", "prod",
        "--patch-operations",
        "op=replace,path=/*/*/metrics/enabled,value=true",
        "op=replace,path=/*/*/logging/loglevel,value=INFO",
        "op=replace,path=/*/*/logging/dataTrace,value=false",
        "op=replace,path=/*/*/throttling/burstLimit,value=30",
        "op=replace,path=/*/*/throttling/rateLimit,value=15",
        "op=replace,path=/*/*/caching/ttlInSeconds,value=60",
    )
    assert stage["methodSettings"]["*/*"]["throttlingBurstLimit"] == 30
    assert stage["methodSettings"]["*/*"]["throttlingRateLimit"] == 15.0
