//! What plans apply to: REST APIs, resources, methods, integrations, deployments, stages and
//! the account throttle.
//!
//! Deployments work as on AWS: CreateDeployment stores a snapshot of the API's resources,
//! methods and integrations and points the stage (created when missing) at it; CreateStage and
//! UpdateStage `replace /deploymentId` point a stage at an existing snapshot. A stage serves the
//! snapshot of its deployment, so resource, method and integration changes reach it only when it
//! is redeployed, while GetResources, GetMethod and GetIntegration show the live (undeployed)
//! definitions. Stage settings (method throttles, variables) take effect at once, as on AWS.
//!
//! Choices where this gateway differs from AWS (documented in README):
//! - Only `HTTP_PROXY`, `HTTP` (forwarded like `HTTP_PROXY`) and `MOCK` integrations exist.
//! - Stage method settings keep throttling only. UpdateStage accepts AWS's other method settings
//!   (metrics, logging, caching) and the stage's `/tracingEnabled`, `/cacheClusterEnabled` and
//!   `/cacheClusterSize`, checks their values as AWS does and does not keep them: the gateway
//!   has no CloudWatch metrics, execution logs, X-Ray or cache, and the model (`plan::Stage`,
//!   `plan::MethodSetting`) has no field for them. Reads show AWS's defaults for them.

use std::collections::BTreeMap;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::wire::{self, ApiError, Order, PatchOp, Req, new_id, put_opt, tags_json};
use super::{Ctx, Reply};
use crate::plan::{
    ApiKeySource, Deployment, HTTP_METHODS, Integration, IntegrationType, Method, MethodSetting,
    Model, ModelError, Resource, RestApi, Stage, ThrottleSettings,
};

fn unknown_api() -> ModelError {
    ModelError::not_found("Invalid API identifier specified")
}

fn unknown_resource() -> ModelError {
    ModelError::not_found("Invalid Resource identifier specified")
}

fn unknown_method() -> ModelError {
    ModelError::not_found("Invalid Method identifier specified")
}

fn unknown_stage() -> ModelError {
    ModelError::not_found("Invalid Stage identifier specified")
}

fn unknown_deployment() -> ModelError {
    ModelError::not_found("Invalid Deployment identifier specified")
}

fn api<'a>(m: &'a Model, id: &str) -> Result<&'a RestApi, ModelError> {
    m.rest_apis
        .iter()
        .find(|a| a.id == id)
        .ok_or_else(unknown_api)
}

fn api_mut<'a>(m: &'a mut Model, id: &str) -> Result<&'a mut RestApi, ModelError> {
    m.rest_apis
        .iter_mut()
        .find(|a| a.id == id)
        .ok_or_else(unknown_api)
}

fn key_source(s: &str) -> Result<ApiKeySource, ModelError> {
    match s {
        "HEADER" => Ok(ApiKeySource::Header),
        "AUTHORIZER" => Ok(ApiKeySource::Authorizer),
        _ => Err(ModelError::bad_request(format!(
            "Invalid API Key source specified: {s}; must be one of HEADER, AUTHORIZER"
        ))),
    }
}

fn root_id(a: &RestApi) -> Option<&str> {
    a.resources
        .iter()
        .find(|r| r.path == "/")
        .map(|r| r.id.as_str())
}

/// The JSON of a REST API.
fn api_json(a: &RestApi) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), a.id.clone().into());
    o.insert("name".into(), a.name.clone().into());
    put_opt(&mut o, "description", a.description.clone());
    put_opt(&mut o, "createdDate", a.created_date);
    o.insert("apiKeySource".into(), json!(a.api_key_source));
    o.insert(
        "endpointConfiguration".into(),
        json!({"types": ["REGIONAL"]}),
    );
    o.insert("disableExecuteApiEndpoint".into(), false.into());
    put_opt(&mut o, "rootResourceId", root_id(a).map(str::to_string));
    if !a.tags.is_empty() {
        o.insert("tags".into(), tags_json(&a.tags));
    }
    Value::Object(o)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateApi {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    api_key_source: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// POST /restapis
pub fn create_api(ctx: &Ctx, req: &Req) -> Result<Reply, ApiError> {
    let body: CreateApi = req.json()?;
    if body.name.is_empty() {
        return Err(ApiError::bad_request("Invalid REST API name specified"));
    }
    super::tags::check(&body.tags)?;
    let source = match &body.api_key_source {
        Some(s) => key_source(s)?,
        None => ApiKeySource::Header,
    };
    let now = ctx.control.now_secs();
    let api = ctx.control.update(move |m| {
        let id = new_id(10, |id| m.rest_apis.iter().any(|a| a.id == id));
        let root = new_id(10, |id| resource_id_taken(m, id));
        let api = RestApi {
            id,
            name: body.name,
            description: body.description,
            api_key_source: source,
            resources: vec![Resource {
                id: root,
                path: "/".into(),
                resource_methods: BTreeMap::new(),
            }],
            created_date: Some(now),
            tags: body.tags,
            ..RestApi::default()
        };
        m.rest_apis.push(api.clone());
        Ok(api)
    })?;
    Ok(Reply::json(StatusCode::CREATED, api_json(&api)))
}

fn resource_id_taken(m: &Model, id: &str) -> bool {
    m.rest_apis
        .iter()
        .any(|a| a.resources.iter().any(|r| r.id == id))
}

/// GET /restapis/{id}
pub fn get_api(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    Ok(Reply::ok(api_json(api(&ctx.control.model(), id)?)))
}

/// GET /restapis
pub fn list_apis(ctx: &Ctx, req: &Req) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let page = wire::page(req, m.rest_apis.iter().collect(), Order::Created, |a| {
        a.id.as_str()
    })?;
    Ok(Reply::ok(page.to_json(|a| api_json(a))))
}

