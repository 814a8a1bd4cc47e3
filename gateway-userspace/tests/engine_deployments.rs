//! Deployment snapshots: a stage routes on the resources of the deployment it points to, and
//! on the API's live resources when it has none. Method, integration and resource changes reach
//! a stage only when it is redeployed; stage buckets and plan per-method throttles follow the
//! methods the stage serves.

use std::sync::Arc;

use gateway::clock::FakeClock;
use gateway::engine::{Decision, Engine, ForbiddenReason, Route};
use gateway::limit::Layer;
use gateway::plan::{ApiKey, Deployment, Method, Model, RestApi, Stage, UsagePlan};
use gateway::quota::{NANOS_PER_DAY, days_from_civil};
use gateway::store::MemoryStore;

const SEC: u64 = 1_000_000_000;

fn t0() -> u64 {
    days_from_civil(2024, 5, 15) as u64 * NANOS_PER_DAY + 12 * 3600 * SEC
}

fn value(n: u32) -> String {
    format!("test-key-value-{n:0>10}")
}

/// Version 1 of the API: open `GET /pets` to `v1`, open `GET /old`.
fn v1() -> RestApi {
    RestApi::new("a1", "pets")
        .method("/pets", "GET", Method::http_proxy("http://v1/pets"))
        .method("/old", "GET", Method::mock())
}

/// Version 2 of the live resources: `/new` first (so method indices shift), `GET /pets` needs
/// a key and goes to `v2`, `/old` is gone.
fn v2(mut api: RestApi) -> RestApi {
    api.resources.clear();
    api.method("/new", "GET", Method::mock()).method(
        "/pets",
        "GET",
        Method::http_proxy("http://v2/pets").key_required(true),
    )
}

fn with_key(api: RestApi, stages: &[&str]) -> Model {
    let mut plan = UsagePlan::new("p1", "plan");
    for s in stages {
        plan = plan.stage("a1", s);
    }
    Model::new()
        .api(api)
        .plan(plan)
        .key(ApiKey::new("k1", value(1)))
        .plan_key("p1", "k1")
}

fn setup(m: Model) -> (Engine, Arc<FakeClock>) {
    let clock = Arc::new(FakeClock::new(t0()));
    let e = Engine::new(m, Arc::new(MemoryStore::new()), clock.clone()).expect("valid model");
    (e, clock)
}

fn route(e: &Engine, stage: &str, path: &str) -> Option<Route> {
    e.resolve(Some("a1"), stage, "GET", path)
}

fn uri(r: &Route) -> Option<String> {
    r.integration.as_ref().map(|i| i.uri.clone())
}

fn reason(d: Decision) -> Option<ForbiddenReason> {
    match d {
        Decision::Forbidden { reason, .. } => Some(reason),
        _ => None,
    }
}

/// Points `stage` of the API at deployment `id`.
fn point(api: &mut RestApi, stage: &str, id: &str) {
    let s = api
        .stages
        .iter_mut()
        .find(|s| s.stage_name == stage)
        .expect("stage exists");
    s.deployment_id = Some(id.to_string());
}

#[test]
fn stage_keeps_its_deployment_until_redeployed() {
    let api = v1().deploy("d1").stage(Stage::new("prod").deployment("d1"));
    let (e, _) = setup(with_key(api.clone(), &["prod"]));
    let pets = route(&e, "prod", "/pets").expect("deployed route");
    let old = route(&e, "prod", "/old").expect("deployed route");
    assert!(!pets.api_key_required);

    // Change the live resources without redeploying: the stage still serves d1.
    let live = v2(api.clone());
    e.apply(with_key(live.clone(), &["prod"])).expect("valid");
    let r = route(&e, "prod", "/pets").expect("still deployed");
    assert!(!r.api_key_required);
    assert_eq!(uri(&r).as_deref(), Some("http://v1/pets"));
    assert!(route(&e, "prod", "/old").is_some());
    assert!(route(&e, "prod", "/new").is_none());
    assert!(e.decide(&r, None).is_allowed());
    // Routes resolved before the swap still decide on the same methods.
    assert!(e.decide(&pets, None).is_allowed());
    assert!(e.decide(&old, None).is_allowed());

    // Redeploy (CreateDeployment with stageName): the stage switches to the new snapshot.
    let mut redeployed = live.deploy("d2");
    point(&mut redeployed, "prod", "d2");
    e.apply(with_key(redeployed, &["prod"])).expect("valid");
    let r = route(&e, "prod", "/pets").expect("redeployed route");
    assert!(r.api_key_required);
    assert_eq!(uri(&r).as_deref(), Some("http://v2/pets"));
    assert_eq!(
        reason(e.decide(&r, None)),
        Some(ForbiddenReason::MissingKey)
    );
    assert!(e.decide(&r, Some(&value(1))).is_allowed());
    assert!(route(&e, "prod", "/new").is_some());
    assert!(route(&e, "prod", "/old").is_none());
    // A route resolved on d1 now decides on d2's method, or is gone.
    assert_eq!(
        reason(e.decide(&pets, None)),
        Some(ForbiddenReason::MissingKey)
    );
    assert_eq!(
        reason(e.decide(&old, None)),
        Some(ForbiddenReason::RouteGone)
    );

    // UpdateStage `replace /deploymentId` back to d1 rolls back.
    let mut api = e.snapshot().rest_apis[0].clone();
    point(&mut api, "prod", "d1");
    e.apply(with_key(api, &["prod"])).expect("valid");
    let r = route(&e, "prod", "/pets").expect("rolled back");
    assert!(!r.api_key_required);
    assert_eq!(uri(&r).as_deref(), Some("http://v1/pets"));
}

