//! Usage plans, usage-plan keys and usage: Create/Get/GetUsagePlans/Update/DeleteUsagePlan,
//! Create/Get/GetUsagePlanKeys/DeleteUsagePlanKey, GetUsage and UpdateUsage.
//!
//! UpdateUsagePlan applies its operations in order to a copy of the plan; the result is
//! validated and saved as a whole, so a request either applies every operation or none.

use std::collections::BTreeMap;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::wire::{self, ApiError, Order, PatchOp, Req, new_id, put_opt, tags_json, unescape};
use super::{Ctx, Reply};
use crate::plan::{
    ApiKey, ApiStage, ErrorKind, Model, ModelError, QuotaPeriod, QuotaSettings, ThrottleSettings,
    UsagePlan, parse_plan_method_key,
};

/// The JSON of a plan; `tags` as `{}` when empty on request.
pub fn plan_json(p: &UsagePlan, empty_tags: bool) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), p.id.clone().into());
    o.insert("name".into(), p.name.clone().into());
    put_opt(&mut o, "description", p.description.clone());
    o.insert(
        "apiStages".into(),
        Value::Array(p.api_stages.iter().map(stage_json).collect()),
    );
    if let Some(t) = &p.throttle {
        o.insert("throttle".into(), throttle_json(t));
    }
    if let Some(q) = &p.quota {
        o.insert(
            "quota".into(),
            json!({"limit": q.limit, "offset": q.offset, "period": q.period}),
        );
    }
    put_opt(&mut o, "productCode", p.product_code.clone());
    if empty_tags || !p.tags.is_empty() {
        o.insert("tags".into(), tags_json(&p.tags));
    }
    Value::Object(o)
}

fn throttle_json(t: &ThrottleSettings) -> Value {
    let mut o = serde_json::Map::new();
    put_opt(&mut o, "burstLimit", t.burst_limit);
    put_opt(&mut o, "rateLimit", t.rate_limit);
    Value::Object(o)
}

fn stage_json(s: &ApiStage) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("apiId".into(), s.api_id.clone().into());
    o.insert("stage".into(), s.stage.clone().into());
    if !s.throttle.is_empty() {
        o.insert(
            "throttle".into(),
            Value::Object(
                s.throttle
                    .iter()
                    .map(|(k, t)| (k.clone(), throttle_json(t)))
                    .collect(),
            ),
        );
    }
    Value::Object(o)
}

/// The CreateUsagePlan body. `throttle`, `quota` and the stages' throttles are read as JSON
/// first and converted by [`throttle_from`] and [`quota_from`], so a missing or mistyped member
/// is refused with a message naming it rather than with the JSON parser's text.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatePlan {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    api_stages: Vec<CreateApiStage>,
    #[serde(default)]
    throttle: Option<Value>,
    #[serde(default)]
    quota: Option<Value>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// An `apiStages` item; a blank `apiId` or `stage` is refused by the model with AWS's text.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateApiStage {
    #[serde(default)]
    api_id: String,
    #[serde(default)]
    stage: String,
    #[serde(default)]
    throttle: BTreeMap<String, Value>,
}

const QUOTA_PERIODS: &str = "must be one of DAY, WEEK, MONTH";

/// A quota period as AWS spells it (upper case), or 400 naming the value.
fn quota_period(value: &str) -> Result<QuotaPeriod, ModelError> {
    match value {
        "DAY" => Ok(QuotaPeriod::Day),
        "WEEK" => Ok(QuotaPeriod::Week),
        "MONTH" => Ok(QuotaPeriod::Month),
        _ => Err(invalid_quota_period(value)),
    }
}

fn invalid_quota_period(value: &str) -> ModelError {
    ModelError::bad_request(format!(
        "Invalid quota period specified: {value}; {QUOTA_PERIODS}"
    ))
}