/// PATCH /restapis/{id}: `replace` `/name`, `/description`, `/apiKeySource`.
pub fn update_api(ctx: &Ctx, req: &Req, id: &str) -> Result<Reply, ApiError> {
    const PATHS: [&str; 3] = ["/name", "/description", "/apiKeySource"];
    let ops = req.patch()?;
    let id = id.to_string();
    let api = ctx.control.update(move |m| {
        let a = api_mut(m, &id)?;
        for op in &ops {
            match (op.op.as_str(), op.path.as_str()) {
                ("replace", "/name") => a.name = op.value()?.to_string(),
                ("replace", "/description") => a.description = op.value.clone(),
                ("replace", "/apiKeySource") => a.api_key_source = key_source(op.value()?)?,
                _ => return Err(op.invalid(&PATHS)),
            }
        }
        Ok(a.clone())
    })?;
    Ok(Reply::ok(api_json(&api)))
}

/// DELETE /restapis/{id}: refused while a usage plan still names one of its stages.
pub fn delete_api(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    let id = id.to_string();
    ctx.control.update(move |m| {
        api(m, &id)?;
        if let Some(p) = m
            .usage_plans
            .iter()
            .find(|p| p.api_stages.iter().any(|s| s.api_id == id))
        {
            return Err(ModelError::bad_request(format!(
                "Cannot delete REST API {id} because usage plan {} still references its stages; remove them from the plan first",
                p.id
            )));
        }
        m.rest_apis.retain(|a| a.id != id);
        m.api_keys
            .iter_mut()
            .for_each(|k| k.stage_keys.retain(|s| !s.starts_with(&format!("{id}/"))));
        Ok(())
    })?;
    Ok(Reply::accepted())
}

fn parent_of<'a>(a: &'a RestApi, r: &Resource) -> Option<&'a Resource> {
    if r.path == "/" {
        return None;
    }
    let parent = match r.path.rsplit_once('/') {
        Some(("", _)) => "/",
        Some((p, _)) => p,
        None => return None,
    };
    a.resources.iter().find(|x| x.path == parent)
}

fn method_json(resource: &Resource, verb: &str, method: &Method) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("httpMethod".into(), verb.into());
    o.insert(
        "authorizationType".into(),
        method
            .authorization_type
            .clone()
            .unwrap_or_else(|| "NONE".into())
            .into(),
    );
    o.insert("apiKeyRequired".into(), method.api_key_required.into());
    if let Some(i) = &method.method_integration {
        o.insert("methodIntegration".into(), integration_json(resource, i));
    }
    Value::Object(o)
}

fn integration_json(resource: &Resource, i: &Integration) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("type".into(), json!(i.integration_type));
    put_opt(&mut o, "httpMethod", i.http_method.clone());
    if !i.uri.is_empty() {
        o.insert("uri".into(), i.uri.clone().into());
    }
    o.insert("passthroughBehavior".into(), "WHEN_NO_MATCH".into());
    o.insert("timeoutInMillis".into(), i.timeout_in_millis.into());
    o.insert("cacheNamespace".into(), resource.id.clone().into());
    o.insert("cacheKeyParameters".into(), json!([]));
    Value::Object(o)
}

fn resource_json(a: &RestApi, r: &Resource, embed_methods: bool) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), r.id.clone().into());
    if let Some(p) = parent_of(a, r) {
        o.insert("parentId".into(), p.id.clone().into());
        o.insert(
            "pathPart".into(),
            r.path.rsplit('/').next().unwrap_or("").into(),
        );
    }
    o.insert("path".into(), r.path.clone().into());
    if !r.resource_methods.is_empty() {
        o.insert(
            "resourceMethods".into(),
            Value::Object(
                r.resource_methods
                    .iter()
                    .map(|(verb, m)| {
                        let v = if embed_methods {
                            method_json(r, verb, m)
                        } else {
                            json!({})
                        };
                        (verb.clone(), v)
                    })
                    .collect(),
            ),
        );
    }
    Value::Object(o)
}

/// GET /restapis/{id}/resources[?embed=methods]
pub fn list_resources(ctx: &Ctx, req: &Req, api_id: &str) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let a = api(&m, api_id)?;
    let embed = req
        .query
        .iter()
        .any(|(k, v)| k == "embed" && v == "methods");
    let page = wire::page(req, a.resources.iter().collect(), Order::Created, |r| {
        r.id.as_str()
    })?;
    Ok(Reply::ok(page.to_json(|r| resource_json(a, r, embed))))
}

fn resource<'a>(a: &'a RestApi, id: &str) -> Result<&'a Resource, ModelError> {
    a.resources
        .iter()
        .find(|r| r.id == id)
        .ok_or_else(unknown_resource)
}

