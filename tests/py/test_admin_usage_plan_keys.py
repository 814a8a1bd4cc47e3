"""Usage plan keys: CreateUsagePlanKey, GetUsagePlanKey, GetUsagePlanKeys and
DeleteUsagePlanKey, including one plan per key per stage."""

import pytest

from support import collect_pages, expect_error, ids_exactly_once, status_of, unique

KEY_NOT_FOUND = "Invalid API Key identifier specified"
PLAN_NOT_FOUND = "Invalid Usage Plan ID specified"


@pytest.fixture(scope="module")
def api(gw):
    return gw.proxy_api(stage="s1", extra_stages=("s2",))


def add_key(apigw, plan_id, key_id):
    return apigw.create_usage_plan_key(usagePlanId=plan_id, keyId=key_id, keyType="API_KEY")


def test_create_get_delete(apigw):
    plan_id = apigw.create_usage_plan(name=unique("pk"))["id"]
    key = apigw.create_api_key(name=unique("pk"))
    created = add_key(apigw, plan_id, key["id"])
    assert status_of(created) == 201
    expected = {"id": key["id"], "type": "API_KEY", "value": key["value"], "name": key["name"]}
    assert {k: created.get(k) for k in expected} == expected

    got = apigw.get_usage_plan_key(usagePlanId=plan_id, keyId=key["id"])
    assert status_of(got) == 200
    assert {k: got.get(k) for k in expected} == expected

    listed = apigw.get_usage_plan_keys(usagePlanId=plan_id)
    assert [{k: item.get(k) for k in expected} for item in listed["items"]] == [expected]
    assert "position" not in listed

    deleted = apigw.delete_usage_plan_key(usagePlanId=plan_id, keyId=key["id"])
    assert status_of(deleted) == 202
    assert apigw.get_usage_plan_keys(usagePlanId=plan_id)["items"] == []
    expect_error(
        lambda: apigw.get_usage_plan_key(usagePlanId=plan_id, keyId=key["id"]),
        404,
        "NotFoundException",
    )
    expect_error(
        lambda: apigw.delete_usage_plan_key(usagePlanId=plan_id, keyId=key["id"]),
        404,
        "NotFoundException",
    )
    # The key itself is untouched.
    assert apigw.get_api_key(apiKey=key["id"])["id"] == key["id"]


def test_unknown_key_or_plan(apigw):
    plan_id = apigw.create_usage_plan(name=unique("pk"))["id"]
    key_id = apigw.create_api_key(name=unique("pk"))["id"]
    expect_error(
        lambda: add_key(apigw, plan_id, "nosuchkey0"), 404, "NotFoundException", KEY_NOT_FOUND
    )
    expect_error(
        lambda: add_key(apigw, "nope00", key_id), 404, "NotFoundException", PLAN_NOT_FOUND
    )
    expect_error(
        lambda: apigw.get_usage_plan_key(usagePlanId=plan_id, keyId="nosuchkey0"),
        404,
        "NotFoundException",
        KEY_NOT_FOUND,
    )
    # An existing key that is not in the plan.
    expect_error(
        lambda: apigw.get_usage_plan_key(usagePlanId=plan_id, keyId=key_id),
        404,
        "NotFoundException",
        PLAN_NOT_FOUND,
    )
    # Listing the keys of a plan that does not exist is not an error.
    listed = apigw.get_usage_plan_keys(usagePlanId="nope00")
    assert status_of(listed) == 200
    assert listed["items"] == []
    assert "position" not in listed


