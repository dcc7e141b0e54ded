//! `GET /pool`, and the health checks `/health`, `/health/live`, `/health/ready`.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::kit::{ApiState, Authorized};

/// The pool, its instances, the embedder, the memory index, the CPU, the KV tiers.
#[utoipa::path(get, path = "/pool", tag = "status",
    responses((status = 200, body = super::openapi::bodies::PoolBody), (status = "default", description = "An error", body = super::error::ErrorBody)))]
async fn pool(state: web::Data<ApiState>, _auth: Authorized) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let status = chat.pool().status().await?;
    let totals = status.totals();
    let (tokenizer_source, tokenizer_by) = chat.pool().engine().tokenizer();
    Ok(HttpResponse::Ok().json(json!({
        "available": status.available,
        "in_use": status.in_use,
        "loading": status.loading,
        "unhealthy": status.unhealthy,
        "queued": status.queued,
        "waiting_for_conversation": status.waiting_for_conversation,
        "replaced": status.replaced,
        "total": status.total,
        "summary": format!(
            "Available: {}/{} slots on {} instance{}",
            status.available,
            status.total,
            status.instances.len(),
            if status.instances.len() == 1 { "" } else { "s" }
        ),
        "accepting": status.accepting,
        "totals": totals,
        "instances": status.instances,
        // Prompts are tokenized once, for local and remote instances alike:
        // with the GGUF here, or (when it is not here) by a remote's /tokenize.
        "tokenizer": {
            "source": tokenizer_source,
            "by": tokenizer_by,
            "model": chat.pool().engine_info().model_name,
        },
        "embedder": chat.embedder().health(),
        "memory_index": chat.index_stats(),
        // Local instances' threads, lowered while other processes keep cores busy.
        "cpu": chat.pool().engine().cpu_status(),
        // What llama.cpp's build uses on this machine (AVX2, AVX512, …).
        "llama_cpp_cpu_features": chat.pool().engine().cpu_features(),
        // Where conversations' KV caches wait outside the slots (memory, disk).
        "kv": chat.pool().kv_tiers().map(|t| t.status()),
        // The memory tier's bytes are part of this figure.
        "rss_bytes": crate::rss_bytes(),
        "storage": { "writable": chat.storage_error().is_none(), "error": chat.storage_error() },
        "auth": auth_summary(&state.settings),
    })))
}

/// Who may read what: keys bound to a namespace, and the keys bound to none,
/// which see every namespace (shown as the first 12 hex digits of their
/// SHA-256, never the key itself).
fn auth_summary(settings: &super::ApiSettings) -> serde_json::Value {
    use sha2::{Digest, Sha256};
    let unbound: Vec<String> = settings
        .api_keys
        .iter()
        .filter(|k| !settings.key_namespaces.contains_key(*k))
        .map(|k| format!("sha256:{}", &format!("{:x}", Sha256::digest(k.as_bytes()))[..12]))
        .collect();
    json!({
        "keys": settings.api_keys.len(),
        "bound_to_a_namespace": settings.api_keys.len() - unbound.len(),
        "unbound_keys": unbound,
        "unbound_keys_see": "every namespace",
    })
}

/// `GET /pool/capacity`: what a load balancer or autoscaler needs, cheaply.
#[utoipa::path(get, path = "/pool/capacity", tag = "status",
    responses((status = 200, body = super::openapi::bodies::CapacityBody), (status = "default", description = "An error", body = super::error::ErrorBody)))]
async fn capacity(state: web::Data<ApiState>, _auth: Authorized) -> Result<HttpResponse, ApiError> {
    let chat = state.chat()?;
    let status = chat.pool().status().await?;
    let instances: Vec<_> = status
        .instances
        .iter()
        .map(|i| {
            json!({
                "id": i.id, "kind": i.kind, "endpoint": i.endpoint, "state": i.state,
                "slots": i.slots, "slots_busy": i.slots_busy,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "ready": status.ready(),
        "free_slots": status.available,
        "total_slots": status.total,
        "running": status.in_use,
        "queue_depth": status.queued,
        "queue_limit": chat.pool().options().max_queue,
        "instances": instances,
    })))
}

fn unavailable(body: serde_json::Value) -> HttpResponse {
    HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "1")).json(body)
}

/// 200 when everything a request needs works: an instance can serve, the
/// store can write, the embedder answers, and the server is not draining.
/// 503 otherwise, with the reason as `status` and, where known, its `cause`.
#[utoipa::path(get, path = "/health", tag = "status", operation_id = "health",
    responses((status = 200, body = super::openapi::bodies::HealthBody),
        (status = 503, description = "Not ready: `status` says why", body = super::openapi::bodies::HealthBody)))]
async fn ready(state: web::Data<ApiState>) -> HttpResponse {
    if state.is_draining() {
        return unavailable(json!({ "status": "draining" }));
    }
    let Ok(chat) = state.chat() else { return unavailable(json!({ "status": "loading" })) };
    if let Some(cause) = chat.check_storage().await {
        return unavailable(json!({ "status": "storage_unavailable", "cause": cause }));
    }
    let embedder = chat.embedder().health();
    if !embedder.healthy {
        return unavailable(json!({ "status": "embedder_unavailable", "cause": embedder.last_error }));
    }
    match chat.pool().status().await {
        // Ready even while namespace graphs build: recall is exact meanwhile.
        Ok(s) if s.ready() => {
            let index = chat.index_stats();
            let recall = if index.building > 0 { "exact while the index builds" } else { "ok" };
            HttpResponse::Ok().json(json!({ "status": "ok", "recall": recall, "memory_index": index }))
        }
        Ok(s) if s.loading > 0 => unavailable(json!({ "status": "loading" })),
        Ok(_) => unavailable(json!({ "status": "unhealthy", "cause": "no model instance can serve" })),
        Err(_) => unavailable(json!({ "status": "stopped" })),
    }
}

/// 200 while the process serves HTTP and can recover by itself. A sled store
/// that cannot write stays so until the process restarts (sled keeps its I/O
/// error until reopened), so liveness fails too: a supervisor restarts it.
/// A PostgreSQL store that is down is not a reason to restart: the replica
/// reconnects by itself, and readiness keeps traffic away meanwhile.
#[utoipa::path(get, path = "/health/live", tag = "status",
    responses((status = 200, body = super::openapi::bodies::HealthBody),
        (status = 503, description = "Only a restart helps: `storage_unavailable`", body = super::openapi::bodies::HealthBody)))]
async fn live(state: web::Data<ApiState>) -> HttpResponse {
    let permanent = state.chat().ok().filter(|c| !c.store().shared()).and_then(|c| c.storage_error());
    match permanent {
        Some(cause) => unavailable(json!({ "status": "storage_unavailable", "cause": cause })),
        None => HttpResponse::Ok().json(json!({ "status": "ok" })),
    }
}

pub fn register(cfg: &mut web::ServiceConfig) {
    use super::kit::resource;
    cfg.service(resource("/pool", "GET").route(web::get().to(pool)))
        .service(resource("/pool/capacity", "GET").route(web::get().to(capacity)))
        .service(resource("/health", "GET").route(web::get().to(ready)))
        .service(resource("/health/ready", "GET").route(web::get().to(ready)))
        .service(resource("/health/live", "GET").route(web::get().to(live)));
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
