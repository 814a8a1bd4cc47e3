//! The configuration model: REST APIs, resources, methods, stages, API keys, usage plans and the
//! account throttle, with Amazon API Gateway's (REST v1) names, JSON shapes and validation rules.
//!
//! This module owns the *desired state*. It does no I/O and keeps no runtime counters; the
//! [`crate::engine`] compiles a validated [`Model`] snapshot into lookup tables. Every rule a client
//! can break returns a [`ModelError`] whose kind (BadRequest / NotFound / Conflict) and message are
//! the ones AWS uses where they are known (see `shared/reference/aws-usage-plans.md`).
//!
//! Invariants of a model that passed [`Model::validate`]:
//! - ids are unique per kind, non-empty and at most [`MAX_ID_LEN`] bytes; API key values are
//!   unique and 20..=128 characters;
//! - every usage-plan key names an existing plan and key, every `apiStages` entry an existing
//!   REST API and stage, and an API key is in at most one plan per stage ("one plan per key per
//!   stage", reported as `Conflict`);
//! - resource paths, live and in deployment snapshots, are well-formed templates (`/pets/{id}`,
//!   greedy `{proxy+}` only last) with at most one variable child per parent;
//! - throttles are non-negative (stage method settings also accept `-1` = "no throttling") and
//!   quota offsets follow the DAY 0 / WEEK 0..=6 / MONTH 0..=27 rule.
//!
//! Choices for points the spec marks unconfirmed (documented here, tested in `tests/engine_*`):
//! - Plan `throttle` with only `burstLimit` set has no rate: the plan layer is not applied. With
//!   only `rateLimit` set the burst defaults to `max(1, ceil(rateLimit))`.
//! - A zero rate or a zero burst blocks every request of that layer.
//! - Stage `methodSettings` `"*/*"` is a per-method default: each method without its own entry
//!   gets its own bucket with the `*/*` limits (AWS's "default method throttling").
//! - Integrations live on methods (`methodIntegration`); the stage contributes `variables`, and
//!   `${stageVariables.NAME}` in an integration `uri` is substituted per stage.
//! - A stage serves the resources of the deployment it names ([`Deployment::resources`]). A
//!   stage without a deployment, naming an unknown one, or naming one without a snapshot
//!   (configurations written by hand) serves the API's live resources
//!   ([`RestApi::served_deployment`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// Longest id (REST API, resource, API key, usage plan) the gateway accepts, in bytes.
pub const MAX_ID_LEN: usize = 63;
/// Shortest API key value AWS accepts on CreateApiKey, in characters.
pub const MIN_KEY_VALUE_LEN: usize = 20;
/// Longest API key value AWS accepts, in characters.
pub const MAX_KEY_VALUE_LEN: usize = 128;
/// Longest API key name, in characters.
pub const MAX_KEY_NAME_LEN: usize = 1024;
/// Longest API key description, in characters.
pub const MAX_KEY_DESCRIPTION_LEN: usize = 125_000;
/// Default account throttle rate, requests per second (AWS default per Region).
pub const DEFAULT_ACCOUNT_RATE: f64 = 10_000.0;
/// Default account throttle burst, requests (AWS default per Region).
pub const DEFAULT_ACCOUNT_BURST: i64 = 5_000;
/// Default integration timeout, milliseconds.
pub const DEFAULT_TIMEOUT_MS: u32 = 29_000;
/// HTTP methods a method may be declared with.
pub const HTTP_METHODS: [&str; 8] = [
    "ANY", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT",
];

/// Which AWS exception an error maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// 400 `BadRequestException`.
    BadRequest,
    /// 404 `NotFoundException`.
    NotFound,
    /// 409 `ConflictException`.
    Conflict,
}

impl ErrorKind {
    /// HTTP status code AWS answers with.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
        }
    }

    /// AWS error code (`x-amzn-ErrorType`).
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "BadRequestException",
            ErrorKind::NotFound => "NotFoundException",
            ErrorKind::Conflict => "ConflictException",
        }
    }
}

/// A validation or lookup failure with AWS's kind and message text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ModelError {
    /// Exception kind.
    pub kind: ErrorKind,
    /// Message for the `{"message": ...}` body.
    pub message: String,
}

impl ModelError {
    /// A 400 BadRequestException.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ModelError {
            kind: ErrorKind::BadRequest,
            message: message.into(),
        }
    }

    /// A 404 NotFoundException.
    pub fn not_found(message: impl Into<String>) -> Self {
        ModelError {
            kind: ErrorKind::NotFound,
            message: message.into(),
        }
    }

    /// A 409 ConflictException.
    pub fn conflict(message: impl Into<String>) -> Self {
        ModelError {
            kind: ErrorKind::Conflict,
            message: message.into(),
        }
    }

    /// `Invalid API Key identifier specified` (404).
    pub fn unknown_api_key() -> Self {
        Self::not_found("Invalid API Key identifier specified")
    }

    /// `Invalid Usage Plan ID specified` (404).
    pub fn unknown_usage_plan() -> Self {
        Self::not_found("Invalid Usage Plan ID specified")
    }

    /// `Invalid API Stage {api: A, stage: S} specified for usageplan P` with the given kind
    /// (400 on create, 404 on update).
    pub fn invalid_api_stage(kind: ErrorKind, api: &str, stage: &str, plan: &str) -> Self {
        ModelError {
            kind,
            message: format!(
                "Invalid API Stage {{api: {api}, stage: {stage}}} specified for usageplan {plan}"
            ),
        }
    }
}

/// Where the data plane reads the API key from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApiKeySource {
    /// The `X-API-Key` request header.
    #[default]
    Header,
    /// `usageIdentifierKey` returned by a Lambda authorizer.
    Authorizer,
}

/// A REST API with its resources and stages.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestApi {
    /// API id (AWS: 10 lowercase alphanumerics).
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where the key comes from; AWS answers `HEADER` when unset.
    #[serde(default)]
    pub api_key_source: ApiKeySource,
    /// Resources, each with its full path template.
    #[serde(default)]
    pub resources: Vec<Resource>,
    /// Deployed stages.
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// Deployments (CreateDeployment); a stage names the one it serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<Deployment>,
    /// Creation time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date: Option<i64>,
    /// Tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// A deployment of a REST API: a snapshot of its resources, methods and integrations taken by
