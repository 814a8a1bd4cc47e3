"""The admin API's wire format below botocore (which hides it): JSON bodies, the list
member `item`, numbers that are doubles, epoch-second dates, `values` in usage, and
errors as `x-amzn-ErrorType` plus `{"message": ...}`."""

import json

from support import today, unique


def assert_json_response(result, status):
    assert result.status == status, result
    assert result.headers.get("content-type", "").startswith("application/json"), result.headers
    assert result.headers.get("x-amzn-requestid"), f"no x-amzn-RequestId: {result.headers}"


def post_json(gw, path, body):
    return gw.raw("POST", path, json.dumps(body), {"Content-Type": "application/json"})


def created_id(gw, path, body):
    result = post_json(gw, path, body)
    assert result.status == 201 and isinstance(result.json, dict), f"POST {path}: {result}"
    return result.json["id"]


def test_error_shape(gw):
    result = gw.raw("GET", "/apikeys/nosuchkey0")
    assert_json_response(result, 404)
    assert result.headers.get("x-amzn-errortype", "").split(":")[0] == "NotFoundException"
    assert result.json == {"message": "Invalid API Key identifier specified"}, result

    result = gw.raw("GET", "/usageplans/nope00")
    assert_json_response(result, 404)
    assert result.json == {"message": "Invalid Usage Plan ID specified"}, result


def test_create_and_list_api_keys_on_the_wire(gw):
    name = unique("wire")
    created = post_json(gw, "/apikeys", {"name": name})
    assert_json_response(created, 201)
    body = created.json
    assert body["name"] == name and body["enabled"] is False and body["stageKeys"] == []
    for member in ("createdDate", "lastUpdatedDate"):
        assert isinstance(body[member], (int, float)), f"{member} is epoch seconds: {body}"
    created_id(gw, "/apikeys", {"name": unique("wire")})

    listed = gw.raw("GET", "/apikeys?limit=1")
    assert_json_response(listed, 200)
    assert isinstance(listed.json.get("item"), list), f"lists are sent as `item`: {listed}"
    assert len(listed.json["item"]) == 1
    assert isinstance(listed.json.get("position"), str) and listed.json["position"]

    everything = gw.raw("GET", "/apikeys?limit=500")
    assert "position" not in everything.json, "the last page has no position"


def test_doubles_and_usage_values_on_the_wire(gw):
    created = post_json(
        gw,
        "/usageplans",
        {
            "name": unique("wire"),
            "throttle": {"rateLimit": 2, "burstLimit": 1},
            "quota": {"limit": 10, "period": "DAY"},
        },
    )
    assert_json_response(created, 201)
    throttle = created.json["throttle"]
    assert isinstance(throttle["rateLimit"], float), f"rateLimit is a double: {created.text}"
    assert isinstance(throttle["burstLimit"], int) and not isinstance(throttle["burstLimit"], bool)
    assert created.json["quota"] == {"limit": 10, "offset": 0, "period": "DAY"}

    plan_id = created.json["id"]
    key_id = created_id(gw, "/apikeys", {"name": unique("wire"), "enabled": True})
    added = post_json(gw, f"/usageplans/{plan_id}/keys", {"keyId": key_id, "keyType": "API_KEY"})
    assert_json_response(added, 201)

    day = today().isoformat()
    usage = gw.raw("GET", f"/usageplans/{plan_id}/usage?startDate={day}&endDate={day}")
    assert_json_response(usage, 200)
    assert usage.json["usagePlanId"] == plan_id
    assert isinstance(usage.json.get("values"), dict), f"usage is sent as `values`: {usage}"


def test_delete_answers_202_with_an_empty_body(gw):
    key_id = created_id(gw, "/apikeys", {"name": unique("wire")})
    deleted = gw.raw("DELETE", f"/apikeys/{key_id}")
    assert deleted.status == 202, deleted
    assert deleted.text.strip() in ("", "{}"), deleted