/// `{"limit": int, "period": "DAY"|"WEEK"|"MONTH", "offset"?: int}`; range checks are the
/// model's (`validate_quota`).
fn quota_from(v: &Value) -> Result<QuotaSettings, ModelError> {
    let Value::Object(o) = v else {
        return Err(ModelError::bad_request(
            "Invalid quota specified: it must be an object with limit, period and offset",
        ));
    };
    let limit = match o.get("limit") {
        None | Some(Value::Null) => {
            return Err(ModelError::bad_request(
                "Invalid quota specified: quota.limit is required",
            ));
        }
        Some(l) => l.as_i64().ok_or_else(|| {
            ModelError::bad_request(
                "Invalid Usage Plan quota limit specified. It must be a non-negative integer.",
            )
        })?,
    };
    let offset = match o.get("offset") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_i64().ok_or_else(|| {
            ModelError::bad_request("Invalid quota offset specified. It must be an integer.")
        })?,
    };
    let period = match o.get("period") {
        None | Some(Value::Null) => {
            return Err(ModelError::bad_request(format!(
                "Invalid quota specified: quota.period is required and {QUOTA_PERIODS}"
            )));
        }
        Some(Value::String(p)) => quota_period(p)?,
        Some(other) => quota_period(&other.to_string())?,
    };
    Ok(QuotaSettings {
        limit,
        offset,
        period,
    })
}

/// `{"burstLimit"?: int, "rateLimit"?: number}`; range checks are the model's
/// (`validate_throttle`).
fn throttle_from(v: &Value) -> Result<ThrottleSettings, ModelError> {
    let Value::Object(o) = v else {
        return Err(ModelError::bad_request(
            "Invalid throttle specified: it must be an object with burstLimit and rateLimit",
        ));
    };
    let burst_limit = match o.get("burstLimit") {
        None | Some(Value::Null) => None,
        Some(b) => Some(b.as_i64().ok_or_else(|| {
            ModelError::bad_request(
                "Invalid throttle burstLimit specified. It must be a non-negative integer.",
            )
        })?),
    };
    let rate_limit = match o.get("rateLimit") {
        None | Some(Value::Null) => None,
        Some(r) => Some(r.as_f64().ok_or_else(|| {
            ModelError::bad_request(
                "Invalid throttle rateLimit specified. It must be a non-negative number.",
            )
        })?),
    };
    Ok(ThrottleSettings {
        burst_limit,
        rate_limit,
    })
}