/// CreateDeployment. A stage that names the deployment serves that snapshot, so later method or
/// integration changes reach the stage only when it is (re)deployed, as on AWS.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    /// Deployment id (AWS: 6 lowercase alphanumerics).
    pub id: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Creation time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date: Option<i64>,
    /// The API's resources at deployment time. Empty means "no snapshot": a stage naming this
    /// deployment serves the API's current resources (configurations written by hand).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<Resource>,
}

/// A resource: a path template and the methods declared on it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    /// Resource id; generated from the path by the builders when empty.
    #[serde(default)]
    pub id: String,
    /// Full path template, e.g. `/pets/{petId}` or `/{proxy+}`; the root is `/`.
    pub path: String,
    /// Methods keyed by HTTP method (`GET`, …, or `ANY`).
    #[serde(default)]
    pub resource_methods: BTreeMap<String, Method>,
}

/// A method of a resource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Method {
    /// Whether a valid API key in a usage plan for the stage is required.
    #[serde(default)]
    pub api_key_required: bool,
    /// AWS authorization type (`NONE`, `AWS_IAM`, ...); recorded and echoed, not enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_type: Option<String>,
    /// Backend the method proxies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method_integration: Option<Integration>,
}

/// Integration type; the gateway forwards `HTTP_PROXY`/`HTTP` and answers `MOCK` itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IntegrationType {
    /// Pass the request through to `uri`.
    #[default]
    HttpProxy,
    /// Non-proxy HTTP (forwarded like `HTTP_PROXY` by this gateway).
    Http,
    /// Answered by the gateway without a backend.
    Mock,
}

/// A method's backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Integration {
    /// Integration type.
    #[serde(rename = "type", default)]
    pub integration_type: IntegrationType,
    /// Backend URL; may contain `{param}` path parameters and `${stageVariables.NAME}`.
    #[serde(default)]
    pub uri: String,
    /// Method used towards the backend (`integrationHttpMethod`); `HTTP_PROXY` forwards the
    /// client's method, so it is recorded and echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_method: Option<String>,
    /// Upstream timeout in milliseconds (50..=29000 on AWS; default 29000).
    #[serde(default = "default_timeout")]
    pub timeout_in_millis: u32,
}

fn default_timeout() -> u32 {
    DEFAULT_TIMEOUT_MS
}

/// A deployed stage of a REST API.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stage {
    /// Stage name, the first path segment of an invoke URL.
    pub stage_name: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Throttles keyed `"*/*"` or `"{resourcePath}/{METHOD}"` (leading slash optional, `~1` = `/`).
    #[serde(default)]
    pub method_settings: BTreeMap<String, MethodSetting>,
    /// Stage variables, substituted into integration URIs.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// The deployment the stage serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    /// Creation time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date: Option<i64>,
    /// Last update time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date: Option<i64>,
    /// Tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Per-method stage settings (throttling only).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MethodSetting {
    /// Bucket size in requests; `-1` disables throttling. AWS default 5000.
    #[serde(default = "default_stage_burst")]
    pub throttling_burst_limit: i64,
    /// Refill rate in requests per second; `-1` disables throttling. AWS default 10000.0.
    #[serde(default = "default_stage_rate")]
    pub throttling_rate_limit: f64,
}

fn default_stage_burst() -> i64 {
    DEFAULT_ACCOUNT_BURST
}

fn default_stage_rate() -> f64 {
    DEFAULT_ACCOUNT_RATE
}

impl Default for MethodSetting {
    fn default() -> Self {
        MethodSetting {
            throttling_burst_limit: DEFAULT_ACCOUNT_BURST,
            throttling_rate_limit: DEFAULT_ACCOUNT_RATE,
        }
    }
}

/// Throttle settings of a plan, an API stage method inside a plan, or the account.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleSettings {
    /// Bucket size in requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_limit: Option<i64>,
    /// Refill rate in requests per second (fractions allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<f64>,
}

impl ThrottleSettings {
    /// Both members set.
    pub fn new(rate_limit: f64, burst_limit: i64) -> Self {
        ThrottleSettings {
            burst_limit: Some(burst_limit),
            rate_limit: Some(rate_limit),
        }
    }

    /// The effective `(rate rps, burst)` of a plan or account throttle, or `None` when the
    /// layer does not apply (no rate). See the module docs for the one-member rules.
    pub fn effective(&self) -> Option<(f64, u64)> {
        let rate = self.rate_limit?;
        let burst = match self.burst_limit {
            Some(b) => u64::try_from(b).unwrap_or(0),
            None => (rate.ceil() as u64).max(1),
        };
        Some((rate.max(0.0), burst))
    }
}

/// Quota period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum QuotaPeriod {
    /// A UTC calendar day.
    Day,
    /// An ISO week (Monday 00:00 UTC) shifted by `offset` days.
    Week,
    /// A calendar month shifted by `offset` days.
    Month,
}

/// Quota of a usage plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSettings {
    /// Requests per period per key.
    pub limit: i64,
    /// Days the period start is shifted by (DAY 0, WEEK 0..=6, MONTH 0..=27).
    #[serde(default)]
    pub offset: i64,
    /// Period.
    pub period: QuotaPeriod,
}

/// One API stage a plan grants access to, with optional per-method throttles.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiStage {
    /// REST API id.
    pub api_id: String,
    /// Stage name.
    pub stage: String,
    /// Throttles keyed `"{resourcePath}/{METHOD}"`, e.g. `"/pets/GET"`, root `"//GET"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub throttle: BTreeMap<String, ThrottleSettings>,
}