/// GET /restapis/{id}/resources/{rid}
pub fn get_resource(ctx: &Ctx, api_id: &str, rid: &str) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let a = api(&m, api_id)?;
    Ok(Reply::ok(resource_json(a, resource(a, rid)?, true)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateResource {
    #[serde(default)]
    path_part: String,
}

/// POST /restapis/{id}/resources/{parentId}
pub fn create_resource(
    ctx: &Ctx,
    req: &Req,
    api_id: &str,
    parent: &str,
) -> Result<Reply, ApiError> {
    let body: CreateResource = req.json()?;
    let part = body.path_part;
    if part.is_empty() || part.contains('/') {
        return Err(ApiError::bad_request(format!(
            "Resource's path part only allow a-zA-Z0-9._- and curly braces at the beginning and the end and an optional plus sign before the closing brace: '{part}'"
        )));
    }
    let (api_id, parent) = (api_id.to_string(), parent.to_string());
    let (a, r) = ctx.control.update(move |m| {
        let rid = new_id(10, |id| resource_id_taken(m, id));
        let a = api_mut(m, &api_id)?;
        let parent_path = resource(a, &parent)?.path.clone();
        let path = if parent_path == "/" {
            format!("/{part}")
        } else {
            format!("{parent_path}/{part}")
        };
        if a.resources.iter().any(|r| r.path == path) {
            return Err(ModelError::conflict(format!(
                "Another resource with the same parent already has this name: {part}"
            )));
        }
        let r = Resource {
            id: rid,
            path,
            resource_methods: BTreeMap::new(),
        };
        a.resources.push(r.clone());
        Ok((a.clone(), r))
    })?;
    Ok(Reply::json(
        StatusCode::CREATED,
        resource_json(&a, &r, false),
    ))
}

/// DELETE /restapis/{id}/resources/{rid}: removes the resource and everything below it.
pub fn delete_resource(ctx: &Ctx, api_id: &str, rid: &str) -> Result<Reply, ApiError> {
    let (api_id, rid) = (api_id.to_string(), rid.to_string());
    ctx.control.update(move |m| {
        let a = api_mut(m, &api_id)?;
        let path = resource(a, &rid)?.path.clone();
        if path == "/" {
            return Err(ModelError::bad_request("Cannot delete the root resource"));
        }
        let below = format!("{path}/");
        a.resources
            .retain(|r| r.path != path && !r.path.starts_with(&below));
        Ok(())
    })?;
    Ok(Reply::accepted())
}

fn verb(v: &str) -> Result<String, ModelError> {
    let upper = v.to_ascii_uppercase();
    if HTTP_METHODS.contains(&upper.as_str()) {
        Ok(upper)
    } else {
        Err(ModelError::bad_request(format!(
            "Invalid HttpMethod specified. Valid options are {}",
            HTTP_METHODS.join(",")
        )))
    }
}

fn resource_mut<'a>(
    m: &'a mut Model,
    api_id: &str,
    rid: &str,
) -> Result<&'a mut Resource, ModelError> {
    api_mut(m, api_id)?
        .resources
        .iter_mut()
        .find(|r| r.id == rid)
        .ok_or_else(unknown_resource)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PutMethod {
    #[serde(default)]
    authorization_type: Option<String>,
    #[serde(default)]
    api_key_required: bool,
}

/// PUT /restapis/{id}/resources/{rid}/methods/{verb}
pub fn put_method(
    ctx: &Ctx,
    req: &Req,
    api_id: &str,
    rid: &str,
    http_method: &str,
) -> Result<Reply, ApiError> {
    let body: PutMethod = req.json()?;
    let verb = verb(http_method)?;
    let (api_id, rid) = (api_id.to_string(), rid.to_string());
    let (r, method) = ctx.control.update(move |m| {
        let r = resource_mut(m, &api_id, &rid)?;
        if r.resource_methods.contains_key(&verb) {
            return Err(ModelError::conflict(
                "Method already exists for this resource",
            ));
        }
        let method = Method {
            api_key_required: body.api_key_required,
            authorization_type: Some(body.authorization_type.unwrap_or_else(|| "NONE".into())),
            method_integration: None,
        };
        r.resource_methods.insert(verb.clone(), method.clone());
        Ok((r.clone(), (verb, method)))
    })?;
    Ok(Reply::json(
        StatusCode::CREATED,
        method_json(&r, &method.0, &method.1),
    ))
}

fn method_of<'a>(r: &'a Resource, verb: &str) -> Result<&'a Method, ModelError> {
    r.resource_methods.get(verb).ok_or_else(unknown_method)
}

/// GET /restapis/{id}/resources/{rid}/methods/{verb}
pub fn get_method(
    ctx: &Ctx,
    api_id: &str,
    rid: &str,
    http_method: &str,
) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let r = resource(api(&m, api_id)?, rid)?;
    let verb = verb(http_method)?;
    Ok(Reply::ok(method_json(r, &verb, method_of(r, &verb)?)))
}

/// PATCH /restapis/{id}/resources/{rid}/methods/{verb}: `replace /apiKeyRequired` and
/// `/authorizationType`.
pub fn update_method(
    ctx: &Ctx,
    req: &Req,
    api_id: &str,
    rid: &str,
    http_method: &str,
) -> Result<Reply, ApiError> {
    const PATHS: [&str; 2] = ["/apiKeyRequired", "/authorizationType"];
    let ops = req.patch()?;
    let verb = verb(http_method)?;
    let (api_id, rid) = (api_id.to_string(), rid.to_string());
    let (r, method) = ctx.control.update(move |m| {
        let r = resource_mut(m, &api_id, &rid)?;
        let method = r
            .resource_methods
            .get_mut(&verb)
            .ok_or_else(unknown_method)?;
        for op in &ops {
            match (op.op.as_str(), op.path.as_str()) {
                ("replace", "/apiKeyRequired") => method.api_key_required = op.boolean()?,
                ("replace", "/authorizationType") => {
                    method.authorization_type = Some(op.value()?.to_string());
                }
                _ => return Err(op.invalid(&PATHS)),
            }
        }
        let method = method.clone();
        Ok((r.clone(), (verb, method)))
    })?;
    Ok(Reply::ok(method_json(&r, &method.0, &method.1)))
}

