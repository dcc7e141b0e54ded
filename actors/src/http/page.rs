//! `GET /`: the chat page, three small files embedded in the binary (no
//! build step, nothing loaded from elsewhere). The page's own security policy
//! allows only these files: no inline script, no other origin.

use actix_web::{web, HttpResponse};

const INDEX: &str = include_str!("web/index.html");
const SCRIPT: &str = include_str!("web/app.js");
const STYLE: &str = include_str!("web/app.css");

/// Scripts, styles and requests only from this server; nothing inline.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                      connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Content-Security-Policy", POLICY))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Cache-Control", "no-cache"))
        .body(body)
}

/// The chat page.
#[utoipa::path(get, path = "/", tag = "page", responses((status = 200, content((String = "text/html")))))]
async fn index() -> HttpResponse {
    file("text/html; charset=utf-8", INDEX)
}

#[utoipa::path(get, path = "/ui/app.js", tag = "page", responses((status = 200, content((String = "text/javascript")))))]
async fn script() -> HttpResponse {
    file("text/javascript; charset=utf-8", SCRIPT)
}

#[utoipa::path(get, path = "/ui/app.css", tag = "page", responses((status = 200, content((String = "text/css")))))]
async fn style() -> HttpResponse {
    file("text/css; charset=utf-8", STYLE)
}

pub fn register(cfg: &mut web::ServiceConfig) {
    use super::kit::resource;
    cfg.service(resource("/", "GET").route(web::get().to(index)))
        .service(resource("/ui/app.js", "GET").route(web::get().to(script)))
        .service(resource("/ui/app.css", "GET").route(web::get().to(style)));
}
