//! Tags: TagResource (`PUT /tags/{arn}`, 204), UntagResource (`DELETE /tags/{arn}?tagKeys=`,
//! 204) and GetTags (`GET /tags/{arn}`) on API keys, usage plans, REST APIs and stages, named
//! by their ARNs: `arn:{partition}:apigateway:{region}::/apikeys/{id}`, `::/usageplans/{id}`,
//! `::/restapis/{id}` and `::/restapis/{id}/stages/{name}`. Any partition and region name the
//! gateway's own resources (it has one region).
//!
//! Limits, checked here and on the create calls that take `tags`: at most [`MAX_TAGS`] tags per
//! resource, keys of 1 to 128 characters, values of at most 256, and no key starting with
//! `aws:` (reserved, as on AWS). Tagging merges (a key given again takes the new value);
//! untagging keys the resource does not have is not an error.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::json;

use super::wire::{ApiError, Req, tags_json};
use super::{Ctx, Reply};
use crate::plan::{Model, ModelError};

/// Most tags one resource may carry.
pub const MAX_TAGS: usize = 50;

/// The resource an ARN names.
enum Target {
    ApiKey(String),
    Plan(String),
    Api(String),
    Stage(String, String),
}

fn target(arn: &str) -> Result<Target, ModelError> {
    let invalid = || {
        ModelError::bad_request(format!(
            "Invalid resource ARN {arn}: expected arn:aws:apigateway:{{region}}::/apikeys/{{id}}, ::/usageplans/{{id}}, ::/restapis/{{id}} or ::/restapis/{{id}}/stages/{{name}}"
        ))
    };
    let (head, path) = arn.split_once("::").ok_or_else(invalid)?;
    match head.split(':').collect::<Vec<_>>().as_slice() {
        ["arn", partition, "apigateway", _region] if !partition.is_empty() => {}
        _ => return Err(invalid()),
    }
    let parts: Vec<&str> = path
        .strip_prefix('/')
        .ok_or_else(invalid)?
        .split('/')
        .collect();
    match parts.as_slice() {
        ["apikeys", id] if !id.is_empty() => Ok(Target::ApiKey(id.to_string())),
        ["usageplans", id] if !id.is_empty() => Ok(Target::Plan(id.to_string())),
        ["restapis", id] if !id.is_empty() => Ok(Target::Api(id.to_string())),
        ["restapis", id, "stages", name] if !id.is_empty() && !name.is_empty() => {
            Ok(Target::Stage(id.to_string(), name.to_string()))
        }
        _ => Err(invalid()),
    }
}

/// Where a target's tags are in the model.
#[derive(Clone, Copy)]
enum Loc {
    ApiKey(usize),
    Plan(usize),
    Api(usize),
    Stage(usize, usize),
}

fn locate(m: &Model, t: &Target) -> Result<Loc, ModelError> {
    let api = |id: &str| {
        m.rest_apis
            .iter()
            .position(|a| a.id == id)
            .ok_or_else(|| ModelError::not_found("Invalid API identifier specified"))
    };
    match t {
        Target::ApiKey(id) => m
            .api_keys
            .iter()
            .position(|k| k.id == *id)
            .map(Loc::ApiKey)
            .ok_or_else(ModelError::unknown_api_key),
        Target::Plan(id) => m
            .usage_plans
            .iter()
            .position(|p| p.id == *id)
            .map(Loc::Plan)
            .ok_or_else(ModelError::unknown_usage_plan),
        Target::Api(id) => api(id).map(Loc::Api),
        Target::Stage(id, name) => {
            let a = api(id)?;
            m.rest_apis[a]
                .stages
                .iter()
                .position(|s| s.stage_name == *name)
                .map(|s| Loc::Stage(a, s))
                .ok_or_else(|| ModelError::not_found("Invalid Stage identifier specified"))
        }
    }
}

fn tags_at(m: &Model, loc: Loc) -> &BTreeMap<String, String> {
    match loc {
        Loc::ApiKey(i) => &m.api_keys[i].tags,
        Loc::Plan(i) => &m.usage_plans[i].tags,
        Loc::Api(a) => &m.rest_apis[a].tags,
        Loc::Stage(a, s) => &m.rest_apis[a].stages[s].tags,
    }
}

fn tags_at_mut(m: &mut Model, loc: Loc) -> &mut BTreeMap<String, String> {
    match loc {
        Loc::ApiKey(i) => &mut m.api_keys[i].tags,
        Loc::Plan(i) => &mut m.usage_plans[i].tags,
        Loc::Api(a) => &mut m.rest_apis[a].tags,
        Loc::Stage(a, s) => &mut m.rest_apis[a].stages[s].tags,
    }
}

