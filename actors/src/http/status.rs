//! `GET /pool`, and the health checks `/health`, `/health/live`, `/health/ready`.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::{ApiError, ApiState, Authorized};

async fn pool(state: web::Data<ApiState>, _auth: Authorized) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let status = chat.pool().status().await?;
    let totals = status.totals();
    Ok(HttpResponse::Ok().json(json!({
        "available": status.available,
        "in_use": status.in_use,
        "loading": status.loading,
        "unhealthy": status.unhealthy,
        "queued": status.queued,
        "replaced": status.replaced,
        "total": status.total,
        "accepting": status.accepting,
        "totals": totals,
        "instances": status.instances,
    })))
}

/// 200 when at least one instance can serve and the server is not draining; 503 otherwise.
async fn ready(state: web::Data<ApiState>) -> HttpResponse {
    let (code, status) = match state.chat() {
        _ if state.is_draining() => (503, "draining".to_string()),
        Err(_) => (503, "loading".to_string()),
        Ok(chat) => match chat.pool().status().await {
            Ok(s) if s.ready() => (200, "ok".to_string()),
            Ok(s) if s.loading > 0 => (503, "loading".to_string()),
            Ok(_) => (503, "unhealthy".to_string()),
            Err(_) => (503, "stopped".to_string()),
        },
    };
    let body = json!({ "status": status });
    if code == 200 {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "1")).json(body)
    }
}

/// 200 while the process serves HTTP at all.
async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

pub fn register(cfg: &mut web::ServiceConfig) {
    cfg.route("/pool", web::get().to(pool))
        .route("/health", web::get().to(ready))
        .route("/health/ready", web::get().to(ready))
        .route("/health/live", web::get().to(live));
}

#[cfg(test)]
mod tests {
    use actix_web::{test, App};

    use super::super::{configure, ApiSettings, ApiState};

    #[actix::test]
    async fn while_loading_health_and_routes_answer_503_loading() {
        let state = ApiState::loading(ApiSettings::default());
        let app = test::init_service(App::new().configure(configure(state))).await;
        let res = test::call_service(&app, test::TestRequest::get().uri("/health").to_request()).await;
        assert_eq!(res.status(), 503);
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["status"], "loading");
        let res = test::call_service(&app, test::TestRequest::get().uri("/health/live").to_request()).await;
        assert_eq!(res.status(), 200);
        let res = test::call_service(&app, test::TestRequest::get().uri("/pool").to_request()).await;
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers().get("retry-after").unwrap(), "1");
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["error"]["type"], "loading");
    }
}
