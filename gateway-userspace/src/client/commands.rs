//! The admin commands: each turns its parsed flags into admin API requests and renders the
//! answers both ways, as text for people and as JSON for scripts ([`Output`]).
//!
//! Text speaks the product's words (a plan "covers" API stages, a key "is in" a plan) and says
//! what to run next where a workflow continues. JSON is the admin API's answer to the
//! command's main request; commands that combine several requests document the object they
//! print in their `--help`. Lists are followed to their last page.

use http::Method;
use serde_json::{Map, Value, json};

use super::table::{Table, details};
use super::{AdminClient, Call, ClientError, patch_op};
use crate::cli::{
    ApiAction, ApiCreate, ApiDeploy, KeyAction, KeyCreate, PlanAction, PlanCreate, PlanSet,
    UsageExtend, UsageShow,
};

/// One admin command, as parsed.
#[derive(Debug)]
pub enum AdminCommand {
    /// `gateway api ...`
    Api(ApiAction),
    /// `gateway plan ...`
    Plan(PlanAction),
    /// `gateway key ...`
    Key(KeyAction),
    /// `gateway usage PLAN ...`
    Usage(UsageShow),
    /// `gateway usage extend ...`
    UsageExtend(UsageExtend),
}

/// What a command prints: `json` with `--json`, else `text` (ending in a newline).
#[derive(Debug)]
pub struct Output {
    /// The JSON form.
    pub json: Value,
    /// The text form.
    pub text: String,
}

impl Output {
    fn new(json: Value, text: impl Into<String>) -> Output {
        let mut text = text.into();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        Output { json, text }
    }
}

/// Runs `command` against the admin API behind `client`.
pub async fn run(client: &AdminClient, command: AdminCommand) -> Result<Output, ClientError> {
    match command {
        AdminCommand::Api(action) => api(client, action).await,
        AdminCommand::Plan(action) => plan(client, action).await,
        AdminCommand::Key(action) => key(client, action).await,
        AdminCommand::Usage(show) => usage(client, show).await,
        AdminCommand::UsageExtend(extend) => usage_extend(client, extend).await,
    }
}

// --- JSON helpers -----------------------------------------------------------------------

/// A string member the answer must have.
fn required(c: &AdminClient, v: &Value, name: &str) -> Result<String, ClientError> {
    v.get(name)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| c.bad_answer(&format!("an object without `{name}`")))
}

/// A string member, or `""`.
fn text<'a>(v: &'a Value, name: &str) -> &'a str {
    v.get(name).and_then(Value::as_str).unwrap_or("")
}

/// A string member, or `-` when absent or empty.
fn or_dash(v: &Value, name: &str) -> String {
    match text(v, name) {
        "" => "-".to_string(),
        s => s.to_string(),
    }
}

/// A JSON number as people write it: `50`, `2.5`.
fn number(v: &Value) -> String {
    match v {
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.0}"),
            (None, Some(f)) => f.to_string(),
            _ => n.to_string(),
        },
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// Epoch seconds as an RFC 3339 UTC time.
fn timestamp(v: &Value) -> String {
    let Some(secs) = v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)) else {
        return "-".to_string();
    };
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

fn items(v: Vec<Value>) -> Value {
    json!({ "item": v })
}

fn with_member(mut v: Value, name: &str, member: Value) -> Value {
    if let Value::Object(o) = &mut v {
        o.insert(name.to_string(), member);
    }
    v
}

// --- REST APIs ----------------------------------------------------------------------------

async fn api(c: &AdminClient, action: ApiAction) -> Result<Output, ClientError> {
    match action {
        ApiAction::Create(args) => api_create(c, args).await,
        ApiAction::List => api_list(c).await,
        ApiAction::Delete { id } => {
            c.send(Call::new(Method::DELETE, &["restapis", &id]))
                .await?;
            Ok(Output::new(json!({}), format!("Deleted REST API {id}.")))
        }
        ApiAction::Deploy(args) => api_deploy(c, args).await,
    }
}

fn invoke_base(data_url: &impl std::fmt::Display, api_id: &str, stage: &str) -> String {
    format!("{data_url}/restapis/{api_id}/{stage}/_user_request_/")
}

