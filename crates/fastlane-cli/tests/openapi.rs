//! The demo's OpenAPI document and docs page, from a `fastlane demo` process:
//! every route documented, fastlane's own answers in it, the document valid
//! OpenAPI 3.1 by a validator from PyPI, and `/docs` served without a CDN.
//! (`.ci/docs_browser.py` clicks through `/docs` in Chromium.)

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use support::Demo;

fn document(demo: &Demo) -> Value {
    let response = support::get(&demo.url("/openapi.json"));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.headers["content-type"], "application/json");
    response.json().expect("the document is JSON")
}

/// `(method, path)` of every operation in the document.
fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            found.push((method.to_uppercase(), path.clone()));
        }
    }
    found
}

#[test]
fn the_demo_documents_every_route_with_fastlanes_own_answers() {
    let demo = Demo::start(&[]);
    let doc = document(&demo);
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "fastlane demo");

    // Every route `fastlane demo` lists is in the document, with its line as the summary.
    let operations = operations(&doc);
    for (route, text) in fastlane_cli::demo::ROUTES {
        let (method, rest) = route.split_once(' ').expect("METHOD path");
        let path = rest.trim().split('?').next().unwrap().replace("{name}", "{job}").replace("{id}", "{job}");
        assert!(
            operations.contains(&(method.to_owned(), path.clone())),
            "{method} {path} is not documented; the document has {operations:?}"
        );
        let summary = &doc["paths"][&path][method.to_lowercase()]["summary"];
        assert_eq!(summary, text, "{method} {path}");
    }

    // Query parameters come from the handlers' types, with their doc comments.
    let test2 = &doc["paths"]["/test2"]["get"];
    let secs = test2["parameters"].as_array().unwrap().iter().find(|p| p["name"] == "secs").expect("secs");
    assert_eq!(secs["in"], "query");
    assert!(secs["description"].as_str().unwrap().contains("at most 60"), "{secs}");

    // fastlane's extractors add their 422; the server's answers are on every operation;
    // 413 only where a body is taken.
    let error_ref = serde_json::json!({ "$ref": "#/components/schemas/ApiError" });
    assert_eq!(test2["responses"]["422"]["content"]["application/json"]["schema"], error_ref);
    for (method, path) in &operations {
        let op = &doc["paths"][path][method.to_lowercase()];
        for status in ["500", "503", "504"] {
            assert_eq!(
                op["responses"][status]["content"]["application/json"]["schema"], error_ref,
                "{method} {path}"
            );
        }
        assert!(op["responses"]["503"]["headers"]["Retry-After"].is_object(), "{method} {path}");
        assert_eq!(op["responses"]["413"].is_object(), op["requestBody"].is_object(), "{method} {path}: 413");
        for (status, response) in op["responses"].as_object().unwrap() {
            assert!(!response["description"].as_str().unwrap_or("").is_empty(), "{method} {path} {status}");
        }
    }
    let profile = &doc["paths"]["/profile"]["post"];
    for status in ["400", "415", "422"] {
        assert!(profile["responses"][status].is_object(), "POST /profile lacks {status}: {profile}");
    }
    assert_eq!(
        profile["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Profile"
    );
    // A sync handler on the blocking lane documents like an async one.
    assert!(
        doc["paths"]["/slow/sync"]["get"]["parameters"][0]["name"] == "secs",
        "{}",
        doc["paths"]["/slow/sync"]
    );

    // The documented error body is what a refused request really gets.
    let schema = &doc["components"]["schemas"]["ApiError"];
    let refused = support::get(&demo.url("/test2?secs=ninety"));
    assert_eq!(refused.status, 422);
    let body: Value = refused.json().unwrap();
    for key in body.as_object().unwrap().keys() {
        assert!(schema["properties"].get(key).is_some(), "`{key}` of {body} is not in {schema}");
    }
    for key in schema["required"].as_array().unwrap() {
        assert!(body.get(key.as_str().unwrap()).is_some(), "{body} lacks {key}");
    }
}

#[test]
fn docs_is_swagger_ui_served_by_the_binary() {
    let demo = Demo::start(&[]);
    let page = support::get(&demo.url("/docs"));
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text();
    assert!(html.contains("SwaggerUIBundle"), "no Swagger UI in the page");
    assert!(html.contains("url: './openapi.json'"), "the page does not load the document next to it");
    // No asset from elsewhere: every script and style is in the page itself.
    for tag in ["<script src=", "<link rel=\"stylesheet\" href=", "<link href="] {
        assert!(!html.contains(tag), "the page loads an asset from elsewhere ({tag})");
    }
}

#[test]
fn the_document_is_valid_openapi_3_1() {
    let Some(python) = support::test_python("the_document_is_valid_openapi_3_1") else { return };
    let demo = Demo::start(&[]);
    let doc = document(&demo);
    let file = std::env::temp_dir().join(format!("fastlane-openapi-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let check = |file: &PathBuf| {
        Command::new(&python)
            .args(["-m", "openapi_spec_validator"])
            .arg(file)
            .output()
            .expect("run the validator")
    };
    let out = check(&file);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the validator says:\n{said}");
    assert!(said.contains("OK"), "{said}");

    // The validator does catch a broken document (a response without its
    // required description), so its OK above means something.
    let mut broken = doc.clone();
    broken["paths"]["/fast"]["get"]["responses"]["200"].as_object_mut().unwrap().remove("description");
    std::fs::write(&file, serde_json::to_vec(&broken).unwrap()).unwrap();
    let out = check(&file);
    let _ = std::fs::remove_file(&file);
    assert!(!out.status.success(), "the validator passed a response without a description");
}
