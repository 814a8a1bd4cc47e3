"""The REST API model the data plane serves: REST APIs, resources, methods,
HTTP_PROXY integrations, deployments, stages (with method throttling) and the
account's throttle."""

import pytest

from support import (
    collect_pages,
    expect_error,
    ids_exactly_once,
    root_resource,
    status_of,
    unique,
)


def test_create_get_list_delete_rest_api(apigw):
    name = unique("api")
    created = apigw.create_rest_api(name=name, description="pets")
    assert status_of(created) == 201
    api_id = created["id"]
    assert isinstance(api_id, str) and api_id
    assert (created["name"], created["description"]) == (name, "pets")
    assert created["apiKeySource"] == "HEADER", "apiKeySource defaults to HEADER"
    assert "createdDate" in created

    got = apigw.get_rest_api(restApiId=api_id)
    assert status_of(got) == 200
    assert (got["id"], got["name"], got["apiKeySource"]) == (api_id, name, "HEADER")

    other = apigw.create_rest_api(name=unique("api"))["id"]
    items, _ = collect_pages(apigw.get_rest_apis, 1)
    ids_exactly_once(items, [api_id, other])

    assert status_of(apigw.delete_rest_api(restApiId=api_id)) == 202
    expect_error(lambda: apigw.get_rest_api(restApiId=api_id), 404, "NotFoundException")
    expect_error(lambda: apigw.delete_rest_api(restApiId=api_id), 404, "NotFoundException")
    assert api_id not in {item["id"] for item in apigw.get_rest_apis(limit=500)["items"]}


def test_api_key_source(apigw):
    created = apigw.create_rest_api(name=unique("api"), apiKeySource="AUTHORIZER")
    assert created["apiKeySource"] == "AUTHORIZER"
    assert apigw.get_rest_api(restApiId=created["id"])["apiKeySource"] == "AUTHORIZER"
    updated = apigw.update_rest_api(
        restApiId=created["id"],
        patchOperations=[{"op": "replace", "path": "/apiKeySource", "value": "HEADER"}],
    )
    assert updated["apiKeySource"] == "HEADER"
    expect_error(
        lambda: apigw.create_rest_api(name=unique("api"), apiKeySource="BOGUS"),
        400,
        "BadRequestException",
    )


def test_resources(apigw):
    api_id = apigw.create_rest_api(name=unique("api"))["id"]
    listed = apigw.get_resources(restApiId=api_id)
    assert status_of(listed) == 200
    root = root_resource(apigw, api_id)
    assert isinstance(root["id"], str) and root["id"]
    assert "parentId" not in root

    pets = apigw.create_resource(restApiId=api_id, parentId=root["id"], pathPart="pets")
    assert status_of(pets) == 201
    assert (pets["parentId"], pets["pathPart"], pets["path"]) == (root["id"], "pets", "/pets")
    pet = apigw.create_resource(restApiId=api_id, parentId=pets["id"], pathPart="{id}")
    assert (pet["parentId"], pet["path"]) == (pets["id"], "/pets/{id}")
    proxy = apigw.create_resource(restApiId=api_id, parentId=root["id"], pathPart="{proxy+}")
    assert proxy["path"] == "/{proxy+}"

    paths = {item["path"]: item["id"] for item in apigw.get_resources(restApiId=api_id)["items"]}
    assert paths == {
        "/": root["id"],
        "/pets": pets["id"],
        "/pets/{id}": pet["id"],
        "/{proxy+}": proxy["id"],
    }
    got = apigw.get_resource(restApiId=api_id, resourceId=pet["id"])
    assert (got["id"], got["path"]) == (pet["id"], "/pets/{id}")

    expect_error(
        lambda: apigw.create_resource(restApiId=api_id, parentId=root["id"], pathPart="pets"),
        409,
        "ConflictException",
    )
    expect_error(
        lambda: apigw.create_resource(restApiId=api_id, parentId="nosuchres0", pathPart="x"),
        404,
        "NotFoundException",
    )

    # Deleting a resource deletes the resources below it.
    assert status_of(apigw.delete_resource(restApiId=api_id, resourceId=pets["id"])) == 202
    paths = {item["path"] for item in apigw.get_resources(restApiId=api_id)["items"]}
    assert paths == {"/", "/{proxy+}"}
    expect_error(
        lambda: apigw.delete_resource(restApiId=api_id, resourceId=pets["id"]),
        404,
        "NotFoundException",
    )