async fn api_create(c: &AdminClient, args: ApiCreate) -> Result<Output, ClientError> {
    let mut body = json!({ "name": args.name });
    if let Some(d) = &args.description {
        body["description"] = d.clone().into();
    }
    let api = c
        .send(Call::new(Method::POST, &["restapis"]).body(body))
        .await?;
    let id = required(c, &api, "id")?;
    let deployment = match build_proxy_api(c, &api, &id, &args).await {
        Ok(d) => d,
        Err(error) => {
            // A half-built API serves nothing useful; take it away so a retry starts clean.
            let undo = c.send(Call::new(Method::DELETE, &["restapis", &id])).await;
            return Err(match undo {
                Ok(_) => error,
                Err(_) => ClientError::Partial {
                    error: Box::new(error),
                    note: format!(
                        "REST API {id} is left half-built: delete it with `gateway api delete {id}`"
                    ),
                },
            });
        }
    };
    let stage = &args.stage;
    let base = invoke_base(&args.data.data_url, &id, stage);
    let upstream = upstream_base(&args);
    let data = &args.data.data_url;
    let mut text = format!(
        "Created REST API {name} (id {id}) and deployed it to stage {stage}.\n\
         Every path and method is forwarded to {upstream}/PATH.\n",
        name = args.name
    );
    if args.no_key_required {
        text.push_str(
            "Any client may call it without an API key, so no usage plan limits apply.\n",
        );
    } else {
        text.push_str(&format!(
            "Clients need an API key (header x-api-key) that is in a usage plan covering {id}:{stage}.\n"
        ));
    }
    text.push_str(&format!(
        "\nClients call it on the data plane ({data}) as any of:\n  \
         {base}PATH\n  \
         {data}/{stage}/PATH   with the header  Host: {id}.execute-api.localhost\n  \
         {data}/{stage}/PATH   while it is the only REST API\n"
    ));
    if !args.no_key_required {
        text.push_str(&format!(
            "\nNext, a usage plan for it, e.g.:\n  \
             gateway plan create --name Silver --rate 50 --burst 100 --quota 5000 --period MONTH --stage {id}:{stage}\n"
        ));
    }
    let json = json!({
        "restApi": api,
        "deployment": deployment,
        "stage": stage,
        "invokeUrl": base,
    });
    Ok(Output::new(json, text))
}

fn upstream_base(args: &ApiCreate) -> String {
    args.upstream.to_string().trim_end_matches('/').to_string()
}

/// Adds `/{proxy+}` and `/`, each `ANY` with an `HTTP_PROXY` integration to the upstream,
/// then deploys the stage; returns the deployment.
async fn build_proxy_api(
    c: &AdminClient,
    api: &Value,
    id: &str,
    args: &ApiCreate,
) -> Result<Value, ClientError> {
    let root = match api.get("rootResourceId").and_then(Value::as_str) {
        Some(r) => r.to_string(),
        None => {
            let resources = c
                .list_all(Call::get(&["restapis", id, "resources"]))
                .await?;
            resources
                .iter()
                .find(|r| text(r, "path") == "/")
                .map(|r| text(r, "id").to_string())
                .ok_or_else(|| c.bad_answer("a REST API without a root resource"))?
        }
    };
    let proxy = c
        .send(
            Call::new(Method::POST, &["restapis", id, "resources", &root])
                .body(json!({ "pathPart": "{proxy+}" })),
        )
        .await?;
    let proxy = required(c, &proxy, "id")?;
    let upstream = upstream_base(args);
    for (resource, uri) in [
        (proxy.as_str(), format!("{upstream}/{{proxy}}")),
        (root.as_str(), format!("{upstream}/")),
    ] {
        let method = ["restapis", id, "resources", resource, "methods", "ANY"];
        c.send(Call::new(Method::PUT, &method).body(json!({
            "authorizationType": "NONE",
            "apiKeyRequired": !args.no_key_required,
        })))
        .await?;
        let integration = [&method[..], &["integration"]].concat();
        c.send(Call::new(Method::PUT, &integration).body(json!({
            "type": "HTTP_PROXY",
            "httpMethod": "ANY",
            "uri": uri,
        })))
        .await?;
    }
    c.send(
        Call::new(Method::POST, &["restapis", id, "deployments"])
            .body(json!({ "stageName": args.stage })),
    )
    .await
}

