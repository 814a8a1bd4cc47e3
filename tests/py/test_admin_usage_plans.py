"""Usage plans: CreateUsagePlan, GetUsagePlan, GetUsagePlans, UpdateUsagePlan (every
patch path AWS takes) and DeleteUsagePlan, with AWS's members and error texts."""

import json

import pytest
from botocore.exceptions import ClientError

from support import (
    collect_pages,
    expect_error,
    ids_exactly_once,
    invalid_patch_path,
    status_of,
    unique,
)

NOT_FOUND = "Invalid Usage Plan ID specified"
REMOVE_PATHS = (
    "/apiStages",
    "/quota",
    "/throttle",
    "/productCode",
    "/apiStages/<apidId:stageName>/throttle/<resourcePath>/<httpMethod>",
    "/apiStages/<apidId:stageName>/throttle",
)
REPLACE_PATHS = (
    "/name",
    "/description",
    "/productCode",
    "/throttle/rateLimit",
    "/throttle/burstLimit",
    "/quota/limit",
    "/quota/offset",
    "/quota/period",
    "/apiStages/<apidId:stageName>/throttle/<resourcePath>/<httpMethod>/rateLimit",
    "/apiStages/<apidId:stageName>/throttle/<resourcePath>/<httpMethod>/burstLimit",
    "/apiStages/<apidId:stageName>/throttle",
)


@pytest.fixture(scope="module")
def api(gw):
    """One API with `GET /pets` and `ANY /{proxy+}`, deployed to stages s1 and s2."""
    return gw.proxy_api(stage="s1", extra_stages=("s2",))


def patch(apigw, plan_id, *ops):
    operations = []
    for op in ops:
        entry = {"op": op[0], "path": op[1]}
        if len(op) > 2:
            entry["value"] = op[2]
        operations.append(entry)
    response = apigw.update_usage_plan(usagePlanId=plan_id, patchOperations=operations)
    assert status_of(response) == 200
    assert response["id"] == plan_id
    return response


def test_create_with_name_only(apigw):
    name = unique("plan")
    created = apigw.create_usage_plan(name=name)
    assert status_of(created) == 201
    assert isinstance(created["id"], str) and created["id"]
    assert created["name"] == name
    assert created["apiStages"] == [], "apiStages is always present"
    for absent in ("throttle", "quota", "productCode", "tags"):
        assert absent not in created, f"{absent} is left out when unset"


def test_create_with_everything(apigw, api):
    name = unique("plan")
    created = apigw.create_usage_plan(
        name=name,
        description="silver tier",
        apiStages=[{"apiId": api["api"], "stage": "s1"}],
        throttle={"rateLimit": 10, "burstLimit": 20},
        quota={"limit": 1000, "period": "DAY"},
        tags={"tier": "silver"},
    )
    assert status_of(created) == 201
    assert created["description"] == "silver tier"
    assert created["apiStages"] == [{"apiId": api["api"], "stage": "s1"}]
    assert created["throttle"] == {"rateLimit": 10.0, "burstLimit": 20}
    assert isinstance(created["throttle"]["rateLimit"], float), "rateLimit is a double"
    assert isinstance(created["throttle"]["burstLimit"], int)
    assert created["quota"] == {"limit": 1000, "offset": 0, "period": "DAY"}
    assert created["tags"] == {"tier": "silver"}

    got = apigw.get_usage_plan(usagePlanId=created["id"])
    assert status_of(got) == 200
    for member in ("id", "name", "description", "apiStages", "throttle", "quota", "tags"):
        assert got[member] == created[member], member


def test_create_with_per_method_throttle_and_fractional_rate(apigw, api):
    created = apigw.create_usage_plan(
        name=unique("plan"),
        throttle={"rateLimit": 0.5, "burstLimit": 1},
        quota={"limit": 70, "offset": 2, "period": "WEEK"},
        apiStages=[
            {
                "apiId": api["api"],
                "stage": "s2",
                "throttle": {"/pets/GET": {"rateLimit": 2, "burstLimit": 3}},
            }
        ],
    )
    assert created["throttle"] == {"rateLimit": 0.5, "burstLimit": 1}
    assert created["quota"] == {"limit": 70, "offset": 2, "period": "WEEK"}
    (stage,) = created["apiStages"]
    assert stage["throttle"] == {"/pets/GET": {"rateLimit": 2.0, "burstLimit": 3}}
    assert isinstance(stage["throttle"]["/pets/GET"]["rateLimit"], float)


