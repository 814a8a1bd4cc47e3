//! Every validation rule of the model, with AWS's error kinds and messages.

use std::sync::Arc;

use gateway::clock::FakeClock;
use gateway::engine::Engine;
use gateway::plan::{
    ApiKey, ErrorKind, Method, MethodSetting, Model, ModelError, QuotaPeriod, QuotaSettings,
    RestApi, Stage, ThrottleSettings, UsagePlan, UsagePlanKey, validate_api_key_description,
    validate_api_key_name, validate_api_key_value, validate_quota, validate_throttle,
};
use gateway::store::MemoryStore;

fn base() -> Model {
    Model::new()
        .api(
            RestApi::proxy("a1", "http://up")
                .stage(Stage::new("prod"))
                .stage(Stage::new("dev")),
        )
        .plan(UsagePlan::new("p1", "one").stage("a1", "prod"))
        .key(ApiKey::new("k1", "a".repeat(20)))
        .plan_key("p1", "k1")
}

fn err(r: Result<impl std::fmt::Debug, ModelError>) -> (ErrorKind, String) {
    let e = r.expect_err("must fail");
    (e.kind, e.message)
}

fn bad(msg: &str) -> (ErrorKind, String) {
    (ErrorKind::BadRequest, msg.to_string())
}

#[test]
fn api_key_value_length() {
    assert_eq!(
        err(validate_api_key_value(&"x".repeat(19))),
        bad("API Key value should be at least 20 characters")
    );
    assert_eq!(
        err(validate_api_key_value(&"x".repeat(129))),
        bad("API Key value exceeds maximum size of 128 characters")
    );
    assert!(validate_api_key_value(&"x".repeat(20)).is_ok());
    assert!(validate_api_key_value(&"x".repeat(128)).is_ok());
    // Characters, not bytes.
    assert!(validate_api_key_value(&"é".repeat(20)).is_ok());
}

#[test]
fn api_key_name_and_description() {
    assert_eq!(
        err(validate_api_key_name(Some(&"n".repeat(1025)))),
        bad("Invalid API Key name, can be at most 1024 characters.")
    );
    assert!(validate_api_key_name(Some(&"n".repeat(1024))).is_ok());
    assert_eq!(
        err(validate_api_key_description(Some(&"d".repeat(125_001)))),
        bad("Invalid API Key description specified.")
    );
    assert!(validate_api_key_description(None).is_ok());
}

#[test]
fn quota_offset_rules() {
    let q = |limit, period, offset| QuotaSettings {
        limit,
        offset,
        period,
    };
    assert_eq!(
        err(validate_quota(&q(10, QuotaPeriod::Day, 1))),
        bad("Usage Plan quota offset must be zero in the DAY period")
    );
    assert_eq!(
        err(validate_quota(&q(10, QuotaPeriod::Week, 7))),
        bad("Usage Plan quota offset must be between 0 and 6 inclusive in the WEEK period")
    );
    assert!(validate_quota(&q(10, QuotaPeriod::Week, -1)).is_err());
    assert_eq!(
        err(validate_quota(&q(10, QuotaPeriod::Month, 28))),
        bad("Usage Plan quota offset must be between 0 and 27 inclusive in the MONTH period")
    );
    assert!(validate_quota(&q(10, QuotaPeriod::Month, 27)).is_ok());
    assert!(validate_quota(&q(10, QuotaPeriod::Week, 6)).is_ok());
    assert_eq!(
        err(validate_quota(&q(-1, QuotaPeriod::Day, 0))).0,
        ErrorKind::BadRequest
    );
}

