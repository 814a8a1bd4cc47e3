"""A gateway started with admin credentials verifies every admin request's SigV4
signature (service `apigateway`, any region) and refuses the rest with AWS's codes.

Runs against GATEWAY_ADMIN_SIGNED_URL, started with GATEWAY_ADMIN_SIGNED_AK/_SK."""

import json
import os

import pytest
from botocore import UNSIGNED

from support import expect_error, http_request, make_client, status_of, unique


@pytest.fixture(scope="module")
def signed():
    problem = os.environ.get("GATEWAY_ADMIN_SIGNED_ERROR")
    if problem:
        pytest.fail(f"the gateway with admin credentials did not start: {problem}", pytrace=False)
    url = os.environ.get("GATEWAY_ADMIN_SIGNED_URL", "").rstrip("/")
    access_key = os.environ.get("GATEWAY_ADMIN_SIGNED_AK")
    secret_key = os.environ.get("GATEWAY_ADMIN_SIGNED_SK")
    if not (url and access_key and secret_key):
        pytest.fail(
            "GATEWAY_ADMIN_SIGNED_URL, _AK and _SK are not set: run these tests with "
            "`cargo test -p gateway-tests --test admin_aws`",
            pytrace=False,
        )
    return {"url": url, "ak": access_key, "sk": secret_key}


def test_correct_credentials_work(signed):
    for region in ("us-east-1", "eu-west-3"):
        client = make_client(signed["url"], signed["ak"], signed["sk"], region=region)
        assert status_of(client.get_account()) == 200
    client = make_client(signed["url"], signed["ak"], signed["sk"])
    # A body, a URI label and a sorted multi-parameter query all sign correctly.
    prefix = unique("signed")
    created = client.create_api_key(name=f"{prefix} key/with:odd chars", enabled=True)
    assert status_of(created) == 201
    updated = client.update_api_key(
        apiKey=created["id"],
        patchOperations=[{"op": "replace", "path": "/description", "value": "a b&c=d"}],
    )
    assert updated["description"] == "a b&c=d"
    listed = client.get_api_keys(nameQuery=prefix, includeValues=True, limit=10)
    assert [item["id"] for item in listed["items"]] == [created["id"]]
    imported = client.import_api_keys(
        body=f"name,key\n{prefix}-imported,{'k' * 40}{prefix.replace('-', '')}\n".encode(),
        format="csv",
    )
    assert status_of(imported) == 201


def test_wrong_secret_is_refused(signed):
    client = make_client(signed["url"], signed["ak"], signed["sk"] + "x")
    expect_error(client.get_account, 403, "InvalidSignatureException")
    expect_error(
        lambda: client.create_api_key(name=unique("refused")), 403, "InvalidSignatureException"
    )


def test_unknown_access_key_is_refused(signed):
    client = make_client(signed["url"], "AKIDUNKNOWNUNKNOWN00", signed["sk"])
    expect_error(client.get_account, 403, "UnrecognizedClientException")


def test_unsigned_requests_are_refused(signed):
    client = make_client(signed["url"], signed["ak"], signed["sk"], signature_version=UNSIGNED)
    expect_error(client.get_api_keys, 403, "MissingAuthenticationTokenException")

    raw = http_request(
        signed["url"] + "/apikeys",
        "POST",
        {"Content-Type": "application/json", "Accept": "application/json"},
        json.dumps({"name": "unsigned"}).encode(),
    )
    assert raw.status == 403, raw
    assert raw.headers.get("x-amzn-errortype", "").startswith(
        "MissingAuthenticationTokenException"
    ), raw.headers
    assert isinstance(raw.json, dict) and raw.json.get("message"), raw