def test_create_rejects_unknown_api_stages(gw, apigw, api):
    for stage in (
        {"apiId": api["api"], "stage": "nosuchstage"},
        {"apiId": "nosuchapi0", "stage": "s1"},
    ):
        error = expect_error(
            lambda: apigw.create_usage_plan(name=unique("bad"), apiStages=[stage]),
            400,
            "BadRequestException",
        )
        assert error["Error"]["Message"].startswith("Invalid API Stage"), error["Error"]
    # `name` is required; botocore checks that itself, so ask without it.
    raw = gw.raw(
        "POST",
        "/usageplans",
        json.dumps({"description": "no name"}),
        {"Content-Type": "application/json"},
    )
    assert raw.status == 400, raw
    assert raw.headers.get("x-amzn-errortype", "").startswith("BadRequestException"), raw


def test_get_and_unknown_id(apigw):
    created = apigw.create_usage_plan(name=unique("plan"))
    got = apigw.get_usage_plan(usagePlanId=created["id"])
    assert status_of(got) == 200
    assert got["name"] == created["name"]
    assert got["apiStages"] == []
    assert got["tags"] == {}, "GetUsagePlan returns tags, {} when none"
    expect_error(
        lambda: apigw.get_usage_plan(usagePlanId="nope00"), 404, "NotFoundException", NOT_FOUND
    )


def test_list_paging_and_key_filter(apigw):
    ids = [apigw.create_usage_plan(name=unique("list"))["id"] for _ in range(4)]
    first = apigw.get_usage_plans(limit=1)
    assert len(first["items"]) == 1 and first.get("position")
    for limit in (1, 3):
        items, _ = collect_pages(apigw.get_usage_plans, limit)
        ids_exactly_once(items, ids)
        for item in items:
            if item["id"] in ids:
                assert item["apiStages"] == []
                assert "tags" not in item, "list items leave out empty tags"
    pages = apigw.get_paginator("get_usage_plans").paginate(PaginationConfig={"PageSize": 2})
    ids_exactly_once([item for page in pages for item in page["items"]], ids)

    key_id = apigw.create_api_key(name=unique("filter"))["id"]
    apigw.create_usage_plan_key(usagePlanId=ids[0], keyId=key_id, keyType="API_KEY")
    apigw.create_usage_plan_key(usagePlanId=ids[2], keyId=key_id, keyType="API_KEY")
    items, _ = collect_pages(apigw.get_usage_plans, 1, keyId=key_id)
    assert sorted(item["id"] for item in items) == sorted([ids[0], ids[2]])
    lonely = apigw.create_api_key(name=unique("filter"))["id"]
    assert apigw.get_usage_plans(keyId=lonely)["items"] == []


def test_update_name_description_product_code(apigw):
    plan_id = apigw.create_usage_plan(name=unique("upd"))["id"]
    new_name = unique("renamed")
    updated = patch(
        apigw,
        plan_id,
        ("replace", "/name", new_name),
        ("replace", "/description", "gold tier"),
        ("add", "/productCode", "pc-1"),
    )
    assert (updated["name"], updated["description"], updated["productCode"]) == (
        new_name,
        "gold tier",
        "pc-1",
    )
    assert updated["tags"] == {}, "UpdateUsagePlan returns tags, {} when none"
    assert patch(apigw, plan_id, ("replace", "/productCode", "pc-2"))["productCode"] == "pc-2"
    removed = patch(apigw, plan_id, ("remove", "/productCode"))
    assert "productCode" not in removed
    assert "productCode" not in apigw.get_usage_plan(usagePlanId=plan_id)


