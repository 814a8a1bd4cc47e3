//! Engine decisions: key checks, every combination of throttle layers, quotas, routing, hot
//! swap, usage and the store round trip, all on a fake clock.

use std::sync::Arc;

use gateway::clock::{Clock, FakeClock};
use gateway::engine::{Decision, Engine, ForbiddenReason, Quotas, Route};
use gateway::limit::Layer;
use gateway::plan::{ApiKey, ApiKeySource, Method, Model, QuotaPeriod, RestApi, Stage, UsagePlan};
use gateway::quota::{NANOS_PER_DAY, days_from_civil};
use gateway::store::{DayRecord, MemoryStore, PeriodCounter, StoreError, UsageDelta, UsageStore};
use time::macros::date;

const SEC: u64 = 1_000_000_000;

/// Wednesday 2024-05-15 12:00:00 UTC.
fn t0() -> u64 {
    days_from_civil(2024, 5, 15) as u64 * NANOS_PER_DAY + 12 * 3600 * SEC
}

fn value(n: u32) -> String {
    format!("test-key-value-{n:0>10}")
}

fn api() -> RestApi {
    RestApi::new("a1", "pets")
        .method("/pets", "GET", Method::mock().key_required(true))
        .method(
            "/pets/{id}",
            "GET",
            Method::http_proxy("http://up/pets/{id}").key_required(true),
        )
        .method(
            "/{proxy+}",
            "ANY",
            Method::http_proxy("http://up/{proxy}").key_required(true),
        )
        .method("/open", "GET", Method::mock())
        .stage(Stage::new("prod"))
        .stage(Stage::new("dev"))
}

fn model(plan: UsagePlan) -> Model {
    Model::new()
        .api(api())
        .plan(plan)
        .key(ApiKey::new("k1", value(1)))
        .plan_key("p1", "k1")
}

fn plan() -> UsagePlan {
    UsagePlan::new("p1", "Plan one").stage("a1", "prod")
}

fn setup(m: Model) -> (Engine, Arc<FakeClock>, Arc<MemoryStore>) {
    let clock = Arc::new(FakeClock::new(t0()));
    let store = Arc::new(MemoryStore::new());
    let e = Engine::new(m, store.clone(), clock.clone()).expect("valid model");
    (e, clock, store)
}

fn route(e: &Engine, stage: &str, method: &str, path: &str) -> Route {
    e.resolve(None, stage, method, path).expect("route exists")
}

fn pets(e: &Engine) -> Route {
    route(e, "prod", "GET", "/pets")
}

#[test]
fn key_checks_give_forbidden_with_reason() {
    let m = model(plan())
        .key(ApiKey::new("k2", value(2)).enabled(false))
        .key(ApiKey::new("k3", value(3)))
        .plan(UsagePlan::new("p2", "dev only").stage("a1", "dev"))
        .plan_key("p2", "k3");
    let (e, _, _) = setup(m);
    let r = pets(&e);
    let reason = |d: Decision| match d {
        Decision::Forbidden { reason, .. } => Some(reason),
        _ => None,
    };
    assert_eq!(
        reason(e.decide(&r, None)),
        Some(ForbiddenReason::MissingKey)
    );
    assert_eq!(
        reason(e.decide(&r, Some("no-such-key-value-000000"))),
        Some(ForbiddenReason::InvalidKey)
    );
    assert_eq!(
        reason(e.decide(&r, Some(&value(2)))),
        Some(ForbiddenReason::DisabledKey)
    );
    assert_eq!(
        reason(e.decide(&r, Some(&value(3)))),
        Some(ForbiddenReason::NoPlanForStage)
    );
    let d = e.decide(&r, Some(&value(1)));
    assert!(d.is_allowed());
    assert_eq!(d.key().map(|k| k.id.to_string()), Some("k1".to_string()));
    assert_eq!(d.plan_id().map(|p| p.to_string()), Some("p1".to_string()));
    // k3 works on dev, where its plan applies.
    assert!(
        e.decide(&route(&e, "dev", "GET", "/pets"), Some(&value(3)))
            .is_allowed()
    );
    let f = e.decide(&r, None);
    assert_eq!(
        (f.status(), f.error_type(), f.message()),
        (403, Some("ForbiddenException"), Some("Forbidden"))
    );
}