/// Checks a resource's tags against the limits in the module docs.
pub fn check(tags: &BTreeMap<String, String>) -> Result<(), ModelError> {
    for (k, v) in tags {
        let len = k.chars().count();
        if len == 0 || len > 128 {
            return Err(ModelError::bad_request(format!(
                "Invalid tag key {k:?}: a tag key has 1 to 128 characters"
            )));
        }
        if k.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:")) {
            return Err(ModelError::bad_request(format!(
                "Invalid tag key {k:?}: the aws: prefix is reserved"
            )));
        }
        if v.chars().count() > 256 {
            return Err(ModelError::bad_request(format!(
                "Invalid value for tag {k:?}: a tag value has at most 256 characters"
            )));
        }
    }
    if tags.len() > MAX_TAGS {
        return Err(ModelError::bad_request(format!(
            "Too many tags: a resource has at most {MAX_TAGS} tags, this one would have {}",
            tags.len()
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
struct TagBody {
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// PUT /tags/{arn}
pub fn tag(ctx: &Ctx, req: &Req, arn: &str) -> Result<Reply, ApiError> {
    let body: TagBody = req.json()?;
    let t = target(arn)?;
    ctx.control.update(move |m| {
        let loc = locate(m, &t)?;
        let mut merged = tags_at(m, loc).clone();
        merged.extend(body.tags);
        check(&merged)?;
        *tags_at_mut(m, loc) = merged;
        Ok(())
    })?;
    Ok(Reply::no_content())
}

/// DELETE /tags/{arn}?tagKeys=k1&tagKeys=k2
pub fn untag(ctx: &Ctx, req: &Req, arn: &str) -> Result<Reply, ApiError> {
    let keys: Vec<String> = req
        .query
        .iter()
        .filter(|(k, _)| k == "tagKeys")
        .map(|(_, v)| v.clone())
        .collect();
    if keys.is_empty() {
        return Err(ApiError::bad_request(
            "tagKeys is required: name the tag keys to remove",
        ));
    }
    let t = target(arn)?;
    ctx.control.update(move |m| {
        let loc = locate(m, &t)?;
        let tags = tags_at_mut(m, loc);
        for k in &keys {
            tags.remove(k);
        }
        Ok(())
    })?;
    Ok(Reply::no_content())
}

/// GET /tags/{arn}
pub fn get(ctx: &Ctx, arn: &str) -> Result<Reply, ApiError> {
    let t = target(arn)?;
    let m = ctx.control.model();
    let loc = locate(&m, &t)?;
    Ok(Reply::ok(json!({ "tags": tags_json(tags_at(&m, loc)) })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns_name_keys_plans_apis_and_stages() {
        assert!(matches!(
            target("arn:aws:apigateway:us-east-1::/apikeys/abc"),
            Ok(Target::ApiKey(id)) if id == "abc"
        ));
        assert!(matches!(
            target("arn:aws-cn:apigateway:cn-north-1::/usageplans/p1"),
            Ok(Target::Plan(id)) if id == "p1"
        ));
        assert!(matches!(
            target("arn:aws:apigateway:eu-west-1::/restapis/a1/stages/prod"),
            Ok(Target::Stage(a, s)) if a == "a1" && s == "prod"
        ));
        for bad in [
            "",
            "apikeys/abc",
            "arn:aws:s3:us-east-1::/apikeys/abc",
            "arn:aws:apigateway:us-east-1::/apikeys/",
            "arn:aws:apigateway:us-east-1::/restapis/a1/resources/r1",
            "arn:aws:apigateway:us-east-1:/apikeys/abc",
        ] {
            let e = target(bad).err().expect(bad);
            assert!(
                e.message.starts_with("Invalid resource ARN"),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn tag_limits() {
        let tags = |pairs: &[(&str, String)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        assert!(check(&tags(&[("team", "billing".into())])).is_ok());
        assert!(check(&tags(&[("k", "v".repeat(256))])).is_ok());
        assert!(check(&tags(&[("k", "v".repeat(257))])).is_err());
        assert!(check(&tags(&[("", "v".into())])).is_err());
        assert!(check(&tags(&[(&"k".repeat(129), "v".into())])).is_err());
        assert!(check(&tags(&[("AWS:x", "v".into())])).is_err());
        let many: BTreeMap<String, String> = (0..=MAX_TAGS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(check(&many).is_err());
    }
}