def test_update_throttle(apigw):
    plan_id = apigw.create_usage_plan(name=unique("thr"))["id"]
    updated = patch(
        apigw,
        plan_id,
        ("add", "/throttle/rateLimit", "5"),
        ("add", "/throttle/burstLimit", "7"),
    )
    assert updated["throttle"] == {"rateLimit": 5.0, "burstLimit": 7}
    assert isinstance(updated["throttle"]["rateLimit"], float)
    updated = patch(
        apigw,
        plan_id,
        ("replace", "/throttle/burstLimit", "100"),
        ("replace", "/throttle/rateLimit", "200"),
    )
    assert updated["throttle"] == {"rateLimit": 200.0, "burstLimit": 100}
    assert patch(apigw, plan_id, ("replace", "/throttle/rateLimit", "2.5"))["throttle"] == {
        "rateLimit": 2.5,
        "burstLimit": 100,
    }
    removed = patch(apigw, plan_id, ("remove", "/throttle"))
    assert "throttle" not in removed
    assert "throttle" not in apigw.get_usage_plan(usagePlanId=plan_id)


def test_update_quota(apigw):
    plan_id = apigw.create_usage_plan(name=unique("quota"))["id"]
    updated = patch(
        apigw,
        plan_id,
        ("add", "/quota/limit", "100"),
        ("add", "/quota/period", "WEEK"),
        ("add", "/quota/offset", "1"),
    )
    assert updated["quota"] == {"limit": 100, "offset": 1, "period": "WEEK"}
    updated = patch(
        apigw,
        plan_id,
        ("replace", "/quota/limit", "5000"),
        ("replace", "/quota/period", "MONTH"),
        ("replace", "/quota/offset", "2"),
    )
    assert updated["quota"] == {"limit": 5000, "offset": 2, "period": "MONTH"}
    updated = patch(
        apigw,
        plan_id,
        ("replace", "/quota/period", "DAY"),
        ("replace", "/quota/offset", "0"),
    )
    assert updated["quota"] == {"limit": 5000, "offset": 0, "period": "DAY"}
    removed = patch(apigw, plan_id, ("remove", "/quota"))
    assert "quota" not in removed
    assert "quota" not in apigw.get_usage_plan(usagePlanId=plan_id)


def test_update_api_stages(apigw, api):
    plan_id = apigw.create_usage_plan(name=unique("stages"))["id"]
    s1, s2 = f"{api['api']}:s1", f"{api['api']}:s2"
    updated = patch(apigw, plan_id, ("add", "/apiStages", s1))
    assert updated["apiStages"] == [{"apiId": api["api"], "stage": "s1"}]
    updated = patch(apigw, plan_id, ("add", "/apiStages", s2))
    assert sorted(s["stage"] for s in updated["apiStages"]) == ["s1", "s2"]
    # Operations apply in order: remove then re-add in one request.
    updated = patch(apigw, plan_id, ("remove", "/apiStages", s1), ("add", "/apiStages", s1))
    assert sorted(s["stage"] for s in updated["apiStages"]) == ["s1", "s2"]
    updated = patch(apigw, plan_id, ("remove", "/apiStages", s1))
    assert updated["apiStages"] == [{"apiId": api["api"], "stage": "s2"}]
    assert apigw.get_usage_plan(usagePlanId=plan_id)["apiStages"] == updated["apiStages"]


def test_update_per_method_throttle(apigw, api):
    stage = f"{api['api']}:s1"
    plan_id = apigw.create_usage_plan(
        name=unique("mthr"), apiStages=[{"apiId": api["api"], "stage": "s1"}]
    )["id"]

    def stage_throttle(response):
        (entry,) = response["apiStages"]
        return entry.get("throttle") or {}

    updated = patch(
        apigw,
        plan_id,
        ("replace", f"/apiStages/{stage}/throttle//pets/GET/rateLimit", "3"),
        ("replace", f"/apiStages/{stage}/throttle//pets/GET/burstLimit", "4"),
    )
    assert stage_throttle(updated) == {"/pets/GET": {"rateLimit": 3.0, "burstLimit": 4}}

    # The resource path may also be written with JSON-pointer escaping.
    updated = patch(
        apigw, plan_id, ("replace", f"/apiStages/{stage}/throttle/~1pets/GET/burstLimit", "6")
    )
    assert stage_throttle(updated) == {"/pets/GET": {"rateLimit": 3.0, "burstLimit": 6}}

    updated = patch(apigw, plan_id, ("remove", f"/apiStages/{stage}/throttle//pets/GET"))
    assert stage_throttle(updated) == {}

    whole = {
        "/pets/GET": {"rateLimit": 1.0, "burstLimit": 1},
        "//GET": {"rateLimit": 8.0, "burstLimit": 9},
    }
    updated = patch(apigw, plan_id, ("replace", f"/apiStages/{stage}/throttle", json.dumps(whole)))
    assert stage_throttle(updated) == whole
    assert stage_throttle(apigw.get_usage_plan(usagePlanId=plan_id)) == whole

    updated = patch(apigw, plan_id, ("remove", f"/apiStages/{stage}/throttle"))
    assert stage_throttle(updated) == {}