def test_duplicates_and_one_plan_per_key_per_stage(apigw, api):
    on_s1 = [{"apiId": api["api"], "stage": "s1"}]
    plan_a = apigw.create_usage_plan(name=unique("a"), apiStages=on_s1)["id"]
    plan_b = apigw.create_usage_plan(name=unique("b"), apiStages=on_s1)["id"]
    plan_c = apigw.create_usage_plan(
        name=unique("c"), apiStages=[{"apiId": api["api"], "stage": "s2"}]
    )["id"]
    key_id = apigw.create_api_key(name=unique("one"))["id"]

    add_key(apigw, plan_a, key_id)
    expect_error(lambda: add_key(apigw, plan_a, key_id), 409, "ConflictException")
    # plan_b covers the same stage as plan_a.
    expect_error(lambda: add_key(apigw, plan_b, key_id), 409, "ConflictException")
    assert apigw.get_usage_plan_keys(usagePlanId=plan_b)["items"] == []
    # A plan on another stage of the same API is fine.
    assert status_of(add_key(apigw, plan_c, key_id)) == 201
    # Nor may a stage be added to a plan when one of its keys is already metered there.
    expect_error(
        lambda: apigw.update_usage_plan(
            usagePlanId=plan_c,
            patchOperations=[{"op": "add", "path": "/apiStages", "value": f"{api['api']}:s1"}],
        ),
        409,
        "ConflictException",
    )
    assert [s["stage"] for s in apigw.get_usage_plan(usagePlanId=plan_c)["apiStages"]] == ["s2"]


def test_list_name_query_and_paging(apigw):
    plan_id = apigw.create_usage_plan(name=unique("list"))["id"]
    prefix = unique("pkq")
    alpha = [apigw.create_api_key(name=f"{prefix}-alpha-{i}")["id"] for i in range(2)]
    beta = apigw.create_api_key(name=f"{prefix}-beta")["id"]
    for key_id in (*alpha, beta):
        add_key(apigw, plan_id, key_id)

    listed = apigw.get_usage_plan_keys(usagePlanId=plan_id, nameQuery=f"{prefix}-alpha")
    assert sorted(item["id"] for item in listed["items"]) == sorted(alpha)
    for query in (prefix.upper(), "alpha", f"{prefix}-gamma"):
        listed = apigw.get_usage_plan_keys(usagePlanId=plan_id, nameQuery=query)
        assert listed["items"] == [], f"nameQuery {query!r}"

    first = apigw.get_usage_plan_keys(usagePlanId=plan_id, limit=1)
    assert len(first["items"]) == 1 and first.get("position")
    for limit in (1, 2, 3):
        items, _ = collect_pages(apigw.get_usage_plan_keys, limit, usagePlanId=plan_id)
        ids_exactly_once(items, [*alpha, beta])
        assert len(items) == 3
    pages = apigw.get_paginator("get_usage_plan_keys").paginate(
        usagePlanId=plan_id, PaginationConfig={"PageSize": 2}
    )
    ids_exactly_once([item for page in pages for item in page["items"]], [*alpha, beta])


def test_deleting_a_key_removes_it_from_its_plans(apigw):
    plan_id = apigw.create_usage_plan(name=unique("cascade"))["id"]
    key_id = apigw.create_api_key(name=unique("cascade"))["id"]
    add_key(apigw, plan_id, key_id)
    assert status_of(apigw.delete_api_key(apiKey=key_id)) == 202
    assert apigw.get_usage_plan_keys(usagePlanId=plan_id)["items"] == []


def test_paging_while_removing_each_page_reaches_every_plan_key(apigw):
    """Removing every key of each page of GetUsagePlanKeys before asking for the next
    one removes them all: `position` resumes after the last key returned."""
    plan_id = apigw.create_usage_plan(name=unique("sweep"))["id"]
    ids = [apigw.create_api_key(name=unique("sweep"))["id"] for _ in range(7)]
    for key_id in ids:
        add_key(apigw, plan_id, key_id)
    pages = apigw.get_paginator("get_usage_plan_keys").paginate(
        usagePlanId=plan_id, PaginationConfig={"PageSize": 3}
    )
    removed = []
    for page in pages:
        for item in page["items"]:
            apigw.delete_usage_plan_key(usagePlanId=plan_id, keyId=item["id"])
            removed.append(item["id"])
    assert sorted(removed) == sorted(ids)
    assert apigw.get_usage_plan_keys(usagePlanId=plan_id)["items"] == []