/// A usage plan.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsagePlan {
    /// Plan id (AWS: 6 lowercase alphanumerics).
    pub id: String,
    /// Name (required on create).
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Stages the plan covers.
    #[serde(default)]
    pub api_stages: Vec<ApiStage>,
    /// Per-key throttle across all stages of the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSettings>,
    /// Per-key quota across all stages of the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSettings>,
    /// AWS Marketplace product code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_code: Option<String>,
    /// Tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// An API key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    /// Key id (AWS: 10 lowercase alphanumerics).
    pub id: String,
    /// Secret value clients send, 20..=128 characters, unique.
    pub value: String,
    /// Display name (not unique).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Disabled keys are rejected with 403. AWS default on create: false.
    #[serde(default)]
    pub enabled: bool,
    /// External customer id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// Creation time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date: Option<i64>,
    /// Last update time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date: Option<i64>,
    /// Deprecated `"{restApiId}/{stageName}"` list.
    #[serde(default)]
    pub stage_keys: Vec<String>,
    /// Tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Membership of an API key in a usage plan (CreateUsagePlanKey).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsagePlanKey {
    /// Plan id.
    pub usage_plan_id: String,
    /// API key id.
    pub key_id: String,
}

/// AWS's UsagePlanKey response shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsagePlanKeyView {
    /// Equals the API key id.
    pub id: String,
    /// Always `API_KEY`.
    #[serde(rename = "type")]
    pub key_type: String,
    /// The key value.
    pub value: String,
    /// The key name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Account settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    /// Account-wide throttle, shared by every request of every API.
    pub throttle_settings: ThrottleSettings,
}

impl Default for Account {
    fn default() -> Self {
        Account {
            throttle_settings: ThrottleSettings::new(DEFAULT_ACCOUNT_RATE, DEFAULT_ACCOUNT_BURST),
        }
    }
}

/// The whole configuration snapshot the engine runs on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Model {
    /// REST APIs with their resources and stages.
    #[serde(default)]
    pub rest_apis: Vec<RestApi>,
    /// API keys.
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    /// Usage plans.
    #[serde(default)]
    pub usage_plans: Vec<UsagePlan>,
    /// Which keys are in which plans.
    #[serde(default)]
    pub usage_plan_keys: Vec<UsagePlanKey>,
    /// Account throttle.
    #[serde(default)]
    pub account: Account,
}

// ---------------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------------

impl RestApi {
    /// An API with no resources or stages and `apiKeySource` HEADER.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        RestApi {
            id: id.into(),
            name: name.into(),
            ..RestApi::default()
        }
    }

    /// An API that proxies everything to `upstream_base` and requires a key: `/` ANY to
    /// `{upstream_base}/` and `/{proxy+}` ANY to `{upstream_base}/{proxy}`.
    pub fn proxy(id: impl Into<String>, upstream_base: &str) -> Self {
        let base = upstream_base.trim_end_matches('/');
        RestApi::new(id, "proxy")
            .method(
                "/",
                "ANY",
                Method::http_proxy(format!("{base}/")).key_required(true),
            )
            .method(
                "/{proxy+}",
                "ANY",
                Method::http_proxy(format!("{base}/{{proxy}}")).key_required(true),
            )
    }

    /// Adds (or replaces) a method on the resource with this path, creating the resource.
    pub fn method(mut self, path: &str, http_method: &str, method: Method) -> Self {
        let idx = match self.resources.iter().position(|r| r.path == path) {
            Some(i) => i,
            None => {
                self.resources.push(Resource {
                    id: format!("r{}", self.resources.len()),
                    path: path.to_string(),
                    resource_methods: BTreeMap::new(),
                });
                self.resources.len() - 1
            }
        };
        self.resources[idx]
            .resource_methods
            .insert(http_method.to_ascii_uppercase(), method);
        self
    }

    /// Records a deployment `id` holding a snapshot of the current resources (what
    /// CreateDeployment does); point a stage at it with [`Stage::deployment`].
    pub fn deploy(mut self, id: &str) -> Self {
        self.deployments.push(Deployment {
            id: id.to_string(),
            resources: self.resources.clone(),
            ..Deployment::default()
        });
        self
    }

    /// Index of the deployment whose snapshot `stage` serves, or `None` when the stage serves
    /// the live resources (no deployment id, an unknown one, or a deployment without snapshot).
    pub fn served_deployment(&self, stage: &Stage) -> Option<usize> {
        let id = stage.deployment_id.as_deref()?;
        self.deployments
            .iter()
            .position(|d| d.id == id)
            .filter(|&i| !self.deployments[i].resources.is_empty())
    }

    /// The resources `stage` routes on: its deployment's snapshot, else the live resources.
    pub fn served_resources(&self, stage: &Stage) -> &[Resource] {
        match self.served_deployment(stage) {
            Some(i) => &self.deployments[i].resources,
            None => &self.resources,
        }
    }

    /// Adds a stage.
    pub fn stage(mut self, stage: Stage) -> Self {
        self.stages.push(stage);
        self
    }

    /// Sets `apiKeySource`.
    pub fn key_source(mut self, source: ApiKeySource) -> Self {
        self.api_key_source = source;
        self
    }
}

impl Method {
    /// A method with an `HTTP_PROXY` integration to `uri` (timeout 29 s, no key required).
    pub fn http_proxy(uri: impl Into<String>) -> Self {
        Method {
            method_integration: Some(Integration {
                integration_type: IntegrationType::HttpProxy,
                uri: uri.into(),
                timeout_in_millis: DEFAULT_TIMEOUT_MS,
                http_method: None,
            }),
            ..Method::default()
        }
    }

    /// A method with a `MOCK` integration.
    pub fn mock() -> Self {
        Method {
            method_integration: Some(Integration {
                integration_type: IntegrationType::Mock,
                uri: String::new(),
                timeout_in_millis: DEFAULT_TIMEOUT_MS,
                http_method: None,
            }),
            ..Method::default()
        }
    }

    /// Sets `apiKeyRequired`.
    pub fn key_required(mut self, required: bool) -> Self {
        self.api_key_required = required;
        self
    }

    /// Sets the integration timeout in milliseconds.
    pub fn timeout_ms(mut self, timeout: u32) -> Self {
        if let Some(i) = self.method_integration.as_mut() {
            i.timeout_in_millis = timeout;
        }
        self
    }
}

