//! API keys: CreateApiKey, GetApiKey, GetApiKeys, UpdateApiKey, DeleteApiKey, ImportApiKeys.
//!
//! Shapes follow AWS: `value` only with `includeValue(s)=true` (always on create), `stageKeys`
//! always present, `tags` left out of create/get/list when empty and `{}` on update. Lists keep
//! creation order (oldest first); `position` resumes after the last key returned, so paging
//! stays complete while keys are added or deleted between pages (see [`wire::page`]).

use std::collections::{BTreeMap, HashMap};

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::wire::{self, ApiError, Order, Req, new_id, put_opt, tags_json};
use super::{Ctx, Reply};
use crate::plan::{ApiKey, Model, ModelError, UsagePlanKey};

/// Longest ImportApiKeys CSV, in rows (AWS limits keys per account to 10,000 by default).
pub const MAX_IMPORT_ROWS: usize = 100_000;

/// The JSON of a key. `value` and `tags` ({} when empty) on request.
pub fn key_json(k: &ApiKey, include_value: bool, empty_tags: bool) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), k.id.clone().into());
    if include_value {
        o.insert("value".into(), k.value.clone().into());
    }
    put_opt(&mut o, "name", k.name.clone());
    put_opt(&mut o, "description", k.description.clone());
    put_opt(&mut o, "customerId", k.customer_id.clone());
    o.insert("enabled".into(), k.enabled.into());
    put_opt(&mut o, "createdDate", k.created_date);
    put_opt(&mut o, "lastUpdatedDate", k.last_updated_date);
    o.insert("stageKeys".into(), json!(k.stage_keys));
    if empty_tags || !k.tags.is_empty() {
        o.insert("tags".into(), tags_json(&k.tags));
    }
    Value::Object(o)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StageKey {
    #[serde(default)]
    rest_api_id: String,
    #[serde(default)]
    stage_name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateKey {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    stage_keys: Vec<StageKey>,
    #[serde(default)]
    customer_id: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// POST /apikeys
pub fn create(ctx: &Ctx, req: &Req) -> Result<Reply, ApiError> {
    let body: CreateKey = req.json()?;
    super::tags::check(&body.tags)?;
    let now = ctx.control.now_secs();
    let key = ctx.control.update(move |m| {
        let stage_keys = body
            .stage_keys
            .iter()
            .map(|s| stage_key(m, &s.rest_api_id, &s.stage_name))
            .collect::<Result<Vec<_>, _>>()?;
        let key = ApiKey {
            id: new_id(10, |id| m.api_keys.iter().any(|k| k.id == id)),
            value: match body.value {
                Some(v) if !v.is_empty() => v,
                _ => wire::new_key_value(),
            },
            name: body.name.filter(|n| !n.is_empty()),
            description: body.description,
            enabled: body.enabled,
            customer_id: body.customer_id,
            created_date: Some(now),
            last_updated_date: Some(now),
            stage_keys,
            tags: body.tags,
        };
        m.create_api_key(key).cloned()
    })?;
    Ok(Reply::json(
        StatusCode::CREATED,
        key_json(&key, true, false),
    ))
}

fn stage_key(m: &Model, api: &str, stage: &str) -> Result<String, ModelError> {
    let exists = m
        .rest_apis
        .iter()
        .find(|a| a.id == api)
        .is_some_and(|a| a.stages.iter().any(|s| s.stage_name == stage));
    if !exists {
        return Err(ModelError::bad_request(format!(
            "Invalid stage key specified: {api}/{stage}"
        )));
    }
    Ok(format!("{api}/{stage}"))
}

/// GET /apikeys/{id}
pub fn get(ctx: &Ctx, req: &Req, id: &str) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let k = m.api_key(id)?;
    Ok(Reply::ok(key_json(k, req.flag("includeValue"), false)))
}

/// GET /apikeys
pub fn list(ctx: &Ctx, req: &Req) -> Result<Reply, ApiError> {
    let m = ctx.control.model();
    let name = req.param("name");
    let customer = req.param("customerId");
    let keys: Vec<&ApiKey> = m
        .api_keys
        .iter()
        .filter(|k| name.is_none_or(|n| k.name.as_deref().unwrap_or("").starts_with(n)))
        .filter(|k| customer.is_none_or(|c| k.customer_id.as_deref() == Some(c)))
        .collect();
    let include = req.flag("includeValues");
    let page = wire::page(req, keys, Order::Created, |k| k.id.as_str())?;
    Ok(Reply::ok(page.to_json(|k| key_json(k, include, false))))
}

/// PATCH /apikeys/{id}
pub fn update(ctx: &Ctx, req: &Req, id: &str) -> Result<Reply, ApiError> {
    const PATHS: [&str; 4] = ["/description", "/enabled", "/name", "/customerId"];
    let ops = req.patch()?;
    let now = ctx.control.now_secs();
    let id = id.to_string();
    let key = ctx.control.update(move |m| {
        let key = m
            .api_keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(ModelError::unknown_api_key)?;
        for op in &ops {
            if op.op != "replace" || !PATHS.contains(&op.path.as_str()) {
                return Err(op.invalid(&PATHS));
            }
            match op.path.as_str() {
                "/description" => key.description = op.value.clone(),
                "/enabled" => key.enabled = op.boolean()?,
                "/name" => key.name = op.value.clone().filter(|n| !n.is_empty()),
                _ => key.customer_id = op.value.clone(),
            }
        }
        key.last_updated_date = Some(now);
        crate::plan::validate_api_key(key)?;
        Ok(key.clone())
    })?;
    Ok(Reply::ok(key_json(&key, false, true)))
}

/// DELETE /apikeys/{id}
pub fn delete(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    let id = id.to_string();
    ctx.control
        .update(move |m| m.delete_api_key(&id).map(drop))?;
    Ok(Reply::accepted())
}

/// POST /apikeys?mode=import&format=csv[&failonwarnings=true]
///
/// Columns `Name` and `Key` are required, `Description`, `Enabled` (default true) and
/// `UsagePlanIds` (comma separated, inside `"..."` or `'...'` when there is more than one)
/// optional; header names are case-insensitive and unknown columns ignored. A row whose `Key`
/// value exists updates that key. A bad row is skipped with a warning; a row with more fields
/// than the header has columns is imported with a warning naming the ignored fields. With
/// `failonwarnings=true` any warning fails the whole import and nothing changes.
pub fn import(ctx: &Ctx, req: &Req) -> Result<Reply, ApiError> {
    match req.param("format") {
        Some(f) if f.eq_ignore_ascii_case("csv") => {}
        other => {
            return Err(ApiError::bad_request(format!(
                "Invalid format specified: {}; only csv is supported",
                other.unwrap_or("")
            )));
        }
    }
    let rows = parse_csv(&req.body)?;
    let fail_on_warnings = req.flag("failonwarnings");
    let now = ctx.control.now_secs();
    let (ids, warnings) = ctx.control.update(move |m| {
        let mut ids = Vec::new();
        let mut warnings = Vec::new();
        // Lookups by value and id, built once: an import is linear in rows + stored keys.
        let mut index = ImportIndex {
            by_value: m
                .api_keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.value.clone(), i))
                .collect(),
            ids: m.api_keys.iter().map(|k| k.id.clone()).collect(),
        };
        for row in rows {
            if let Some(note) = &row.note {
                warnings.push(format!("Line {}: {note}", row.line));
            }
            match import_row(m, &mut index, &row, now) {
                Ok(id) => ids.push(id),
                Err(e) => warnings.push(format!("Line {}: {}", row.line, e.message)),
            }
        }
        if fail_on_warnings && !warnings.is_empty() {
            return Err(ModelError::bad_request(format!(
                "Import failed with warnings: {}",
                warnings.join("; ")
            )));
        }
        Ok((ids, warnings))
    })?;
    let mut out = serde_json::Map::new();
    out.insert("ids".into(), json!(ids));
    if !warnings.is_empty() {
        out.insert("warnings".into(), json!(warnings));
    }
    Ok(Reply::json(StatusCode::CREATED, Value::Object(out)))
}

