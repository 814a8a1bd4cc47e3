"""What the admin API configures is what the data plane does: an API, stage, plan and
key built with boto3 admit keyed requests to the upstream and refuse the rest, and
later changes (plan throttle, key disabled, redeployed method, stage throttle) reach
the data plane within a second."""

import time

import pytest

from support import eventually, unique

PROPAGATION = 1.0


def assert_refused(result, status, error_type, message):
    assert result.status == status, result
    assert result.json == {"message": message}, result
    assert result.headers.get("x-amzn-errortype") == error_type, result.headers
    assert result.headers.get("content-type", "").startswith("application/json"), result.headers


def within_propagation(check, accept, what):
    """The change must be visible to a request sent within PROPAGATION seconds of the
    admin call's answer (give or take one polling interval)."""
    value, took = eventually(check, accept, PROPAGATION, what, interval=0.02)
    assert took <= PROPAGATION + 0.05, f"{what} took {took:.2f} s"
    return value


@pytest.fixture
def setup(gw):
    """API (prod) with keyed `ANY /{proxy+}` and `GET /pets`, plus an open
    `GET /open`; a plan (rate 100, burst 100) and one enabled key in it."""
    client = gw.client
    api = gw.proxy_api(stage="prod")
    open_id = client.create_resource(restApiId=api["api"], parentId=api["root"], pathPart="open")[
        "id"
    ]
    client.put_method(
        restApiId=api["api"], resourceId=open_id, httpMethod="GET", authorizationType="NONE"
    )
    client.put_integration(
        restApiId=api["api"],
        resourceId=open_id,
        httpMethod="GET",
        type="HTTP_PROXY",
        integrationHttpMethod="GET",
        uri=f"{gw.upstream_url}/open-fixed",
    )
    client.create_deployment(restApiId=api["api"], stageName="prod")
    plan_id = client.create_usage_plan(
        name=unique("dp"),
        apiStages=[{"apiId": api["api"], "stage": "prod"}],
        throttle={"rateLimit": 100, "burstLimit": 100},
    )["id"]
    key = gw.create_key("dp")
    client.create_usage_plan_key(usagePlanId=plan_id, keyId=key["id"], keyType="API_KEY")
    gw.wait_admitted(api["api"], "prod", key["value"])
    return {**api, "open": open_id, "plan": plan_id, "key": key}


def test_keyed_requests_reach_the_upstream_and_others_are_refused(gw, setup):
    api = setup["api"]
    ok = gw.invoke(api, "prod", "pets/7/toys?color=red", key=setup["key"]["value"])
    assert ok.status == 200, ok
    assert ok.json["path"] == "/pets/7/toys" and ok.json["query"] == "color=red", ok.json
    assert ok.json["xApiKey"] is None, "the key stays at the gateway"
    ok = gw.invoke(api, "prod", "pets", key=setup["key"]["value"])
    assert ok.status == 200 and ok.json["path"] == "/pets", ok

    forbidden = ("ForbiddenException", "Forbidden")
    assert_refused(gw.invoke(api, "prod", "pets"), 403, *forbidden)
    unknown = gw.invoke(api, "prod", "pets", key="not-a-key-0123456789abcdef")
    assert_refused(unknown, 403, *forbidden)
    # An enabled key in no plan for this stage.
    outsider = gw.create_key("dp-outsider")
    assert_refused(gw.invoke(api, "prod", "pets", key=outsider["value"]), 403, *forbidden)

    # Without apiKeyRequired no key is needed.
    open_ = gw.invoke(api, "prod", "open")
    assert open_.status == 200 and open_.json["path"] == "/open-fixed", open_

    assert_refused(
        gw.invoke(api, "nosuchstage", "pets", key=setup["key"]["value"]),
        403,
        "MissingAuthenticationTokenException",
        "Missing Authentication Token",
    )


