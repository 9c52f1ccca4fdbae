//! Extractors that turn malformed input into problem documents instead of axum's plain-text
//! rejections: JSON bodies (size limit, content type, unknown fields, field paths), query
//! strings, path identifiers, `If-Match` and list cursors.

use super::error::{ApiError, ApiResult};
use super::AppState;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts, StatusCode};
use base64::Engine;
use serde::de::DeserializeOwned;

/// A JSON request body, limited in size and strictly parsed.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let mime = media_type(req.headers());
        if mime != "application/json" && !mime.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "unsupported media type",
                "send the body as application/json",
            ));
        }
        let bytes = read_body(req.into_body(), state.max_body_bytes).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The request's media type, lowercase, without parameters (`""` when there is none).
pub fn media_type(headers: &axum::http::HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Bodies larger than this past the limit are not drained; the connection is dropped.
const MAX_DRAIN_BYTES: usize = 64 * 1024 * 1024;

/// Reads a body of at most `limit` bytes. An oversized body is read to its end (up to a
/// cap) before the 413 is sent, so the client can finish writing and read the answer on a
/// connection that stays usable.
pub async fn read_body(body: axum::body::Body, limit: usize) -> ApiResult<bytes::Bytes> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::bad_request("the request body could not be read"))?;
        seen += chunk.len();
        if seen > limit {
            if seen > limit + MAX_DRAIN_BYTES {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if seen > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(buf.freeze())
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request("a JSON body is required"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = without_position(inner.to_string());
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("the body is not valid JSON: {message}"))
        } else if path == "." || path.is_empty() {
            ApiError::field("body", message)
        } else {
            ApiError::field(&path, message)
        }
    })?;
    // The body is exactly one JSON value: anything after it but whitespace is refused,
    // not silently ignored.
    de.end().map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not valid JSON: {}",
            without_position(e.to_string())
        ))
    })?;
    Ok(value)
}

/// serde_json appends " at line L column C"; the field path says more.
fn without_position(message: String) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message,
    }
}

/// A query string parsed into `T` (which should deny unknown fields).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str::<T>(q)
            .map(ApiQuery)
            .map_err(|e| ApiError::field("query", e.to_string()))
    }
}

/// The version in `If-Match`, if the header is present. `*` matches any version.
pub struct IfMatch(pub Option<i64>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(v) = parts.headers.get(header::IF_MATCH) else {
            return Ok(IfMatch(None));
        };
        let s = v
            .to_str()
            .map_err(|_| ApiError::field("If-Match", "must be ASCII"))?
            .trim();
        if s == "*" {
            return Ok(IfMatch(None));
        }
        let s = s.strip_prefix("W/").unwrap_or(s);
        let inner = s
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .ok_or_else(|| ApiError::field("If-Match", "must be a quoted version such as \"3\""))?;
        let v: i64 = inner.parse().ok().filter(|v| *v >= 1).ok_or_else(|| {
            ApiError::field("If-Match", "must be a quoted positive integer version")
        })?;
        Ok(IfMatch(Some(v)))
    }
}

/// Validates a path segment as an identifier.
pub fn path_id<'a>(field: &str, s: &'a str) -> ApiResult<&'a str> {
    cellplane_api::validate_id(s).map_err(|e| ApiError::field(field, e.to_string()))?;
    Ok(s)
}

/// Path parameters as strings; each handler validates the ones it uses with [`path_id`].
pub struct PathParams(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for PathParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let raw = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::bad_request("the path is not valid UTF-8"))?;
        Ok(PathParams(
            raw.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }
}

impl PathParams {
    /// The named parameter, validated as an identifier.
    pub fn id(&self, name: &str) -> ApiResult<String> {
        let v = self
            .0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| ApiError::bad_request(format!("missing path parameter {name}")))?;
        path_id(name, v).map(str::to_string)
    }
}

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

pub fn limit_of(limit: Option<i64>) -> ApiResult<i64> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(l) if (1..=MAX_LIMIT).contains(&l) => Ok(l),
        Some(_) => Err(ApiError::field(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        )),
    }
}

/// Opaque cursors: base64url of `v1:<last key>`.
pub fn encode_cursor(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{key}"))
}

pub fn decode_cursor(cursor: Option<&str>) -> ApiResult<String> {
    let Some(c) = cursor else {
        return Ok(String::new());
    };
    let bad = || ApiError::field("cursor", "is not a cursor returned by this API");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| bad())?;
    let s = String::from_utf8(bytes).map_err(|_| bad())?;
    let key = s.strip_prefix("v1:").ok_or_else(bad)?;
    if key.is_empty() || key.len() > 128 || key.chars().any(|c| c.is_control()) {
        return Err(bad());
    }
    Ok(key.to_string())
}

/// Builds a page: one more row than `limit` was fetched to know if another page exists.
pub fn page<T>(
    mut items: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> String,
) -> cellplane_api::Page<T> {
    let more = items.len() as i64 > limit;
    if more {
        items.truncate(limit as usize);
    }
    let next_cursor = if more {
        items.last().map(|i| encode_cursor(&key(i)))
    } else {
        None
    };
    cellplane_api::Page { items, next_cursor }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_garbage() {
        let c = encode_cursor("acme");
        assert_eq!(decode_cursor(Some(&c)).ok().as_deref(), Some("acme"));
        assert!(decode_cursor(Some("!!!")).is_err());
        assert!(decode_cursor(Some("Zm9v")).is_err());
    }

    #[test]
    fn a_body_is_exactly_one_json_value() {
        let ok: ApiResult<serde_json::Value> = parse_json(b" {\"a\": 1}\n ");
        assert!(ok.is_ok());
        for bad in [&b"{\"a\": 1} xyz"[..], b"{} {}", b"[1]]", b"1 2"] {
            let r: ApiResult<serde_json::Value> = parse_json(bad);
            assert_eq!(
                r.err().map(|e| e.status.as_u16()),
                Some(400),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