/// DELETE /restapis/{id}/resources/{rid}/methods/{verb}
pub fn delete_method(
    ctx: &Ctx,
    api_id: &str,
    rid: &str,
    http_method: &str,
) -> Result<Reply, ApiError> {
    let verb = verb(http_method)?;
    let (api_id, rid) = (api_id.to_string(), rid.to_string());
    ctx.control.update(move |m| {
        let r = resource_mut(m, &api_id, &rid)?;
        r.resource_methods
            .remove(&verb)
            .ok_or_else(unknown_method)?;
        Ok(())
    })?;
    Ok(Reply::accepted())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PutIntegration {
    #[serde(rename = "type", default)]
    integration_type: String,
    #[serde(default)]
    http_method: Option<String>,
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    timeout_in_millis: Option<u32>,
}

fn integration_type(s: &str) -> Result<IntegrationType, ModelError> {
    match s {
        "HTTP_PROXY" => Ok(IntegrationType::HttpProxy),
        "HTTP" => Ok(IntegrationType::Http),
        "MOCK" => Ok(IntegrationType::Mock),
        _ => Err(ModelError::bad_request(format!(
            "Integration type {s} is not supported by this gateway; use HTTP_PROXY, HTTP or MOCK"
        ))),
    }
}

fn check_uri(kind: IntegrationType, uri: &str) -> Result<(), ModelError> {
    if kind == IntegrationType::Mock {
        return Ok(());
    }
    let ok = (uri.starts_with("http://") || uri.starts_with("https://"))
        && uri.parse::<http::Uri>().is_ok_and(|u| u.host().is_some());
    if ok || (uri.contains('{') || uri.contains("${")) && uri.starts_with("http") {
        Ok(())
    } else {
        Err(ModelError::bad_request(format!(
            "Invalid HTTP endpoint specified for URI: {uri}"
        )))
    }
}

/// PUT /restapis/{id}/resources/{rid}/methods/{verb}/integration
pub fn put_integration(
    ctx: &Ctx,
    req: &Req,
    api_id: &str,
    rid: &str,
    http_method: &str,
) -> Result<Reply, ApiError> {
    let body: PutIntegration = req.json()?;
    let kind = integration_type(&body.integration_type)?;
    let uri = body.uri.unwrap_or_default();
    check_uri(kind, &uri)?;
    let timeout = body
        .timeout_in_millis
        .unwrap_or(crate::plan::DEFAULT_TIMEOUT_MS);
    if !(50..=29_000).contains(&timeout) {
        return Err(ApiError::bad_request(
            "Timeout should be between 50 ms and 29000 ms",
        ));
    }
    let verb = verb(http_method)?;
    // The method the upstream request is sent with (`ANY`: the client's).
    let upstream_method = body.http_method.as_deref().map(self::verb).transpose()?;
    let (api_id, rid) = (api_id.to_string(), rid.to_string());
    let (r, integration) = ctx.control.update(move |m| {
        let r = resource_mut(m, &api_id, &rid)?;
        let method = r
            .resource_methods
            .get_mut(&verb)
            .ok_or_else(unknown_method)?;
        let integration = Integration {
            integration_type: kind,
            uri,
            timeout_in_millis: timeout,
            http_method: upstream_method,
        };
        method.method_integration = Some(integration.clone());
        Ok((r.clone(), integration))
    })?;
    Ok(Reply::json(
        StatusCode::CREATED,
        integration_json(&r, &integration),
    ))
}

/// GET /restapis/{id}/resources/{rid}/methods/{verb}/integration
pub fn get_integration(
    ctx: &Ctx,
    api_id: &str,
    rid: &str,
    http_method: &str,
) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let r = resource(api(&m, api_id)?, rid)?;
    let verb = verb(http_method)?;
    let integration = method_of(r, &verb)?
        .method_integration
        .as_ref()
        .ok_or_else(|| ModelError::not_found("No integration defined for method"))?;
    Ok(Reply::ok(integration_json(r, integration)))
}

/// PATCH /restapis/{id}/resources/{rid}/methods/{verb}/integration: `replace /uri`,
/// `/timeoutInMillis`, `/httpMethod`.
pub fn update_integration(
    ctx: &Ctx,
    req: &Req,
    api_id: &str,
    rid: &str,
    http_method: &str,
) -> Result<Reply, ApiError> {
    const PATHS: [&str; 3] = ["/uri", "/timeoutInMillis", "/httpMethod"];
    let ops = req.patch()?;
    let verb = verb(http_method)?;
    let (api_id, rid) = (api_id.to_string(), rid.to_string());
    let (r, integration) = ctx.control.update(move |m| {
        let r = resource_mut(m, &api_id, &rid)?;
        let i = r
            .resource_methods
            .get_mut(&verb)
            .ok_or_else(unknown_method)?
            .method_integration
            .as_mut()
            .ok_or_else(|| ModelError::not_found("No integration defined for method"))?;
        for op in &ops {
            match (op.op.as_str(), op.path.as_str()) {
                ("replace", "/uri") => {
                    check_uri(i.integration_type, op.value()?)?;
                    i.uri = op.value()?.to_string();
                }
                ("replace", "/timeoutInMillis") => {
                    i.timeout_in_millis = u32::try_from(op.integer()?).unwrap_or(0);
                }
                ("replace", "/httpMethod") => i.http_method = Some(op.value()?.to_string()),
                _ => return Err(op.invalid(&PATHS)),
            }
        }
        let i = i.clone();
        Ok((r.clone(), i))
    })?;
    Ok(Reply::ok(integration_json(&r, &integration)))
}

/// DELETE /restapis/{id}/resources/{rid}/methods/{verb}/integration
pub fn delete_integration(
    ctx: &Ctx,
    api_id: &str,
    rid: &str,
    http_method: &str,
) -> Result<Reply, ApiError> {
    let verb = verb(http_method)?;
    let (api_id, rid) = (api_id.to_string(), rid.to_string());
    ctx.control.update(move |m| {
        let r = resource_mut(m, &api_id, &rid)?;
        let method = r
            .resource_methods
            .get_mut(&verb)
            .ok_or_else(unknown_method)?;
        method
            .method_integration
            .take()
            .ok_or_else(|| ModelError::not_found("No integration defined for method"))?;
        Ok(())
    })?;
    Ok(Reply::accepted())
}

fn deployment_json(d: &Deployment) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), d.id.clone().into());
    put_opt(&mut o, "description", d.description.clone());
    put_opt(&mut o, "createdDate", d.created_date);
    Value::Object(o)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateDeployment {
    #[serde(default)]
    stage_name: Option<String>,
    #[serde(default)]
    stage_description: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    variables: BTreeMap<String, String>,
}

