//! OpenAPI for an app's routes: `/openapi.json` and interactive docs at
//! `/docs` (feature `openapi`, on by default).
//!
//! Routes are described with [aide]: an [`ApiRouter`] takes the same handlers
//! as an axum `Router`, and each route's parameters, body and responses come
//! from the handler's own types (its extractors and return type, with
//! [`JsonSchema`](schemars::JsonSchema) derived on the structs they carry), so
//! the document cannot drift from the code. fastlane's extractors add the
//! `4xx` answers they give before the handler runs (a `422` naming the field,
//! `400`/`415` for bodies), plain `fn` handlers on the lanes ([`sync`](crate::sync),
//! [`cpu`](crate::cpu)) document like `async fn`s, and [`Docs`] adds what the
//! server itself may answer on any route: `503` (refused at once when
//! overloaded), `504` (the request timeout), `500` (a panic) and `413` (a body
//! over the limit).
//!
//! `/docs` is Swagger UI, served by the binary from the copy aide vendors: no
//! CDN, so it works offline and behind strict content policies.
//!
//! # Example
//!
//! ```
//! use fastlane::extract::Query;
//! use fastlane::openapi::{routing::get, ApiRouter, Docs};
//! use schemars::JsonSchema;
//! use serde::Deserialize;
//!
//! /// The greeting's parameters.
//! #[derive(Deserialize, JsonSchema)]
//! struct Greet {
//!     /// Whom to greet.
//!     name: String,
//! }
//!
//! async fn hello(Query(q): Query<Greet>) -> String {
//!     format!("hello {}", q.name)
//! }
//!
//! let app: axum::Router = Docs::new("Greeter", "1.0")
//!     .finish(ApiRouter::new().api_route("/hello", get(hello)));
//! // `app` answers /hello, /openapi.json and /docs.
//! # let _ = app;
//! ```

mod operations;

use aide::openapi::{Info, OpenApi};
use axum::response::{Html, IntoResponse};
use axum::Router;
use bytes::Bytes;
use http::header;
use serde_json::{json, Map, Value};

pub use aide;
pub use aide::axum::{routing, ApiRouter, IntoApiResponse};
pub use schemars;

/// Serves an app's OpenAPI document and its Swagger UI.
///
/// Built with [`Docs::new`], then either [`finish`](Docs::finish)es an
/// [`ApiRouter`], or [`serve`](Docs::serve)s a document the app finished
/// itself (to add tags or security schemes with aide's transforms).
#[derive(Debug, Clone)]
pub struct Docs {
    info: Info,
    openapi_path: String,
    docs_path: String,
}

impl Docs {
    /// Documents an API with this title and version, at `/openapi.json` and
    /// `/docs`.
    pub fn new(title: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            info: Info { title: title.into(), version: version.into(), ..Default::default() },
            openapi_path: "/openapi.json".to_owned(),
            docs_path: "/docs".to_owned(),
        }
    }

    /// The API's description (CommonMark), shown at the top of `/docs`.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.info.description = Some(text.into());
        self
    }

    /// Where the document is served, instead of `/openapi.json`.
    pub fn openapi_path(mut self, path: impl Into<String>) -> Self {
        self.openapi_path = path.into();
        self
    }

    /// Where Swagger UI is served, instead of `/docs`.
    pub fn docs_path(mut self, path: impl Into<String>) -> Self {
        self.docs_path = path.into();
        self
    }

    /// The app's `Router`, answering its routes and the document and docs.
    pub fn finish<S>(self, app: ApiRouter<S>) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let mut api = OpenApi::default();
        let router = app.finish_api(&mut api);
        self.serve(router, api)
    }

    /// Adds the document and docs routes to `router` for a document the app
    /// made itself (`ApiRouter::finish_api_with`). The info of this `Docs`
    /// fills in a document whose title is empty.
    pub fn serve<S>(self, router: Router<S>, api: OpenApi) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let document = Bytes::from(serde_json::to_vec(&self.document(api)).expect("a JSON value serializes"));
        let ui = Bytes::from(
            aide::swagger::Swagger::new(spec_url(&self.openapi_path, &self.docs_path))
                .with_title(&self.info.title)
                .html(),
        );
        router
            .route(
                &self.openapi_path,
                axum::routing::get(move || {
                    let document = document.clone();
                    async move { ([(header::CONTENT_TYPE, "application/json")], document).into_response() }
                }),
            )
            .route(
                &self.docs_path,
                axum::routing::get(move || {
                    let ui = ui.clone();
                    async move { Html(ui).into_response() }
                }),
            )
    }

    /// The finished document as JSON, with the server's own answers added to
    /// every operation.
    pub fn document(&self, mut api: OpenApi) -> Value {
        if api.info.title.is_empty() {
            api.info = self.info.clone();
        }
        let mut doc = serde_json::to_value(&api).expect("an OpenAPI document serializes");
        add_server_answers(&mut doc);
        doc
    }
}