/// POST /usageplans
pub fn create(ctx: &Ctx, req: &Req) -> Result<Reply, ApiError> {
    let body: CreatePlan = req.json()?;
    super::tags::check(&body.tags)?;
    let Some(name) = body.name.filter(|n| !n.is_empty()) else {
        return Err(ApiError::bad_request("Invalid usage plan name specified"));
    };
    // `null` is the member left out.
    let throttle = body
        .throttle
        .as_ref()
        .filter(|v| !v.is_null())
        .map(throttle_from)
        .transpose()?;
    let quota = body
        .quota
        .as_ref()
        .filter(|v| !v.is_null())
        .map(quota_from)
        .transpose()?;
    let api_stages = body
        .api_stages
        .into_iter()
        .map(|s| {
            let throttle = s
                .throttle
                .iter()
                .map(|(k, v)| Ok((k.clone(), throttle_from(v)?)))
                .collect::<Result<_, ModelError>>()?;
            Ok(ApiStage {
                api_id: s.api_id,
                stage: s.stage,
                throttle,
            })
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    let plan = ctx.control.update(move |m| {
        let plan = UsagePlan {
            id: new_id(6, |id| m.usage_plans.iter().any(|p| p.id == id)),
            name,
            description: body.description,
            api_stages,
            throttle,
            quota,
            product_code: None,
            tags: body.tags,
        };
        m.create_usage_plan(plan).cloned()
    })?;
    Ok(Reply::json(StatusCode::CREATED, plan_json(&plan, false)))
}

/// GET /usageplans/{id}
pub fn get(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    Ok(Reply::ok(plan_json(m.usage_plan(id)?, true)))
}

/// GET /usageplans[?keyId=]
pub fn list(ctx: &Ctx, req: &Req) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let key = req.param("keyId");
    let plans: Vec<&UsagePlan> = m
        .usage_plans
        .iter()
        .filter(|p| {
            key.is_none_or(|k| {
                m.usage_plan_keys
                    .iter()
                    .any(|u| u.usage_plan_id == p.id && u.key_id == k)
            })
        })
        .collect();
    let page = wire::page(req, plans, Order::Created, |p| p.id.as_str())?;
    Ok(Reply::ok(page.to_json(|p| plan_json(p, false))))
}

/// PATCH /usageplans/{id}
pub fn update(ctx: &Ctx, req: &Req, id: &str) -> Result<Reply, ApiError> {
    let ops = req.patch()?;
    let id = id.to_string();
    let plan = ctx.control.update(move |m| {
        let before = m.usage_plan(&id)?.clone();
        for op in &ops {
            apply_plan_op(m, &id, op)?;
        }
        let plan = m.usage_plan(&id)?.clone();
        check_new_limits(&before, &plan, &ops)?;
        m.validate_usage_plan(&plan)?;
        Ok(plan)
    })?;
    Ok(Reply::ok(plan_json(&plan, true)))
}

/// A quota or throttle that a patch creates must be complete: a new quota needs its limit and
/// period, a new throttle its rate (the burst then defaults as documented in `plan`), rather
/// than silently becoming a zero quota or a throttle without a rate.
fn check_new_limits(
    before: &UsagePlan,
    after: &UsagePlan,
    ops: &[PatchOp],
) -> Result<(), ModelError> {
    let set = |path: &str| ops.iter().any(|o| o.op != "remove" && o.path == path);
    if before.quota.is_none()
        && after.quota.is_some()
        && !(set("/quota/limit") && set("/quota/period"))
    {
        return Err(ModelError::bad_request(
            "Invalid quota specified: a plan without a quota needs /quota/limit and /quota/period in the same request",
        ));
    }
    if before.throttle.is_none() && after.throttle.is_some_and(|t| t.rate_limit.is_none()) {
        return Err(ModelError::bad_request(
            "Invalid throttle specified: a plan without a throttle needs /throttle/rateLimit in the same request",
        ));
    }
    Ok(())
}

const REMOVE_PATHS: [&str; 6] = [
    "/apiStages",
    "/quota",
    "/throttle",
    "/productCode",
    "/apiStages/<apidId:stageName>/throttle/<resourcePath>/<httpMethod>",
    "/apiStages/<apidId:stageName>/throttle",
];
/// AWS changes `/apiStages` itself with add and remove only, so it is not listed here.
const REPLACE_PATHS: [&str; 11] = [
    "/name",
    "/description",
    "/productCode",
    "/throttle/rateLimit",
    "/throttle/burstLimit",
    "/quota/limit",
    "/quota/offset",
    "/quota/period",
    "/apiStages/<apidId:stageName>/throttle/<resourcePath>/<httpMethod>/rateLimit",
    "/apiStages/<apidId:stageName>/throttle/<resourcePath>/<httpMethod>/burstLimit",
    "/apiStages/<apidId:stageName>/throttle",
];
const ADD_PATHS: [&str; 7] = [
    "/productCode",
    "/throttle/rateLimit",
    "/throttle/burstLimit",
    "/quota/limit",
    "/quota/offset",
    "/quota/period",
    "/apiStages",
];

fn plan_mut<'a>(m: &'a mut Model, id: &str) -> &'a mut UsagePlan {
    m.usage_plans
        .iter_mut()
        .find(|p| p.id == id)
        .expect("the plan was looked up before the operations")
}

