//! AWS rest-json plumbing shared by the admin handlers: the parsed request, errors as botocore
//! reads them, `limit`/`position` paging, patch operations and generated ids.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::StatusCode;
use rand::Rng;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{control::ControlError, engine::EngineError, plan::ModelError};

/// Default page size of list operations (AWS).
pub const DEFAULT_LIMIT: usize = 25;
/// Largest page size of list operations (AWS).
pub const MAX_LIMIT: usize = 500;

/// An admin request, read whole and decoded.
#[derive(Debug)]
pub struct Req {
    /// HTTP method.
    pub method: http::Method,
    /// Path segments, percent-decoded (`/tags/arn%3A...` gives one segment `arn:...`).
    pub segments: Vec<String>,
    /// Query parameters in order, decoded.
    pub query: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl Req {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Query boolean (`true`/`false`, as botocore sends them); absent is `false`.
    pub fn flag(&self, name: &str) -> bool {
        self.param(name)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// The JSON body as `T`; an empty body reads as `{}`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("Could not parse request body into json: {e}"))
        })
    }

    /// The patch operations of an Update* request.
    pub fn patch(&self) -> Result<Vec<PatchOp>, ApiError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            #[serde(default)]
            patch_operations: Vec<PatchOp>,
        }
        Ok(self.json::<Body>()?.patch_operations)
    }
}

/// One JSON-patch-like operation; `value` is always a string on the wire.
#[derive(Clone, Debug, Deserialize)]
pub struct PatchOp {
    /// `add`, `remove`, `replace`, `move`, `copy` or `test`.
    pub op: String,
    /// Target path, `/` separated, `~1` = `/` inside a segment.
    pub path: String,
    /// New value.
    #[serde(default)]
    pub value: Option<String>,
}

impl PatchOp {
    /// The value, or 400 naming the path when it is missing.
    pub fn value(&self) -> Result<&str, ModelError> {
        self.value.as_deref().ok_or_else(|| {
            ModelError::bad_request(format!(
                "Invalid null value specified for op '{}' on path '{}'",
                self.op, self.path
            ))
        })
    }

    /// The value as a number (`"10"`, `"2.5"`), or 400.
    pub fn number(&self) -> Result<f64, ModelError> {
        let v = self.value()?;
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .ok_or_else(|| ModelError::bad_request(format!("Invalid number value: {v}")))
    }

    /// The value as an integer, or 400.
    pub fn integer(&self) -> Result<i64, ModelError> {
        let v = self.value()?;
        v.trim()
            .parse::<i64>()
            .map_err(|_| ModelError::bad_request(format!("Invalid integer value: {v}")))
    }

    /// The value as a boolean the way AWS reads it: `true` (any case) is true, anything else
    /// false.
    pub fn boolean(&self) -> Result<bool, ModelError> {
        Ok(self.value()?.trim().eq_ignore_ascii_case("true"))
    }

    /// AWS's refusal of this op/path, listing the paths the op supports.
    pub fn invalid(&self, allowed: &[&str]) -> ModelError {
        invalid_patch_path(&self.path, &self.op, allowed)
    }
}

/// `Invalid patch path  '<path>' specified for op '<op>'. Must be one of: [<list>]` (AWS's text,
/// two spaces after "path").
pub fn invalid_patch_path(path: &str, op: &str, allowed: &[&str]) -> ModelError {
    ModelError::bad_request(format!(
        "Invalid patch path  '{path}' specified for op '{op}'. Must be one of: [{}]",
        allowed.join(", ")
    ))
}

/// Undoes JSON-pointer escaping of one path segment (`~1` = `/`, `~0` = `~`).
pub fn unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// An error as botocore parses it: status, `x-amzn-ErrorType`, `{"message": ...}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// AWS error code.
    pub code: &'static str,
    /// Message text.
    pub message: String,
}

impl ApiError {
    /// 400 BadRequestException.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ModelError::bad_request(message).into()
    }

    /// 404 NotFoundException.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ModelError::not_found(message).into()
    }

    /// A server-side failure the client cannot fix.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "ServiceUnavailableException",
            message: message.into(),
        }
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> ApiError {
        let status = StatusCode::from_u16(e.kind.status()).expect("AWS status codes are valid");
        ApiError {
            status,
            code: e.kind.code(),
            message: e.message,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::Model(m) => m.into(),
            EngineError::Store(s) => {
                tracing::error!(error = %s, "usage store failed");
                ApiError::unavailable(s.to_string())
            }
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        match e {
            ControlError::Model(m) => m.into(),
            ControlError::Engine(e) => e.into(),
            ControlError::Storage(s) => {
                tracing::error!(error = %s, "configuration change not saved");
                ApiError::unavailable(format!("The change was not saved: {s}"))
            }
        }
    }
}

/// A page of a list and the position of the next one.
pub struct Page<T> {
    /// Items of this page.
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub position: Option<String>,
}

impl<T> Page<T> {
    /// `{"item": [...], "position": ...}` (AWS's list shape, `position` left out at the end).
    pub fn to_json(&self, item: impl Fn(&T) -> Value) -> Value {
        let mut out = serde_json::Map::new();
        out.insert(
            "item".into(),
            Value::Array(self.items.iter().map(item).collect()),
        );
        if let Some(p) = &self.position {
            out.insert("position".into(), Value::String(p.clone()));
        }
        Value::Object(out)
    }
}

/// Pages `items` with the request's `limit` (default 25, at most 500) and `position` (an
/// opaque token this gateway made: the offset of the next item).
pub fn page<T>(req: &Req, items: Vec<T>) -> Result<Page<T>, ApiError> {
    let limit = match req.param("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Invalid limit specified: {v}; it must be between 1 and {MAX_LIMIT}"
                ))
            })?,
    };
    let start = match req.param("position") {
        None | Some("") => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("Invalid position specified: {v}")))?,
    };
    let total = items.len();
    let end = start.saturating_add(limit).min(total);
    let items: Vec<T> = items
        .into_iter()
        .skip(start)
        .take(end.saturating_sub(start))
        .collect();
    let position = (end < total).then(|| end.to_string());
    Ok(Page { items, position })
}

/// A new id of `len` lowercase alphanumerics not taken per `taken`.
pub fn new_id(len: usize, taken: impl Fn(&str) -> bool) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    loop {
        let id: String = (0..len)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect();
        if !taken(&id) {
            return id;
        }
    }
}

/// A generated API key value: 40 alphanumerics, as AWS generates them.
pub fn new_key_value() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..40)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Inserts `key: value` into a JSON object when `value` is `Some`.
pub fn put_opt<V: Into<Value>>(
    obj: &mut serde_json::Map<String, Value>,
    key: &str,
    value: Option<V>,
) {
    if let Some(v) = value {
        obj.insert(key.to_string(), v.into());
    }
}

/// Tags as a JSON object.
pub fn tags_json(tags: &BTreeMap<String, String>) -> Value {
    Value::Object(
        tags.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}