def test_update_errors(apigw, api):
    plan_id = apigw.create_usage_plan(
        name=unique("errs"), apiStages=[{"apiId": api["api"], "stage": "s1"}]
    )["id"]

    def update(*ops):
        return lambda: apigw.update_usage_plan(
            usagePlanId=plan_id,
            patchOperations=[dict(zip(("op", "path", "value"), op)) for op in ops],
        )

    bad = "Invalid API Stage specified"
    expect_error(update(("remove", "/apiStages")), 400, "BadRequestException", bad)
    expect_error(update(("remove", "/apiStages", "no-colon")), 400, "BadRequestException", bad)
    expect_error(
        update(("remove", "/apiStages", f"{api['api']}:nosuchstage")),
        404,
        "NotFoundException",
        f"Invalid API Stage {{api: {api['api']}, stage: nosuchstage}} "
        f"specified for usageplan {plan_id}",
    )
    expect_error(
        update(("remove", "/apiStages", "nosuchapi0:s1")),
        404,
        "NotFoundException",
        f"Invalid API Stage {{api: nosuchapi0, stage: s1}} specified for usageplan {plan_id}",
    )
    # Adding a stage that does not exist is refused (400 or 404: AWS's code varies).
    try:
        update(("add", "/apiStages", f"{api['api']}:nosuchstage"))()
    except ClientError as error:
        assert status_of(error.response) in (400, 404), error.response
    else:
        pytest.fail("adding an unknown stage to a plan succeeded")

    expect_error(
        update(("remove", "/name")),
        400,
        "BadRequestException",
        invalid_patch_path("/name", "remove", REMOVE_PATHS),
    )
    error = expect_error(update(("replace", "/nosuchpath", "x")), 400, "BadRequestException")
    assert error["Error"]["Message"].startswith(
        "Invalid patch path  '/nosuchpath' specified for op 'replace'."
    ), error["Error"]["Message"]

    expect_error(
        lambda: apigw.update_usage_plan(
            usagePlanId="nope00",
            patchOperations=[{"op": "replace", "path": "/throttle/burstLimit", "value": "100"}],
        ),
        404,
        "NotFoundException",
        NOT_FOUND,
    )
    # A refused request changes nothing.
    assert apigw.get_usage_plan(usagePlanId=plan_id)["apiStages"] == [
        {"apiId": api["api"], "stage": "s1"}
    ]


def test_delete_needs_the_stages_removed_first(apigw, api):
    plan_id = apigw.create_usage_plan(
        name=unique("del"), apiStages=[{"apiId": api["api"], "stage": "s2"}]
    )["id"]
    expect_error(
        lambda: apigw.delete_usage_plan(usagePlanId=plan_id),
        400,
        "BadRequestException",
        f"Cannot delete Usage Plan {plan_id} because there are API Stages associated "
        f"with it, including {api['api']}:s2",
    )
    patch(apigw, plan_id, ("remove", "/apiStages", f"{api['api']}:s2"))
    assert status_of(apigw.delete_usage_plan(usagePlanId=plan_id)) == 202
    expect_error(
        lambda: apigw.get_usage_plan(usagePlanId=plan_id), 404, "NotFoundException", NOT_FOUND
    )
    expect_error(
        lambda: apigw.delete_usage_plan(usagePlanId=plan_id),
        404,
        "NotFoundException",
        NOT_FOUND,
    )
    assert plan_id not in {p["id"] for p in collect_pages(apigw.get_usage_plans, 500)[0]}