async fn api_list(c: &AdminClient) -> Result<Output, ClientError> {
    let apis = c.list_all(Call::get(&["restapis"])).await?;
    let mut table = Table::new(&["ID", "NAME", "STAGES", "CREATED"]);
    for a in &apis {
        let id = text(a, "id");
        let stages = c.send(Call::get(&["restapis", id, "stages"])).await?;
        let names: Vec<&str> = stages
            .get("item")
            .and_then(Value::as_array)
            .map(|s| s.iter().map(|s| text(s, "stageName")).collect())
            .unwrap_or_default();
        table.row(vec![
            id.to_string(),
            text(a, "name").to_string(),
            if names.is_empty() {
                "-".to_string()
            } else {
                names.join(",")
            },
            a.get("createdDate").map_or("-".to_string(), timestamp),
        ]);
    }
    let text = if table.is_empty() {
        "No REST APIs. Create one with `gateway api create --name NAME --upstream URL`.".into()
    } else {
        table.render()
    };
    Ok(Output::new(items(apis), text))
}

async fn api_deploy(c: &AdminClient, args: ApiDeploy) -> Result<Output, ClientError> {
    let mut body = json!({ "stageName": args.stage });
    if let Some(d) = &args.description {
        body["description"] = d.clone().into();
    }
    let deployment = c
        .send(Call::new(Method::POST, &["restapis", &args.id, "deployments"]).body(body))
        .await?;
    let text = format!(
        "Deployed REST API {id} to stage {stage} (deployment {dep}).\nClients call it as {base}PATH",
        id = args.id,
        stage = args.stage,
        dep = text(&deployment, "id"),
        base = invoke_base(&args.data.data_url, &args.id, &args.stage),
    );
    Ok(Output::new(deployment, text))
}

// --- Usage plans --------------------------------------------------------------------------

async fn plan(c: &AdminClient, action: PlanAction) -> Result<Output, ClientError> {
    match action {
        PlanAction::Create(args) => plan_create(c, args).await,
        PlanAction::List => plan_list(c).await,
        PlanAction::Show { id } => {
            let plan = c.send(Call::get(&["usageplans", &id])).await?;
            let keys = c.list_all(Call::get(&["usageplans", &id, "keys"])).await?;
            let text = plan_details(&plan, Some(&keys));
            Ok(Output::new(with_member(plan, "keys", keys.into()), text))
        }
        PlanAction::Set(args) => plan_set(c, args).await,
        PlanAction::AddStage { plan, stage } => {
            let ops = vec![patch_op("add", "/apiStages", Some(stage.to_string()))];
            let updated = update_plan(c, &plan, ops).await?;
            let text = format!(
                "Usage plan {plan} now covers {stage}.\n{}",
                plan_details(&updated, None)
            );
            Ok(Output::new(updated, text))
        }
        PlanAction::RemoveStage { plan, stage } => {
            let ops = vec![patch_op("remove", "/apiStages", Some(stage.to_string()))];
            let updated = update_plan(c, &plan, ops).await?;
            let text = format!(
                "Usage plan {plan} no longer covers {stage}.\n{}",
                plan_details(&updated, None)
            );
            Ok(Output::new(updated, text))
        }
        PlanAction::AddKey { plan, key } => {
            let added = c
                .send(
                    Call::new(Method::POST, &["usageplans", &plan, "keys"])
                        .body(json!({ "keyId": key, "keyType": "API_KEY" })),
                )
                .await?;
            let name = match text(&added, "name") {
                "" => String::new(),
                n => format!(" ({n})"),
            };
            let text = format!(
                "API key {key}{name} is in usage plan {plan}: its requests now count against the plan's throttle and quota."
            );
            Ok(Output::new(added, text))
        }
        PlanAction::RemoveKey { plan, key } => {
            c.send(Call::new(
                Method::DELETE,
                &["usageplans", &plan, "keys", &key],
            ))
            .await?;
            Ok(Output::new(
                json!({}),
                format!("API key {key} is no longer in usage plan {plan}."),
            ))
        }
        PlanAction::Delete { id, force } => plan_delete(c, &id, force).await,
    }
}