#[test]
fn throttle_rules() {
    assert!(validate_throttle(&ThrottleSettings::new(0.5, 1)).is_ok());
    assert!(validate_throttle(&ThrottleSettings::new(-1.0, 1)).is_err());
    assert!(validate_throttle(&ThrottleSettings::new(f64::NAN, 1)).is_err());
    assert!(validate_throttle(&ThrottleSettings::new(1.0, -1)).is_err());
    let mut m = base();
    m.rest_apis[0].stages[0].method_settings.insert(
        "*/*".into(),
        MethodSetting {
            throttling_burst_limit: -2,
            throttling_rate_limit: 1.0,
        },
    );
    assert_eq!(err(m.validate()).0, ErrorKind::BadRequest);
    let mut m = base();
    m.rest_apis[0].stages[0]
        .method_settings
        .insert("pets".into(), MethodSetting::default());
    assert_eq!(err(m.validate()), bad("Invalid method setting path: pets"));
    let mut m = base();
    m.usage_plans[0].api_stages[0]
        .throttle
        .insert("pets/GET".into(), ThrottleSettings::new(1.0, 1));
    assert_eq!(
        err(m.validate()),
        bad("Invalid method throttle key specified: pets/GET")
    );
    assert!(validate_throttle(&base().account.throttle_settings).is_ok());
}

#[test]
fn duplicate_values_ids_and_unknown_references() {
    let m = base().key(ApiKey::new("k2", "a".repeat(20)));
    assert_eq!(
        err(m.validate()),
        (ErrorKind::Conflict, "API Key already exists".into())
    );
    let m = base().key(ApiKey::new("k1", "b".repeat(20)));
    assert_eq!(err(m.validate()).0, ErrorKind::Conflict);
    let m = base().plan_key("p9", "k1");
    assert_eq!(
        err(m.validate()),
        (
            ErrorKind::NotFound,
            "Invalid Usage Plan ID specified".into()
        )
    );
    let m = base().plan_key("p1", "k9");
    assert_eq!(
        err(m.validate()),
        (
            ErrorKind::NotFound,
            "Invalid API Key identifier specified".into()
        )
    );
    let m = base().plan_key("p1", "k1");
    assert_eq!(err(m.validate()).0, ErrorKind::Conflict);
    let m = base().plan(UsagePlan::new("p2", "two").stage("a1", "nope"));
    assert_eq!(
        err(m.validate()),
        bad("Invalid API Stage {api: a1, stage: nope} specified for usageplan p2")
    );
    let m = base().plan(UsagePlan::new("p2", ""));
    assert_eq!(err(m.validate()).0, ErrorKind::BadRequest);
    let m = base().key(ApiKey::new("", "c".repeat(20)));
    assert_eq!(
        err(m.validate()),
        bad("Invalid API Key identifier specified")
    );
    let m = base().key(ApiKey::new("x".repeat(64), "c".repeat(20)));
    assert_eq!(err(m.validate()).0, ErrorKind::BadRequest);
}

#[test]
fn one_plan_per_key_per_stage_is_a_conflict() {
    let m = base()
        .plan(UsagePlan::new("p2", "two").stage("a1", "prod"))
        .plan_key("p2", "k1");
    assert_eq!(
        err(m.validate()),
        (
            ErrorKind::Conflict,
            "Usage Plan p2 cannot be added because API Key k1 cannot reference multiple Usage Plans with the same API Stage: a1:prod".into()
        )
    );
    // Different stages are fine.
    let ok = base()
        .plan(UsagePlan::new("p2", "two").stage("a1", "dev"))
        .plan_key("p2", "k1");
    assert!(ok.validate().is_ok());
    // Admin paths: CreateUsagePlanKey and adding a stage.
    let mut m = base().plan(UsagePlan::new("p2", "two").stage("a1", "prod"));
    assert_eq!(
        err(m.create_usage_plan_key("p2", "k1")).0,
        ErrorKind::Conflict
    );
    let mut m2 = ok.clone();
    assert_eq!(
        err(m2.add_api_stage("p2", "a1", "prod")).0,
        ErrorKind::Conflict
    );
    assert_eq!(
        err(m2.add_api_stage("p2", "a1", "qa")),
        (
            ErrorKind::NotFound,
            "Invalid API Stage {api: a1, stage: qa} specified for usageplan p2".into()
        )
    );
    assert!(m.create_usage_plan_key("p2", "zz").is_err());
    // The engine refuses such a snapshot too.
    let bad_model = base()
        .plan(UsagePlan::new("p2", "two").stage("a1", "prod"))
        .plan_key("p2", "k1");
    let e = Engine::new(
        bad_model,
        Arc::new(MemoryStore::new()),
        Arc::new(FakeClock::new(0)),
    );
    assert_eq!(e.expect_err("conflict").kind, ErrorKind::Conflict);
}