def test_methods_and_integrations(gw, apigw):
    api_id = apigw.create_rest_api(name=unique("api"))["id"]
    root_id = root_resource(apigw, api_id)["id"]
    pets = apigw.create_resource(restApiId=api_id, parentId=root_id, pathPart="pets")["id"]

    method = apigw.put_method(
        restApiId=api_id,
        resourceId=pets,
        httpMethod="GET",
        authorizationType="NONE",
        apiKeyRequired=True,
    )
    assert status_of(method) == 201
    assert (method["httpMethod"], method["authorizationType"], method["apiKeyRequired"]) == (
        "GET",
        "NONE",
        True,
    )
    got = apigw.get_method(restApiId=api_id, resourceId=pets, httpMethod="GET")
    assert status_of(got) == 200 and got["apiKeyRequired"] is True

    updated = apigw.update_method(
        restApiId=api_id,
        resourceId=pets,
        httpMethod="GET",
        patchOperations=[{"op": "replace", "path": "/apiKeyRequired", "value": "false"}],
    )
    assert status_of(updated) == 200 and updated["apiKeyRequired"] is False
    updated = apigw.update_method(
        restApiId=api_id,
        resourceId=pets,
        httpMethod="GET",
        patchOperations=[{"op": "replace", "path": "/apiKeyRequired", "value": "true"}],
    )
    assert updated["apiKeyRequired"] is True
    assert apigw.get_method(restApiId=api_id, resourceId=pets, httpMethod="GET")["apiKeyRequired"]

    plain = apigw.put_method(
        restApiId=api_id, resourceId=root_id, httpMethod="ANY", authorizationType="NONE"
    )
    assert plain["apiKeyRequired"] is False, "apiKeyRequired defaults to false"

    uri = f"{gw.upstream_url}/pets"
    integration = apigw.put_integration(
        restApiId=api_id,
        resourceId=pets,
        httpMethod="GET",
        type="HTTP_PROXY",
        integrationHttpMethod="GET",
        uri=uri,
        timeoutInMillis=5000,
    )
    assert status_of(integration) == 201
    assert (
        integration["type"],
        integration["httpMethod"],
        integration["uri"],
        integration["timeoutInMillis"],
    ) == ("HTTP_PROXY", "GET", uri, 5000)
    got = apigw.get_integration(restApiId=api_id, resourceId=pets, httpMethod="GET")
    assert status_of(got) == 200
    assert (got["type"], got["httpMethod"], got["uri"], got["timeoutInMillis"]) == (
        "HTTP_PROXY",
        "GET",
        uri,
        5000,
    )
    with_integration = apigw.get_method(restApiId=api_id, resourceId=pets, httpMethod="GET")
    assert with_integration["methodIntegration"]["uri"] == uri

    default = apigw.put_integration(
        restApiId=api_id,
        resourceId=root_id,
        httpMethod="ANY",
        type="HTTP_PROXY",
        integrationHttpMethod="ANY",
        uri=f"{gw.upstream_url}/",
    )
    assert default["timeoutInMillis"] == 29000, "the integration timeout defaults to 29 s"

    expect_error(
        lambda: apigw.get_method(restApiId=api_id, resourceId=pets, httpMethod="POST"),
        404,
        "NotFoundException",
    )
    expect_error(
        lambda: apigw.get_integration(restApiId=api_id, resourceId="nosuchres0", httpMethod="GET"),
        404,
        "NotFoundException",
    )


@pytest.fixture
def deployed(gw):
    return gw.proxy_api(stage="v1")


