"""API keys: CreateApiKey, GetApiKey, GetApiKeys, UpdateApiKey, DeleteApiKey,
ImportApiKeys, with AWS's status codes, members and error texts."""

import datetime
import re
import secrets

from support import (
    collect_pages,
    expect_error,
    ids_exactly_once,
    status_of,
    unique,
)

NOT_FOUND = "Invalid API Key identifier specified"
UPDATE_PATHS = {"/description", "/enabled", "/name", "/customerId"}


def key_value(length=40):
    """A distinct alphanumeric key value of `length` characters."""
    return (unique("v").replace("-", "") + secrets.token_hex(64))[:length]


def all_keys(apigw, **params):
    return apigw.get_paginator("get_api_keys").paginate(**params).build_full_result()["items"]


def test_create_with_given_value_echoes_members(apigw):
    name, value = unique("key"), key_value()
    created = apigw.create_api_key(
        name=name, value=value, description="a test key", customerId="cust-1"
    )
    assert status_of(created) == 201
    assert isinstance(created["id"], str) and created["id"]
    assert created["value"] == value
    assert created["name"] == name
    assert created["description"] == "a test key"
    assert created["customerId"] == "cust-1"
    assert created["enabled"] is False, "enabled defaults to false"
    assert created["stageKeys"] == []
    assert isinstance(created["createdDate"], datetime.datetime)
    assert isinstance(created["lastUpdatedDate"], datetime.datetime)
    assert "tags" not in created, "no tags were given"


def test_create_enabled_and_with_tags(apigw):
    created = apigw.create_api_key(name=unique("key"), enabled=True, tags={"tier": "silver"})
    assert status_of(created) == 201
    assert created["enabled"] is True
    assert created["tags"] == {"tier": "silver"}


def test_create_generates_a_value_when_none_or_empty_is_given(apigw):
    first = apigw.create_api_key(name=unique("gen"))
    second = apigw.create_api_key(name=unique("gen"), value="")
    for created in (first, second):
        assert status_of(created) == 201
        value = created["value"]
        assert isinstance(value, str) and 20 <= len(value) <= 128, value
        assert value.isalnum(), value
    assert first["value"] != second["value"]
    assert first["id"] != second["id"]


def test_create_without_name_has_no_name_member(apigw):
    created = apigw.create_api_key(value=key_value())
    assert status_of(created) == 201
    assert "name" not in created


def test_value_length_limits(apigw):
    expect_error(
        lambda: apigw.create_api_key(name=unique("short"), value=key_value(19)),
        400,
        "BadRequestException",
        "API Key value should be at least 20 characters",
    )
    expect_error(
        lambda: apigw.create_api_key(name=unique("long"), value=key_value(129)),
        400,
        "BadRequestException",
        "API Key value exceeds maximum size of 128 characters",
    )
    for length in (20, 128):
        value = key_value(length)
        created = apigw.create_api_key(name=unique("edge"), value=value)
        assert status_of(created) == 201
        assert created["value"] == value


def test_values_a_client_could_never_send_are_refused(apigw):
    # A trailing space is trimmed by HTTP stacks and non-ASCII is not valid header text:
    # such a key would exist but never match a request.
    for value in ("trailing-space-value-0001 ", "inner space-value-00000002", "ключ" * 6):
        expect_error(
            lambda: apigw.create_api_key(name=unique("bad"), value=value),
            400,
            "BadRequestException",
            "Invalid API Key value specified: use 20 to 128 visible ASCII characters, "
            "without spaces",
        )
    value = "Visible-ASCII_~!value.0003"
    assert apigw.create_api_key(name=unique("ok"), value=value)["value"] == value


def test_name_and_description_length_limits(apigw):
    expect_error(
        lambda: apigw.create_api_key(name="n" * 1025),
        400,
        "BadRequestException",
        "Invalid API Key name, can be at most 1024 characters.",
    )
    created = apigw.create_api_key(name=unique("n") + "n" * 1000)
    assert status_of(created) == 201
    longest = apigw.create_api_key(name="n" * 1024)
    assert status_of(longest) == 201 and longest["name"] == "n" * 1024
    expect_error(
        lambda: apigw.create_api_key(name=unique("d"), description="d" * 125001),
        400,
        "BadRequestException",
        "Invalid API Key description specified.",
    )