impl Stage {
    /// A stage with no settings.
    pub fn new(name: impl Into<String>) -> Self {
        Stage {
            stage_name: name.into(),
            ..Stage::default()
        }
    }

    /// Adds a throttle method setting; `key` is `"*/*"` or `"{path}/{METHOD}"`.
    pub fn throttle(mut self, key: &str, rate: f64, burst: i64) -> Self {
        self.method_settings.insert(
            key.to_string(),
            MethodSetting {
                throttling_burst_limit: burst,
                throttling_rate_limit: rate,
            },
        );
        self
    }

    /// Points the stage at a deployment.
    pub fn deployment(mut self, id: &str) -> Self {
        self.deployment_id = Some(id.to_string());
        self
    }

    /// Sets a stage variable.
    pub fn variable(mut self, name: &str, value: &str) -> Self {
        self.variables.insert(name.to_string(), value.to_string());
        self
    }
}

impl UsagePlan {
    /// A plan with no stages, throttle or quota.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        UsagePlan {
            id: id.into(),
            name: name.into(),
            ..UsagePlan::default()
        }
    }

    /// Adds an API stage.
    pub fn stage(mut self, api_id: &str, stage: &str) -> Self {
        self.api_stages.push(ApiStage {
            api_id: api_id.to_string(),
            stage: stage.to_string(),
            throttle: BTreeMap::new(),
        });
        self
    }

    /// Adds a per-method throttle (`"/pets/GET"`) to the API stage, adding the stage if needed.
    pub fn method_throttle(
        mut self,
        api_id: &str,
        stage: &str,
        key: &str,
        rate: f64,
        burst: i64,
    ) -> Self {
        if !self
            .api_stages
            .iter()
            .any(|s| s.api_id == api_id && s.stage == stage)
        {
            self = self.stage(api_id, stage);
        }
        for s in &mut self.api_stages {
            if s.api_id == api_id && s.stage == stage {
                s.throttle
                    .insert(key.to_string(), ThrottleSettings::new(rate, burst));
            }
        }
        self
    }

    /// Sets the plan throttle.
    pub fn throttle(mut self, rate: f64, burst: i64) -> Self {
        self.throttle = Some(ThrottleSettings::new(rate, burst));
        self
    }

    /// Sets the quota with offset 0.
    pub fn quota(mut self, limit: i64, period: QuotaPeriod) -> Self {
        self.quota = Some(QuotaSettings {
            limit,
            offset: 0,
            period,
        });
        self
    }

    /// Sets the quota with an offset in days.
    pub fn quota_with_offset(mut self, limit: i64, period: QuotaPeriod, offset: i64) -> Self {
        self.quota = Some(QuotaSettings {
            limit,
            offset,
            period,
        });
        self
    }
}

impl ApiKey {
    /// An enabled key.
    pub fn new(id: impl Into<String>, value: impl Into<String>) -> Self {
        ApiKey {
            id: id.into(),
            value: value.into(),
            enabled: true,
            ..ApiKey::default()
        }
    }

    /// Sets `enabled`.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Sets the name.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }
}

impl Model {
    /// An empty model with the default account throttle (10,000 rps, burst 5,000).
    pub fn new() -> Self {
        Model::default()
    }

    /// Adds a REST API.
    pub fn api(mut self, api: RestApi) -> Self {
        self.rest_apis.push(api);
        self
    }

    /// Adds a usage plan.
    pub fn plan(mut self, plan: UsagePlan) -> Self {
        self.usage_plans.push(plan);
        self
    }

    /// Adds an API key.
    pub fn key(mut self, key: ApiKey) -> Self {
        self.api_keys.push(key);
        self
    }

    /// Puts a key into a plan.
    pub fn plan_key(mut self, plan_id: &str, key_id: &str) -> Self {
        self.usage_plan_keys.push(UsagePlanKey {
            usage_plan_id: plan_id.to_string(),
            key_id: key_id.to_string(),
        });
        self
    }

    /// Sets the account throttle.
    pub fn account_throttle(mut self, rate: f64, burst: i64) -> Self {
        self.account.throttle_settings = ThrottleSettings::new(rate, burst);
        self
    }

    /// The demo setup: one proxy API `demo` with stage `prod` forwarding to `upstream`, plan
    /// `silver` (rate/burst/quota per DAY) and one enabled key `demokey` with `key_value`.
    pub fn demo(
        upstream: &str,
        key_value: &str,
        rate: f64,
        burst: i64,
        quota_per_day: i64,
    ) -> Self {
        Model::new()
            .api(RestApi::proxy("demo", upstream).stage(Stage::new("prod")))
            .plan(
                UsagePlan::new("silver", "Silver")
                    .stage("demo", "prod")
                    .throttle(rate, burst)
                    .quota(quota_per_day, QuotaPeriod::Day),
            )
            .key(ApiKey::new("demokey", key_value).named("demo"))
            .plan_key("silver", "demokey")
    }
}

// ---------------------------------------------------------------------------------------------
// Validation of single values (also used by the admin API before it builds a model)
// ---------------------------------------------------------------------------------------------

/// Checks an API key value: 20..=128 characters.
pub fn validate_api_key_value(value: &str) -> Result<(), ModelError> {
    let n = value.chars().count();
    if n < MIN_KEY_VALUE_LEN {
        return Err(ModelError::bad_request(
            "API Key value should be at least 20 characters",
        ));
    }
    if n > MAX_KEY_VALUE_LEN {
        return Err(ModelError::bad_request(
            "API Key value exceeds maximum size of 128 characters",
        ));
    }
    Ok(())
}

/// Checks the value of a key being created or imported: [`validate_api_key_value`], and
/// visible ASCII only. A value with a space, a control character or a non-ASCII letter could
/// be stored but never matched: clients' HTTP stacks trim or refuse such header text. (Loading
/// a stored configuration keeps the length rule only, so a value accepted before still loads.)
pub fn validate_new_api_key_value(value: &str) -> Result<(), ModelError> {
    validate_api_key_value(value)?;
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ModelError::bad_request(
            "Invalid API Key value specified: use 20 to 128 visible ASCII characters, without spaces",
        ));
    }
    Ok(())
}