/// POST /restapis/{id}/deployments
pub fn create_deployment(ctx: &Ctx, req: &Req, api_id: &str) -> Result<Reply, ApiError> {
    let body: CreateDeployment = req.json()?;
    let now = ctx.control.now_secs();
    let api_id = api_id.to_string();
    let d = ctx.control.update(move |m| {
        let a = api_mut(m, &api_id)?;
        if a.resources.iter().all(|r| r.resource_methods.is_empty()) {
            return Err(ModelError::bad_request(
                "The REST API doesn't contain any methods",
            ));
        }
        let id = new_id(6, |id| a.deployments.iter().any(|d| d.id == id));
        // The stage serves this snapshot until it is redeployed; GetResources and GetMethod
        // keep showing the live definitions.
        let d = Deployment {
            id: id.clone(),
            description: body.description,
            created_date: Some(now),
            resources: a.resources.clone(),
        };
        a.deployments.push(d.clone());
        if let Some(name) = body.stage_name.filter(|n| !n.is_empty()) {
            match a.stages.iter_mut().find(|s| s.stage_name == name) {
                Some(s) => {
                    s.deployment_id = Some(id);
                    s.last_updated_date = Some(now);
                    s.variables.extend(body.variables);
                    if body.stage_description.is_some() {
                        s.description = body.stage_description;
                    }
                }
                None => a.stages.push(Stage {
                    stage_name: name,
                    description: body.stage_description,
                    variables: body.variables,
                    deployment_id: Some(id),
                    created_date: Some(now),
                    last_updated_date: Some(now),
                    ..Stage::default()
                }),
            }
        }
        Ok(d)
    })?;
    Ok(Reply::json(StatusCode::CREATED, deployment_json(&d)))
}

/// GET /restapis/{id}/deployments
pub fn list_deployments(ctx: &Ctx, req: &Req, api_id: &str) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let a = api(&m, api_id)?;
    let page = wire::page(req, a.deployments.iter().collect(), Order::Created, |d| {
        d.id.as_str()
    })?;
    Ok(Reply::ok(page.to_json(|d| deployment_json(d))))
}

/// GET /restapis/{id}/deployments/{deploymentId}
pub fn get_deployment(ctx: &Ctx, api_id: &str, id: &str) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let d = api(&m, api_id)?
        .deployments
        .iter()
        .find(|d| d.id == id)
        .ok_or_else(unknown_deployment)?;
    Ok(Reply::ok(deployment_json(d)))
}

/// PATCH /restapis/{id}/deployments/{deploymentId}: `replace /description`.
pub fn update_deployment(ctx: &Ctx, req: &Req, api_id: &str, id: &str) -> Result<Reply, ApiError> {
    const PATHS: [&str; 1] = ["/description"];
    let ops = req.patch()?;
    let (api_id, id) = (api_id.to_string(), id.to_string());
    let d = ctx.control.update(move |m| {
        let d = api_mut(m, &api_id)?
            .deployments
            .iter_mut()
            .find(|d| d.id == id)
            .ok_or_else(unknown_deployment)?;
        for op in &ops {
            match (op.op.as_str(), op.path.as_str()) {
                ("replace", "/description") => d.description = op.value.clone(),
                _ => return Err(op.invalid(&PATHS)),
            }
        }
        Ok(d.clone())
    })?;
    Ok(Reply::ok(deployment_json(&d)))
}

/// DELETE /restapis/{id}/deployments/{deploymentId}: refused while a stage serves it, as on
/// AWS; deleting drops the deployment's snapshot of the resources.
pub fn delete_deployment(ctx: &Ctx, api_id: &str, id: &str) -> Result<Reply, ApiError> {
    let (api_id, id) = (api_id.to_string(), id.to_string());
    ctx.control.update(move |m| {
        let a = api_mut(m, &api_id)?;
        if !a.deployments.iter().any(|d| d.id == id) {
            return Err(unknown_deployment());
        }
        if a.stages
            .iter()
            .any(|s| s.deployment_id.as_deref() == Some(id.as_str()))
        {
            return Err(ModelError::bad_request(
                "Active stages pointing to this deployment must be moved or deleted",
            ));
        }
        a.deployments.retain(|d| d.id != id);
        Ok(())
    })?;
    Ok(Reply::accepted())
}

fn setting_json(s: &MethodSetting) -> Value {
    json!({
        "metricsEnabled": false,
        "dataTraceEnabled": false,
        "throttlingBurstLimit": s.throttling_burst_limit,
        "throttlingRateLimit": s.throttling_rate_limit,
        "cachingEnabled": false,
        "cacheTtlInSeconds": 300,
        "cacheDataEncrypted": false,
        "requireAuthorizationForCacheControl": true,
        "unauthorizedCacheControlHeaderStrategy": "SUCCEED_WITH_RESPONSE_HEADER",
    })
}