#[test]
fn stages_on_different_deployments_route_differently() {
    let api = v2(v1().deploy("d1")).deploy("d2");
    let api = api
        .stage(Stage::new("prod").deployment("d1").variable("v", "p"))
        .stage(Stage::new("beta").deployment("d2"))
        .stage(Stage::new("old").deployment("d1"));
    let (e, _) = setup(with_key(api, &["prod", "beta", "old"]));

    let prod = route(&e, "prod", "/pets").expect("d1");
    let beta = route(&e, "beta", "/pets").expect("d2");
    let old = route(&e, "old", "/pets").expect("d1");
    assert_eq!(uri(&prod).as_deref(), Some("http://v1/pets"));
    assert_eq!(uri(&old).as_deref(), Some("http://v1/pets"));
    assert_eq!(uri(&beta).as_deref(), Some("http://v2/pets"));
    assert!(e.decide(&prod, None).is_allowed());
    assert!(e.decide(&old, None).is_allowed());
    assert_eq!(
        reason(e.decide(&beta, None)),
        Some(ForbiddenReason::MissingKey)
    );
    assert!(route(&e, "prod", "/old").is_some() && route(&e, "prod", "/new").is_none());
    assert!(route(&e, "beta", "/old").is_none() && route(&e, "beta", "/new").is_some());
}

#[test]
fn stage_without_a_usable_deployment_serves_live_resources() {
    let mut api = v2(v1().deploy("d1"));
    // A deployment recorded without a snapshot (a configuration written by hand).
    api.deployments.push(Deployment {
        id: "bare".into(),
        ..Deployment::default()
    });
    let api = api
        .stage(Stage::new("none"))
        .stage(Stage::new("unknown").deployment("nope"))
        .stage(Stage::new("bare").deployment("bare"))
        .stage(Stage::new("prod").deployment("d1"));
    let (e, _) = setup(with_key(api.clone(), &["none"]));
    for stage in ["none", "unknown", "bare"] {
        let r = route(&e, stage, "/pets").expect("live route");
        assert!(r.api_key_required, "{stage}");
        assert_eq!(uri(&r).as_deref(), Some("http://v2/pets"), "{stage}");
        assert!(route(&e, stage, "/new").is_some(), "{stage}");
        assert!(route(&e, stage, "/old").is_none(), "{stage}");
    }
    assert!(route(&e, "prod", "/old").is_some());

    // Live changes reach those stages at once.
    let live = api.method("/later", "GET", Method::mock());
    e.apply(with_key(live, &["none"])).expect("valid");
    assert!(route(&e, "none", "/later").is_some());
    assert!(route(&e, "prod", "/later").is_none());
}