async fn update_plan(c: &AdminClient, id: &str, ops: Vec<Value>) -> Result<Value, ClientError> {
    c.send(Call::new(Method::PATCH, &["usageplans", id]).body(json!({ "patchOperations": ops })))
        .await
}

async fn plan_create(c: &AdminClient, args: PlanCreate) -> Result<Output, ClientError> {
    let mut body = Map::new();
    body.insert("name".into(), args.name.clone().into());
    if let Some(d) = &args.description {
        body.insert("description".into(), d.clone().into());
    }
    body.insert(
        "apiStages".into(),
        args.stages
            .iter()
            .map(|s| json!({ "apiId": s.api_id, "stage": s.stage }))
            .collect(),
    );
    if let (Some(rate), Some(burst)) = (args.rate, args.burst) {
        body.insert(
            "throttle".into(),
            json!({ "rateLimit": rate, "burstLimit": burst }),
        );
    }
    if let (Some(limit), Some(period)) = (args.quota, args.period) {
        body.insert(
            "quota".into(),
            json!({
                "limit": limit,
                "period": period.as_str(),
                "offset": args.quota_offset.unwrap_or(0),
            }),
        );
    }
    let plan = c
        .send(Call::new(Method::POST, &["usageplans"]).body(Value::Object(body)))
        .await?;
    let id = text(&plan, "id");
    let mut text = format!(
        "Created usage plan {} (id {id}).\n{}",
        text(&plan, "name"),
        plan_details(&plan, None)
    );
    if args.stages.is_empty() {
        text.push_str(&format!(
            "\nIt covers no API stage yet: gateway plan add-stage {id} API_ID:STAGE\n"
        ));
    }
    text.push_str(&format!(
        "\nNext, give a customer a key in this plan:\n  \
         gateway key create --name CUSTOMER\n  \
         gateway plan add-key {id} KEY_ID\n"
    ));
    Ok(Output::new(plan, text))
}

fn throttle_text(t: Option<&Value>) -> String {
    match t {
        Some(t) if t.get("rateLimit").is_some() || t.get("burstLimit").is_some() => format!(
            "{} requests/s, bursts up to {}",
            number(t.get("rateLimit").unwrap_or(&Value::Null)),
            number(t.get("burstLimit").unwrap_or(&Value::Null)),
        ),
        _ => "none".to_string(),
    }
}

fn quota_text(q: Option<&Value>) -> String {
    let Some(q) = q else {
        return "none".to_string();
    };
    let period = text(q, "period").to_ascii_lowercase();
    let mut out = format!(
        "{} requests per {period}",
        number(q.get("limit").unwrap_or(&Value::Null))
    );
    if let Some(offset) = q.get("offset").and_then(Value::as_i64).filter(|o| *o > 0) {
        out.push_str(&format!(" (periods start {offset} days late)"));
    }
    out
}

fn stages_text(plan: &Value) -> String {
    let stages = plan
        .get("apiStages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if stages.is_empty() {
        return "none".to_string();
    }
    let mut lines = Vec::new();
    for s in &stages {
        lines.push(format!("{}:{}", text(s, "apiId"), text(s, "stage")));
        if let Some(Value::Object(methods)) = s.get("throttle") {
            for (method, t) in methods {
                lines.push(format!("  {method}: {}", throttle_text(Some(t))));
            }
        }
    }
    lines.join("\n")
}