/// Builds a model where each layer in `mask` (bit order PlanMethod, Plan, StageMethod, Account)
/// has rate 1 rps and burst 4, except `binder`, which has burst 2.
fn layered(mask: u8, binder: Layer) -> Model {
    let burst = |l: Layer| if l == binder { 2 } else { 4 };
    let mut p = plan();
    if mask & 1 != 0 {
        p = p.method_throttle("a1", "prod", "/pets/GET", 1.0, burst(Layer::PlanMethod));
    }
    if mask & 2 != 0 {
        p = p.throttle(1.0, burst(Layer::Plan));
    }
    let mut m = model(p);
    if mask & 4 != 0 {
        let a = &mut m.rest_apis[0];
        a.stages[0] = Stage::new("prod").throttle("pets/GET", 1.0, burst(Layer::StageMethod));
    }
    if mask & 8 != 0 {
        m = m.account_throttle(1.0, burst(Layer::Account));
    }
    m
}

const LAYERS: [Layer; 4] = [
    Layer::PlanMethod,
    Layer::Plan,
    Layer::StageMethod,
    Layer::Account,
];

#[test]
fn every_layer_combination_binds_on_its_strictest_layer_without_leaking_tokens() {
    for mask in 1u8..16 {
        for (bi, &binder) in LAYERS.iter().enumerate() {
            if mask & (1 << bi) == 0 {
                continue;
            }
            let (e, clock, _) = setup(layered(mask, binder));
            let r = pets(&e);
            let k = Some(value(1));
            for round in 0..3 {
                for i in 0..2 {
                    let d = e.decide(&r, k.as_deref());
                    assert!(
                        d.is_allowed(),
                        "mask {mask:04b} binder {binder:?} round {round} request {i}: {d:?}"
                    );
                }
                // Many rejected requests in a row must not drain the other layers.
                for _ in 0..10 {
                    match e.decide(&r, k.as_deref()) {
                        Decision::Throttled {
                            layer,
                            retry_after_ns,
                            limits,
                            ..
                        } => {
                            assert_eq!(layer, binder, "mask {mask:04b}");
                            assert_eq!(retry_after_ns, SEC);
                            if mask & 2 != 0 && binder != Layer::Plan {
                                let t = limits.throttle.expect("plan throttle status");
                                assert_eq!(t.remaining, 2, "plan tokens untouched by rejections");
                            }
                        }
                        d => panic!(
                            "mask {mask:04b} binder {binder:?}: expected throttled, got {d:?}"
                        ),
                    }
                }
                // Refill: the binder gets 2 tokens back, the others are full (4) again.
                clock.advance(2 * SEC);
            }
        }
    }
}

#[test]
fn stage_star_default_applies_per_method_and_specific_entry_wins() {
    let mut m = model(plan());
    m.rest_apis[0].stages[0] = Stage::new("prod")
        .throttle("*/*", 1.0, 1)
        .throttle("pets/GET", 1.0, 3);
    let (e, _, _) = setup(m);
    let k = Some(value(1));
    let pets = pets(&e);
    for _ in 0..3 {
        assert!(e.decide(&pets, k.as_deref()).is_allowed());
    }
    assert!(matches!(
        e.decide(&pets, k.as_deref()),
        Decision::Throttled {
            layer: Layer::StageMethod,
            ..
        }
    ));
    // `*/*` gives /pets/{id} its own bucket of 1.
    let one = route(&e, "prod", "GET", "/pets/7");
    assert!(e.decide(&one, k.as_deref()).is_allowed());
    assert!(matches!(
        e.decide(&one, k.as_deref()),
        Decision::Throttled {
            layer: Layer::StageMethod,
            ..
        }
    ));
    // ...and the proxy method another one.
    let other = route(&e, "prod", "POST", "/x/y");
    assert!(e.decide(&other, k.as_deref()).is_allowed());
}

#[test]
fn stage_minus_one_disables_throttling() {
    let mut m = model(plan());
    m.rest_apis[0].stages[0] = Stage::new("prod").throttle("*/*", -1.0, -1);
    let (e, _, _) = setup(m);
    let r = pets(&e);
    for _ in 0..100 {
        assert!(e.decide(&r, Some(&value(1))).is_allowed());
    }
}

