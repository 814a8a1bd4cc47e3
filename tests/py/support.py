"""Helpers for the admin API acceptance tests: clients, error checks, paging, the
data plane and a builder for a keyed HTTP_PROXY API. The fixtures are in conftest.py."""

import datetime
import http.client
import itertools
import json
import os
import re
import secrets
import time
import urllib.parse

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

REGION = "us-east-1"
DUMMY_AK = "AKIDGATEWAYTESTDUMMY"
DUMMY_SK = "gateway-test-dummy-secret-access-key"

# Prefix of every name this run creates, so filters by name only ever see our own items.
RUN = "t" + secrets.token_hex(3)
_COUNTER = itertools.count(1)


def require_env(name):
    value = os.environ.get(name, "").rstrip("/")
    if not value:
        pytest.fail(
            f"{name} is not set. Run these tests with "
            "`cargo test -p gateway-tests --test admin_aws`, which starts a gateway, an "
            "upstream and sets the GATEWAY_* variables (see tests/py/conftest.py).",
            pytrace=False,
        )
    return value


def client_config(**overrides):
    """No retries (a refusal must be seen as it is) and short timeouts."""
    settings = dict(
        region_name=REGION,
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=5,
        read_timeout=30,
    )
    settings.update(overrides)
    return Config(**settings)


def make_client(url, access_key, secret_key, region=REGION, **config):
    return boto3.session.Session().client(
        "apigateway",
        endpoint_url=url,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=client_config(region_name=region, **config),
    )


def unique(tag):
    """A name no other test (and no earlier run) uses: `t<run>-<tag>-<n>`."""
    return f"{RUN}-{tag}-{next(_COUNTER)}"


def status_of(response):
    return response["ResponseMetadata"]["HTTPStatusCode"]


def expect_error(call, status, code, message=None, pattern=None):
    """Runs `call()`, which must fail with HTTP `status` and error `code`; checks the
    message exactly (`message`) or against a full-match regex (`pattern`). Returns the
    parsed error response."""
    try:
        result = call()
    except ClientError as error:
        response = error.response
    else:
        pytest.fail(
            f"expected {status} {code}, but the call succeeded with "
            f"{status_of(result)}: {strip_metadata(result)!r}",
            pytrace=False,
        )
    got_status = response["ResponseMetadata"]["HTTPStatusCode"]
    got_code = response.get("Error", {}).get("Code")
    got_message = response.get("Error", {}).get("Message")
    assert (got_status, got_code) == (status, code), (
        f"expected {status} {code}, got {got_status} {got_code}: {got_message!r}"
    )
    if message is not None:
        assert got_message == message, f"{code} message"
    if pattern is not None:
        assert got_message is not None and re.fullmatch(pattern, got_message), (
            f"{code} message {got_message!r} does not match {pattern!r}"
        )
    return response


def strip_metadata(response):
    return {k: v for k, v in response.items() if k != "ResponseMetadata"}


def invalid_patch_path(path, op, allowed):
    """AWS's text for a patch path an operation does not take (two spaces after "path")."""
    return (
        f"Invalid patch path  '{path}' specified for op '{op}'. "
        f"Must be one of: [{', '.join(allowed)}]"
    )


def today():
    return datetime.datetime.now(datetime.timezone.utc).date()


def eventually(check, accept, within, what, interval=0.05):
    """Calls `check()` until `accept(value)` holds, for at most `within` seconds from
    now. Returns (value, when the accepted check started, in seconds from now); fails
    naming `what` and the last value."""
    start = time.monotonic()
    while True:
        started = time.monotonic() - start
        value = check()
        if accept(value):
            return value, started
        if started >= within:
            pytest.fail(f"{what}: not seen within {within} s (last: {value!r})", pytrace=False)
        time.sleep(interval)