fn stage_json(s: &Stage) -> Value {
    let mut o = serde_json::Map::new();
    put_opt(&mut o, "deploymentId", s.deployment_id.clone());
    o.insert("stageName".into(), s.stage_name.clone().into());
    put_opt(&mut o, "description", s.description.clone());
    o.insert("cacheClusterEnabled".into(), false.into());
    o.insert("cacheClusterStatus".into(), "NOT_AVAILABLE".into());
    o.insert(
        "methodSettings".into(),
        Value::Object(
            s.method_settings
                .iter()
                .map(|(k, v)| (k.clone(), setting_json(v)))
                .collect(),
        ),
    );
    if !s.variables.is_empty() {
        o.insert("variables".into(), json!(s.variables));
    }
    o.insert("tracingEnabled".into(), false.into());
    put_opt(&mut o, "createdDate", s.created_date);
    put_opt(&mut o, "lastUpdatedDate", s.last_updated_date);
    if !s.tags.is_empty() {
        o.insert("tags".into(), tags_json(&s.tags));
    }
    Value::Object(o)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateStage {
    #[serde(default)]
    stage_name: String,
    #[serde(default)]
    deployment_id: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    variables: BTreeMap<String, String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// POST /restapis/{id}/stages
pub fn create_stage(ctx: &Ctx, req: &Req, api_id: &str) -> Result<Reply, ApiError> {
    let body: CreateStage = req.json()?;
    super::tags::check(&body.tags)?;
    let now = ctx.control.now_secs();
    let api_id = api_id.to_string();
    let stage = ctx.control.update(move |m| {
        let a = api_mut(m, &api_id)?;
        if !a.deployments.iter().any(|d| d.id == body.deployment_id) {
            return Err(ModelError::not_found(
                "Invalid Deployment identifier specified",
            ));
        }
        if a.stages.iter().any(|s| s.stage_name == body.stage_name) {
            return Err(ModelError::conflict("Stage already exists"));
        }
        let stage = Stage {
            stage_name: body.stage_name,
            description: body.description,
            variables: body.variables,
            deployment_id: Some(body.deployment_id),
            created_date: Some(now),
            last_updated_date: Some(now),
            tags: body.tags,
            ..Stage::default()
        };
        a.stages.push(stage.clone());
        Ok(stage)
    })?;
    Ok(Reply::json(StatusCode::CREATED, stage_json(&stage)))
}

/// GET /restapis/{id}/stages/{name}
pub fn get_stage(ctx: &Ctx, api_id: &str, name: &str) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let s = api(&m, api_id)?
        .stages
        .iter()
        .find(|s| s.stage_name == name)
        .ok_or_else(unknown_stage)?;
    Ok(Reply::ok(stage_json(s)))
}

/// GET /restapis/{id}/stages[?deploymentId=] (not paged, as AWS): with `deploymentId`, only
/// the stages serving that deployment.
pub fn list_stages(ctx: &Ctx, req: &Req, api_id: &str) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let a = api(&m, api_id)?;
    let deployment = req.param("deploymentId");
    let stages: Vec<Value> = a
        .stages
        .iter()
        .filter(|s| deployment.is_none_or(|d| s.deployment_id.as_deref() == Some(d)))
        .map(stage_json)
        .collect();
    Ok(Reply::ok(json!({ "item": stages })))
}

/// PATCH /restapis/{id}/stages/{name}
pub fn update_stage(ctx: &Ctx, req: &Req, api_id: &str, name: &str) -> Result<Reply, ApiError> {
    let ops = req.patch()?;
    let now = ctx.control.now_secs();
    let (api_id, name) = (api_id.to_string(), name.to_string());
    let stage = ctx.control.update(move |m| {
        let a = api_mut(m, &api_id)?;
        let deployments: Vec<String> = a.deployments.iter().map(|d| d.id.clone()).collect();
        let s = a
            .stages
            .iter_mut()
            .find(|s| s.stage_name == name)
            .ok_or_else(unknown_stage)?;
        for op in &ops {
            apply_stage_op(s, op, &deployments)?;
        }
        s.last_updated_date = Some(now);
        Ok(s.clone())
    })?;
    Ok(Reply::ok(stage_json(&stage)))
}

const STAGE_PATHS: [&str; 17] = [
    "/description",
    "/deploymentId",
    "/variables/{name}",
    "/tracingEnabled",
    "/cacheClusterEnabled",
    "/cacheClusterSize",
    "/{resourcePath}/{httpMethod}/metrics/enabled",
    "/{resourcePath}/{httpMethod}/logging/loglevel",
    "/{resourcePath}/{httpMethod}/logging/dataTrace",
    "/{resourcePath}/{httpMethod}/throttling/rateLimit",
    "/{resourcePath}/{httpMethod}/throttling/burstLimit",
    "/{resourcePath}/{httpMethod}/caching/enabled",
    "/{resourcePath}/{httpMethod}/caching/ttlInSeconds",
    "/{resourcePath}/{httpMethod}/caching/dataEncrypted",
    "/{resourcePath}/{httpMethod}/caching/requireAuthorizationForCacheControl",
    "/{resourcePath}/{httpMethod}/caching/unauthorizedCacheControlHeaderStrategy",
    "/{resourcePath}/{httpMethod}",
];

/// The settings of a method-setting path, after `/{resourcePath}/{httpMethod}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MethodSettingPath {
    /// `throttling/rateLimit`, kept.
    ThrottlingRate,
    /// `throttling/burstLimit`, kept.
    ThrottlingBurst,
    /// `metrics/enabled`, `logging/dataTrace`, `caching/enabled`, `caching/dataEncrypted`,
    /// `caching/requireAuthorizationForCacheControl`: any value reads as a boolean, as AWS
    /// reads them (`true` in any case is true).
    Flag,
    /// `logging/loglevel`: `OFF`, `ERROR` or `INFO`, in any case.
    LogLevel,
    /// `caching/ttlInSeconds`: 0 to 3600.
    CacheTtl,
    /// `caching/unauthorizedCacheControlHeaderStrategy`.
    CacheControlStrategy,
}

const METHOD_SETTING_PATHS: [(&str, MethodSettingPath); 10] = [
    ("/throttling/rateLimit", MethodSettingPath::ThrottlingRate),
    ("/throttling/burstLimit", MethodSettingPath::ThrottlingBurst),
    ("/metrics/enabled", MethodSettingPath::Flag),
    ("/logging/dataTrace", MethodSettingPath::Flag),
    ("/logging/loglevel", MethodSettingPath::LogLevel),
    ("/caching/enabled", MethodSettingPath::Flag),
    ("/caching/ttlInSeconds", MethodSettingPath::CacheTtl),
    ("/caching/dataEncrypted", MethodSettingPath::Flag),
    (
        "/caching/requireAuthorizationForCacheControl",
        MethodSettingPath::Flag,
    ),
    (
        "/caching/unauthorizedCacheControlHeaderStrategy",
        MethodSettingPath::CacheControlStrategy,
    ),
];