def test_plan_throttle_change_applies_within_a_second(gw, apigw, setup):
    api, key = setup["api"], setup["key"]["value"]
    burst = [gw.invoke(api, "prod", "pets", key=key).status for _ in range(5)]
    assert burst == [200] * 5, burst

    apigw.update_usage_plan(
        usagePlanId=setup["plan"],
        patchOperations=[
            {"op": "replace", "path": "/throttle/burstLimit", "value": "1"},
            {"op": "replace", "path": "/throttle/rateLimit", "value": "1"},
        ],
    )

    def three_quick():
        return [gw.invoke(api, "prod", "pets", key=key) for _ in range(3)]

    results = within_propagation(
        three_quick,
        lambda rs: any(r.status == 429 for r in rs),
        "burst 1 throttles back-to-back requests",
    )
    refused = next(r for r in results if r.status == 429)
    assert_refused(refused, 429, "TooManyRequestsException", "Too Many Requests")


def test_disabling_the_key_applies_within_a_second(gw, apigw, setup):
    api, key = setup["api"], setup["key"]
    apigw.update_api_key(
        apiKey=key["id"], patchOperations=[{"op": "replace", "path": "/enabled", "value": "false"}]
    )
    refused = within_propagation(
        lambda: gw.invoke(api, "prod", "pets", key=key["value"]),
        lambda r: r.status == 403,
        "a disabled key is refused",
    )
    assert_refused(refused, 403, "ForbiddenException", "Forbidden")

    apigw.update_api_key(
        apiKey=key["id"], patchOperations=[{"op": "replace", "path": "/enabled", "value": "true"}]
    )
    within_propagation(
        lambda: gw.invoke(api, "prod", "pets", key=key["value"]),
        lambda r: r.status == 200,
        "a re-enabled key is admitted",
    )


def test_removing_the_key_from_the_plan_applies_within_a_second(gw, apigw, setup):
    api, key = setup["api"], setup["key"]
    apigw.delete_usage_plan_key(usagePlanId=setup["plan"], keyId=key["id"])
    within_propagation(
        lambda: gw.invoke(api, "prod", "pets", key=key["value"]),
        lambda r: r.status == 403,
        "a key removed from its plan is refused",
    )


def test_method_changes_apply_when_redeployed(gw, apigw, setup):
    api = setup["api"]
    apigw.update_method(
        restApiId=api,
        resourceId=setup["open"],
        httpMethod="GET",
        patchOperations=[{"op": "replace", "path": "/apiKeyRequired", "value": "true"}],
    )
    # Not deployed yet: the stage still serves the old method.
    time.sleep(PROPAGATION + 0.2)
    before = gw.invoke(api, "prod", "open")
    assert before.status == 200, (
        f"a method change must wait for CreateDeployment; the stage already serves it: {before}"
    )

    apigw.create_deployment(restApiId=api, stageName="prod")
    refused = within_propagation(
        lambda: gw.invoke(api, "prod", "open"),
        lambda r: r.status == 403,
        "the redeployed method needs a key",
    )
    assert_refused(refused, 403, "ForbiddenException", "Forbidden")
    assert gw.invoke(api, "prod", "open", key=setup["key"]["value"]).status == 200


def test_stage_method_throttle_applies_within_a_second(gw, apigw, setup):
    api = setup["api"]
    apigw.update_stage(
        restApiId=api,
        stageName="prod",
        patchOperations=[
            {"op": "replace", "path": "/*/*/throttling/burstLimit", "value": "1"},
            {"op": "replace", "path": "/*/*/throttling/rateLimit", "value": "1"},
        ],
    )
    results = within_propagation(
        lambda: [gw.invoke(api, "prod", "open") for _ in range(3)],
        lambda rs: any(r.status == 429 for r in rs),
        "the stage's */* throttle refuses back-to-back requests",
    )
    refused = next(r for r in results if r.status == 429)
    assert_refused(refused, 429, "TooManyRequestsException", "Too Many Requests")
