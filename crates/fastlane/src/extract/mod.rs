//! Extractors whose rejections are JSON [`ApiError`]s that name the field.
//!
//! axum's own `Path`, `Query` and `Json` reject with a plain-text body. These wrap
//! the same parsing (serde, with the path of the failing field) and answer
//! `422` (or `400`/`413`/`415`) with the JSON body every fastlane error has.

use axum::extract::{FromRequest, FromRequestParts, Request};
use bytes::Bytes;
use http::request::Parts;
use serde::de::DeserializeOwned;

use crate::ApiError;

/// Query-string extractor; a value that does not parse is a `422` naming the
/// field.
///
/// # Examples
///
/// ```
/// use fastlane::extract::Query;
///
/// #[derive(serde::Deserialize)]
/// struct Params { secs: Option<u64> }
///
/// async fn handler(Query(p): Query<Params>) -> String {
///     format!("{}", p.secs.unwrap_or(1))
/// }
/// # let _: axum::routing::MethodRouter = axum::routing::get(handler);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T> Query<T>
where
    T: DeserializeOwned,
{
    /// Parses a query string (without the `?`).
    pub fn parse(query: &str) -> Result<Self, ApiError> {
        let deserializer = serde_urlencoded::Deserializer::new(form_urlencoded_pairs(query));
        serde_path_to_error::deserialize(deserializer).map(Query).map_err(|err| {
            let field = err.path().to_string();
            let inner = err.into_inner().to_string();
            if field == "." {
                // Missing fields carry their name in serde's message.
                ApiError::new(
                    http::StatusCode::UNPROCESSABLE_ENTITY,
                    format!("invalid query string: {inner}"),
                )
                .with_field(missing_field_name(&inner).unwrap_or_default())
            } else {
                ApiError::unprocessable(field, inner)
            }
        })
    }
}

fn form_urlencoded_pairs(query: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query.as_bytes())
}

/// serde says "missing field `name`"; pull the name out for the `field` key.
fn missing_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_owned())
}

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Self::parse(parts.uri.query().unwrap_or_default())
    }
}

/// Path parameter extractor; a parameter that does not parse is a `422`
/// naming it, with the same JSON body as [`Query`]'s (axum's own `Path`
/// answers `400` in plain text).
///
/// # Examples
///
/// ```
/// use fastlane::extract::Path;
///
/// async fn user(Path(id): Path<u32>) -> String {
///     format!("user {id}")
/// }
/// let app: axum::Router = axum::Router::new().route("/users/{id}", axum::routing::get(user));
/// # let _ = app;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        let rejection = match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => return Ok(Path(value)),
            Err(rejection) => rejection,
        };
        let PathRejection::FailedToDeserializePathParams(failed) = rejection else {
            // No parameters at all: the extractor is on a route without any.
            return Err(ApiError::internal(format!(
                "the path parameters could not be read: {}",
                rejection.body_text()
            )));
        };
        // The name of the n-th parameter, for errors that only give a position.
        let name_at = |index: usize| {
            let names: Vec<String> = parts
                .extensions
                .get::<axum::extract::MatchedPath>()
                .map(|m| {
                    m.as_str()
                        .split('/')
                        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                        .map(|s| s.trim_start_matches('*').to_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.get(index).cloned().unwrap_or_else(|| format!("{index}"))
        };
        let invalid = |field: String, value: &str, expected: &str| {
            ApiError::unprocessable(field, format!("`{value}` is not a valid {expected}"))
        };
        Err(match failed.into_kind() {
            ErrorKind::ParseErrorAtKey { key, value, expected_type } => invalid(key, &value, expected_type),
            ErrorKind::ParseErrorAtIndex { index, value, expected_type } => {
                invalid(name_at(index), &value, expected_type)
            }
            ErrorKind::ParseError { value, expected_type } => invalid(name_at(0), &value, expected_type),
            ErrorKind::InvalidUtf8InPathParam { key } => {
                ApiError::unprocessable(key, "not valid UTF-8 once percent-decoded")
            }
            ErrorKind::DeserializeError { key, value, message } => {
                ApiError::unprocessable(key, format!("`{value}`: {message}"))
            }
            // The handler's type does not fit its route: the app's bug, not
            // the client's.
            kind @ (ErrorKind::WrongNumberOfParameters { .. } | ErrorKind::UnsupportedType { .. }) => {
                ApiError::internal(format!("the route's path parameters do not fit the handler: {kind}"))
            }
            kind => ApiError::new(http::StatusCode::UNPROCESSABLE_ENTITY, format!("invalid path: {kind}")),
        })
    }
}

/// JSON body extractor; a body that is not JSON is a `400`, a field with the
/// wrong type or value a `422` naming the field, a missing
/// `Content-Type: application/json` a `415`, a body over the limit a `413`.
///
/// # Examples
///
/// ```
/// use fastlane::extract::Json;
///
/// #[derive(serde::Deserialize)]
/// struct Profile { name: String }
///
/// async fn handler(Json(p): Json<Profile>) -> String {
///     p.name
/// }
/// # let _: axum::routing::MethodRouter = axum::routing::post(handler);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let mime = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::new(
                http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected a request with `Content-Type: application/json`",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            ApiError::new(status, format!("could not read the request body: {}", rejection.body_text()))
        })?;
        Self::from_bytes(&bytes)
    }
}

impl<T: DeserializeOwned> Json<T> {
    /// Parses a JSON document.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ApiError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
            let field = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_data() {
                if field == "." {
                    let message = inner.to_string();
                    let name = missing_field_name(&message).unwrap_or_default();
                    ApiError::new(
                        http::StatusCode::UNPROCESSABLE_ENTITY,
                        format!("invalid JSON body: {message}"),
                    )
                    .with_field(name)
                } else {
                    ApiError::unprocessable(field, inner.to_string())
                }
            } else {
                ApiError::bad_request(format!("the body is not valid JSON: {inner}"))
            }
        })?;
        de.end().map_err(|err| ApiError::bad_request(format!("the body is not valid JSON: {err}")))?;
        Ok(Json(value))
    }
}

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct P {
        secs: u64,
    }

    #[test]
    fn bad_query_value_names_the_field() {
        let err = Query::<P>::parse("secs=abc").unwrap_err();
        assert_eq!(err.status(), 422);
        assert_eq!(err.field(), Some("secs"));
        let err = Query::<P>::parse("").unwrap_err();
        assert_eq!(err.field(), Some("secs"), "{err}");
        assert_eq!(Query::<P>::parse("secs=3").unwrap().0.secs, 3);
    }

    #[test]
    fn bad_json_is_400_and_bad_field_is_422() {
        assert_eq!(Json::<P>::from_bytes(b"{").unwrap_err().status(), 400);
        let err = Json::<P>::from_bytes(br#"{"secs": "x"}"#).unwrap_err();
        assert_eq!((err.status().as_u16(), err.field()), (422, Some("secs")));
        assert_eq!(Json::<P>::from_bytes(br#"{"secs": 2}"#).unwrap().0.secs, 2);
    }
}