#[test]
fn plan_method_throttle_matches_any_methods_by_concrete_verb() {
    let p = plan().method_throttle("a1", "prod", "/{proxy+}/GET", 1.0, 1);
    let (e, _, _) = setup(model(p));
    let k = Some(value(1));
    let get = route(&e, "prod", "GET", "/a/b");
    assert!(get.matched_any);
    assert!(e.decide(&get, k.as_deref()).is_allowed());
    assert!(matches!(
        e.decide(&get, k.as_deref()),
        Decision::Throttled {
            layer: Layer::PlanMethod,
            ..
        }
    ));
    let post = route(&e, "prod", "POST", "/a/b");
    assert!(e.decide(&post, k.as_deref()).is_allowed());
}

#[test]
fn plan_throttle_is_shared_across_stages_of_the_plan() {
    let p = plan().stage("a1", "dev").throttle(1.0, 2);
    let (e, _, _) = setup(model(p));
    let k = Some(value(1));
    assert!(e.decide(&pets(&e), k.as_deref()).is_allowed());
    assert!(
        e.decide(&route(&e, "dev", "GET", "/pets"), k.as_deref())
            .is_allowed()
    );
    assert!(matches!(
        e.decide(&pets(&e), k.as_deref()),
        Decision::Throttled {
            layer: Layer::Plan,
            ..
        }
    ));
}