fn plan_details(plan: &Value, keys: Option<&[Value]>) -> String {
    let mut fields = vec![("id", or_dash(plan, "id")), ("name", or_dash(plan, "name"))];
    if !text(plan, "description").is_empty() {
        fields.push(("description", or_dash(plan, "description")));
    }
    fields.push(("throttle", throttle_text(plan.get("throttle"))));
    fields.push(("quota", quota_text(plan.get("quota"))));
    fields.push(("stages", stages_text(plan)));
    if let Some(keys) = keys {
        let lines: Vec<String> = keys
            .iter()
            .map(|k| match text(k, "name") {
                "" => text(k, "id").to_string(),
                n => format!("{}  {n}", text(k, "id")),
            })
            .collect();
        fields.push((
            "keys",
            if lines.is_empty() {
                "none".to_string()
            } else {
                lines.join("\n")
            },
        ));
    }
    details(&fields)
}

async fn plan_list(c: &AdminClient) -> Result<Output, ClientError> {
    let plans = c.list_all(Call::get(&["usageplans"])).await?;
    let mut table = Table::new(&["ID", "NAME", "THROTTLE", "QUOTA", "STAGES"]);
    for p in &plans {
        let throttle = match p.get("throttle") {
            Some(t) => format!(
                "{}/s burst {}",
                number(t.get("rateLimit").unwrap_or(&Value::Null)),
                number(t.get("burstLimit").unwrap_or(&Value::Null))
            ),
            None => "-".to_string(),
        };
        let quota = match p.get("quota") {
            Some(q) => format!(
                "{}/{}",
                number(q.get("limit").unwrap_or(&Value::Null)),
                text(q, "period")
            ),
            None => "-".to_string(),
        };
        let stages: Vec<String> = p
            .get("apiStages")
            .and_then(Value::as_array)
            .map(|s| {
                s.iter()
                    .map(|s| format!("{}:{}", text(s, "apiId"), text(s, "stage")))
                    .collect()
            })
            .unwrap_or_default();
        table.row(vec![
            text(p, "id").to_string(),
            text(p, "name").to_string(),
            throttle,
            quota,
            if stages.is_empty() {
                "-".to_string()
            } else {
                stages.join(",")
            },
        ]);
    }
    let text = if table.is_empty() {
        "No usage plans. Create one with `gateway plan create --name NAME ...`.".into()
    } else {
        table.render()
    };
    Ok(Output::new(items(plans), text))
}

async fn plan_set(c: &AdminClient, args: PlanSet) -> Result<Output, ClientError> {
    // A lone quota period or offset, or half a throttle, would make the admin API invent the
    // missing half (a quota of 0 requests blocks every key), so those need an existing one.
    let needs_quota =
        args.quota.is_none() && (args.period.is_some() || args.quota_offset.is_some());
    let needs_throttle = args.rate.is_some() != args.burst.is_some();
    if needs_quota || needs_throttle {
        let current = c.send(Call::get(&["usageplans", &args.id])).await?;
        if needs_quota && current.get("quota").is_none() {
            return Err(ClientError::Refused(format!(
                "usage plan {} has no quota to change: give --quota too",
                args.id
            )));
        }
        if needs_throttle && current.get("throttle").is_none() {
            return Err(ClientError::Refused(format!(
                "usage plan {} has no throttle to change: give both --rate and --burst",
                args.id
            )));
        }
    }
    let mut ops = Vec::new();
    if let Some(name) = &args.name {
        ops.push(patch_op("replace", "/name", Some(name.clone())));
    }
    if let Some(d) = &args.description {
        ops.push(patch_op("replace", "/description", Some(d.clone())));
    }
    if let Some(rate) = args.rate {
        ops.push(patch_op(
            "replace",
            "/throttle/rateLimit",
            Some(rate.to_string()),
        ));
    }
    if let Some(burst) = args.burst {
        ops.push(patch_op(
            "replace",
            "/throttle/burstLimit",
            Some(burst.to_string()),
        ));
    }
    if let Some(limit) = args.quota {
        ops.push(patch_op("replace", "/quota/limit", Some(limit.to_string())));
    }
    if let Some(period) = args.period {
        ops.push(patch_op(
            "replace",
            "/quota/period",
            Some(period.as_str().to_string()),
        ));
    }
    if let Some(offset) = args.quota_offset {
        ops.push(patch_op(
            "replace",
            "/quota/offset",
            Some(offset.to_string()),
        ));
    }
    if args.no_throttle {
        ops.push(patch_op("remove", "/throttle", None));
    }
    if args.no_quota {
        ops.push(patch_op("remove", "/quota", None));
    }
    let updated = update_plan(c, &args.id, ops).await?;
    let text = format!(
        "Updated usage plan {}.\n{}",
        args.id,
        plan_details(&updated, None)
    );
    Ok(Output::new(updated, text))
}