def test_deployments_and_stages(apigw, deployed):
    api_id = deployed["api"]
    stage = apigw.get_stage(restApiId=api_id, stageName="v1")
    assert status_of(stage) == 200
    assert stage["stageName"] == "v1"
    first_deployment = stage["deploymentId"]
    assert isinstance(first_deployment, str) and first_deployment

    redeployed = apigw.create_deployment(restApiId=api_id, stageName="v1")
    assert status_of(redeployed) == 201
    assert redeployed["id"] != first_deployment
    assert apigw.get_stage(restApiId=api_id, stageName="v1")["deploymentId"] == redeployed["id"]

    created = apigw.create_stage(
        restApiId=api_id, stageName="v2", deploymentId=first_deployment, description="second"
    )
    assert status_of(created) == 201
    assert (created["stageName"], created["deploymentId"]) == ("v2", first_deployment)
    expect_error(
        lambda: apigw.create_stage(restApiId=api_id, stageName="v2", deploymentId=first_deployment),
        409,
        "ConflictException",
    )
    names = {item["stageName"] for item in apigw.get_stages(restApiId=api_id)["item"]}
    assert names == {"v1", "v2"}

    assert status_of(apigw.delete_stage(restApiId=api_id, stageName="v2")) == 202
    expect_error(
        lambda: apigw.get_stage(restApiId=api_id, stageName="v2"), 404, "NotFoundException"
    )
    names = {item["stageName"] for item in apigw.get_stages(restApiId=api_id)["item"]}
    assert names == {"v1"}


def test_get_update_delete_deployment(gw, apigw):
    api = gw.proxy_api(stage="v1", key_required=False)
    api_id = api["api"]
    first = apigw.get_stage(restApiId=api_id, stageName="v1")["deploymentId"]
    got = apigw.get_deployment(restApiId=api_id, deploymentId=first)
    assert status_of(got) == 200
    assert got["id"] == first and "createdDate" in got

    updated = apigw.update_deployment(
        restApiId=api_id,
        deploymentId=first,
        patchOperations=[{"op": "replace", "path": "/description", "value": "first cut"}],
    )
    assert (status_of(updated), updated["description"]) == (200, "first cut")
    assert apigw.get_deployment(restApiId=api_id, deploymentId=first)["description"] == "first cut"
    expect_error(
        lambda: apigw.update_deployment(
            restApiId=api_id,
            deploymentId=first,
            patchOperations=[{"op": "replace", "path": "/stageName", "value": "x"}],
        ),
        400,
        "BadRequestException",
    )

    # A stage still serves it: refused, as on AWS.
    expect_error(
        lambda: apigw.delete_deployment(restApiId=api_id, deploymentId=first),
        400,
        "BadRequestException",
        "Active stages pointing to this deployment must be moved or deleted",
    )
    second = apigw.create_deployment(restApiId=api_id, stageName="v1")["id"]
    assert status_of(apigw.delete_deployment(restApiId=api_id, deploymentId=first)) == 202
    expect_error(
        lambda: apigw.get_deployment(restApiId=api_id, deploymentId=first),
        404,
        "NotFoundException",
        "Invalid Deployment identifier specified",
    )
    expect_error(
        lambda: apigw.delete_deployment(restApiId=api_id, deploymentId=first),
        404,
        "NotFoundException",
        "Invalid Deployment identifier specified",
    )
    listed = [d["id"] for d in apigw.get_deployments(restApiId=api_id)["items"]]
    assert listed == [second]
    # The stage keeps serving its (second) deployment.
    answer = gw.invoke(api_id, "v1", "pets")
    assert answer.status == 200, answer


