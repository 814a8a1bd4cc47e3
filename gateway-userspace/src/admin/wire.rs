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

/// How a list is ordered, which decides where a `position` token resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Creation order (oldest first): new items are appended and a deletion never reorders
    /// the rest (API keys, plans, plan keys, REST APIs, resources, deployments).
    Created,
    /// Ascending by id (GetUsage's keys).
    Id,
}

/// Where the next page starts: the id of the last item returned, the id of the item after
/// it and the last item's index, all as they were when the page was made.
#[derive(Debug, PartialEq, Eq)]
struct Position {
    last_index: usize,
    last: String,
    next: String,
}

impl Position {
    /// Lowercase hex of the JSON `[last_index, last, next]`: opaque and URL-safe.
    fn encode(&self) -> String {
        let json = serde_json::to_vec(&(self.last_index, &self.last, &self.next))
            .expect("a tuple of a number and strings serialises");
        hex::encode(json)
    }

    /// `None` for anything [`Position::encode`] did not make.
    fn decode(token: &str) -> Option<Position> {
        let bytes = hex::decode(token).ok()?;
        let (last_index, last, next): (usize, String, String) =
            serde_json::from_slice(&bytes).ok()?;
        Some(Position {
            last_index,
            last,
            next,
        })
    }

    /// The index in `ids` (the list as it is now) of the first item the client has not seen.
    ///
    /// [`Order::Id`]: the first id above `last`, exact whatever was added or deleted.
    ///
    /// [`Order::Created`]: survivors keep their relative order and new items go to the end,
    /// so the answer is right after `last` while it exists, else at `next` (the common
    /// cleanup loop deletes every item of a page, `last` included, before asking for the
    /// next one). When both are gone it is `last_index`: deleting `last` moved everything
    /// after it up by at least one, so this is exact when `last` was the only deleted item
    /// the client had seen, and otherwise may skip as many items as were deleted from the
    /// pages already returned besides `last` (it never repeats an item).
    fn start<'a>(&self, ids: impl Iterator<Item = &'a str>, order: Order) -> usize {
        match order {
            Order::Id => ids.take_while(|id| *id <= self.last.as_str()).count(),
            Order::Created => {
                let mut next_at = None;
                for (i, id) in ids.enumerate() {
                    if id == self.last {
                        return i + 1;
                    }
                    if id == self.next && next_at.is_none() {
                        next_at = Some(i);
                    }
                }
                next_at.unwrap_or(self.last_index)
            }
        }
    }
}

/// Pages `items` (in `order`, with `id` naming each) with the request's `limit` (default 25,
/// at most 500) and `position`, an opaque token made by an earlier page of the same list.
///
/// The token remembers the last item returned rather than an offset, so a client that deletes
/// items between pages (paging GetApiKeys and deleting every key of each page, say) still gets
/// every remaining item exactly once; [`Position::start`] says how it resumes. A token this
/// gateway did not make is 400 `Invalid position specified: <token>`.
pub fn page<T>(
    req: &Req,
    items: Vec<T>,
    order: Order,
    id: impl Fn(&T) -> &str,
) -> Result<Page<T>, ApiError> {
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
    let total = items.len();
    let start = match req.param("position") {
        None | Some("") => 0,
        Some(v) => Position::decode(v)
            .ok_or_else(|| ApiError::bad_request(format!("Invalid position specified: {v}")))?
            .start(items.iter().map(&id), order)
            .min(total),
    };
    let end = start.saturating_add(limit).min(total);
    let position = (end < total && end > start).then(|| {
        Position {
            last_index: end - 1,
            last: id(&items[end - 1]).to_string(),
            next: id(&items[end]).to_string(),
        }
        .encode()
    });
    let items: Vec<T> = items.into_iter().skip(start).take(end - start).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(query: &[(&str, &str)]) -> Req {
        Req {
            method: http::Method::GET,
            segments: Vec::new(),
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Bytes::new(),
        }
    }

    fn list(ids: &[&str], limit: &str, position: Option<&str>, order: Order) -> Page<String> {
        let mut query = vec![("limit", limit)];
        if let Some(p) = position {
            query.push(("position", p));
        }
        let items = ids.iter().map(|s| s.to_string()).collect();
        page(&req(&query), items, order, String::as_str).expect("a valid request")
    }

    #[test]
    fn deleting_each_page_before_the_next_skips_nothing() {
        let mut ids: Vec<&str> = vec!["k", "c", "x", "a", "q", "m", "b"];
        let mut seen = Vec::new();
        let mut position = None;
        loop {
            let p = list(&ids, "2", position.as_deref(), Order::Created);
            for item in &p.items {
                ids.retain(|i| i != item);
                seen.push(item.clone());
            }
            position = p.position;
            if position.is_none() {
                break;
            }
        }
        assert_eq!(seen, ["k", "c", "x", "a", "q", "m", "b"]);
        assert!(ids.is_empty());
    }

    #[test]
    fn resumes_after_the_last_item_while_it_exists_and_sees_new_ones() {
        let first = list(&["a", "b", "c", "d"], "2", None, Order::Created);
        let token = first.position.expect("more items follow");
        // "a" and "c" (the next one) went, "e" came: resume after "b".
        let next = list(&["b", "d", "e"], "5", Some(&token), Order::Created);
        assert_eq!(next.items, ["d", "e"]);
        assert_eq!(next.position, None);
        // Both "b" and "c" went: the recorded index of "b" (1), exact when "b" was the only
        // item seen that went.
        let next = list(&["a", "d", "e"], "5", Some(&token), Order::Created);
        assert_eq!(next.items, ["d", "e"]);
    }

    #[test]
    fn id_order_resumes_at_the_first_id_above_the_last() {
        let first = list(&["a", "c", "e", "g"], "2", None, Order::Id);
        let token = first.position.expect("more items follow");
        let next = list(&["b", "d", "e", "g"], "5", Some(&token), Order::Id);
        assert_eq!(next.items, ["d", "e", "g"]);
    }

    #[test]
    fn positions_this_gateway_did_not_make_are_refused() {
        for junk in ["junk", "12", "-1", "7b7d", "5b315d"] {
            let result = page(
                &req(&[("position", junk)]),
                vec!["a".to_string()],
                Order::Created,
                String::as_str,
            );
            let error = result.err().expect("a junk position is refused");
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert_eq!(error.message, format!("Invalid position specified: {junk}"));
        }
    }
}