def test_duplicate_value_conflicts(apigw):
    value = key_value()
    apigw.create_api_key(name=unique("dup"), value=value)
    expect_error(
        lambda: apigw.create_api_key(name=unique("dup"), value=value),
        409,
        "ConflictException",
        "API Key already exists",
    )


def test_get_hides_the_value_unless_asked(apigw):
    value = key_value()
    key_id = apigw.create_api_key(name=unique("get"), value=value, enabled=True)["id"]
    hidden = apigw.get_api_key(apiKey=key_id)
    assert status_of(hidden) == 200
    assert hidden["id"] == key_id
    assert hidden["enabled"] is True
    assert "value" not in hidden
    hidden_too = apigw.get_api_key(apiKey=key_id, includeValue=False)
    assert "value" not in hidden_too
    shown = apigw.get_api_key(apiKey=key_id, includeValue=True)
    assert shown["value"] == value
    expect_error(
        lambda: apigw.get_api_key(apiKey="nosuchkey0"), 404, "NotFoundException", NOT_FOUND
    )


def test_list_name_query_is_a_case_sensitive_prefix(apigw):
    prefix = unique("Query")
    wanted = {
        apigw.create_api_key(name=f"{prefix}-alpha-1")["id"],
        apigw.create_api_key(name=f"{prefix}-alpha-2")["id"],
    }
    other = apigw.create_api_key(name=f"{prefix}-beta")["id"]

    listed = all_keys(apigw, nameQuery=f"{prefix}-alpha")
    assert {item["id"] for item in listed} == wanted
    everything = all_keys(apigw, nameQuery=prefix)
    assert {item["id"] for item in everything} == wanted | {other}
    for item in everything:
        assert item["name"].startswith(prefix)
        assert "value" not in item, "values are left out unless includeValues=true"
        for member in ("id", "enabled", "createdDate", "lastUpdatedDate", "stageKeys"):
            assert member in item, f"list item lacks {member}: {item}"

    # Upper-cased prefix, a suffix and an infix match nothing of ours.
    for query in (prefix.upper(), "alpha-1", prefix[3:]):
        found = {item["id"] for item in all_keys(apigw, nameQuery=query)}
        assert not found & (wanted | {other}), f"nameQuery {query!r} matched {found}"


def test_list_include_values(apigw):
    prefix = unique("vals")
    values = {}
    for i in range(2):
        value = key_value()
        values[apigw.create_api_key(name=f"{prefix}-{i}", value=value)["id"]] = value
    listed = all_keys(apigw, nameQuery=prefix, includeValues=True)
    assert {item["id"]: item.get("value") for item in listed} == values
    listed = all_keys(apigw, nameQuery=prefix, includeValues=False)
    assert all("value" not in item for item in listed)


def test_list_customer_id_filter(apigw):
    customer = unique("cust")
    mine = apigw.create_api_key(name=unique("c"), customerId=customer)["id"]
    apigw.create_api_key(name=unique("c"), customerId=customer + "-other")
    listed = all_keys(apigw, customerId=customer)
    assert [item["id"] for item in listed] == [mine]
    assert listed[0]["customerId"] == customer