def test_stage_method_throttling_settings(apigw, deployed):
    api_id = deployed["api"]

    def update(*ops):
        response = apigw.update_stage(
            restApiId=api_id,
            stageName="v1",
            patchOperations=[dict(zip(("op", "path", "value"), op)) for op in ops],
        )
        assert status_of(response) == 200
        return response.get("methodSettings", {})

    settings = update(
        ("replace", "/*/*/throttling/rateLimit", "100"),
        ("replace", "/*/*/throttling/burstLimit", "50"),
    )
    assert settings["*/*"]["throttlingRateLimit"] == 100.0
    assert isinstance(settings["*/*"]["throttlingRateLimit"], float)
    assert settings["*/*"]["throttlingBurstLimit"] == 50

    # Only the burst is set: the rate takes AWS's default.
    settings = update(("replace", "/pets/GET/throttling/burstLimit", "7"))
    assert settings["pets/GET"]["throttlingBurstLimit"] == 7
    assert settings["pets/GET"]["throttlingRateLimit"] == 10000.0
    settings = update(("replace", "/pets/GET/throttling/rateLimit", "3.5"))
    assert settings["pets/GET"]["throttlingRateLimit"] == 3.5

    # `~1` escaping is kept in the key, as AWS does.
    settings = update(("replace", "/~1pets/GET/throttling/rateLimit", "4"))
    assert settings["~1pets/GET"]["throttlingRateLimit"] == 4.0

    # Changing */* leaves the per-method entries alone.
    settings = update(("replace", "/*/*/throttling/burstLimit", "60"))
    assert settings["*/*"]["throttlingBurstLimit"] == 60
    assert settings["pets/GET"]["throttlingBurstLimit"] == 7

    got = apigw.get_stage(restApiId=api_id, stageName="v1")["methodSettings"]
    assert got["pets/GET"] == settings["pets/GET"] and got["*/*"] == settings["*/*"]

    settings = update(("remove", "/pets/GET"))
    assert "pets/GET" not in settings and "*/*" in settings
    settings = update(("remove", "/*/*"))
    assert "*/*" not in settings
    expect_error(
        lambda: update(("remove", "/*/*")),
        400,
        "BadRequestException",
        "Cannot remove method setting */* because there is no method setting for this method",
    )


def test_account_throttle(apigw):
    account = apigw.get_account()
    assert status_of(account) == 200
    assert account["throttleSettings"] == {"burstLimit": 5000, "rateLimit": 10000.0}
    assert "UsagePlans" in account.get("features", [])
    try:
        updated = apigw.update_account(
            patchOperations=[
                {"op": "replace", "path": "/throttleSettings/rateLimit", "value": "20000"},
                {"op": "replace", "path": "/throttleSettings/burstLimit", "value": "9000"},
            ]
        )
        assert status_of(updated) == 200
        assert updated["throttleSettings"] == {"burstLimit": 9000, "rateLimit": 20000.0}
        assert apigw.get_account()["throttleSettings"] == updated["throttleSettings"]
    finally:
        apigw.update_account(
            patchOperations=[
                {"op": "replace", "path": "/throttleSettings/rateLimit", "value": "10000"},
                {"op": "replace", "path": "/throttleSettings/burstLimit", "value": "5000"},
            ]
        )
    assert apigw.get_account()["throttleSettings"] == {"burstLimit": 5000, "rateLimit": 10000.0}