/// Swagger UI fetches the document relative to its own page when both live in
/// one folder, so that the pair keeps working under a proxy's path prefix.
fn spec_url(openapi_path: &str, docs_path: &str) -> String {
    match (openapi_path.rsplit_once('/'), docs_path.rsplit_once('/')) {
        (Some((dir, file)), Some((docs_dir, _))) if dir == docs_dir => format!("./{file}"),
        _ => openapi_path.to_owned(),
    }
}

/// What the server may answer on any route, before or instead of the handler.
/// `413` only where the operation takes a body.
const SERVER_ANSWERS: &[(&str, &str)] = &[
    (
        "503",
        "Refused at once rather than queued: the route's lane is full, or the route stalled recently \
         and the server is at its thread cap. `Retry-After` says when to try again.",
    ),
    ("504", "The handler did not answer within the server's request timeout (`--request-timeout`, 60 s by default)."),
    ("500", "The handler panicked. The panic is logged; the server and its other requests carry on."),
    ("413", "The body is larger than the server's limit (`--body-limit`, 2 MiB by default)."),
];

const HTTP_METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn add_server_answers(doc: &mut Value) {
    let error_schema = schema_of_error_body();
    let Some(root) = doc.as_object_mut() else { return };
    let schemas = root
        .entry("components")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .map(|components| components.entry("schemas").or_insert_with(|| json!({})));
    if let Some(Value::Object(schemas)) = schemas {
        schemas.entry("ApiError").or_insert(error_schema);
    }
    let Some(Value::Object(paths)) = root.get_mut("paths") else { return };
    for item in paths.values_mut().filter_map(Value::as_object_mut) {
        for (method, operation) in item.iter_mut() {
            let Some(operation) =
                operation.as_object_mut().filter(|_| HTTP_METHODS.contains(&method.as_str()))
            else {
                continue;
            };
            let takes_body = operation.contains_key("requestBody");
            let responses = operation.entry("responses").or_insert_with(|| Value::Object(Map::new()));
            let Some(responses) = responses.as_object_mut() else { continue };
            name_unnamed_responses(responses);
            for (status, description) in SERVER_ANSWERS {
                if *status == "413" && !takes_body {
                    continue;
                }
                responses.entry(*status).or_insert_with(|| server_answer(status, description));
            }
        }
    }
}

/// A response whose type says nothing about it (a JSON value, a tuple) gets
/// its status's name, so that no response in `/docs` is blank.
fn name_unnamed_responses(responses: &mut Map<String, Value>) {
    for (status, response) in responses.iter_mut() {
        let Some(response) = response.as_object_mut() else { continue };
        if response.get("description").and_then(Value::as_str).is_none_or(str::is_empty) {
            let reason = status
                .parse::<u16>()
                .ok()
                .and_then(|code| http::StatusCode::from_u16(code).ok())
                .and_then(|code| code.canonical_reason())
                .unwrap_or("The response");
            response.insert("description".to_owned(), Value::from(reason));
        }
    }
}

fn server_answer(status: &str, description: &str) -> Value {
    let mut answer = json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ApiError" } } },
    });
    if status == "503" {
        answer["headers"] = json!({
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "schema": { "type": "integer", "minimum": 0 },
            }
        });
    }
    answer
}

/// The `ApiError` component, for documents in which no extractor put it.
fn schema_of_error_body() -> Value {
    let schema = schemars::generate::SchemaSettings::draft07()
        .into_generator()
        .root_schema_for::<operations::ErrorBody>();
    let mut value = schema.to_value();
    if let Some(object) = value.as_object_mut() {
        // A component is a schema inside the document, not a document of its own.
        object.remove("$schema");
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiError;

    #[test]
    fn the_documented_error_body_is_the_one_api_error_writes() {
        let written: Value = serde_json::from_slice(
            &futures_util::FutureExt::now_or_never(axum::body::to_bytes(
                ApiError::unprocessable("secs", "must be at most 60").into_response().into_body(),
                usize::MAX,
            ))
            .expect("a full body is ready")
            .expect("the body reads"),
        )
        .expect("ApiError writes JSON");
        let schema = schema_of_error_body();
        let properties = schema["properties"].as_object().expect("the schema has properties");
        let mut documented: Vec<&String> = properties.keys().collect();
        let mut sent: Vec<&String> = written.as_object().expect("an object").keys().collect();
        documented.sort();
        sent.sort();
        assert_eq!(documented, sent, "schema {schema}, body {written}");
        let required = schema["required"].as_array().expect("required fields");
        assert!(required.contains(&json!("error")) && required.contains(&json!("status")), "{schema}");
    }

    #[test]
    fn the_ui_fetches_the_document_next_to_it() {
        assert_eq!(spec_url("/openapi.json", "/docs"), "./openapi.json");
        assert_eq!(spec_url("/api/openapi.json", "/docs"), "/api/openapi.json");
    }
}
