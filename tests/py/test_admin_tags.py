"""Tags on API keys, usage plans, REST APIs and stages: TagResource, UntagResource and
GetTags on `/tags/{resource_arn}`, as Terraform and the aws CLI use them."""

from support import REGION, expect_error, status_of, unique


def arn(path):
    return f"arn:aws:apigateway:{REGION}::{path}"


def test_tags_of_a_key_are_added_merged_listed_and_removed(gw, apigw):
    key = gw.create_key("tags", tags={"team": "billing"})
    assert key["tags"] == {"team": "billing"}
    resource = arn(f"/apikeys/{key['id']}")
    assert apigw.get_tags(resourceArn=resource)["tags"] == {"team": "billing"}

    done = apigw.tag_resource(resourceArn=resource, tags={"tier": "gold", "team": "growth"})
    assert status_of(done) == 204
    assert apigw.get_tags(resourceArn=resource)["tags"] == {"team": "growth", "tier": "gold"}
    assert apigw.get_api_key(apiKey=key["id"])["tags"] == {"team": "growth", "tier": "gold"}

    done = apigw.untag_resource(resourceArn=resource, tagKeys=["team", "absent"])
    assert status_of(done) == 204
    assert apigw.get_tags(resourceArn=resource)["tags"] == {"tier": "gold"}


def test_tags_of_plans_apis_and_stages(gw, apigw):
    plan = apigw.create_usage_plan(name=unique("tags"))
    resource = arn(f"/usageplans/{plan['id']}")
    apigw.tag_resource(resourceArn=resource, tags={"product": "pets"})
    assert apigw.get_usage_plan(usagePlanId=plan["id"])["tags"] == {"product": "pets"}

    created = apigw.create_rest_api(name=unique("tags"), tags={"owner": "api-team"})
    assert created["tags"] == {"owner": "api-team"}
    assert apigw.get_rest_api(restApiId=created["id"])["tags"] == {"owner": "api-team"}

    api = gw.proxy_api(stage="live", key_required=False)
    stage = arn(f"/restapis/{api['api']}/stages/live")
    apigw.tag_resource(resourceArn=stage, tags={"env": "production"})
    assert apigw.get_tags(resourceArn=stage)["tags"] == {"env": "production"}
    assert apigw.get_stage(restApiId=api["api"], stageName="live")["tags"] == {
        "env": "production"
    }
    # Tagging changes nothing the stage serves.
    assert gw.invoke(api["api"], "live", "pets").status == 200


def test_tagging_refuses_unknown_resources_bad_arns_and_tags_over_the_limits(gw, apigw):
    expect_error(
        lambda: apigw.get_tags(resourceArn=arn("/apikeys/nosuchkey0")),
        404,
        "NotFoundException",
        "Invalid API Key identifier specified",
    )
    expect_error(
        lambda: apigw.tag_resource(resourceArn=arn("/usageplans/nosuch"), tags={"a": "b"}),
        404,
        "NotFoundException",
        "Invalid Usage Plan ID specified",
    )
    expect_error(
        lambda: apigw.get_tags(resourceArn="arn:aws:s3:::bucket"),
        400,
        "BadRequestException",
        pattern=r"Invalid resource ARN .*",
    )
    key = gw.create_key("tags")
    resource = arn(f"/apikeys/{key['id']}")
    expect_error(
        lambda: apigw.tag_resource(resourceArn=resource, tags={"aws:owner": "x"}),
        400,
        "BadRequestException",
        pattern=r".*aws: prefix is reserved",
    )
    expect_error(
        lambda: apigw.tag_resource(resourceArn=resource, tags={"k": "v" * 257}),
        400,
        "BadRequestException",
    )
    apigw.tag_resource(resourceArn=resource, tags={f"k{i}": "v" for i in range(50)})
    expect_error(
        lambda: apigw.tag_resource(resourceArn=resource, tags={"one-more": "v"}),
        400,
        "BadRequestException",
        pattern=r"Too many tags.*",
    )
    # A refused change leaves the tags as they were.
    assert len(apigw.get_tags(resourceArn=resource)["tags"]) == 50
    expect_error(
        lambda: gw.create_key("tags", tags={"AWS:team": "x"}),
        400,
        "BadRequestException",
    )