def test_stage_takes_aws_method_settings_beside_throttling(apigw, deployed):
    """Terraform's aws_api_gateway_method_settings sends metrics, logging and caching
    settings in the same UpdateStage as the throttles. The gateway keeps the throttles
    and accepts the rest (checking their values as AWS does) without keeping them."""
    api_id = deployed["api"]

    def update(*ops):
        return apigw.update_stage(
            restApiId=api_id,
            stageName="v1",
            patchOperations=[dict(zip(("op", "path", "value"), op)) for op in ops],
        )

    response = update(
        ("replace", "/*/*/metrics/enabled", "true"),
        ("replace", "/*/*/logging/loglevel", "INFO"),
        ("replace", "/*/*/logging/dataTrace", "false"),
        ("replace", "/*/*/throttling/burstLimit", "40"),
        ("replace", "/*/*/throttling/rateLimit", "20"),
        ("replace", "/*/*/caching/enabled", "false"),
        ("replace", "/*/*/caching/ttlInSeconds", "300"),
        ("replace", "/*/*/caching/dataEncrypted", "false"),
        ("replace", "/*/*/caching/requireAuthorizationForCacheControl", "true"),
        (
            "replace",
            "/*/*/caching/unauthorizedCacheControlHeaderStrategy",
            "SUCCEED_WITH_RESPONSE_HEADER",
        ),
        ("replace", "/~1pets/GET/logging/loglevel", "Error"),
        ("replace", "/tracingEnabled", "false"),
        ("replace", "/cacheClusterEnabled", "false"),
        ("replace", "/cacheClusterSize", "0.5"),
    )
    assert status_of(response) == 200
    settings = response["methodSettings"]
    assert settings["*/*"]["throttlingBurstLimit"] == 40
    assert settings["*/*"]["throttlingRateLimit"] == 20.0
    # A setting for a method creates its entry, with the stage's */* throttle so that the
    # method's throttle does not change.
    assert settings["~1pets/GET"]["throttlingBurstLimit"] == 40
    assert settings["~1pets/GET"]["throttlingRateLimit"] == 20.0
    assert apigw.get_stage(restApiId=api_id, stageName="v1")["methodSettings"] == settings

    for path, value, message in (
        (
            "/*/*/logging/loglevel",
            "VERBOSE",
            "Invalid logging level specified: VERBOSE; must be one of OFF, ERROR, INFO",
        ),
        (
            "/*/*/caching/ttlInSeconds",
            "3601",
            "Invalid cache TTL specified: 3601; it must be an integer from 0 to 3600 seconds",
        ),
        (
            "/*/*/caching/ttlInSeconds",
            "soon",
            "Invalid cache TTL specified: soon; it must be an integer from 0 to 3600 seconds",
        ),
        (
            "/*/*/caching/unauthorizedCacheControlHeaderStrategy",
            "ALLOW",
            "Invalid unauthorized cache control header strategy specified: ALLOW; must be one "
            "of FAIL_WITH_403, SUCCEED_WITH_RESPONSE_HEADER, SUCCEED_WITHOUT_RESPONSE_HEADER",
        ),
        (
            "/cacheClusterSize",
            "2",
            "Invalid cache cluster size specified: 2; must be one of "
            "0.5, 1.6, 6.1, 13.5, 28.4, 58.2, 118, 237",
        ),
    ):
        expect_error(
            lambda: update(
                ("replace", "/*/*/throttling/burstLimit", "41"), ("replace", path, value)
            ),
            400,
            "BadRequestException",
            message,
        )
    error = expect_error(
        lambda: update(("replace", "/*/*/metrics/nosuchsetting", "true")),
        400,
        "BadRequestException",
    )
    assert error["Error"]["Message"].startswith(
        "Invalid patch path  '/*/*/metrics/nosuchsetting' specified for op 'replace'."
    ), error["Error"]["Message"]
    # A refused request changes nothing.
    got = apigw.get_stage(restApiId=api_id, stageName="v1")["methodSettings"]
    assert got["*/*"]["throttlingBurstLimit"] == 40


def test_get_stages_filters_by_deployment(apigw, deployed):
    api_id = deployed["api"]
    first = apigw.get_stage(restApiId=api_id, stageName="v1")["deploymentId"]
    second = apigw.create_deployment(restApiId=api_id, stageName="v2")["id"]
    apigw.create_stage(restApiId=api_id, stageName="v3", deploymentId=first)

    def names(**filters):
        listed = apigw.get_stages(restApiId=api_id, **filters)
        assert status_of(listed) == 200
        return sorted(item["stageName"] for item in listed["item"])

    assert names() == ["v1", "v2", "v3"]
    assert names(deploymentId=first) == ["v1", "v3"]
    assert names(deploymentId=second) == ["v2"]
    assert names(deploymentId="nosuchdep0") == []