def test_paging_while_deleting_each_page_reaches_every_plan(apigw):
    """GetUsagePlans over the whole account, deleting this test's plans page by page:
    `position` resumes after the last plan returned, so none is skipped."""
    prefix = unique("sweep")
    ids = {apigw.create_usage_plan(name=f"{prefix}-{i}")["id"] for i in range(7)}
    pages = apigw.get_paginator("get_usage_plans").paginate(PaginationConfig={"PageSize": 2})
    for page in pages:
        for plan in page["items"]:
            if plan["name"].startswith(prefix):
                assert status_of(apigw.delete_usage_plan(usagePlanId=plan["id"])) == 202
                ids.discard(plan["id"])
    assert ids == set(), "plans the paging skipped"


def test_replace_api_stages_is_not_offered(apigw, api):
    """AWS changes `/apiStages` with add and remove only; the refusal of replace lists
    the paths replace does take, without `/apiStages`."""
    plan_id = apigw.create_usage_plan(
        name=unique("repl"), apiStages=[{"apiId": api["api"], "stage": "s1"}]
    )["id"]
    message = expect_error(
        lambda: apigw.update_usage_plan(
            usagePlanId=plan_id,
            patchOperations=[
                {"op": "replace", "path": "/apiStages", "value": f"{api['api']}:s2"}
            ],
        ),
        400,
        "BadRequestException",
        invalid_patch_path("/apiStages", "replace", REPLACE_PATHS),
    )["Error"]["Message"]
    assert "/apiStages," not in message and "/apiStages]" not in message
    patch(apigw, plan_id, ("remove", "/apiStages", f"{api['api']}:s1"))


QUOTA_PERIODS = "must be one of DAY, WEEK, MONTH"
NO_PERIOD = f"Invalid quota specified: quota.period is required and {QUOTA_PERIODS}"


@pytest.mark.parametrize(
    "quota, message",
    [
        ({"limit": 10}, NO_PERIOD),
        ({"limit": 10, "offset": 0}, NO_PERIOD),
        ({"period": "DAY"}, "Invalid quota specified: quota.limit is required"),
        ({"limit": 10, "period": "day"}, f"Invalid quota period specified: day; {QUOTA_PERIODS}"),
        ({"limit": 10, "period": "YEAR"}, f"Invalid quota period specified: YEAR; {QUOTA_PERIODS}"),
    ],
)
def test_create_refuses_an_incomplete_quota_with_aws_style_messages(apigw, quota, message):
    name = unique("badquota")
    expect_error(
        lambda: apigw.create_usage_plan(name=name, quota=quota),
        400,
        "BadRequestException",
        message,
    )
    listed = collect_pages(apigw.get_usage_plans, 500)[0]
    assert name not in {p["name"] for p in listed}, "a refused plan is not created"


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"quota": {"limit": "ten", "period": "DAY"}},
            "Invalid Usage Plan quota limit specified. It must be a non-negative integer.",
        ),
        (
            {"quota": {"limit": 10, "period": "WEEK", "offset": "x"}},
            "Invalid quota offset specified. It must be an integer.",
        ),
        (
            {"quota": {"limit": 10, "period": 7}},
            f"Invalid quota period specified: 7; {QUOTA_PERIODS}",
        ),
        (
            {"quota": "DAY"},
            "Invalid quota specified: it must be an object with limit, period and offset",
        ),
        (
            {"throttle": {"burstLimit": "many"}},
            "Invalid throttle burstLimit specified. It must be a non-negative integer.",
        ),
        (
            {"throttle": {"rateLimit": "fast"}},
            "Invalid throttle rateLimit specified. It must be a non-negative number.",
        ),
    ],
)
def test_create_refuses_mistyped_limits_on_the_wire(gw, body, message):
    """Types botocore would catch on the client, sent by hand: the refusal still names
    the field instead of repeating the JSON parser."""
    result = gw.raw(
        "POST",
        "/usageplans",
        json.dumps({"name": unique("badtype"), **body}),
        {"Content-Type": "application/json"},
    )
    assert result.status == 400, result
    assert result.headers.get("x-amzn-errortype") == "BadRequestException", result
    assert result.json == {"message": message}, result


def test_create_reads_null_limits_as_absent(gw):
    result = gw.raw(
        "POST",
        "/usageplans",
        json.dumps({"name": unique("nulls"), "quota": None, "throttle": None}),
        {"Content-Type": "application/json"},
    )
    assert result.status == 201, result
    assert "quota" not in result.json and "throttle" not in result.json, result