class HttpResult:
    """One HTTP exchange: status, lower-cased headers, body text and parsed JSON."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.text = body.decode("utf-8", "replace")
        try:
            self.json = json.loads(self.text) if self.text else None
        except ValueError:
            self.json = None

    def __repr__(self):
        return f"HTTP {self.status} {self.text[:300]!r}"


def http_request(url, method="GET", headers=None, body=None, timeout=10):
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    target = parsed.path or "/"
    if parsed.query:
        target += "?" + parsed.query
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        return HttpResult(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            payload,
        )
    finally:
        connection.close()


class Gateway:
    """The gateway under test as the tests see it: a boto3 client, raw signed admin
    requests, the data plane and the upstream's address."""

    def __init__(self, admin_url, data_url, upstream_url, access_key, secret_key):
        self.admin_url = admin_url
        self.data_url = data_url
        self.upstream_url = upstream_url
        self.credentials = Credentials(access_key, secret_key)
        self.client = make_client(admin_url, access_key, secret_key)

    # -- admin API below botocore ---------------------------------------------------

    def raw(self, method, path, body=None, headers=None):
        """A SigV4-signed admin request with exactly this path (and query) and body."""
        url = self.admin_url + path
        data = body.encode() if isinstance(body, str) else body
        sent = {"Accept": "application/json", **(headers or {})}
        request = AWSRequest(method=method, url=url, data=data, headers=sent)
        SigV4Auth(self.credentials, "apigateway", REGION).add_auth(request)
        return http_request(url, method, dict(request.headers.items()), data)

    # -- data plane -------------------------------------------------------------------

    def invoke_url(self, api_id, stage, path):
        return f"{self.data_url}/restapis/{api_id}/{stage}/_user_request_/{path.lstrip('/')}"

    def invoke(self, api_id, stage, path, key=None, method="GET", headers=None):
        sent = dict(headers or {})
        if key is not None:
            sent["x-api-key"] = key
        return http_request(self.invoke_url(api_id, stage, path), method, sent)

    # -- building blocks --------------------------------------------------------------

    def create_key(self, tag="key", **kwargs):
        kwargs.setdefault("name", unique(tag))
        kwargs.setdefault("enabled", True)
        return self.client.create_api_key(**kwargs)

    def proxy_api(self, stage="prod", key_required=True, extra_stages=(), **create):
        """A REST API whose `ANY /{proxy+}` forwards to the upstream (HTTP_PROXY),
        plus `GET /pets` with the same key requirement, deployed to `stage` (and to
        each of `extra_stages`). Returns a dict of ids."""
        client = self.client
        api = client.create_rest_api(name=create.pop("name", unique("api")), **create)
        api_id = api["id"]
        root_id = root_resource(client, api_id)["id"]
        proxy = client.create_resource(restApiId=api_id, parentId=root_id, pathPart="{proxy+}")
        pets = client.create_resource(restApiId=api_id, parentId=root_id, pathPart="pets")
        for resource_id, method, target in (
            (proxy["id"], "ANY", "{proxy}"),
            (pets["id"], "GET", "pets"),
        ):
            client.put_method(
                restApiId=api_id,
                resourceId=resource_id,
                httpMethod=method,
                authorizationType="NONE",
                apiKeyRequired=key_required,
            )
            client.put_integration(
                restApiId=api_id,
                resourceId=resource_id,
                httpMethod=method,
                type="HTTP_PROXY",
                integrationHttpMethod="ANY",
                uri=f"{self.upstream_url}/{target}",
            )
        for name in (stage, *extra_stages):
            client.create_deployment(restApiId=api_id, stageName=name)
        return {
            "api": api_id,
            "root": root_id,
            "proxy": proxy["id"],
            "pets": pets["id"],
            "stage": stage,
        }

    def wait_admitted(self, api_id, stage, key, path="pets", within=3.0):
        """Polls the data plane until a keyed request is answered 200 (the new
        configuration has reached it); returns that response."""
        result, _ = eventually(
            lambda: self.invoke(api_id, stage, path, key=key),
            lambda r: r.status == 200,
            within,
            f"a keyed request to {api_id}/{stage}/{path} answered 200",
        )
        return result


def root_resource(client, api_id):
    items = client.get_resources(restApiId=api_id)["items"]
    roots = [item for item in items if item.get("path") == "/"]
    assert len(roots) == 1, f"exactly one root resource expected: {items!r}"
    return roots[0]


def collect_pages(fetch, limit, **params):
    """Pages through a list operation with `limit`/`position` by hand. Checks that
    every page but the last has a `position`, that no page is larger than `limit`,
    and returns (items, pages)."""
    items, pages, position = [], 0, None
    while True:
        kwargs = dict(params, limit=limit)
        if position is not None:
            kwargs["position"] = position
        response = fetch(**kwargs)
        assert status_of(response) == 200
        page = response.get("items", [])
        pages += 1
        assert len(page) <= limit, f"page of {len(page)} items with limit {limit}"
        position = response.get("position")
        if position is None:
            return items + page, pages
        assert page, "a page that is not the last one must hold items"
        items += page
        assert pages < 10_000, "paging does not end"


def ids_exactly_once(items, expected):
    """Every id in `expected` occurs exactly once among `items`."""
    seen = [item["id"] for item in items]
    counts = {i: seen.count(i) for i in expected}
    assert all(c == 1 for c in counts.values()), f"occurrences per id: {counts}"
    assert len(seen) == len(set(seen)), "an id came back on two pages"