#[test]
fn stage_buckets_survive_a_redeploy_while_the_method_exists() {
    let api = v1()
        .method("/gone", "GET", Method::mock())
        .deploy("d1")
        .stage(Stage::new("prod").deployment("d1").throttle("*/*", 1.0, 2));
    let (e, clock) = setup(with_key(api.clone(), &["prod"]));
    for path in ["/pets", "/gone"] {
        let r = route(&e, "prod", path).expect("route");
        assert!(e.decide(&r, None).is_allowed());
        assert!(e.decide(&r, None).is_allowed());
        assert!(!e.decide(&r, None).is_allowed(), "{path}: bucket empty");
    }

    // Redeploy: `/pets` GET moves to another method index, `/gone` disappears, `/new` appears.
    let mut redeployed = v2(api.clone())
        .method("/pets", "GET", Method::mock())
        .deploy("d2");
    point(&mut redeployed, "prod", "d2");
    e.apply(with_key(redeployed, &["prod"])).expect("valid");
    let pets = route(&e, "prod", "/pets").expect("route");
    match e.decide(&pets, None) {
        Decision::Throttled { layer, .. } => assert_eq!(layer, Layer::StageMethod),
        d => panic!("the stage bucket of /pets GET must carry over: {d:?}"),
    }
    let new = route(&e, "prod", "/new").expect("route");
    assert!(
        e.decide(&new, None).is_allowed(),
        "a new method starts full"
    );

    // Bring `/gone` back: its bucket was dropped with the method, so it starts full.
    let mut back = e.snapshot().rest_apis[0].clone();
    back = back.method("/gone", "GET", Method::mock()).deploy("d3");
    point(&mut back, "prod", "d3");
    e.apply(with_key(back, &["prod"])).expect("valid");
    let gone = route(&e, "prod", "/gone").expect("route");
    assert!(e.decide(&gone, None).is_allowed());
    assert!(e.decide(&gone, None).is_allowed());

    clock.advance(SEC);
    assert!(e.decide(&pets, None).is_allowed(), "refilled after 1 s");
}

#[test]
fn plan_method_throttles_match_the_methods_the_stage_serves() {
    let keyed = |uri: &str| Method::http_proxy(uri).key_required(true);
    let api = RestApi::new("a1", "pets")
        .method("/pets", "GET", keyed("http://v1/pets"))
        .deploy("d1");
    // Live: `/pets` is gone, `/cats` GET is new.
    let mut live = api.clone();
    live.resources.clear();
    let live = live
        .method("/cats", "GET", keyed("http://v2/cats"))
        .stage(Stage::new("prod").deployment("d1"))
        .stage(Stage::new("dev"));
    let plan = UsagePlan::new("p1", "plan")
        .method_throttle("a1", "prod", "/pets/GET", 1.0, 1)
        .method_throttle("a1", "dev", "/pets/GET", 1.0, 1)
        .method_throttle("a1", "dev", "/cats/GET", 1.0, 1);
    let m = Model::new()
        .api(live)
        .plan(plan)
        .key(ApiKey::new("k1", value(1)))
        .plan_key("p1", "k1");
    let (e, _) = setup(m);
    let key = value(1);

    let prod = route(&e, "prod", "/pets").expect("deployed on prod");
    assert!(route(&e, "prod", "/cats").is_none());
    assert!(e.decide(&prod, Some(&key)).is_allowed());
    match e.decide(&prod, Some(&key)) {
        Decision::Throttled { layer, .. } => assert_eq!(layer, Layer::PlanMethod),
        d => panic!("prod serves /pets GET with its plan throttle: {d:?}"),
    }

    let dev = route(&e, "dev", "/cats").expect("live on dev");
    assert!(route(&e, "dev", "/pets").is_none());
    assert!(e.decide(&dev, Some(&key)).is_allowed());
    match e.decide(&dev, Some(&key)) {
        Decision::Throttled { layer, .. } => assert_eq!(layer, Layer::PlanMethod),
        d => panic!("dev serves /cats GET with its plan throttle: {d:?}"),
    }
}

#[test]
fn deployments_round_trip_through_json_and_old_configs_load() {
    let api = v1().deploy("d1").stage(Stage::new("prod").deployment("d1"));
    let m = with_key(api, &["prod"]);
    let json = serde_json::to_value(&m).expect("serialise");
    let d = &json["restApis"][0]["deployments"][0];
    assert_eq!(d["resources"][0]["path"], "/pets");
    let back: Model = serde_json::from_value(json).expect("round trip");
    assert_eq!(back, m);

    // A deployment without a snapshot writes no `resources` and reads back the same.
    let old = serde_json::json!({
        "restApis": [{"id": "a1", "resources": [], "stages": [{"stageName": "prod", "deploymentId": "d0"}],
                      "deployments": [{"id": "d0", "createdDate": 1}]}]
    });
    let m: Model = serde_json::from_value(old).expect("old config loads");
    assert!(m.rest_apis[0].deployments[0].resources.is_empty());
    assert!(m.validate().is_ok());
    let again = serde_json::to_value(&m).expect("serialise");
    assert!(
        again["restApis"][0]["deployments"][0]
            .get("resources")
            .is_none()
    );
}
