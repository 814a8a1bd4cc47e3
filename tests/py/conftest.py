"""Acceptance tests of the gateway's admin API, driven by botocore and the aws CLI.

The gateway under test, its upstream and its credentials come from the environment,
which `tests/tests/admin_aws.rs` (`cargo test -p gateway-tests --test admin_aws`) sets:

- GATEWAY_ADMIN_URL        admin listener, e.g. http://127.0.0.1:9180
- GATEWAY_DATA_URL         data-plane listener, e.g. http://127.0.0.1:8080
- GATEWAY_UPSTREAM_URL     the test upstream, which echoes each request as JSON
- GATEWAY_ADMIN_AK / _SK   credentials for GATEWAY_ADMIN_URL (dummy ones by default:
                           a gateway started without admin credentials takes any)
- GATEWAY_ADMIN_SIGNED_URL a second gateway that verifies SigV4 (test_admin_sigv4.py),
  GATEWAY_ADMIN_SIGNED_AK / _SK the credentials it was started with

Every test shares one gateway: each creates what it needs under unique names and never
assumes the account is empty. List order is not asserted; paging is.
"""

import os

import pytest

from support import DUMMY_AK, DUMMY_SK, Gateway, require_env


@pytest.fixture(scope="session")
def gw():
    return Gateway(
        require_env("GATEWAY_ADMIN_URL"),
        require_env("GATEWAY_DATA_URL"),
        require_env("GATEWAY_UPSTREAM_URL"),
        os.environ.get("GATEWAY_ADMIN_AK") or DUMMY_AK,
        os.environ.get("GATEWAY_ADMIN_SK") or DUMMY_SK,
    )


@pytest.fixture(scope="session")
def apigw(gw):
    return gw.client