/// Longest cache TTL AWS allows, in seconds.
const MAX_CACHE_TTL_SECONDS: i64 = 3600;
/// Cache cluster sizes AWS offers, in GB, as they are written.
const CACHE_CLUSTER_SIZES: [&str; 8] = ["0.5", "1.6", "6.1", "13.5", "28.4", "58.2", "118", "237"];

/// Checks the value of a method setting this gateway accepts without keeping (see the module
/// doc); throttles are checked when they are stored.
fn check_setting_value(kind: MethodSettingPath, op: &PatchOp) -> Result<(), ModelError> {
    let value = op.value()?;
    match kind {
        MethodSettingPath::ThrottlingRate | MethodSettingPath::ThrottlingBurst => {}
        MethodSettingPath::Flag => {
            op.boolean()?;
        }
        MethodSettingPath::LogLevel => {
            if !["OFF", "ERROR", "INFO"]
                .iter()
                .any(|l| l.eq_ignore_ascii_case(value.trim()))
            {
                return Err(ModelError::bad_request(format!(
                    "Invalid logging level specified: {value}; must be one of OFF, ERROR, INFO"
                )));
            }
        }
        MethodSettingPath::CacheTtl => {
            if !value
                .trim()
                .parse::<i64>()
                .is_ok_and(|t| (0..=MAX_CACHE_TTL_SECONDS).contains(&t))
            {
                return Err(ModelError::bad_request(format!(
                    "Invalid cache TTL specified: {value}; it must be an integer from 0 to {MAX_CACHE_TTL_SECONDS} seconds"
                )));
            }
        }
        MethodSettingPath::CacheControlStrategy => {
            const STRATEGIES: [&str; 3] = [
                "FAIL_WITH_403",
                "SUCCEED_WITH_RESPONSE_HEADER",
                "SUCCEED_WITHOUT_RESPONSE_HEADER",
            ];
            if !STRATEGIES.contains(&value.trim()) {
                return Err(ModelError::bad_request(format!(
                    "Invalid unauthorized cache control header strategy specified: {value}; must be one of {}",
                    STRATEGIES.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// One UpdateStage operation. Method settings other than throttling and the stage's tracing
/// and cache-cluster settings are checked and then dropped (see the module doc); a method
/// setting of any kind still creates the method's entry, so that a client (Terraform) that
/// reads the entry back finds it: a throttling setting with AWS's default for the other
/// throttle value, any other setting with the stage's `*/*` throttle (AWS's defaults without
/// one).
fn apply_stage_op(s: &mut Stage, op: &PatchOp, deployments: &[String]) -> Result<(), ModelError> {
    let path = op.path.as_str();
    match (op.op.as_str(), path) {
        ("replace", "/description") => {
            s.description = op.value.clone();
            return Ok(());
        }
        ("replace", "/deploymentId") => {
            let id = op.value()?;
            if !deployments.iter().any(|d| d == id) {
                return Err(ModelError::not_found(
                    "Invalid Deployment identifier specified",
                ));
            }
            s.deployment_id = Some(id.to_string());
            return Ok(());
        }
        ("replace", "/tracingEnabled" | "/cacheClusterEnabled") => {
            op.boolean()?;
            return Ok(());
        }
        ("replace", "/cacheClusterSize") => {
            let value = op.value()?;
            if !CACHE_CLUSTER_SIZES.contains(&value.trim()) {
                return Err(ModelError::bad_request(format!(
                    "Invalid cache cluster size specified: {value}; must be one of {}",
                    CACHE_CLUSTER_SIZES.join(", ")
                )));
            }
            return Ok(());
        }
        _ => {}
    }
    if let Some(var) = path.strip_prefix("/variables/") {
        return match op.op.as_str() {
            "replace" | "add" => {
                s.variables.insert(var.to_string(), op.value()?.to_string());
                Ok(())
            }
            "remove" => {
                s.variables.remove(var);
                Ok(())
            }
            _ => Err(op.invalid(&STAGE_PATHS)),
        };
    }
    // `/{resourcePath}/{METHOD}/{setting}`: the key is everything between the leading slash and
    // the setting, kept as written (`*/*`, `pets/GET`, `~1pets/GET`).
    let body = path.strip_prefix('/').unwrap_or(path);
    if let Some((key, kind)) = METHOD_SETTING_PATHS.iter().find_map(|(suffix, kind)| {
        body.strip_suffix(suffix)
            .filter(|k| k.contains('/'))
            .map(|k| (k, *kind))
    }) {
        if !matches!(op.op.as_str(), "replace" | "add") {
            return Err(op.invalid(&STAGE_PATHS));
        }
        crate::plan::parse_method_setting_key(key)?;
        check_setting_value(kind, op)?;
        // A method's entry made by a setting this gateway does not keep takes the stage's
        // `*/*` throttle, so enabling (say) metrics on one method never loosens its throttle.
        let inherited = match kind {
            MethodSettingPath::ThrottlingRate | MethodSettingPath::ThrottlingBurst => {
                MethodSetting::default()
            }
            _ => s.method_settings.get("*/*").copied().unwrap_or_default(),
        };
        let setting = s
            .method_settings
            .entry(key.to_string())
            .or_insert(inherited);
        match kind {
            MethodSettingPath::ThrottlingRate => setting.throttling_rate_limit = op.number()?,
            MethodSettingPath::ThrottlingBurst => setting.throttling_burst_limit = op.integer()?,
            _ => {}
        }
        return Ok(());
    }
    if op.op == "remove" && body.contains('/') && !body.contains("/throttling") {
        crate::plan::parse_method_setting_key(body)?;
        if s.method_settings.remove(body).is_none() {
            return Err(ModelError::bad_request(format!(
                "Cannot remove method setting {body} because there is no method setting for this method"
            )));
        }
        return Ok(());
    }
    Err(op.invalid(&STAGE_PATHS))
}

/// DELETE /restapis/{id}/stages/{name}: refused while a usage plan names the stage.
pub fn delete_stage(ctx: &Ctx, api_id: &str, name: &str) -> Result<Reply, ApiError> {
    let (api_id, name) = (api_id.to_string(), name.to_string());
    ctx.control.update(move |m| {
        if let Some(p) = m.usage_plans.iter().find(|p| {
            p.api_stages
                .iter()
                .any(|s| s.api_id == api_id && s.stage == name)
        }) {
            return Err(ModelError::bad_request(format!(
                "Cannot delete stage {name} because usage plan {} still references it; remove it from the plan first",
                p.id
            )));
        }
        let a = api_mut(m, &api_id)?;
        let before = a.stages.len();
        a.stages.retain(|s| s.stage_name != name);
        if a.stages.len() == before {
            return Err(unknown_stage());
        }
        let stage_key = format!("{api_id}/{name}");
        m.api_keys
            .iter_mut()
            .for_each(|k| k.stage_keys.retain(|s| *s != stage_key));
        Ok(())
    })?;
    Ok(Reply::accepted())
}

fn account_json(t: &ThrottleSettings) -> Value {
    let mut throttle = serde_json::Map::new();
    put_opt(&mut throttle, "burstLimit", t.burst_limit);
    put_opt(&mut throttle, "rateLimit", t.rate_limit);
    json!({
        "throttleSettings": Value::Object(throttle),
        "features": ["UsagePlans"],
        "apiKeyVersion": "4",
    })
}

/// GET /account
pub fn get_account(ctx: &Ctx) -> Result<Reply, ApiError> {
    Ok(Reply::ok(account_json(
        &ctx.control.model().account.throttle_settings,
    )))
}

/// PATCH /account: `replace /throttleSettings/rateLimit` and `/throttleSettings/burstLimit`
/// (a self-hosted gateway lets the operator set the account throttle).
pub fn update_account(ctx: &Ctx, req: &Req) -> Result<Reply, ApiError> {
    const PATHS: [&str; 2] = [
        "/throttleSettings/rateLimit",
        "/throttleSettings/burstLimit",
    ];
    let ops = req.patch()?;
    let account = ctx.control.update(move |m| {
        let t = &mut m.account.throttle_settings;
        for op in &ops {
            match (op.op.as_str(), op.path.as_str()) {
                ("replace", "/throttleSettings/rateLimit") => t.rate_limit = Some(op.number()?),
                ("replace", "/throttleSettings/burstLimit") => {
                    t.burst_limit = Some(op.integer()?);
                }
                _ => return Err(op.invalid(&PATHS)),
            }
        }
        crate::plan::validate_throttle(t)?;
        Ok(*t)
    })?;
    Ok(Reply::ok(account_json(&account)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::clock::FakeClock;
    use crate::control::Control;
    use crate::engine::Engine;
    use crate::metrics::Metrics;
    use crate::store::MemoryStore;

    fn ctx(model: Model) -> Ctx {
        let engine = Engine::new(
            model,
            Arc::new(MemoryStore::new()),
            Arc::new(FakeClock::new(1_700_000_000_000_000_000)),
        )
        .expect("valid model");
        Ctx {
            control: Arc::new(Control::new(Arc::new(engine), None)),
            metrics: Arc::new(Metrics::new()),
            credentials: None,
        }
    }

    fn req(body: Value) -> Req {
        Req {
            method: http::Method::POST,
            segments: Vec::new(),
            query: Vec::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    fn body(r: Result<Reply, ApiError>) -> Value {
        match r {
            Ok(reply) => reply.body.unwrap_or(Value::Null),
            Err(_) => panic!("the call must succeed"),
        }
    }

    fn key_required(ctx: &Ctx) -> bool {
        ctx.control
            .engine()
            .resolve(Some("a1"), "prod", "GET", "/pets")
            .expect("route")
            .api_key_required
    }

    #[test]
    fn deployments_snapshot_the_resources_and_reads_show_the_live_ones() {
        let api = RestApi::new("a1", "pets").method("/pets", "GET", Method::mock());
        let rid = api.resources[0].id.clone();
        let ctx = ctx(Model::new().api(api));

        let d1 = body(create_deployment(
            &ctx,
            &req(json!({"stageName": "prod"})),
            "a1",
        ));
        let patch = json!({"patchOperations": [
            {"op": "replace", "path": "/apiKeyRequired", "value": "true"}
        ]});
        body(update_method(&ctx, &req(patch), "a1", &rid, "GET"));

        // GetMethod shows the live definition; the stage still serves the deployed one.
        let live = body(get_method(&ctx, "a1", &rid, "GET"));
        assert_eq!(live["apiKeyRequired"], true);
        assert!(!key_required(&ctx));
        let m = ctx.control.model();
        let deployed = &m.rest_apis[0].deployments[0];
        assert_eq!(deployed.id, d1["id"]);
        assert!(!deployed.resources[0].resource_methods["GET"].api_key_required);

        // Redeploying switches the stage; the listing carries no snapshot.
        body(create_deployment(
            &ctx,
            &req(json!({"stageName": "prod"})),
            "a1",
        ));
        assert!(key_required(&ctx));
        let list = body(list_deployments(&ctx, &req(Value::Null), "a1"));
        let items = list["item"].as_array().expect("items");
        assert_eq!(items.len(), 2);
        assert!(items.iter().all(|d| d.get("resources").is_none()));

        // Pointing the stage back at the first deployment rolls the method back.
        let back = json!({"patchOperations": [
            {"op": "replace", "path": "/deploymentId", "value": d1["id"]}
        ]});
        body(update_stage(&ctx, &req(back), "a1", "prod"));
        assert!(!key_required(&ctx));
    }
}