/// Checks an API key name: at most 1024 characters.
pub fn validate_api_key_name(name: Option<&str>) -> Result<(), ModelError> {
    match name {
        Some(n) if n.chars().count() > MAX_KEY_NAME_LEN => Err(ModelError::bad_request(
            "Invalid API Key name, can be at most 1024 characters.",
        )),
        _ => Ok(()),
    }
}

/// Checks an API key description: at most 125,000 characters.
pub fn validate_api_key_description(description: Option<&str>) -> Result<(), ModelError> {
    match description {
        Some(d) if d.chars().count() > MAX_KEY_DESCRIPTION_LEN => Err(ModelError::bad_request(
            "Invalid API Key description specified.",
        )),
        _ => Ok(()),
    }
}

/// Checks a whole API key (id, value, name, description).
pub fn validate_api_key(key: &ApiKey) -> Result<(), ModelError> {
    validate_id("API Key", &key.id)?;
    validate_api_key_value(&key.value)?;
    validate_api_key_name(key.name.as_deref())?;
    validate_api_key_description(key.description.as_deref())
}

/// Checks a plan or plan-method throttle: both members finite and non-negative.
pub fn validate_throttle(t: &ThrottleSettings) -> Result<(), ModelError> {
    if let Some(r) = t.rate_limit
        && !(r.is_finite() && r >= 0.0)
    {
        return Err(ModelError::bad_request(
            "Invalid throttle rateLimit specified. It must be a non-negative number.",
        ));
    }
    if let Some(b) = t.burst_limit
        && !(0..=i64::from(i32::MAX)).contains(&b)
    {
        return Err(ModelError::bad_request(
            "Invalid throttle burstLimit specified. It must be a non-negative integer.",
        ));
    }
    Ok(())
}

/// Checks a quota: non-negative limit and the offset rule of its period.
pub fn validate_quota(q: &QuotaSettings) -> Result<(), ModelError> {
    if !(0..=i64::from(i32::MAX)).contains(&q.limit) {
        return Err(ModelError::bad_request(
            "Invalid Usage Plan quota limit specified. It must be a non-negative integer.",
        ));
    }
    match q.period {
        QuotaPeriod::Day if q.offset != 0 => Err(ModelError::bad_request(
            "Usage Plan quota offset must be zero in the DAY period",
        )),
        QuotaPeriod::Week if !(0..=6).contains(&q.offset) => Err(ModelError::bad_request(
            "Usage Plan quota offset must be between 0 and 6 inclusive in the WEEK period",
        )),
        QuotaPeriod::Month if !(0..=27).contains(&q.offset) => Err(ModelError::bad_request(
            "Usage Plan quota offset must be between 0 and 27 inclusive in the MONTH period",
        )),
        _ => Ok(()),
    }
}

/// Checks a stage method setting: each member `-1` (off) or finite and non-negative.
pub fn validate_method_setting(key: &str, s: &MethodSetting) -> Result<(), ModelError> {
    let rate_ok = s.throttling_rate_limit == -1.0
        || (s.throttling_rate_limit.is_finite() && s.throttling_rate_limit >= 0.0);
    let burst_ok = s.throttling_burst_limit == -1
        || (0..=i64::from(i32::MAX)).contains(&s.throttling_burst_limit);
    if !rate_ok || !burst_ok {
        return Err(ModelError::bad_request(format!(
            "Invalid throttling settings for method setting {key}"
        )));
    }
    parse_method_setting_key(key).map(|_| ())
}

fn validate_id(what: &str, id: &str) -> Result<(), ModelError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(|c| c.is_control() || c == '/') {
        return Err(ModelError::bad_request(format!(
            "Invalid {what} identifier specified"
        )));
    }
    Ok(())
}

/// One parsed segment of a resource path template.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// Literal text.
    Literal(String),
    /// `{name}`: exactly one segment.
    Param(String),
    /// `{name+}`: one or more remaining segments (only last).
    Greedy(String),
}

/// Parses a resource path template (`/`, `/pets/{id}`, `/{proxy+}`) into segments.
pub fn parse_resource_path(path: &str) -> Result<Vec<Segment>, ModelError> {
    let bad = || ModelError::bad_request(format!("Invalid resource path specified: {path}"));
    if !path.starts_with('/') {
        return Err(bad());
    }
    if path == "/" {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = path[1..].split('/').collect();
    let mut out = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(bad());
        }
        if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            if let Some(name) = inner.strip_suffix('+') {
                if name.is_empty() || i + 1 != parts.len() || !valid_param_name(name) {
                    return Err(bad());
                }
                out.push(Segment::Greedy(name.to_string()));
            } else {
                if !valid_param_name(inner) {
                    return Err(bad());
                }
                out.push(Segment::Param(inner.to_string()));
            }
        } else if part.contains(['{', '}']) {
            return Err(bad());
        } else {
            out.push(Segment::Literal((*part).to_string()));
        }
    }
    Ok(out)
}

fn valid_param_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Parses a stage `methodSettings` key into `("*", "*")` or `(canonical "/path", METHOD)`.
/// Accepts `pets/GET`, `/pets/GET` and `~1pets/GET`.
pub fn parse_method_setting_key(key: &str) -> Result<(String, String), ModelError> {
    if key == "*/*" {
        return Ok(("*".to_string(), "*".to_string()));
    }
    let bad = || ModelError::bad_request(format!("Invalid method setting path: {key}"));
    let (path, method) = key.rsplit_once('/').ok_or_else(bad)?;
    let method = method.to_ascii_uppercase();
    if !HTTP_METHODS.contains(&method.as_str()) && method != "*" {
        return Err(bad());
    }
    let path = path.replace("~1", "/");
    let path = if path.starts_with('/') {
        path
    } else {
        format!("/{path}")
    };
    let path = if path.len() > 1 {
        path.trim_end_matches('/').to_string()
    } else {
        path
    };
    Ok((path, method))
}

