//! fastlane's extractors over real sockets: bad input is a JSON error that
//! names the problem, the same for a path, a query and a body.

mod support;

use axum::routing::{get, post};
use axum::Router;
use fastlane::extract::{Json, Path, Query};
use fastlane::{client, Config};
use support::start;

#[derive(serde::Deserialize)]
struct Page {
    page: u32,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Profile {
    name: String,
    age: u8,
}

#[derive(serde::Deserialize)]
struct Ids {
    org: u32,
    user: u32,
}

fn app() -> Router {
    Router::new()
        .route("/users/{id}", get(|Path(id): Path<u32>| async move { format!("user {id}") }))
        .route(
            "/repos/{owner}/{number}",
            get(|Path((owner, number)): Path<(String, u64)>| async move { format!("{owner} #{number}") }),
        )
        .route(
            "/orgs/{org}/users/{user}",
            get(|Path(ids): Path<Ids>| async move { format!("{}/{}", ids.org, ids.user) }),
        )
        .route("/list", get(|Query(p): Query<Page>| async move { format!("page {}", p.page) }))
        .route("/profile", post(|Json(p): Json<Profile>| async move { Json(p) }))
}

/// The JSON error of a response: (status, field, message).
fn error_of(response: &client::Response) -> (u16, String, String) {
    let body: serde_json::Value = response.json().unwrap_or_else(|_| panic!("not JSON: {}", response.text()));
    let field = body["field"].as_str().unwrap_or_default().to_owned();
    (response.status.as_u16(), field, body["error"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn a_bad_path_parameter_is_a_422_naming_it_like_a_bad_query() {
    let server = start(app(), Config::default()).await;
    assert_eq!(client::get(&server.url("/users/7")).await.unwrap().text(), "user 7");
    for (path, field, value) in [
        ("/users/abc", "id", "abc"),
        ("/repos/tokio/x1", "number", "x1"),
        ("/orgs/3/users/-1", "user", "-1"),
        ("/list?page=two", "page", ""),
    ] {
        let response = client::get(&server.url(path)).await.unwrap();
        let (status, named, message) = error_of(&response);
        assert_eq!((status, named.as_str()), (422, field), "{path}: {message}");
        assert!(message.contains(value), "{path}: {message}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_json_is_a_400_and_a_wrong_field_a_422_both_as_json() {
    let server = start(app(), Config::default()).await;
    let url = server.url("/profile");
    let ok = client::post_json(&url, &serde_json::json!({"name": "ada", "age": 36})).await.unwrap();
    assert_eq!(ok.status, 200);
    let wrong = client::post_json(&url, &serde_json::json!({"name": "ada", "age": 300})).await.unwrap();
    let (status, field, _) = error_of(&wrong);
    assert_eq!((status, field.as_str()), (422, "age"));
    let body = bytes::Bytes::from_static(b"{\"name\": ");
    let malformed =
        client::request(http::Method::POST, &url, Some(("application/json", body))).await.unwrap();
    let (status, _, message) = error_of(&malformed);
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("not valid JSON"), "{message}");
    server.shutdown().await.unwrap();
}