fn apply_plan_op(m: &mut Model, id: &str, op: &PatchOp) -> Result<(), ModelError> {
    let path = op.path.as_str();
    if let Some(rest) = path.strip_prefix("/apiStages/") {
        return apply_stage_throttle_op(m, id, op, rest);
    }
    match (op.op.as_str(), path) {
        ("replace", "/name") => {
            let name = op.value()?.to_string();
            if name.is_empty() {
                return Err(ModelError::bad_request("Invalid usage plan name specified"));
            }
            plan_mut(m, id).name = name;
        }
        ("replace", "/description") => plan_mut(m, id).description = op.value.clone(),
        ("add" | "replace", "/productCode") => {
            plan_mut(m, id).product_code = Some(op.value()?.to_string());
        }
        ("remove", "/productCode") => plan_mut(m, id).product_code = None,
        ("add" | "replace", "/throttle/rateLimit") => {
            let rate = op.number()?;
            plan_mut(m, id)
                .throttle
                .get_or_insert_with(ThrottleSettings::default)
                .rate_limit = Some(rate);
        }
        ("add" | "replace", "/throttle/burstLimit") => {
            let burst = op.integer()?;
            plan_mut(m, id)
                .throttle
                .get_or_insert_with(ThrottleSettings::default)
                .burst_limit = Some(burst);
        }
        ("remove", "/throttle") => plan_mut(m, id).throttle = None,
        ("add" | "replace", "/quota/limit" | "/quota/offset" | "/quota/period") => {
            let value = op.value()?.to_string();
            let quota = plan_mut(m, id).quota.get_or_insert(QuotaSettings {
                limit: 0,
                offset: 0,
                period: QuotaPeriod::Day,
            });
            match path {
                "/quota/limit" => quota.limit = op.integer()?,
                "/quota/offset" => quota.offset = op.integer()?,
                // UpdateUsagePlan has always taken the period in any case.
                _ => {
                    quota.period = quota_period(&value.to_ascii_uppercase())
                        .map_err(|_| invalid_quota_period(&value))?;
                }
            }
        }
        ("remove", "/quota") => plan_mut(m, id).quota = None,
        ("add", "/apiStages") => {
            let value = op.value()?;
            let Some((api, stage)) = split_api_stage(value) else {
                return Err(ModelError::not_found(format!(
                    "API Stage not found: {value}"
                )));
            };
            m.add_api_stage(id, api, stage)?;
        }
        ("remove", "/apiStages") => {
            let invalid = || ModelError::bad_request("Invalid API Stage specified");
            let value = op.value.as_deref().ok_or_else(invalid)?;
            let (api, stage) = split_api_stage(value).ok_or_else(invalid)?;
            let plan = plan_mut(m, id);
            let before = plan.api_stages.len();
            plan.api_stages
                .retain(|s| !(s.api_id == api && s.stage == stage));
            if plan.api_stages.len() == before {
                return Err(ModelError::invalid_api_stage(
                    ErrorKind::NotFound,
                    api,
                    stage,
                    id,
                ));
            }
        }
        ("remove", _) => return Err(op.invalid(&REMOVE_PATHS)),
        ("replace", _) => return Err(op.invalid(&REPLACE_PATHS)),
        ("add", _) => return Err(op.invalid(&ADD_PATHS)),
        _ => return Err(op.invalid(&[])),
    }
    Ok(())
}

fn split_api_stage(value: &str) -> Option<(&str, &str)> {
    value
        .split_once(':')
        .filter(|(a, s)| !a.is_empty() && !s.is_empty() && !s.contains(':'))
}