#[test]
fn methods_without_key_bypass_plan_limits_but_not_stage_or_account() {
    let p = plan().throttle(1.0, 5).quota(5, QuotaPeriod::Day);
    let mut m = model(p).account_throttle(1.0, 3);
    m.rest_apis[0].stages[0] = Stage::new("prod").throttle("open/GET", 1.0, 2);
    let (e, clock, _) = setup(m);
    let open = route(&e, "prod", "GET", "/open");
    assert!(!open.api_key_required);
    // A valid key on an open method does not touch the plan's throttle or quota.
    let d = e.decide(&open, Some(&value(1)));
    assert!(matches!(
        d,
        Decision::Allow {
            key: None,
            plan_id: None,
            ..
        }
    ));
    assert!(e.decide(&open, None).is_allowed());
    assert!(matches!(
        e.decide(&open, None),
        Decision::Throttled {
            layer: Layer::StageMethod,
            ..
        }
    ));
    clock.advance(10 * SEC);
    let d = e.decide(&pets(&e), Some(&value(1)));
    let Decision::Allow { limits, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(limits.quota.map(|q| q.remaining), Some(4));
    assert_eq!(limits.throttle.map(|t| t.remaining), Some(4));
    // Account (burst 3) is shared by open and keyed methods.
    clock.advance(10 * SEC);
    assert!(e.decide(&pets(&e), Some(&value(1))).is_allowed());
    assert!(e.decide(&pets(&e), Some(&value(1))).is_allowed());
    assert!(e.decide(&open, None).is_allowed());
    assert!(matches!(
        e.decide(&open, None),
        Decision::Throttled {
            layer: Layer::Account,
            ..
        }
    ));
}

#[test]
fn authorizer_key_source_refuses_the_header_key() {
    let mut m = model(plan());
    m.rest_apis[0].api_key_source = ApiKeySource::Authorizer;
    let (e, _, _) = setup(m);
    // No custom authorizer can supply usageIdentifierKey here: keyed methods fail closed.
    assert_eq!(
        e.decide(&pets(&e), Some(&value(1))),
        Decision::Forbidden {
            reason: ForbiddenReason::MissingKey,
            key: None
        }
    );
    // Methods without apiKeyRequired are unaffected.
    assert!(
        e.decide(&route(&e, "prod", "GET", "/open"), None)
            .is_allowed()
    );
}

#[test]
fn wall_clock_stepped_back_holds_traffic_one_interval_not_the_whole_step() {
    let p = plan().throttle(10.0, 5).quota(100, QuotaPeriod::Day);
    let mut m = model(p);
    m.rest_apis[0].stages[0] = Stage::new("prod").throttle("open/GET", 1.0, 2);
    let (e, clock, _) = setup(m);
    let open = route(&e, "prod", "GET", "/open");
    for _ in 0..5 {
        assert!(e.decide(&pets(&e), Some(&value(1))).is_allowed());
    }
    for _ in 0..2 {
        assert!(e.decide(&open, None).is_allowed());
    }
    // The host's clock is stepped back an hour (same UTC day).
    clock.set(t0() - 3_600 * SEC);
    let retry = |d: Decision| match d {
        Decision::Throttled {
            layer,
            retry_after_ns,
            ..
        } => (layer, retry_after_ns),
        other => panic!("{other:?}"),
    };
    // Each bucket restarts empty: the next token is one emission interval away, not an hour.
    assert_eq!(
        retry(e.decide(&pets(&e), Some(&value(1)))),
        (Layer::Plan, SEC / 10)
    );
    assert_eq!(retry(e.decide(&open, None)), (Layer::StageMethod, SEC));
    clock.advance(SEC / 10);
    let d = e.decide(&pets(&e), Some(&value(1)));
    let Decision::Allow { limits, .. } = d else {
        panic!("{d:?}")
    };
    // Same day: the quota carried on counting.
    assert_eq!(limits.quota.map(|q| q.remaining), Some(94));
    assert!(!e.decide(&pets(&e), Some(&value(1))).is_allowed());
    clock.advance(SEC);
    assert!(e.decide(&open, None).is_allowed());
    assert!(!e.decide(&open, None).is_allowed());
}

#[test]
fn quota_counts_admitted_requests_and_resets_at_utc_midnight() {
    let p = plan()
        .stage("a1", "dev")
        .throttle(1.0, 2)
        .quota(3, QuotaPeriod::Day);
    let (e, clock, _) = setup(model(p));
    let k = Some(value(1));
    let prod = pets(&e);
    let dev = route(&e, "dev", "GET", "/pets");
    let remaining = |d: Decision| d.limits().and_then(|l| l.quota).map(|q| q.remaining);
    assert_eq!(remaining(e.decide(&prod, k.as_deref())), Some(2));
    assert_eq!(remaining(e.decide(&dev, k.as_deref())), Some(1));
    // Throttled requests do not count.
    let d = e.decide(&prod, k.as_deref());
    assert!(matches!(
        d,
        Decision::Throttled {
            layer: Layer::Plan,
            ..
        }
    ));
    assert_eq!(remaining(d), Some(1));
    clock.advance(SEC);
    let d = e.decide(&dev, k.as_deref());
    let Decision::Allow { limits, .. } = d else {
        panic!("{d:?}")
    };
    let q = limits.quota.expect("quota");
    assert_eq!((q.limit, q.used, q.remaining), (3, 3, 0));
    let midnight = days_from_civil(2024, 5, 16) as u64 * NANOS_PER_DAY;
    assert_eq!(q.reset_at_ns, midnight);
    assert_eq!(q.window_secs, 86_400);
    assert_eq!(q.reset_secs, (midnight - clock.now()).div_ceil(SEC));
    clock.advance(5 * SEC);
    let d = e.decide(&prod, k.as_deref());
    match d {
        Decision::QuotaExceeded {
            reset_at_ns,
            limits,
            ..
        } => {
            assert_eq!(reset_at_ns, midnight);
            // The quota rejection took no plan token.
            assert_eq!(limits.throttle.map(|t| t.remaining), Some(2));
        }
        d => panic!("{d:?}"),
    }
    assert_eq!((d.status(), d.message()), (429, Some("Limit Exceeded")));
    assert_eq!(d.retry_after_secs(clock.now()), Some(q.reset_secs - 5));
    clock.set(midnight);
    assert_eq!(remaining(e.decide(&prod, k.as_deref())), Some(2));
}

#[test]
fn week_and_month_quotas_follow_offsets() {
    // Weeks starting Wednesday (offset 2); t0 is a Wednesday at noon.
    let p = plan().quota_with_offset(1, QuotaPeriod::Week, 2);
    let (e, clock, _) = setup(model(p));
    let k = Some(value(1));
    assert!(e.decide(&pets(&e), k.as_deref()).is_allowed());
    let d = e.decide(&pets(&e), k.as_deref());
    let Decision::QuotaExceeded { reset_at_ns, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(
        reset_at_ns,
        days_from_civil(2024, 5, 22) as u64 * NANOS_PER_DAY
    );
    clock.set(reset_at_ns - 1);
    assert!(!e.decide(&pets(&e), k.as_deref()).is_allowed());
    clock.set(reset_at_ns);
    assert!(e.decide(&pets(&e), k.as_deref()).is_allowed());

    let p = plan().quota_with_offset(1, QuotaPeriod::Month, 27);
    let (e, clock, _) = setup(model(p));
    clock.set(days_from_civil(2023, 3, 27) as u64 * NANOS_PER_DAY);
    assert!(e.decide(&pets(&e), k.as_deref()).is_allowed());
    let d = e.decide(&pets(&e), k.as_deref());
    let Decision::QuotaExceeded { reset_at_ns, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(
        reset_at_ns,
        days_from_civil(2023, 3, 28) as u64 * NANOS_PER_DAY
    );
}

#[test]
fn a_key_when_no_plan_exists_at_all_is_refused_not_a_crash() {
    // No membership anywhere: the key's record names no cell.
    let m = Model::new().api(api()).key(ApiKey::new("k1", value(1)));
    let (e, _, _) = setup(m);
    let d = e.decide(&pets(&e), Some(&value(1)));
    assert!(
        matches!(
            d,
            Decision::Forbidden {
                reason: ForbiddenReason::NoPlanForStage,
                ..
            }
        ),
        "{d:?}"
    );
}

#[test]
fn quota_resets_follow_the_calendar_day_by_day_forwards_and_back() {
    // The engine works a plan's period out once per day; walk 500 days (a leap February
    // included) forwards, then back, and check every reset against the calendar.
    for (period, offset) in [
        (QuotaPeriod::Month, 27),
        (QuotaPeriod::Week, 3),
        (QuotaPeriod::Day, 0),
    ] {
        let p = plan().quota_with_offset(1_000_000, period, offset);
        let (e, clock, _) = setup(model(p));
        let first = days_from_civil(2023, 11, 20);
        let days: Vec<i64> = (first..first + 500)
            .chain((first..first + 500).rev())
            .collect();
        for day in days {
            clock.set(day as u64 * NANOS_PER_DAY + 12 * 3600 * SEC);
            let d = e.decide(&pets(&e), Some(&value(1)));
            let q = d.limits().and_then(|l| l.quota).expect("quota status");
            let want = gateway::quota::period_bounds(day, period, offset as u32);
            assert_eq!(
                q.reset_at_ns,
                want.end_ns(),
                "{period:?} offset {offset} day {day}"
            );
        }
    }
}

#[test]
fn binding_policy_and_throttle_status_for_headers() {
    let p = plan().throttle(2.0, 5).quota(100, QuotaPeriod::Day);
    let (e, _, _) = setup(model(p));
    let d = e.decide(&pets(&e), Some(&value(1)));
    let l = *d.limits().expect("limits");
    let t = l.throttle.expect("throttle");
    assert_eq!((t.rate, t.burst, t.remaining, t.reset_secs), (2.0, 5, 4, 1));
    let b = l.binding().expect("binding");
    assert_eq!(
        (b.name, b.limit, b.remaining, b.window_secs),
        ("throttle", 5, 4, 3)
    );
    assert_eq!(
        l.quota_policy().map(|q| (q.limit, q.remaining)),
        Some((100, 99))
    );
}

#[test]
fn routing_prefers_literal_then_param_then_greedy_and_exact_then_any() {
    let (e, _, _) = setup(model(plan()));
    let r = route(&e, "prod", "get", "/pets/42");
    assert_eq!(
        (
            r.resource_path.as_str(),
            r.http_method.as_str(),
            r.matched_any
        ),
        ("/pets/{id}", "GET", false)
    );
    assert_eq!(r.path_params, vec![("id".to_string(), "42".to_string())]);
    assert_eq!(r.upstream_url().as_deref(), Some("http://up/pets/42"));
    assert_eq!(r.integration.as_ref().map(|i| i.timeout_ms), Some(29_000));
    let r = route(&e, "prod", "POST", "/pets/42");
    assert_eq!(
        (
            r.resource_path.as_str(),
            r.declared_method.as_str(),
            r.matched_any
        ),
        ("/{proxy+}", "ANY", true)
    );
    assert_eq!(r.upstream_url().as_deref(), Some("http://up/pets/42"));
    let r = route(&e, "prod", "GET", "/pets/42/toys/1");
    assert_eq!(
        r.path_params,
        vec![("proxy".to_string(), "pets/42/toys/1".to_string())]
    );
    assert_eq!(route(&e, "prod", "GET", "/pets").resource_path, "/pets");
    assert!(
        e.resolve(None, "prod", "GET", "/").is_none(),
        "no root resource"
    );
    assert!(e.resolve(None, "nope", "GET", "/pets").is_none());
    assert!(e.resolve(Some("zz"), "prod", "GET", "/pets").is_none());
    assert!(e.resolve(Some("a1"), "prod", "GET", "/pets").is_some());
    // Two APIs: the api id is needed.
    let mut m = model(plan());
    m.rest_apis
        .push(RestApi::proxy("a2", "http://b").stage(Stage::new("prod").variable("v", "x")));
    e.apply(m).expect("apply");
    assert!(e.resolve(None, "prod", "GET", "/pets").is_none());
    let r = e
        .resolve(Some("a2"), "prod", "GET", "/")
        .expect("root of a2");
    assert_eq!(r.upstream_url().as_deref(), Some("http://b/"));
}

#[test]
fn stage_variables_substituted_in_integration_uri() {
    let a = RestApi::new("a9", "vars")
        .method(
            "/{proxy+}",
            "ANY",
            Method::http_proxy("${stageVariables.up}/{proxy}").timeout_ms(1500),
        )
        .stage(Stage::new("prod").variable("up", "http://127.0.0.1:9000"));
    let (e, _, _) = setup(Model::new().api(a));
    let r = route(&e, "prod", "GET", "/x");
    assert_eq!(r.upstream_url().as_deref(), Some("http://127.0.0.1:9000/x"));
    assert_eq!(r.integration.map(|i| i.timeout_ms), Some(1500));
}

#[test]
fn hot_swap_keeps_state_of_unchanged_keys_and_applies_changes() {
    let p = plan().throttle(1.0, 3).quota(10, QuotaPeriod::Day);
    let m = model(p)
        .key(ApiKey::new("k2", value(2)))
        .plan_key("p1", "k2");
    let mut stage_throttled = m.clone();
    stage_throttled.rest_apis[0].stages[0] = Stage::new("prod").throttle("*/*", 1.0, 100);
    let (e, _, _) = setup(stage_throttled.clone());
    let r = pets(&e);
    for _ in 0..2 {
        assert!(e.decide(&r, Some(&value(1))).is_allowed());
    }
    let slot1 = e.key_slot("k1").expect("slot");
    let slot2 = e.key_slot("k2").expect("slot");

    // New snapshot: k2 removed, k3 added, quota raised.
    let mut next = stage_throttled.clone();
    next.api_keys.retain(|k| k.id != "k2");
    next.usage_plan_keys.retain(|u| u.key_id != "k2");
    next = next.key(ApiKey::new("k3", value(3))).plan_key("p1", "k3");
    next.usage_plans[0].quota = Some(gateway::plan::QuotaSettings {
        limit: 20,
        offset: 0,
        period: QuotaPeriod::Day,
    });
    e.apply(next).expect("apply");
    assert_eq!(e.generation(), 2);
    assert_eq!(e.key_slot("k1"), Some(slot1), "slot stable");
    assert_eq!(e.key_slot("k2"), None);
    assert_ne!(
        e.key_slot("k3"),
        Some(slot2),
        "freed slot quarantined for one apply"
    );

    // The old route still works (re-resolved by name) and k1's bucket and quota carried over.
    let d = e.decide(&r, Some(&value(1)));
    let Decision::Allow { limits, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(limits.throttle.map(|t| t.remaining), Some(0));
    assert_eq!(limits.quota.map(|q| (q.used, q.limit)), Some((3, 20)));
    assert!(matches!(
        e.decide(&r, Some(&value(1))),
        Decision::Throttled {
            layer: Layer::Plan,
            ..
        }
    ));
    assert!(matches!(
        e.decide(&r, Some(&value(2))),
        Decision::Forbidden {
            reason: ForbiddenReason::InvalidKey,
            ..
        }
    ));
    assert!(e.decide(&r, Some(&value(3))).is_allowed());

    // Disabling a key takes effect at once; stage buckets survive too.
    let mut off = e.snapshot().as_ref().clone();
    off.api_keys
        .iter_mut()
        .for_each(|k| k.enabled = k.id != "k3");
    e.apply(off).expect("apply");
    assert!(matches!(
        e.decide(&r, Some(&value(3))),
        Decision::Forbidden {
            reason: ForbiddenReason::DisabledKey,
            ..
        }
    ));

    // A route whose resource disappeared is refused.
    let mut gone = e.snapshot().as_ref().clone();
    gone.rest_apis[0]
        .resources
        .retain(|res| res.path != "/pets");
    e.apply(gone).expect("apply");
    assert!(matches!(
        e.decide(&r, Some(&value(1))),
        Decision::Forbidden {
            reason: ForbiddenReason::RouteGone,
            ..
        }
    ));
}

#[test]
fn invalid_swap_keeps_the_old_snapshot() {
    let (e, _, _) = setup(model(plan()));
    let mut bad = model(plan());
    bad.usage_plan_keys.push(gateway::plan::UsagePlanKey {
        usage_plan_id: "p1".into(),
        key_id: "nope".into(),
    });
    let err = e.apply(bad).expect_err("unknown key");
    assert_eq!(err.message, "Invalid API Key identifier specified");
    assert_eq!(e.generation(), 1);
    assert!(e.decide(&pets(&e), Some(&value(1))).is_allowed());
}

#[test]
fn freed_slots_are_reused_after_quarantine() {
    let (e, _, _) = setup(model(plan()).key(ApiKey::new("k2", value(2))));
    let s2 = e.key_slot("k2").expect("slot");
    let mut m = e.snapshot().as_ref().clone();
    m.api_keys.retain(|k| k.id != "k2");
    e.apply(m.clone()).expect("apply");
    e.apply(m.clone()).expect("apply");
    e.apply(m.key(ApiKey::new("k9", value(9)))).expect("apply");
    assert_eq!(e.key_slot("k9"), Some(s2));
    let slots = e.key_slots();
    assert_eq!(slots.len(), 2);
    let k1 = slots.iter().find(|s| s.key_id == "k1").expect("k1");
    assert!(k1.enabled);
    assert_eq!(k1.plans[0].plan_id, "p1");
}

#[test]
fn usage_history_update_usage_and_store_round_trip() {
    let p = plan().quota(5, QuotaPeriod::Day);
    let m = model(p)
        .key(ApiKey::new("k2", value(2)))
        .plan_key("p1", "k2");
    let (e, clock, store) = setup(m.clone());
    let r = pets(&e);
    for _ in 0..2 {
        assert!(e.decide(&r, Some(&value(1))).is_allowed());
    }
    let stats = e.flush().expect("flush");
    assert_eq!((stats.deltas, stats.requests), (1, 2));
    assert!(e.decide(&r, Some(&value(1))).is_allowed());
    clock.advance(NANOS_PER_DAY);
    assert!(e.decide(&r, Some(&value(1))).is_allowed());
    e.set_remaining("p1", "k1", 10).expect("update usage");
    let u = e
        .usage("p1", None, date!(2024 - 05 - 14), date!(2024 - 05 - 17))
        .expect("usage");
    assert_eq!(u.items["k1"], vec![[0, 5], [3, 2], [1, 10], [0, 5]]);
    assert_eq!(u.items["k2"], vec![[0, 5]; 4]);
    let one = e
        .usage(
            "p1",
            Some("k1"),
            date!(2024 - 05 - 16),
            date!(2024 - 05 - 16),
        )
        .expect("usage");
    assert_eq!(one.items.len(), 1);
    let json = serde_json::to_value(&one).expect("json");
    assert_eq!(json["values"]["k1"], serde_json::json!([[1, 10]]));
    assert_eq!(json["usagePlanId"], "p1");
    assert_eq!(json["startDate"], "2024-05-16");

    // A new engine on the same store resumes the period counter and the override.
    let e2 = Engine::new(m, store.clone(), clock.clone()).expect("engine");
    let d = e2.decide(
        &e2.resolve(None, "prod", "GET", "/pets").expect("route"),
        Some(&value(1)),
    );
    assert_eq!(
        d.limits()
            .and_then(|l| l.quota)
            .map(|q| (q.used, q.remaining)),
        Some((2, 9))
    );
    assert!(
        store
            .load_periods()
            .expect("load")
            .iter()
            .any(|p| p.allowance == Some(11))
    );

    // Errors with AWS texts.
    let err = e
        .usage("nope", None, date!(2024 - 05 - 14), date!(2024 - 05 - 17))
        .expect_err("plan");
    assert_eq!(err.to_string(), "Invalid Usage Plan ID specified");
    let err = e.set_remaining("p1", "nope", 1).expect_err("key");
    assert_eq!(err.to_string(), "Invalid API Key identifier specified");
    assert!(
        e.usage("p1", None, date!(2024 - 05 - 17), date!(2024 - 05 - 14))
            .is_err()
    );
    assert_eq!(
        gateway::engine::parse_usage_date("2016-08-01").expect("date"),
        date!(2016 - 08 - 01)
    );
    assert!(gateway::engine::parse_usage_date("2016-8-1x").is_err());
}

#[test]
fn day_rollover_without_flush_keeps_history() {
    let p = plan().quota(100, QuotaPeriod::Month);
    let (e, clock, store) = setup(model(p));
    let r = pets(&e);
    assert!(e.decide(&r, Some(&value(1))).is_allowed());
    clock.advance(NANOS_PER_DAY);
    assert!(e.decide(&r, Some(&value(1))).is_allowed());
    e.flush().expect("flush");
    let h = store
        .history("p1", Some("k1"), 0, u32::MAX)
        .expect("history");
    let days: Vec<u64> = h.iter().map(|d| d.used).collect();
    assert_eq!(days, vec![1, 1]);
    let q = e.quota_status("p1", "k1").expect("member").expect("quota");
    assert_eq!(q.used, 2);
}

#[test]
fn removed_membership_flushes_pending_usage() {
    let (e, _, store) = setup(model(plan()));
    assert!(e.decide(&pets(&e), Some(&value(1))).is_allowed());
    let mut m = e.snapshot().as_ref().clone();
    m.usage_plan_keys.clear();
    e.apply(m).expect("apply");
    e.flush().expect("flush");
    let h = store
        .history("p1", Some("k1"), 0, u32::MAX)
        .expect("history");
    assert_eq!(h.iter().map(|d| d.used).sum::<u64>(), 1);
}

/// A memory store whose UpdateUsage writes fail, as a full disk or a lost Redis would.
struct RefusingOverrides(MemoryStore);

impl UsageStore for RefusingOverrides {
    fn add(&self, batch: &[UsageDelta]) -> Result<Vec<u64>, StoreError> {
        self.0.add(batch)
    }

    fn set_allowance(&self, _: &str, _: &str, _: u32, _: u64, _: u32) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("disk full".into()))
    }

    fn load_periods(&self) -> Result<Vec<PeriodCounter>, StoreError> {
        self.0.load_periods()
    }

    fn history(
        &self,
        plan_id: &str,
        key_id: Option<&str>,
        first_day: u32,
        last_day: u32,
    ) -> Result<Vec<DayRecord>, StoreError> {
        self.0.history(plan_id, key_id, first_day, last_day)
    }
}

#[test]
fn update_usage_the_store_refused_is_not_in_force() {
    let clock = Arc::new(FakeClock::new(t0()));
    let store = Arc::new(RefusingOverrides(MemoryStore::new()));
    let e =
        Engine::new(model(plan().quota(2, QuotaPeriod::Day)), store, clock).expect("valid model");
    let r = pets(&e);
    for _ in 0..2 {
        assert!(e.decide(&r, Some(&value(1))).is_allowed());
    }
    assert!(e.set_remaining("p1", "k1", 100).is_err());
    assert!(matches!(
        e.decide(&r, Some(&value(1))),
        Decision::QuotaExceeded { .. }
    ));
}

#[test]
fn a_waived_quota_still_leaves_every_throttle_in_force() {
    let (e, clock, _) = setup(model(plan().throttle(1.0, 2).quota(1, QuotaPeriod::Day)));
    let r = pets(&e);
    assert!(e.decide(&r, Some(&value(1))).is_allowed());
    // Over quota: waived, the request is admitted while the bucket has a token...
    assert!(
        e.decide_with(&r, Some(&value(1)), Quotas::Waive)
            .is_allowed()
    );
    // ...and throttled once it has none.
    assert!(matches!(
        e.decide_with(&r, Some(&value(1)), Quotas::Waive),
        Decision::Throttled {
            layer: Layer::Plan,
            ..
        }
    ));
    clock.advance(SEC);
    assert!(matches!(
        e.decide(&r, Some(&value(1))),
        Decision::QuotaExceeded { .. }
    ));
    assert!(
        e.decide_with(&r, Some(&value(1)), Quotas::Waive)
            .is_allowed()
    );
}