async fn plan_delete(c: &AdminClient, id: &str, force: bool) -> Result<Output, ClientError> {
    let mut removed = Vec::new();
    if force {
        let plan = c.send(Call::get(&["usageplans", id])).await?;
        let ops: Vec<Value> = plan
            .get("apiStages")
            .and_then(Value::as_array)
            .map(|stages| {
                stages
                    .iter()
                    .map(|s| {
                        let stage = format!("{}:{}", text(s, "apiId"), text(s, "stage"));
                        removed.push(stage.clone());
                        patch_op("remove", "/apiStages", Some(stage))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !ops.is_empty() {
            update_plan(c, id, ops).await?;
        }
    }
    c.send(Call::new(Method::DELETE, &["usageplans", id]))
        .await?;
    let text = if removed.is_empty() {
        format!("Deleted usage plan {id}.")
    } else {
        format!(
            "Deleted usage plan {id} after removing its stages {}.",
            removed.join(", ")
        )
    };
    Ok(Output::new(json!({}), text))
}

// --- API keys -----------------------------------------------------------------------------

async fn key(c: &AdminClient, action: KeyAction) -> Result<Output, ClientError> {
    match action {
        KeyAction::Create(args) => key_create(c, args).await,
        KeyAction::List {
            name_prefix,
            customer_id,
            show_values,
        } => key_list(c, name_prefix, customer_id, show_values).await,
        KeyAction::Show { id, show_value } => key_show(c, &id, show_value).await,
        KeyAction::Enable { id } => key_enable(c, &id, true).await,
        KeyAction::Disable { id } => key_enable(c, &id, false).await,
        KeyAction::Delete { id } => {
            c.send(Call::new(Method::DELETE, &["apikeys", &id])).await?;
            Ok(Output::new(
                json!({}),
                format!("Deleted API key {id}; it is in no usage plan any more."),
            ))
        }
    }
}

async fn key_create(c: &AdminClient, args: KeyCreate) -> Result<Output, ClientError> {
    // The admin API (like AWS) creates keys disabled unless told otherwise; a key made for a
    // customer is meant to work, so `enabled` is always sent.
    let mut body = json!({ "name": args.name, "enabled": !args.disabled });
    if let Some(v) = &args.value {
        body["value"] = v.clone().into();
    }
    if let Some(cid) = &args.customer_id {
        body["customerId"] = cid.clone().into();
    }
    if let Some(d) = &args.description {
        body["description"] = d.clone().into();
    }
    let key = c
        .send(Call::new(Method::POST, &["apikeys"]).body(body))
        .await?;
    let id = text(&key, "id");
    let state = if key.get("enabled").and_then(Value::as_bool) == Some(true) {
        "enabled"
    } else {
        "disabled (gateway key enable to let it call)"
    };
    let text = format!(
        "Created API key {name} (id {id}), {state}.\n\
         {value_line}\n\
         Clients send the value in the x-api-key header. It is accepted once the key is in a usage plan:\n  \
         gateway plan add-key PLAN_ID {id}\n",
        name = text(&key, "name"),
        value_line = details(&[("value", or_dash(&key, "value"))]).trim_end(),
    );
    Ok(Output::new(key, text))
}

async fn key_list(
    c: &AdminClient,
    name_prefix: Option<String>,
    customer_id: Option<String>,
    show_values: bool,
) -> Result<Output, ClientError> {
    let mut call = Call::get(&["apikeys"])
        .query_opt("name", name_prefix)
        .query_opt("customerId", customer_id);
    if show_values {
        call = call.query("includeValues", "true");
    }
    let keys = c.list_all(call).await?;
    let mut headers = vec!["ID", "NAME", "ENABLED", "CUSTOMER", "CREATED"];
    if show_values {
        headers.push("VALUE");
    }
    let mut table = Table::new(&headers);
    for k in &keys {
        let mut row = vec![
            text(k, "id").to_string(),
            or_dash(k, "name"),
            enabled_text(k).to_string(),
            or_dash(k, "customerId"),
            k.get("createdDate").map_or("-".to_string(), timestamp),
        ];
        if show_values {
            row.push(or_dash(k, "value"));
        }
        table.row(row);
    }
    let text = if table.is_empty() {
        "No API keys. Create one with `gateway key create --name NAME`.".into()
    } else {
        table.render()
    };
    Ok(Output::new(items(keys), text))
}

fn enabled_text(k: &Value) -> &'static str {
    if k.get("enabled").and_then(Value::as_bool) == Some(true) {
        "yes"
    } else {
        "no"
    }
}

async fn key_show(c: &AdminClient, id: &str, show_value: bool) -> Result<Output, ClientError> {
    let mut call = Call::get(&["apikeys", id]);
    if show_value {
        call = call.query("includeValue", "true");
    }
    let key = c.send(call).await?;
    let plans = c
        .list_all(Call::get(&["usageplans"]).query("keyId", id))
        .await?;
    let plan_lines: Vec<String> = plans
        .iter()
        .map(|p| format!("{}  {}", text(p, "id"), text(p, "name")))
        .collect();
    let mut fields = vec![
        ("id", or_dash(&key, "id")),
        ("name", or_dash(&key, "name")),
        ("enabled", enabled_text(&key).to_string()),
        (
            "value",
            if show_value {
                or_dash(&key, "value")
            } else {
                "(hidden; --show-value shows it)".to_string()
            },
        ),
        ("customer", or_dash(&key, "customerId")),
    ];
    if !text(&key, "description").is_empty() {
        fields.push(("description", or_dash(&key, "description")));
    }
    fields.push((
        "created",
        key.get("createdDate").map_or("-".to_string(), timestamp),
    ));
    fields.push((
        "updated",
        key.get("lastUpdatedDate")
            .map_or("-".to_string(), timestamp),
    ));
    fields.push((
        "plans",
        if plan_lines.is_empty() {
            "none (gateway plan add-key PLAN_ID KEY_ID)".to_string()
        } else {
            plan_lines.join("\n")
        },
    ));
    let ids: Vec<Value> = plans.iter().map(|p| text(p, "id").into()).collect();
    Ok(Output::new(
        with_member(key, "usagePlanIds", ids.into()),
        details(&fields),
    ))
}

async fn key_enable(c: &AdminClient, id: &str, enabled: bool) -> Result<Output, ClientError> {
    let key = c
        .send(Call::new(Method::PATCH, &["apikeys", id]).body(json!({
            "patchOperations": [patch_op("replace", "/enabled", Some(enabled.to_string()))]
        })))
        .await?;
    let name = match text(&key, "name") {
        "" => String::new(),
        n => format!(" ({n})"),
    };
    let text = if enabled {
        format!("API key {id}{name} is enabled.")
    } else {
        format!("API key {id}{name} is disabled: its requests get 403 Forbidden.")
    };
    Ok(Output::new(key, text))
}

// --- Usage --------------------------------------------------------------------------------

fn day(d: time::Date) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    d.format(&format).expect("a calendar date formats")
}

async fn usage(c: &AdminClient, show: UsageShow) -> Result<Output, ClientError> {
    let (from, to) = (day(show.from), day(show.to));
    let call = Call::get(&["usageplans", &show.plan, "usage"])
        .query("startDate", from.clone())
        .query("endDate", to.clone())
        .query_opt("keyId", show.key.clone());
    // GetUsage pages over keys; merge the pages' `values`.
    let mut values = Map::new();
    let mut position: Option<String> = None;
    let mut answer;
    loop {
        answer = c
            .send(
                call.clone()
                    .query("limit", super::PAGE_LIMIT.to_string())
                    .query_opt("position", position.clone()),
            )
            .await?;
        if let Some(Value::Object(page)) = answer.get("values") {
            values.extend(page.clone());
        }
        match answer.get("position").and_then(Value::as_str) {
            Some(p) if position.as_deref() != Some(p) => position = Some(p.to_string()),
            Some(_) => return Err(c.bad_answer("the same `position` twice")),
            None => break,
        }
    }
    let names: Vec<(String, String)> = c
        .list_all(Call::get(&["usageplans", &show.plan, "keys"]))
        .await?
        .iter()
        .map(|k| (text(k, "id").to_string(), text(k, "name").to_string()))
        .collect();
    let mut table = Table::new(&["KEY", "NAME", "DAY", "USED", "REMAINING"]);
    for (key_id, days) in &values {
        let name = names
            .iter()
            .find(|(id, _)| id == key_id)
            .map_or("-", |(_, n)| if n.is_empty() { "-" } else { n.as_str() });
        let days = days.as_array().cloned().unwrap_or_default();
        for (i, pair) in days.iter().enumerate() {
            let date = show
                .from
                .checked_add(time::Duration::days(i as i64))
                .map_or_else(|| "?".to_string(), day);
            table.row(vec![
                key_id.clone(),
                name.to_string(),
                date,
                number(pair.get(0).unwrap_or(&Value::Null)),
                number(pair.get(1).unwrap_or(&Value::Null)),
            ]);
        }
    }
    let range = if from == to {
        from.clone()
    } else {
        format!("{from} to {to}")
    };
    let text = if table.is_empty() {
        format!(
            "No usage to show for usage plan {} on {range}: it has no keys{}.",
            show.plan,
            if show.key.is_some() {
                " matching --key"
            } else {
                ""
            }
        )
    } else {
        table.render()
    };
    let mut json = Map::new();
    json.insert(
        "usagePlanId".into(),
        text_or(&answer, "usagePlanId", &show.plan),
    );
    json.insert("startDate".into(), text_or(&answer, "startDate", &from));
    json.insert("endDate".into(), text_or(&answer, "endDate", &to));
    json.insert("values".into(), Value::Object(values));
    Ok(Output::new(Value::Object(json), text))
}

fn text_or(v: &Value, name: &str, default: &str) -> Value {
    match text(v, name) {
        "" => default.into(),
        s => s.into(),
    }
}

async fn usage_extend(c: &AdminClient, args: UsageExtend) -> Result<Output, ClientError> {
    let answer = c
        .send(
            Call::new(Method::PATCH, &["usageplans", &args.plan, "keys", &args.key, "usage"])
                .body(json!({
                    "patchOperations": [patch_op("replace", "/remaining", Some(args.remaining.to_string()))]
                })),
        )
        .await?;
    // What the gateway now counts down from, as it answered (today's `[used, remaining]`).
    let left = answer["values"][args.key.as_str()][0][1]
        .as_u64()
        .unwrap_or(args.remaining);
    let text = format!(
        "API key {key} has {left} requests left in usage plan {plan} until its quota period ends; the next period starts from the plan's quota again.",
        key = args.key,
        plan = args.plan,
    );
    Ok(Output::new(answer, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(number(&json!(50.0)), "50");
        assert_eq!(number(&json!(2.5)), "2.5");
        assert_eq!(number(&json!(100)), "100");
        assert_eq!(number(&Value::Null), "-");
        assert_eq!(timestamp(&json!(0)), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn plan_details_say_what_the_tier_grants() {
        let plan = json!({
            "id": "n371pt", "name": "Silver",
            "apiStages": [{"apiId": "a1", "stage": "prod",
                           "throttle": {"/pets/GET": {"rateLimit": 5.0, "burstLimit": 10}}}],
            "throttle": {"rateLimit": 50.0, "burstLimit": 100},
            "quota": {"limit": 5000, "offset": 0, "period": "MONTH"},
        });
        let keys = [json!({"id": "k1", "name": "acme", "type": "API_KEY"})];
        assert_eq!(
            plan_details(&plan, Some(&keys)),
            "id        n371pt\n\
             name      Silver\n\
             throttle  50 requests/s, bursts up to 100\n\
             quota     5000 requests per month\n\
             stages    a1:prod\n\
             \x20           /pets/GET: 5 requests/s, bursts up to 10\n\
             keys      k1  acme\n"
        );
    }
}
