//! The OpenAPI document (`GET /openapi.json`) against docs/http-api.md: every
//! route its table of routes names is in it with its method, every field
//! of its table of request fields is a property of its route's
//! request body, and the document validates as OpenAPI 3.1 (with the
//! `openapi-spec-validator` that the set-up installs). The fuzzer
//! (`tests/api_fuzz.rs`) checks the server's answers against it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

fn document() -> Value {
    serde_json::from_str(modelpool_actors::http::openapi::document()).expect("the document is JSON")
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/http-api.md")).unwrap()
}

/// The routes of docs/http-api.md's table of routes: `(method, path)`, parameters as `{id}`.
fn readme_routes() -> Vec<(String, String)> {
    let readme = readme();
    let section = readme.split("## Routes").nth(1).expect("docs/http-api.md has a Routes section");
    let mut routes = Vec::new();
    // The section's first table: one row a route (or a few related ones).
    let rows = section.lines().skip_while(|l| !l.starts_with("| `")).take_while(|l| l.starts_with("| `"));
    for row in rows {
        let first_cell = row.trim_start_matches('|').split(" | ").next().unwrap_or("");
        let mut method = String::new();
        for code in first_cell.split('`').skip(1).step_by(2) {
            let (m, path) = match code.split_once(' ') {
                Some((m, p)) if m.chars().all(|c| c.is_ascii_uppercase()) => (m.to_string(), p),
                _ => (method.clone(), code),
            };
            assert!(!m.is_empty(), "docs/http-api.md: a route row without a method: {row}");
            method = m;
            let path = path.split('?').next().unwrap().trim();
            routes.push((method.to_lowercase(), path.to_string()));
        }
    }
    assert!(routes.len() > 20, "docs/http-api.md's table of routes was not read: {routes:?}");
    routes
}

/// `schema`'s property names, through `$ref`s and `allOf`.
fn properties(doc: &Value, schema: &Value, out: &mut BTreeSet<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return properties(doc, &doc["components"]["schemas"][name], out);
    }
    for part in schema["allOf"].as_array().into_iter().flatten() {
        properties(doc, part, out);
    }
    if let Some(props) = schema["properties"].as_object() {
        out.extend(props.keys().cloned());
    }
}

/// The schema of property `name` of `schema` (through `$ref`s and `allOf`).
fn property<'a>(doc: &'a Value, schema: &'a Value, name: &str) -> Option<&'a Value> {
    if let Some(r) = schema["$ref"].as_str() {
        return property(doc, &doc["components"]["schemas"][r.rsplit('/').next().unwrap()], name);
    }
    if let Some(p) = schema["properties"].get(name) {
        return Some(p);
    }
    schema["allOf"].as_array()?.iter().find_map(|part| property(doc, part, name))
}

/// A nullable `$ref` is `oneOf: [null, $ref]` in 3.1: the `$ref` of it.
fn unwrap_nullable(schema: &Value) -> &Value {
    schema["oneOf"].as_array().and_then(|alts| alts.iter().find(|a| a.get("$ref").is_some())).unwrap_or(schema)
}

#[test]
fn every_route_the_readme_documents_is_in_the_document() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut missing = Vec::new();
    for (method, path) in readme_routes() {
        if doc["paths"][&path][&method].is_null() {
            missing.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    assert!(missing.is_empty(), "routes in docs/http-api.md but not in /openapi.json: {missing:?}");
}

/// Every link (what the fuzzer's stateful phase follows: a new conversation's
/// id into the routes that read it) names an operation of the document.
#[test]
fn links_name_operations_that_exist() {
    let doc = document();
    let mut ids = BTreeSet::new();
    for item in doc["paths"].as_object().unwrap().values() {
        ids.extend(item.as_object().unwrap().values().filter_map(|op| op["operationId"].as_str().map(String::from)));
    }
    let mut links = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for op in item.as_object().unwrap().values() {
            for response in op["responses"].as_object().into_iter().flat_map(|r| r.values()) {
                for (name, link) in response["links"].as_object().into_iter().flatten() {
                    let target = link["operationId"].as_str();
                    assert!(target.is_some_and(|t| ids.contains(t)), "{path}: link {name} names no operation: {link}");
                    links += 1;
                }
            }
        }
    }
    assert!(links >= 9, "the conversation routes' links are missing ({links})");
}

#[test]
fn every_request_field_the_readme_documents_is_in_its_routes_body() {
    let doc = document();
    let readme = readme();
    let table = readme.split("## Request fields").nth(1).expect("docs/http-api.md has a table of request fields");
    let mut missing = Vec::new();
    let mut checked = 0;
    for row in table.lines().skip_while(|l| !l.starts_with("| `")).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let field = cells[0].trim_start_matches("| ").trim_matches('`');
        for route in cells[1].split_whitespace().map(|r| r.trim_matches('`')) {
            let body = &doc["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"];
            assert!(!body.is_null(), "{route} (http-api.md's request fields) has no JSON request body in the document");
            let (schema, name) = match field.split_once('.') {
                Some((parent, child)) => match property(&doc, body, parent) {
                    Some(p) => (unwrap_nullable(p).clone(), child),
                    None => {
                        missing.push(format!("{route} {parent}"));
                        continue;
                    }
                },
                None => (body.clone(), field),
            };
            let mut names = BTreeSet::new();
            properties(&doc, &schema, &mut names);
            if !names.contains(name) {
                missing.push(format!("{route} {field}"));
            }
            checked += 1;
        }
    }
    assert!(checked > 150, "docs/http-api.md's table of request fields was not read ({checked} fields)");
    assert!(missing.is_empty(), "request fields in docs/http-api.md but not in /openapi.json: {missing:?}");
}

#[test]
fn the_document_validates_as_openapi_3_1() {
    let venv = std::env::var_os("MODELPOOL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/modelpool/venv"));
    let python = venv.join("bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup.sh --with-test-tools", python.display());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, modelpool_actors::http::openapi::document()).unwrap();
    let out = std::process::Command::new(python)
        .args(["-c", "import sys; from openapi_spec_validator import validate; from openapi_spec_validator.readers import read_from_filename; \
                      from openapi_spec_validator import OpenAPIV31SpecValidator; \
                      spec, _ = read_from_filename(sys.argv[1]); validate(spec, cls=OpenAPIV31SpecValidator); print('valid')"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the document is not valid OpenAPI 3.1 (or openapi-spec-validator is missing: run scripts/setup.sh \
         --with-test-tools):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
