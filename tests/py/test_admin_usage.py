"""GetUsage and UpdateUsage against real data-plane traffic: requests the gateway
admitted show up per key per day, and a new `remaining` count is what the data plane
then admits."""

import datetime
import time

from support import eventually, expect_error, status_of, today, unique

PLAN_NOT_FOUND = "Invalid Usage Plan ID specified"


def metered(gw, quota_limit, keys=1):
    """An API on stage prod, a plan with a daily quota of `quota_limit`, and `keys`
    enabled keys in it, each already admitted once by the data plane."""
    api = gw.proxy_api(stage="prod")
    plan_id = gw.client.create_usage_plan(
        name=unique("usage"),
        apiStages=[{"apiId": api["api"], "stage": "prod"}],
        quota={"limit": quota_limit, "period": "DAY"},
    )["id"]
    created = []
    for _ in range(keys):
        key = gw.create_key("usage")
        gw.client.create_usage_plan_key(usagePlanId=plan_id, keyId=key["id"], keyType="API_KEY")
        created.append(key)
    for key in created:
        gw.wait_admitted(api["api"], "prod", key["value"])
    return api, plan_id, created


def send(gw, api, key, count):
    statuses = [
        gw.invoke(api["api"], "prod", f"pets?n={i}", key=key["value"]).status
        for i in range(count)
    ]
    assert statuses == [200] * count, statuses


def usage_of(apigw, plan_id, start, end, **params):
    return apigw.get_usage(
        usagePlanId=plan_id, startDate=start.isoformat(), endDate=end.isoformat(), **params
    )


def wait_usage(apigw, plan_id, expected_today, start=None):
    """Polls GetUsage until today's [used, remaining] of each key is as expected."""
    day = today()
    start = start or day

    def check():
        return usage_of(apigw, plan_id, start, day)

    def accept(response):
        values = response.get("items", {})
        return all(
            values.get(key_id, [None])[-1] == pair for key_id, pair in expected_today.items()
        )

    response, _ = eventually(check, accept, 3.0, f"usage of plan {plan_id} = {expected_today}")
    return response


def test_get_usage_reports_admitted_requests_per_key_per_day(gw, apigw):
    api, plan_id, (k1, k2) = metered(gw, 10, keys=2)
    send(gw, api, k1, 2)  # k1: 3 admitted in all, k2: 1
    day = today()
    start = day - datetime.timedelta(days=2)
    usage = wait_usage(apigw, plan_id, {k1["id"]: [3, 7], k2["id"]: [1, 9]}, start=start)

    assert status_of(usage) == 200
    assert usage["usagePlanId"] == plan_id
    assert (usage["startDate"], usage["endDate"]) == (start.isoformat(), day.isoformat())
    values = usage["items"]
    assert set(values) == {k1["id"], k2["id"]}, "keyed by API key id"
    for key_id in values:
        days = values[key_id]
        assert len(days) == 3, f"one [used, remaining] per day, inclusive: {days}"
        assert all(len(pair) == 2 for pair in days)
        assert [used for used, _ in days[:-1]] == [0, 0], days

    one_day = usage_of(apigw, plan_id, day, day)
    assert one_day["items"] == {k1["id"]: [[3, 7]], k2["id"]: [[1, 9]]}

    only_k1 = usage_of(apigw, plan_id, day, day, keyId=k1["id"])
    assert only_k1["items"] == {k1["id"]: [[3, 7]]}


def test_get_usage_pages_over_keys(gw, apigw):
    api, plan_id, keys = metered(gw, 100, keys=3)
    expected = {key["id"]: [1, 99] for key in keys}
    wait_usage(apigw, plan_id, expected)
    day = today()

    merged, position, pages = {}, None, 0
    while True:
        params = {"limit": 1}
        if position:
            params["position"] = position
        page = usage_of(apigw, plan_id, day, day, **params)
        pages += 1
        assert len(page["items"]) <= 1, page["items"]
        assert not set(page["items"]) & set(merged), "a key came back on two pages"
        merged.update(page["items"])
        position = page.get("position")
        if not position:
            break
        assert pages < 10, "paging does not end"
    assert merged == {key_id: [pair] for key_id, pair in expected.items()}
    assert pages == 3

    paginated = apigw.get_paginator("get_usage").paginate(
        usagePlanId=plan_id,
        startDate=day.isoformat(),
        endDate=day.isoformat(),
        PaginationConfig={"PageSize": 2},
    )
    seen = {}
    for page in paginated:
        assert page["usagePlanId"] == plan_id
        seen.update(page["items"])
    assert seen == merged


def test_update_usage_sets_the_remaining_quota(gw, apigw):
    api, plan_id, (key,) = metered(gw, 5)
    wait_usage(apigw, plan_id, {key["id"]: [1, 4]})

    updated = apigw.update_usage(
        usagePlanId=plan_id,
        keyId=key["id"],
        patchOperations=[{"op": "replace", "path": "/remaining", "value": "2"}],
    )
    assert status_of(updated) == 200
    assert updated["usagePlanId"] == plan_id

    # The new count reaches the data plane within a second; then exactly two more pass.
    time.sleep(1.1)
    results = [gw.invoke(api["api"], "prod", "pets", key=key["value"]) for _ in range(3)]
    assert [r.status for r in results] == [200, 200, 429], results
    refused = results[-1]
    assert refused.json == {"message": "Limit Exceeded"}, refused
    assert refused.headers.get("x-amzn-errortype") == "LimitExceededException", refused.headers
    wait_usage(apigw, plan_id, {key["id"]: [3, 0]})


def test_update_usage_errors(gw, apigw):
    plan_id = apigw.create_usage_plan(
        name=unique("usage-err"), quota={"limit": 5, "period": "DAY"}
    )["id"]
    key_id = apigw.create_api_key(name=unique("usage-err"))["id"]
    apigw.create_usage_plan_key(usagePlanId=plan_id, keyId=key_id, keyType="API_KEY")
    expect_error(
        lambda: apigw.update_usage(
            usagePlanId=plan_id,
            keyId=key_id,
            patchOperations=[{"op": "add", "path": "/remaining", "value": "10"}],
        ),
        400,
        "BadRequestException",
        pattern=r"Invalid patch path  '/(remaining|extension)' specified for op 'add'\. "
        r"Must be one of: \[\]",
    )
    # The counters are 32-bit: a larger remaining quota is refused, not silently cut.
    expect_error(
        lambda: apigw.update_usage(
            usagePlanId=plan_id,
            keyId=key_id,
            patchOperations=[{"op": "replace", "path": "/remaining", "value": "4294967296"}],
        ),
        400,
        "BadRequestException",
        "The remaining quota must be at most 4294967295",
    )
    outsider = apigw.create_api_key(name=unique("usage-err"))["id"]
    expect_error(
        lambda: apigw.update_usage(
            usagePlanId=plan_id,
            keyId=outsider,
            patchOperations=[{"op": "replace", "path": "/remaining", "value": "10"}],
        ),
        404,
        "NotFoundException",
    )
    day = today().isoformat()
    expect_error(
        lambda: apigw.get_usage(usagePlanId="nope00", startDate=day, endDate=day),
        404,
        "NotFoundException",
        PLAN_NOT_FOUND,
    )