#[test]
fn admin_operations() {
    let mut m = base();
    assert_eq!(
        err(m.create_api_key(ApiKey::new("k2", "a".repeat(20)))),
        (ErrorKind::Conflict, "API Key already exists".into())
    );
    assert_eq!(
        err(m.create_api_key(ApiKey::new("k2", "short"))),
        bad("API Key value should be at least 20 characters")
    );
    assert!(m.create_api_key(ApiKey::new("k2", "b".repeat(20))).is_ok());
    let view = m.create_usage_plan_key("p1", "k2").expect("add");
    assert_eq!(
        (view.id.as_str(), view.key_type.as_str()),
        ("k2", "API_KEY")
    );
    assert_eq!(
        err(m.create_usage_plan_key("p1", "k2")).0,
        ErrorKind::Conflict
    );
    assert_eq!(
        err(m.api_key("zz")),
        (
            ErrorKind::NotFound,
            "Invalid API Key identifier specified".into()
        )
    );
    assert_eq!(
        err(m.usage_plan("zz")),
        (
            ErrorKind::NotFound,
            "Invalid Usage Plan ID specified".into()
        )
    );
    assert_eq!(
        err(m.delete_usage_plan("p1")),
        bad(
            "Cannot delete Usage Plan p1 because there are API Stages associated with it, including a1:prod"
        )
    );
    m.delete_api_key("k2").expect("delete");
    assert!(
        !m.usage_plan_keys.iter().any(|u| u.key_id == "k2"),
        "delete cascades"
    );
    assert_eq!(err(m.delete_api_key("k2")).0, ErrorKind::NotFound);
    assert_eq!(
        err(m.create_usage_plan(UsagePlan::new("p3", "x").stage("zz", "prod"))).0,
        ErrorKind::BadRequest
    );
    m.create_usage_plan(UsagePlan::new("p3", "x"))
        .expect("plan without stages");
    m.delete_usage_plan("p3").expect("no stages");
    assert_eq!(
        err(m.delete_usage_plan_key("p1", "k2")).0,
        ErrorKind::NotFound
    );
    m.delete_usage_plan_key("p1", "k1").expect("delete");
    assert!(m.validate().is_ok());
    let mut q = m.clone();
    q.usage_plan_keys.push(UsagePlanKey {
        usage_plan_id: "p1".into(),
        key_id: "k1".into(),
    });
    assert!(q.validate().is_ok());
}

#[test]
fn resources_methods_and_stages() {
    let with = |path: &str, verb: &str| {
        Model::new().api(
            RestApi::new("a", "a")
                .method(path, verb, Method::mock())
                .stage(Stage::new("s")),
        )
    };
    assert_eq!(
        err(with("pets", "GET").validate()),
        bad("Invalid resource path specified: pets")
    );
    assert_eq!(
        err(with("/{a+}/b", "GET").validate()).0,
        ErrorKind::BadRequest
    );
    assert_eq!(
        err(with("/p", "FETCH").validate()),
        bad(
            "Invalid HttpMethod specified. Valid options are ANY,DELETE,GET,HEAD,OPTIONS,PATCH,POST,PUT"
        )
    );
    let sib = Model::new().api(
        RestApi::new("a", "a")
            .method("/{a}", "GET", Method::mock())
            .method("/{b}", "GET", Method::mock()),
    );
    assert_eq!(
        err(sib.validate()),
        bad(
            "A sibling ({a}) of this resource already has a variable path part -- only one is allowed"
        )
    );
    let dup = Model::new().api(
        RestApi::new("a", "a")
            .stage(Stage::new("s"))
            .stage(Stage::new("s")),
    );
    assert_eq!(
        err(dup.validate()),
        (ErrorKind::Conflict, "Stage already exists".into())
    );
    let t = Model::new().api(RestApi::new("a", "a").method(
        "/",
        "GET",
        Method::http_proxy("http://x").timeout_ms(30_000),
    ));
    assert_eq!(
        err(t.validate()),
        bad("Timeout should be between 50 ms and 29000 ms")
    );
    let two = Model::new()
        .api(RestApi::new("a", "a"))
        .api(RestApi::new("a", "b"));
    assert_eq!(err(two.validate()).0, ErrorKind::Conflict);
}