/// `/apiStages/{api}:{stage}/throttle[/{resourcePath}/{METHOD}[/rateLimit|/burstLimit]]`;
/// the resource path may be written raw (`//pets/GET`) or `~1`-escaped (`/~1pets/GET`).
fn apply_stage_throttle_op(
    m: &mut Model,
    id: &str,
    op: &PatchOp,
    rest: &str,
) -> Result<(), ModelError> {
    let allowed: &[&str] = match op.op.as_str() {
        "remove" => &REMOVE_PATHS,
        "replace" => &REPLACE_PATHS,
        "add" => &ADD_PATHS,
        _ => &[],
    };
    let (api_stage, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let Some((api, stage)) = split_api_stage(api_stage) else {
        return Err(op.invalid(allowed));
    };
    let Some(tail) = tail.strip_prefix("throttle") else {
        return Err(op.invalid(allowed));
    };
    let plan = plan_mut(m, id);
    let Some(api_stage) = plan
        .api_stages
        .iter_mut()
        .find(|s| s.api_id == api && s.stage == stage)
    else {
        return Err(ModelError::invalid_api_stage(
            ErrorKind::NotFound,
            api,
            stage,
            id,
        ));
    };
    if tail.is_empty() {
        return match op.op.as_str() {
            "remove" => {
                api_stage.throttle.clear();
                Ok(())
            }
            "replace" => {
                let map: BTreeMap<String, ThrottleSettings> = serde_json::from_str(op.value()?)
                    .map_err(|e| {
                        ModelError::bad_request(format!("Invalid throttle map specified: {e}"))
                    })?;
                for key in map.keys() {
                    parse_plan_method_key(key)?;
                }
                api_stage.throttle = map;
                Ok(())
            }
            _ => Err(op.invalid(allowed)),
        };
    }
    let method_path = unescape(tail.strip_prefix('/').unwrap_or(tail));
    let method_path = if method_path.starts_with('/') {
        method_path
    } else {
        format!("/{method_path}")
    };
    match op.op.as_str() {
        "remove" => {
            parse_plan_method_key(&method_path)?;
            if api_stage.throttle.remove(&method_path).is_none() {
                return Err(ModelError::not_found(format!(
                    "Invalid method throttle specified: {method_path}"
                )));
            }
            Ok(())
        }
        "replace" | "add" => {
            let (key, field) = method_path
                .rsplit_once('/')
                .filter(|(_, f)| *f == "rateLimit" || *f == "burstLimit")
                .ok_or_else(|| op.invalid(allowed))?;
            parse_plan_method_key(key)?;
            let t = api_stage.throttle.entry(key.to_string()).or_default();
            if field == "rateLimit" {
                t.rate_limit = Some(op.number()?);
            } else {
                t.burst_limit = Some(op.integer()?);
            }
            Ok(())
        }
        _ => Err(op.invalid(allowed)),
    }
}

/// DELETE /usageplans/{id}
pub fn delete(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    let id = id.to_string();
    ctx.control
        .update(move |m| m.delete_usage_plan(&id).map(drop))?;
    Ok(Reply::accepted())
}

fn plan_key_json(k: &ApiKey) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), k.id.clone().into());
    o.insert("type".into(), "API_KEY".into());
    o.insert("value".into(), k.value.clone().into());
    put_opt(&mut o, "name", k.name.clone());
    Value::Object(o)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatePlanKey {
    #[serde(default)]
    key_id: String,
    #[serde(default)]
    key_type: String,
}

/// POST /usageplans/{id}/keys
pub fn create_key(ctx: &Ctx, req: &Req, plan_id: &str) -> Result<Reply, ApiError> {
    let body: CreatePlanKey = req.json()?;
    if body.key_type != "API_KEY" {
        return Err(ApiError::bad_request(format!(
            "Invalid key type specified: {}; the only key type is API_KEY",
            body.key_type
        )));
    }
    let plan_id = plan_id.to_string();
    let view = ctx
        .control
        .update(move |m| m.create_usage_plan_key(&plan_id, &body.key_id))?;
    Ok(Reply::json(
        StatusCode::CREATED,
        serde_json::to_value(view).expect("plain struct serialises"),
    ))
}

/// GET /usageplans/{id}/keys/{keyId}
pub fn get_key(ctx: &Ctx, plan_id: &str, key_id: &str) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    m.usage_plan(plan_id)?;
    m.api_key(key_id)?;
    if !m
        .usage_plan_keys
        .iter()
        .any(|u| u.usage_plan_id == plan_id && u.key_id == key_id)
    {
        return Err(ModelError::unknown_usage_plan().into());
    }
    Ok(Reply::ok(plan_key_json(m.api_key(key_id)?)))
}