def test_list_paging_returns_every_key_once(apigw):
    prefix = unique("page")
    ids = [apigw.create_api_key(name=f"{prefix}-{i}")["id"] for i in range(5)]

    first = apigw.get_api_keys(nameQuery=prefix, limit=1)
    assert len(first["items"]) == 1
    assert first.get("position"), "limit=1 with 5 matches returns a position"

    for limit in (1, 2, 5, 500):
        items, pages = collect_pages(apigw.get_api_keys, limit, nameQuery=prefix)
        ids_exactly_once(items, ids)
        assert len(items) == 5, f"limit {limit}"
        assert pages >= -(-5 // limit)

    # Across the whole account, with the botocore paginator.
    pages = apigw.get_paginator("get_api_keys").paginate(PaginationConfig={"PageSize": 3})
    items = [item for page in pages for item in page["items"]]
    ids_exactly_once(items, ids)


def test_update_every_allowed_path(apigw):
    created = apigw.create_api_key(name=unique("upd"), value=key_value())
    key_id = created["id"]
    new_name = unique("renamed")
    updated = apigw.update_api_key(
        apiKey=key_id,
        patchOperations=[
            {"op": "replace", "path": "/name", "value": new_name},
            {"op": "replace", "path": "/description", "value": "new description"},
            {"op": "replace", "path": "/enabled", "value": "true"},
            {"op": "replace", "path": "/customerId", "value": "cust-2"},
        ],
    )
    assert status_of(updated) == 200
    assert updated["id"] == key_id
    assert updated["name"] == new_name
    assert updated["description"] == "new description"
    assert updated["enabled"] is True
    assert updated["customerId"] == "cust-2"
    assert "value" not in updated, "UpdateApiKey leaves the value out"
    assert updated["tags"] == {}, "UpdateApiKey returns tags, {} when none"
    assert updated["lastUpdatedDate"] >= updated["createdDate"]

    got = apigw.get_api_key(apiKey=key_id)
    assert (got["name"], got["description"], got["enabled"], got["customerId"]) == (
        new_name,
        "new description",
        True,
        "cust-2",
    )

    disabled = apigw.update_api_key(
        apiKey=key_id, patchOperations=[{"op": "replace", "path": "/enabled", "value": "false"}]
    )
    assert disabled["enabled"] is False
    apigw.update_api_key(
        apiKey=key_id, patchOperations=[{"op": "replace", "path": "/enabled", "value": "true"}]
    )
    # A value that is not a boolean is taken as false.
    odd = apigw.update_api_key(
        apiKey=key_id,
        patchOperations=[{"op": "replace", "path": "/enabled", "value": "not-a-boolean"}],
    )
    assert status_of(odd) == 200 and odd["enabled"] is False


def test_update_errors(apigw):
    key_id = apigw.create_api_key(name=unique("upderr"))["id"]
    error = expect_error(
        lambda: apigw.update_api_key(
            apiKey=key_id, patchOperations=[{"op": "replace", "path": "/value", "value": "x" * 30}]
        ),
        400,
        "BadRequestException",
    )
    message = error["Error"]["Message"]
    match = re.fullmatch(
        r"Invalid patch path  '/value' specified for op 'replace'\. Must be one of: \[(.*)\]",
        message,
    )
    assert match, f"unexpected text: {message!r}"
    assert set(match.group(1).split(", ")) == UPDATE_PATHS, message

    expect_error(
        lambda: apigw.update_api_key(
            apiKey=key_id,
            patchOperations=[{"op": "replace", "path": "/description", "value": "d" * 125001}],
        ),
        400,
        "BadRequestException",
        "Invalid API Key description specified.",
    )
    expect_error(
        lambda: apigw.update_api_key(
            apiKey="nosuchkey0",
            patchOperations=[{"op": "replace", "path": "/name", "value": "x"}],
        ),
        404,
        "NotFoundException",
        NOT_FOUND,
    )


def test_delete(apigw):
    key_id = apigw.create_api_key(name=unique("del"))["id"]
    deleted = apigw.delete_api_key(apiKey=key_id)
    assert status_of(deleted) == 202
    expect_error(lambda: apigw.get_api_key(apiKey=key_id), 404, "NotFoundException", NOT_FOUND)
    expect_error(
        lambda: apigw.delete_api_key(apiKey=key_id), 404, "NotFoundException", NOT_FOUND
    )
    assert key_id not in {item["id"] for item in all_keys(apigw)}


# -- ImportApiKeys ------------------------------------------------------------------


def import_csv(apigw, text, **kwargs):
    return apigw.import_api_keys(body=text.encode(), format="csv", **kwargs)


def keys_named(apigw, prefix):
    return {
        item["name"]: item for item in all_keys(apigw, nameQuery=prefix, includeValues=True)
    }


def test_import_creates_keys_with_every_column(apigw):
    plan_id = apigw.create_usage_plan(name=unique("import-plan"))["id"]
    prefix = unique("imp")
    v1, v2, v3 = key_value(40), key_value(30), key_value(128)
    csv = (
        "Name,Key,Description,Enabled,UsagePlanIds\n"
        f"{prefix}-1,{v1},first key,true,\"{plan_id}\"\n"
        f"{prefix}-2,{v2},second key,FALSE,\n"
        f"{prefix}-3,{v3},,tRuE,\n"
    )
    imported = import_csv(apigw, csv)
    assert status_of(imported) == 201
    assert len(imported["ids"]) == 3
    assert imported.get("warnings", []) == []

    keys = keys_named(apigw, prefix)
    assert set(keys) == {f"{prefix}-1", f"{prefix}-2", f"{prefix}-3"}
    assert {k["id"] for k in keys.values()} == set(imported["ids"])
    first, second, third = keys[f"{prefix}-1"], keys[f"{prefix}-2"], keys[f"{prefix}-3"]
    assert (first["value"], first["description"], first["enabled"]) == (v1, "first key", True)
    assert (second["value"], second["description"], second["enabled"]) == (
        v2,
        "second key",
        False,
    )
    assert (third["value"], third["enabled"]) == (v3, True)

    plan_keys = apigw.get_usage_plan_keys(usagePlanId=plan_id)["items"]
    assert [k["id"] for k in plan_keys] == [first["id"]], "UsagePlanIds made a plan key"


def test_import_header_is_case_insensitive_and_enabled_defaults_to_true(apigw):
    prefix = unique("imphdr")
    v1, v2 = key_value(), key_value()
    imported = import_csv(
        apigw, f"kEY,ignored column,NAME\n{v1},whatever,{prefix}-1\n{v2},,{prefix}-2\n"
    )
    assert status_of(imported) == 201 and len(imported["ids"]) == 2
    keys = keys_named(apigw, prefix)
    assert {name: (k["value"], k["enabled"]) for name, k in keys.items()} == {
        f"{prefix}-1": (v1, True),
        f"{prefix}-2": (v2, True),
    }


def test_import_overwrites_by_key_value(apigw):
    prefix = unique("impover")
    value = key_value()
    first = import_csv(apigw, f"name,key,enabled\n{prefix}-old,{value},false\n")
    (key_id,) = first["ids"]
    again = import_csv(apigw, f"name,key,enabled,description\n{prefix}-new,{value},true,again\n")
    assert status_of(again) == 201
    assert again["ids"] == [key_id], "re-importing a value updates the same key"
    got = apigw.get_api_key(apiKey=key_id, includeValue=True)
    assert (got["name"], got["enabled"], got["description"], got["value"]) == (
        f"{prefix}-new",
        True,
        "again",
        value,
    )
    assert list(keys_named(apigw, prefix)) == [f"{prefix}-new"]


def test_import_fail_on_warnings(apigw):
    prefix = unique("impwarn")
    good = key_value()
    csv = f"name,key\n{prefix}-good,{good}\n{prefix}-bad,tooshort\n"

    expect_error(
        lambda: import_csv(apigw, csv, failOnWarnings=True), 400, "BadRequestException"
    )
    assert keys_named(apigw, prefix) == {}, "failonwarnings=true imports nothing"

    imported = import_csv(apigw, csv, failOnWarnings=False)
    assert status_of(imported) == 201
    assert len(imported["ids"]) == 1
    assert imported.get("warnings"), "the bad row is reported as a warning"
    keys = keys_named(apigw, prefix)
    assert list(keys) == [f"{prefix}-good"]
    assert keys[f"{prefix}-good"]["id"] == imported["ids"][0]


def test_import_rejects_bad_input(apigw):
    expect_error(
        lambda: import_csv(apigw, f"name,description\n{unique('nokey')},x\n"),
        400,
        "BadRequestException",
    )
    expect_error(
        lambda: apigw.import_api_keys(
            body=f"name,key\n{unique('fmt')},{key_value()}\n".encode(), format="json"
        ),
        400,
        "BadRequestException",
    )


def test_paging_while_deleting_each_page_reaches_every_key(apigw):
    """The usual cleanup loop: page through the keys and delete every key of each page
    before asking for the next. `position` resumes after the last key returned, so the
    deletions do not make the next page skip keys."""
    prefix = unique("sweep")
    ids = [apigw.create_api_key(name=f"{prefix}-{i}")["id"] for i in range(12)]
    pages = apigw.get_paginator("get_api_keys").paginate(
        nameQuery=prefix, PaginationConfig={"PageSize": 5}
    )
    deleted = []
    for page in pages:
        for item in page["items"]:
            assert status_of(apigw.delete_api_key(apiKey=item["id"])) == 202
            deleted.append(item["id"])
    assert sorted(deleted) == sorted(ids), "every key was listed once"
    assert all_keys(apigw, nameQuery=prefix) == []


def test_paging_resumes_after_the_last_key_when_earlier_ones_go(apigw):
    """Keys before the last one returned are deleted by someone else between pages."""
    prefix = unique("sweepmid")
    ids = [apigw.create_api_key(name=f"{prefix}-{i}")["id"] for i in range(6)]
    first = apigw.get_api_keys(nameQuery=prefix, limit=3)
    assert [k["id"] for k in first["items"]] == ids[:3]
    for key_id in ids[:2]:
        apigw.delete_api_key(apiKey=key_id)
    second = apigw.get_api_keys(nameQuery=prefix, limit=3, position=first["position"])
    assert [k["id"] for k in second["items"]] == ids[3:]
    assert "position" not in second


def test_list_rejects_a_junk_position(apigw):
    for junk in ("junk", "12", "-1", "7b7d"):
        expect_error(
            lambda: apigw.get_api_keys(position=junk),
            400,
            "BadRequestException",
            f"Invalid position specified: {junk}",
        )


def test_import_single_quoted_usage_plan_ids(apigw):
    """UsagePlanIds may be quoted with '...' as well as "..." (AWS's file format);
    every id of the list counts and the columns after it keep their place."""
    plans = [apigw.create_usage_plan(name=unique("impq"))["id"] for _ in range(3)]
    prefix = unique("impq")
    v1, v2, v3 = key_value(), key_value(), key_value()
    csv = (
        "Name,Key,UsagePlanIds,Description\n"
        f"{prefix}-1,{v1},'{plans[0]},{plans[1]}',single quoted\n"
        f"{prefix}-2,{v2}, '{plans[1]}, {plans[2]}' ,padded\n"
        f"{prefix}-3,{v3},\"{plans[0]},{plans[2]}\",double quoted\n"
    )
    imported = import_csv(apigw, csv)
    assert status_of(imported) == 201
    assert imported.get("warnings", []) == []
    keys = keys_named(apigw, prefix)
    k1, k2, k3 = (keys[f"{prefix}-{i}"] for i in (1, 2, 3))
    assert (k1["description"], k2["description"], k3["description"]) == (
        "single quoted",
        "padded",
        "double quoted",
    )
    members = {
        p: sorted(k["id"] for k in apigw.get_usage_plan_keys(usagePlanId=p)["items"])
        for p in plans
    }
    assert members == {
        plans[0]: sorted([k1["id"], k3["id"]]),
        plans[1]: sorted([k1["id"], k2["id"]]),
        plans[2]: sorted([k2["id"], k3["id"]]),
    }


def test_import_warns_about_fields_beyond_the_header(apigw):
    """An unquoted plan list spills into fields the header has no column for: the row
    is imported with the columns it names, and the extra fields are reported."""
    plans = [apigw.create_usage_plan(name=unique("impx"))["id"] for _ in range(2)]
    prefix = unique("impx")
    value = key_value()
    csv = f"Name,Key,UsagePlanIds\n{prefix}-1,{value},{plans[0]},{plans[1]}\n"

    expect_error(
        lambda: import_csv(apigw, csv, failOnWarnings=True), 400, "BadRequestException"
    )
    assert keys_named(apigw, prefix) == {}, "failonwarnings=true imports nothing"

    imported = import_csv(apigw, csv)
    assert status_of(imported) == 201
    assert len(imported["ids"]) == 1
    assert imported.get("warnings") == [
        "Line 2: the row has 4 fields but the header names 3 columns; "
        "the fields after the 3rd were ignored"
    ]
    members = [k["id"] for k in apigw.get_usage_plan_keys(usagePlanId=plans[0])["items"]]
    assert members == imported["ids"]
    assert apigw.get_usage_plan_keys(usagePlanId=plans[1])["items"] == []