#[test]
fn deployment_snapshots_are_validated_like_live_resources() {
    // The live resources are valid; each snapshot breaks one rule.
    let with_snapshot = |path: &str, verb: &str, method: Method| {
        let mut api = RestApi::new("a", "a")
            .method("/ok", "GET", Method::mock())
            .deploy("d1");
        api.deployments[0].resources = RestApi::new("a", "a").method(path, verb, method).resources;
        Model::new().api(api.stage(Stage::new("s").deployment("d1")))
    };
    assert!(
        with_snapshot("/p", "GET", Method::mock())
            .validate()
            .is_ok()
    );
    assert_eq!(
        err(with_snapshot("pets", "GET", Method::mock()).validate()),
        bad("Invalid resource path specified: pets")
    );
    assert_eq!(
        err(with_snapshot("/p", "FETCH", Method::mock()).validate()).0,
        ErrorKind::BadRequest
    );
    assert_eq!(
        err(with_snapshot("/p", "GET", Method::http_proxy("http://x").timeout_ms(10)).validate()),
        bad("Timeout should be between 50 ms and 29000 ms")
    );
    let mut sib = with_snapshot("/{a}", "GET", Method::mock());
    sib.rest_apis[0].deployments[0].resources.extend(
        RestApi::new("a", "a")
            .method("/{b}", "GET", Method::mock())
            .resources,
    );
    assert_eq!(
        err(sib.validate()),
        bad(
            "A sibling ({a}) of this resource already has a variable path part -- only one is allowed"
        )
    );
    // The engine refuses the model and keeps nothing of it.
    let e = Engine::new(
        with_snapshot("pets", "GET", Method::mock()),
        Arc::new(MemoryStore::new()),
        Arc::new(FakeClock::new(0)),
    );
    assert!(e.is_err());
}

#[test]
fn model_json_round_trip_from_aws_shapes() {
    let json = serde_json::json!({
        "restApis": [{"id": "a1", "name": "x", "apiKeySource": "AUTHORIZER",
            "resources": [{"id": "r1", "path": "/{proxy+}", "resourceMethods": {"ANY": {
                "apiKeyRequired": true,
                "methodIntegration": {"type": "HTTP_PROXY", "uri": "http://127.0.0.1:9000/{proxy}"}}}}],
            "stages": [{"stageName": "prod", "methodSettings": {"*/*": {"throttlingBurstLimit": 10}}}]}],
        "apiKeys": [{"id": "k1", "value": "0123456789abcdefghij", "enabled": true, "createdDate": 1456184452}],
        "usagePlans": [{"id": "p1", "name": "n", "apiStages": [{"apiId": "a1", "stage": "prod",
            "throttle": {"/{proxy+}/GET": {"rateLimit": 1.0, "burstLimit": 1}}}],
            "throttle": {"rateLimit": 2.0, "burstLimit": 1},
            "quota": {"limit": 10, "period": "WEEK", "offset": 2}}],
        "usagePlanKeys": [{"usagePlanId": "p1", "keyId": "k1"}]
    });
    let m: Model = serde_json::from_value(json).expect("parse");
    assert!(m.validate().is_ok());
    let s = &m.rest_apis[0].stages[0].method_settings["*/*"];
    assert_eq!(
        (s.throttling_burst_limit, s.throttling_rate_limit),
        (10, 10_000.0),
        "AWS fills defaults"
    );
    assert_eq!(
        m.rest_apis[0].resources[0].resource_methods["ANY"]
            .method_integration
            .as_ref()
            .map(|i| i.timeout_in_millis),
        Some(29_000)
    );
    assert_eq!(
        m.account.throttle_settings,
        ThrottleSettings::new(10_000.0, 5_000)
    );
    let back = serde_json::to_value(&m).expect("json");
    assert_eq!(back["usagePlans"][0]["quota"]["offset"], 2);
    assert!(
        back["apiKeys"][0].get("name").is_none(),
        "unset members are left out"
    );
}