/// GET /usageplans/{id}/keys[?name=] (an unknown plan lists nothing, as AWS does)
pub fn list_keys(ctx: &Ctx, req: &Req, plan_id: &str) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let name = req.param("name");
    let keys: Vec<&ApiKey> = m
        .usage_plan_keys
        .iter()
        .filter(|u| u.usage_plan_id == plan_id)
        .filter_map(|u| m.api_keys.iter().find(|k| k.id == u.key_id))
        .filter(|k| name.is_none_or(|n| k.name.as_deref().unwrap_or("").starts_with(n)))
        .collect();
    let page = wire::page(req, keys, Order::Created, |k| k.id.as_str())?;
    Ok(Reply::ok(page.to_json(|k| plan_key_json(k))))
}

/// DELETE /usageplans/{id}/keys/{keyId}
pub fn delete_key(ctx: &Ctx, plan_id: &str, key_id: &str) -> Result<Reply, ApiError> {
    let (plan_id, key_id) = (plan_id.to_string(), key_id.to_string());
    ctx.control
        .update(move |m| m.delete_usage_plan_key(&plan_id, &key_id))?;
    Ok(Reply::accepted())
}

/// GET /usageplans/{id}/usage?startDate=&endDate=[&keyId=]
pub fn usage(ctx: &Ctx, req: &Req, plan_id: &str) -> Result<Reply, ApiError> {
    let date = |name: &str| -> Result<time::Date, ApiError> {
        let v = req.param(name).ok_or_else(|| {
            ApiError::bad_request(format!("The {name} parameter is required (yyyy-MM-dd)"))
        })?;
        Ok(crate::engine::parse_usage_date(v)?)
    };
    let (start, end) = (date("startDate")?, date("endDate")?);
    let usage = ctx
        .control
        .engine()
        .usage(plan_id, req.param("keyId"), start, end)?;
    let keys: Vec<(String, Vec<[u64; 2]>)> = usage.items.into_iter().collect();
    let page = wire::page(req, keys, Order::Id, |(id, _)| id.as_str())?;
    let mut o = serde_json::Map::new();
    o.insert("usagePlanId".into(), usage.usage_plan_id.into());
    o.insert("startDate".into(), usage.start_date.into());
    o.insert("endDate".into(), usage.end_date.into());
    o.insert(
        "values".into(),
        Value::Object(
            page.items
                .into_iter()
                .map(|(k, days)| (k, json!(days)))
                .collect(),
        ),
    );
    put_opt(&mut o, "position", page.position);
    Ok(Reply::ok(Value::Object(o)))
}

/// PATCH /usageplans/{id}/keys/{keyId}/usage: `replace /remaining` sets the key's remaining
/// quota for the current period.
pub fn update_usage(ctx: &Ctx, req: &Req, plan_id: &str, key_id: &str) -> Result<Reply, ApiError> {
    let ops = req.patch()?;
    let engine = ctx.control.engine();
    let m = ctx.control.model();
    m.usage_plan(plan_id)?;
    m.api_key(key_id)?;
    // Every operation is checked before any is applied.
    let mut remaining = Vec::with_capacity(ops.len());
    for op in &ops {
        match (op.op.as_str(), op.path.as_str()) {
            ("replace", "/remaining") => {
                let value = u64::try_from(op.integer()?).map_err(|_| {
                    ApiError::bad_request("The remaining quota must not be negative")
                })?;
                // Period counters are 32-bit: more could not be counted down exactly.
                if value > u64::from(u32::MAX) {
                    return Err(ApiError::bad_request(format!(
                        "The remaining quota must be at most {}",
                        u32::MAX
                    )));
                }
                remaining.push(value);
            }
            ("replace", _) => return Err(op.invalid(&["/remaining"]).into()),
            _ => return Err(op.invalid(&[]).into()),
        }
    }
    for value in remaining {
        engine.set_remaining(plan_id, key_id, value)?;
    }
    let today = time::OffsetDateTime::from_unix_timestamp(ctx.control.now_secs())
        .map(|t| t.date())
        .unwrap_or(time::Date::MIN);
    let usage = engine.usage(plan_id, Some(key_id), today, today)?;
    Ok(Reply::ok(
        serde_json::to_value(usage).expect("plain struct serialises"),
    ))
}