/// Parses a plan `apiStages[].throttle` key (`"/pets/GET"`, root `"//GET"`) into `(path, METHOD)`.
pub fn parse_plan_method_key(key: &str) -> Result<(String, String), ModelError> {
    let bad = || ModelError::bad_request(format!("Invalid method throttle key specified: {key}"));
    let (path, method) = key.rsplit_once('/').ok_or_else(bad)?;
    let method = method.to_ascii_uppercase();
    if !HTTP_METHODS.contains(&method.as_str()) || !path.starts_with('/') {
        return Err(bad());
    }
    Ok((path.to_string(), method))
}

// ---------------------------------------------------------------------------------------------
// Whole-model validation and admin operations
// ---------------------------------------------------------------------------------------------

impl Model {
    /// Validates the whole snapshot (see the module invariants). The first violation wins.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_throttle(&self.account.throttle_settings)?;
        // Sets sized up front with a fast hasher: a configuration of a million keys is
        // validated on every change.
        use foldhash::{HashMapExt, HashSetExt};
        let mut api_ids = foldhash::HashSet::with_capacity(self.rest_apis.len());
        for api in &self.rest_apis {
            validate_id("REST API", &api.id)?;
            if !api_ids.insert(api.id.as_str()) {
                return Err(ModelError::conflict(format!(
                    "REST API {} already exists",
                    api.id
                )));
            }
            validate_rest_api(api)?;
        }
        let mut key_ids = foldhash::HashSet::with_capacity(self.api_keys.len());
        let mut values = foldhash::HashSet::with_capacity(self.api_keys.len());
        for key in &self.api_keys {
            validate_api_key(key)?;
            if !key_ids.insert(key.id.as_str()) {
                return Err(ModelError::conflict(format!(
                    "API Key {} already exists",
                    key.id
                )));
            }
            if !values.insert(key.value.as_str()) {
                return Err(ModelError::conflict("API Key already exists"));
            }
        }
        let mut plan_ids = foldhash::HashSet::with_capacity(self.usage_plans.len());
        for plan in &self.usage_plans {
            if !plan_ids.insert(plan.id.as_str()) {
                return Err(ModelError::conflict(format!(
                    "Usage Plan {} already exists",
                    plan.id
                )));
            }
            self.validate_usage_plan(plan)?;
        }
        let mut seen = foldhash::HashSet::with_capacity(self.usage_plan_keys.len());
        // (key id, api id, stage) -> plan id, for one-plan-per-key-per-stage.
        let mut stage_owner: foldhash::HashMap<(&str, &str, &str), &str> =
            foldhash::HashMap::with_capacity(self.usage_plan_keys.len());
        let plans: foldhash::HashMap<&str, &UsagePlan> = self
            .usage_plans
            .iter()
            .map(|p| (p.id.as_str(), p))
            .collect();
        for upk in &self.usage_plan_keys {
            let plan = plans
                .get(upk.usage_plan_id.as_str())
                .ok_or_else(ModelError::unknown_usage_plan)?;
            if !key_ids.contains(upk.key_id.as_str()) {
                return Err(ModelError::unknown_api_key());
            }
            if !seen.insert((upk.usage_plan_id.as_str(), upk.key_id.as_str())) {
                return Err(ModelError::conflict(format!(
                    "Usage Plan Key {} already exists in Usage Plan {}",
                    upk.key_id, upk.usage_plan_id
                )));
            }
            for s in &plan.api_stages {
                let slot = (upk.key_id.as_str(), s.api_id.as_str(), s.stage.as_str());
                if let Some(other) = stage_owner.insert(slot, plan.id.as_str())
                    && other != plan.id
                {
                    return Err(one_plan_per_stage(
                        &plan.id,
                        &upk.key_id,
                        &s.api_id,
                        &s.stage,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Validates a usage plan against the model's APIs (stages exist, throttles, quota).
    /// Unknown API stages give 400 (CreateUsagePlan's behaviour).
    pub fn validate_usage_plan(&self, plan: &UsagePlan) -> Result<(), ModelError> {
        validate_id("Usage Plan", &plan.id)?;
        if plan.name.is_empty() {
            return Err(ModelError::bad_request("Usage Plan name must be specified"));
        }
        if let Some(t) = &plan.throttle {
            validate_throttle(t)?;
        }
        if let Some(q) = &plan.quota {
            validate_quota(q)?;
        }
        let mut stages = HashSet::new();
        for s in &plan.api_stages {
            let stage_exists = self
                .rest_apis
                .iter()
                .find(|a| a.id == s.api_id)
                .is_some_and(|a| a.stages.iter().any(|st| st.stage_name == s.stage));
            if s.api_id.is_empty() || s.stage.is_empty() || !stage_exists {
                return Err(ModelError::invalid_api_stage(
                    ErrorKind::BadRequest,
                    &s.api_id,
                    &s.stage,
                    &plan.id,
                ));
            }
            if !stages.insert((s.api_id.as_str(), s.stage.as_str())) {
                return Err(ModelError::conflict(format!(
                    "API Stage {}:{} is already associated with usage plan {}",
                    s.api_id, s.stage, plan.id
                )));
            }
            for (k, t) in &s.throttle {
                parse_plan_method_key(k)?;
                validate_throttle(t)?;
            }
        }
        Ok(())
    }

    /// The API key with this id, or 404 `Invalid API Key identifier specified`.
    pub fn api_key(&self, id: &str) -> Result<&ApiKey, ModelError> {
        self.api_keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(ModelError::unknown_api_key)
    }

    /// The usage plan with this id, or 404 `Invalid Usage Plan ID specified`.
    pub fn usage_plan(&self, id: &str) -> Result<&UsagePlan, ModelError> {
        self.usage_plans
            .iter()
            .find(|p| p.id == id)
            .ok_or_else(ModelError::unknown_usage_plan)
    }

    /// CreateApiKey: validates and adds a key. A taken value is 409 `API Key already exists`.
    pub fn create_api_key(&mut self, key: ApiKey) -> Result<&ApiKey, ModelError> {
        validate_api_key(&key)?;
        validate_new_api_key_value(&key.value)?;
        if self.api_keys.iter().any(|k| k.value == key.value) {
            return Err(ModelError::conflict("API Key already exists"));
        }
        if self.api_keys.iter().any(|k| k.id == key.id) {
            return Err(ModelError::conflict(format!(
                "API Key {} already exists",
                key.id
            )));
        }
        self.api_keys.push(key);
        Ok(self.api_keys.last().expect("just pushed"))
    }

    /// DeleteApiKey: removes the key and its usage-plan memberships.
    pub fn delete_api_key(&mut self, id: &str) -> Result<ApiKey, ModelError> {
        let idx = self
            .api_keys
            .iter()
            .position(|k| k.id == id)
            .ok_or_else(ModelError::unknown_api_key)?;
        self.usage_plan_keys.retain(|u| u.key_id != id);
        Ok(self.api_keys.remove(idx))
    }

    /// CreateUsagePlan: validates and adds a plan (unknown stages are 400).
    pub fn create_usage_plan(&mut self, plan: UsagePlan) -> Result<&UsagePlan, ModelError> {
        self.validate_usage_plan(&plan)?;
        if self.usage_plans.iter().any(|p| p.id == plan.id) {
            return Err(ModelError::conflict(format!(
                "Usage Plan {} already exists",
                plan.id
            )));
        }
        self.usage_plans.push(plan);
        Ok(self.usage_plans.last().expect("just pushed"))
    }

    /// DeleteUsagePlan: refused with 400 while the plan still has API stages.
    pub fn delete_usage_plan(&mut self, id: &str) -> Result<UsagePlan, ModelError> {
        let idx = self
            .usage_plans
            .iter()
            .position(|p| p.id == id)
            .ok_or_else(ModelError::unknown_usage_plan)?;
        if let Some(s) = self.usage_plans[idx].api_stages.first() {
            return Err(ModelError::bad_request(format!(
                "Cannot delete Usage Plan {id} because there are API Stages associated with it, including {}:{}",
                s.api_id, s.stage
            )));
        }
        self.usage_plan_keys.retain(|u| u.usage_plan_id != id);
        Ok(self.usage_plans.remove(idx))
    }

    /// Adds an API stage to a plan (UpdateUsagePlan `add /apiStages`). Unknown API or stage is
    /// 404 with AWS's formatted text; a key that would then be in two plans for the stage is 409.
    pub fn add_api_stage(
        &mut self,
        plan_id: &str,
        api_id: &str,
        stage: &str,
    ) -> Result<(), ModelError> {
        let plan = self.usage_plan(plan_id)?;
        let exists = self
            .rest_apis
            .iter()
            .find(|a| a.id == api_id)
            .is_some_and(|a| a.stages.iter().any(|s| s.stage_name == stage));
        if !exists {
            return Err(ModelError::invalid_api_stage(
                ErrorKind::NotFound,
                api_id,
                stage,
                plan_id,
            ));
        }
        if plan
            .api_stages
            .iter()
            .any(|s| s.api_id == api_id && s.stage == stage)
        {
            return Err(ModelError::conflict(format!(
                "API Stage {api_id}:{stage} is already associated with usage plan {plan_id}"
            )));
        }
        for upk in self
            .usage_plan_keys
            .iter()
            .filter(|u| u.usage_plan_id == plan_id)
        {
            if let Some(other) = self.plan_of_key_for_stage(&upk.key_id, api_id, stage)
                && other != plan_id
            {
                return Err(one_plan_per_stage(plan_id, &upk.key_id, api_id, stage));
            }
        }
        let plan = self
            .usage_plans
            .iter_mut()
            .find(|p| p.id == plan_id)
            .expect("plan looked up above");
        plan.api_stages.push(ApiStage {
            api_id: api_id.to_string(),
            stage: stage.to_string(),
            throttle: BTreeMap::new(),
        });
        Ok(())
    }

    /// CreateUsagePlanKey: unknown plan or key is 404; an existing membership or a second plan
    /// for one of the plan's stages is 409.
    pub fn create_usage_plan_key(
        &mut self,
        plan_id: &str,
        key_id: &str,
    ) -> Result<UsagePlanKeyView, ModelError> {
        let plan = self.usage_plan(plan_id)?;
        let key = self.api_key(key_id)?;
        let view = UsagePlanKeyView {
            id: key.id.clone(),
            key_type: "API_KEY".to_string(),
            value: key.value.clone(),
            name: key.name.clone(),
        };
        if self
            .usage_plan_keys
            .iter()
            .any(|u| u.usage_plan_id == plan_id && u.key_id == key_id)
        {
            return Err(ModelError::conflict(format!(
                "Usage Plan Key {key_id} already exists in Usage Plan {plan_id}"
            )));
        }
        for s in &plan.api_stages {
            if let Some(other) = self.plan_of_key_for_stage(key_id, &s.api_id, &s.stage)
                && other != plan_id
            {
                return Err(one_plan_per_stage(plan_id, key_id, &s.api_id, &s.stage));
            }
        }
        self.usage_plan_keys.push(UsagePlanKey {
            usage_plan_id: plan_id.to_string(),
            key_id: key_id.to_string(),
        });
        Ok(view)
    }

    /// DeleteUsagePlanKey.
    pub fn delete_usage_plan_key(&mut self, plan_id: &str, key_id: &str) -> Result<(), ModelError> {
        self.usage_plan(plan_id)?;
        self.api_key(key_id)?;
        let before = self.usage_plan_keys.len();
        self.usage_plan_keys
            .retain(|u| !(u.usage_plan_id == plan_id && u.key_id == key_id));
        if self.usage_plan_keys.len() == before {
            return Err(ModelError::unknown_api_key());
        }
        Ok(())
    }

    /// The plan a key is in for an API stage, if any.
    pub fn plan_of_key_for_stage(&self, key_id: &str, api_id: &str, stage: &str) -> Option<&str> {
        self.usage_plan_keys
            .iter()
            .filter(|u| u.key_id == key_id)
            .filter_map(|u| self.usage_plans.iter().find(|p| p.id == u.usage_plan_id))
            .find(|p| {
                p.api_stages
                    .iter()
                    .any(|s| s.api_id == api_id && s.stage == stage)
            })
            .map(|p| p.id.as_str())
    }
}

/// The one-plan-per-key-per-stage violation (409). AWS's exact text is unconfirmed; this wording
/// is the one reported by users of the AWS console.
fn one_plan_per_stage(plan: &str, key: &str, api: &str, stage: &str) -> ModelError {
    ModelError::conflict(format!(
        "Usage Plan {plan} cannot be added because API Key {key} cannot reference multiple Usage Plans with the same API Stage: {api}:{stage}"
    ))
}

fn validate_rest_api(api: &RestApi) -> Result<(), ModelError> {
    validate_resources(&api.resources)?;
    for d in &api.deployments {
        validate_resources(&d.resources)?;
    }
    let mut stages = HashSet::new();
    for s in &api.stages {
        if s.stage_name.is_empty() || s.stage_name.contains('/') {
            return Err(ModelError::bad_request("Stage name only allows a-zA-Z0-9_"));
        }
        if !stages.insert(s.stage_name.as_str()) {
            return Err(ModelError::conflict("Stage already exists"));
        }
        for (k, v) in &s.method_settings {
            validate_method_setting(k, v)?;
        }
    }
    Ok(())
}

/// Checks one resource list (an API's live resources or a deployment's snapshot): well-formed,
/// unique paths, one variable child per parent, known HTTP methods, integration timeouts.
fn validate_resources(resources: &[Resource]) -> Result<(), ModelError> {
    let mut paths = HashSet::new();
    // parent path -> variable child name, for the one-variable-sibling rule.
    let mut variable_child: HashMap<String, String> = HashMap::new();
    for r in resources {
        let segs = parse_resource_path(&r.path)?;
        if !paths.insert(r.path.as_str()) {
            return Err(ModelError::conflict(format!(
                "Another resource with the same parent already has this name: {}",
                r.path
            )));
        }
        if let Some(last) = segs.last()
            && matches!(last, Segment::Param(_) | Segment::Greedy(_))
        {
            let parent = r.path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            let name = r.path.rsplit('/').next().unwrap_or("").to_string();
            if let Some(prev) = variable_child.insert(parent.to_string(), name.clone())
                && prev != name
            {
                return Err(ModelError::bad_request(format!(
                    "A sibling ({prev}) of this resource already has a variable path part -- only one is allowed"
                )));
            }
        }
        for (m, method) in &r.resource_methods {
            if !HTTP_METHODS.contains(&m.as_str()) {
                return Err(ModelError::bad_request(format!(
                    "Invalid HttpMethod specified. Valid options are {}",
                    HTTP_METHODS.join(",")
                )));
            }
            if let Some(i) = &method.method_integration
                && !(50..=29_000).contains(&i.timeout_in_millis)
            {
                return Err(ModelError::bad_request(
                    "Timeout should be between 50 ms and 29000 ms",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_setting_keys_are_canonicalised() {
        assert_eq!(
            parse_method_setting_key("*/*").expect("ok"),
            ("*".into(), "*".into())
        );
        assert_eq!(
            parse_method_setting_key("pets/GET").expect("ok"),
            ("/pets".into(), "GET".into())
        );
        assert_eq!(
            parse_method_setting_key("~1pets/get").expect("ok"),
            ("/pets".into(), "GET".into())
        );
        assert_eq!(
            parse_method_setting_key("/GET").expect("ok"),
            ("/".into(), "GET".into())
        );
        assert!(parse_method_setting_key("pets").is_err());
        assert!(parse_method_setting_key("pets/FETCH").is_err());
    }

    #[test]
    fn plan_method_keys() {
        assert_eq!(
            parse_plan_method_key("//GET").expect("ok"),
            ("/".into(), "GET".into())
        );
        assert_eq!(
            parse_plan_method_key("/pets/{id}/PUT").expect("ok"),
            ("/pets/{id}".into(), "PUT".into())
        );
        assert!(parse_plan_method_key("pets/GET").is_err());
    }

    #[test]
    fn resource_paths() {
        assert_eq!(parse_resource_path("/").expect("root"), vec![]);
        assert_eq!(
            parse_resource_path("/a/{b}/{c+}").expect("ok"),
            vec![
                Segment::Literal("a".into()),
                Segment::Param("b".into()),
                Segment::Greedy("c".into())
            ]
        );
        for bad in ["", "a", "/a//b", "/{x+}/y", "/{}", "/a{b}", "/a/"] {
            assert!(parse_resource_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn effective_throttle_rules() {
        assert_eq!(ThrottleSettings::new(2.0, 5).effective(), Some((2.0, 5)));
        let only_rate = ThrottleSettings {
            rate_limit: Some(2.5),
            burst_limit: None,
        };
        assert_eq!(only_rate.effective(), Some((2.5, 3)));
        let only_burst = ThrottleSettings {
            rate_limit: None,
            burst_limit: Some(3),
        };
        assert_eq!(only_burst.effective(), None);
    }

    #[test]
    fn json_uses_aws_names() {
        let m = Model::demo(
            "http://127.0.0.1:9000",
            "abcdefghijklmnopqrstuvwxyz",
            2.0,
            1,
            10,
        );
        let v = serde_json::to_value(&m).expect("serialise");
        assert_eq!(v["restApis"][0]["apiKeySource"], "HEADER");
        assert_eq!(v["usagePlans"][0]["apiStages"][0]["apiId"], "demo");
        assert_eq!(v["usagePlans"][0]["quota"]["period"], "DAY");
        assert_eq!(v["usagePlans"][0]["throttle"]["rateLimit"], 2.0);
        assert_eq!(v["apiKeys"][0]["enabled"], true);
        let back: Model = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, m);
        assert!(m.validate().is_ok());
    }
}