struct Row {
    line: u64,
    /// A warning about the row that does not stop its import.
    note: Option<String>,
    name: String,
    key: String,
    description: Option<String>,
    enabled: bool,
    plans: Vec<String>,
}

fn parse_csv(body: &[u8]) -> Result<Vec<Row>, ApiError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(body);
    let headers = reader
        .headers()
        .map_err(|e| ApiError::bad_request(format!("Invalid API key CSV: {e}")))?
        .clone();
    let column: HashMap<String, usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| (h.to_ascii_lowercase(), i))
        .collect();
    let (Some(&name_col), Some(&key_col)) = (column.get("name"), column.get("key")) else {
        return Err(ApiError::bad_request(
            "Invalid API key CSV: the header must name the columns Name and Key",
        ));
    };
    let plans_col = column.get("usageplanids").copied();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record =
            record.map_err(|e| ApiError::bad_request(format!("Invalid API key CSV: {e}")))?;
        if rows.len() >= MAX_IMPORT_ROWS {
            return Err(ApiError::bad_request(format!(
                "Invalid API key CSV: more than {MAX_IMPORT_ROWS} rows"
            )));
        }
        let line = record.position().map_or(0, |p| p.line());
        let fields = match plans_col {
            Some(col) => join_single_quoted(record.iter().collect(), col),
            None => record.iter().map(str::to_string).collect(),
        };
        let note = (fields.len() > headers.len()).then(|| {
            format!(
                "the row has {} fields but the header names {} columns; the fields after the {} were ignored",
                fields.len(),
                headers.len(),
                ordinal(headers.len())
            )
        });
        let field =
            |col: Option<&usize>| col.and_then(|&i| fields.get(i)).map_or("", String::as_str);
        let enabled = field(column.get("enabled"));
        rows.push(Row {
            line,
            note,
            name: field(Some(&name_col)).to_string(),
            key: field(Some(&key_col)).to_string(),
            description: Some(field(column.get("description")))
                .filter(|d| !d.is_empty())
                .map(str::to_string),
            enabled: enabled.is_empty() || enabled.eq_ignore_ascii_case("true"),
            plans: field(plans_col.as_ref())
                .trim_matches(|c| c == '"' || c == '\'')
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(rows)
}

/// The fields of a record with a `'...'`-quoted list in column `col` made one field again.
///
/// The CSV reader only knows `"` as a quote, so `'p1,p2'` arrives as the fields `'p1` and
/// `p2'`. When the field at `col` opens a single quote it does not close, it is joined (with
/// `,`) with the fields up to the first one that ends with `'`; with no such field the record
/// is left as it is. Only that column is treated so: a `'` elsewhere (`O'Brien`) is text.
fn join_single_quoted(fields: Vec<&str>, col: usize) -> Vec<String> {
    let opens = fields
        .get(col)
        .is_some_and(|f| f.starts_with('\'') && (f.len() == 1 || !f.ends_with('\'')));
    let close = fields
        .iter()
        .enumerate()
        .skip(col + 1)
        .find(|(_, f)| f.ends_with('\''))
        .map(|(i, _)| i);
    match close {
        Some(close) if opens => {
            let mut out: Vec<String> = fields[..col].iter().map(|f| f.to_string()).collect();
            out.push(fields[col..=close].join(","));
            out.extend(fields[close + 1..].iter().map(|f| f.to_string()));
            out
        }
        _ => fields.into_iter().map(str::to_string).collect(),
    }
}

/// `1st`, `2nd`, `3rd`, `4th`, ... (column counts in import warnings).
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// Keys of the model being imported into, by value and by id.
struct ImportIndex {
    by_value: HashMap<String, usize>,
    ids: std::collections::HashSet<String>,
}

/// Creates or updates the key of one row and adds it to the row's plans; all or nothing.
fn import_row(
    m: &mut Model,
    index: &mut ImportIndex,
    row: &Row,
    now: i64,
) -> Result<String, ModelError> {
    crate::plan::validate_new_api_key_value(&row.key)?;
    crate::plan::validate_api_key_name(Some(&row.name))?;
    crate::plan::validate_api_key_description(row.description.as_deref())?;
    for plan in &row.plans {
        m.usage_plan(plan)?;
    }
    // Creation and memberships append; an update replaces one key. Undo exactly that on error.
    let (keys_len, members_len) = (m.api_keys.len(), m.usage_plan_keys.len());
    let mut previous = None;
    let id = match index.by_value.get(&row.key) {
        Some(&i) => {
            let k = &mut m.api_keys[i];
            previous = Some((i, k.clone()));
            k.name = Some(row.name.clone()).filter(|n| !n.is_empty());
            k.description = row.description.clone();
            k.enabled = row.enabled;
            k.last_updated_date = Some(now);
            k.id.clone()
        }
        None => {
            let id = new_id(10, |id| index.ids.contains(id));
            let key = ApiKey {
                id: id.clone(),
                value: row.key.clone(),
                name: Some(row.name.clone()).filter(|n| !n.is_empty()),
                description: row.description.clone(),
                enabled: row.enabled,
                created_date: Some(now),
                last_updated_date: Some(now),
                ..ApiKey::default()
            };
            crate::plan::validate_api_key(&key)?;
            m.api_keys.push(key);
            id
        }
    };
    if previous.is_none() {
        // A new key is in no plan yet: only the row's own plans can clash on a stage.
        if let Err(e) = add_new_key_to_plans(m, &id, &row.plans) {
            m.api_keys.truncate(keys_len);
            return Err(e);
        }
        index.by_value.insert(row.key.clone(), keys_len);
        index.ids.insert(id.clone());
        return Ok(id);
    }
    for plan in &row.plans {
        let member = UsagePlanKey {
            usage_plan_id: plan.clone(),
            key_id: id.clone(),
        };
        if m.usage_plan_keys.contains(&member) {
            continue;
        }
        if let Err(e) = m.create_usage_plan_key(plan, &id) {
            m.usage_plan_keys.truncate(members_len);
            m.api_keys.truncate(keys_len);
            if let Some((i, old)) = previous {
                m.api_keys[i] = old;
            }
            return Err(e);
        }
    }
    Ok(id)
}

/// Adds a key that is in no plan to `plans` (each existing), refusing two plans that share
/// an API stage ("one plan per key per stage") as CreateUsagePlanKey does.
fn add_new_key_to_plans(m: &mut Model, id: &str, plans: &[String]) -> Result<(), ModelError> {
    let mut stages: HashMap<(&str, &str), &str> = HashMap::new();
    let mut unique: Vec<&String> = Vec::new();
    for plan_id in plans {
        if unique.contains(&plan_id) {
            continue;
        }
        unique.push(plan_id);
        let plan = m.usage_plan(plan_id)?;
        for s in &plan.api_stages {
            if let Some(other) = stages.insert((s.api_id.as_str(), s.stage.as_str()), plan_id) {
                return Err(ModelError::conflict(format!(
                    "Usage Plan {plan_id} cannot be added because API Key {id} cannot reference multiple Usage Plans with the same API Stage: {}:{} (also in {other})",
                    s.api_id, s.stage
                )));
            }
        }
    }
    for plan_id in unique {
        m.usage_plan_keys.push(UsagePlanKey {
            usage_plan_id: plan_id.clone(),
            key_id: id.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_quoted_plan_list_is_one_field() {
        let joined = join_single_quoted(vec!["n", "k", "'p1", "p2", "p3'", "d"], 2);
        assert_eq!(joined, ["n", "k", "'p1,p2,p3'", "d"]);
        // Closed in one field, unclosed, or quoted elsewhere: left alone.
        for fields in [
            vec!["n", "k", "'p1'", "d"],
            vec!["n", "k", "'p1", "p2"],
            vec!["O'Brien", "k", "p1", "d'"],
        ] {
            let same: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
            assert_eq!(join_single_quoted(fields, 2), same);
        }
    }

    #[test]
    fn rows_with_more_fields_than_the_header_carry_a_note() {
        let value = "a".repeat(30);
        let csv = format!("name,key,usageplanids\nn1,{value},'p1,p2'\nn2,{value},p1,p2\n");
        let rows = parse_csv(csv.as_bytes()).expect("a valid CSV");
        assert_eq!(rows[0].plans, ["p1", "p2"]);
        assert_eq!(rows[0].note, None);
        assert_eq!(rows[1].plans, ["p1"]);
        assert_eq!(
            rows[1].note.as_deref(),
            Some(
                "the row has 4 fields but the header names 3 columns; the fields after the 3rd were ignored"
            )
        );
        assert_eq!(
            (ordinal(1), ordinal(2), ordinal(11), ordinal(22)),
            ("1st".into(), "2nd".into(), "11th".into(), "22nd".into())
        );
    }
}
