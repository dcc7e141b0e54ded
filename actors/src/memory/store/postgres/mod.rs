//! The shared conversation store: PostgreSQL through sqlx, with the schema
//! migrations (`actors/migrations/`) embedded in the binary and applied at
//! start-up (sqlx takes an advisory lock, so replicas starting together
//! migrate once).
//!
//! Order within a conversation comes from a per-conversation sequence: an
//! append increments `conversations.next_seq` (taking that row's lock until
//! commit) and stores the message with the old value, so concurrent turns of
//! one conversation, on any replica, get distinct, gap-free positions.
//!
//! sqlx runs on a small tokio runtime of its own thread: the connections live
//! there, whichever actix arbiter asks, and a query never runs on the
//! executor that hosts the pool manager.

use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use super::{Conversation, ConversationId, NewMessage, Store, StoreError, StoredMessage, StoredVector};

mod rows;
mod url;

use rows::{
    conversation_from, insert_conversation, insert_message, message_from, vector_from, CONVERSATION_COLUMNS,
    MESSAGE_COLUMNS, NOW_MS,
};
pub use url::redact;

/// The longest wait for a connection from the pool (or a new one): past it,
/// a call fails with [`StoreError::Unavailable`] instead of hanging a turn.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long readiness waits for `SELECT 1`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_CONNECTIONS: u32 = 16;

/// Stops the store's runtime thread when the last handle is dropped.
struct RuntimeGuard {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Conversations in PostgreSQL, shared by every replica that points at it.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    url: String,
    health: Arc<Mutex<Option<String>>>,
    runtime: Arc<RuntimeGuard>,
}

/// Whether an error means "cannot reach the database now" (retry later)
/// rather than "the database refused this".
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Class 08: connection exception; 57P0x: the server is shutting down or starting.
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300")
        }
        _ => false,
    }
}

/// Why a query failed, for one conversation (`NotFound` passes through).
enum Failure {
    NotFound(ConversationId),
    Sql(sqlx::Error),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Sql(e)
    }
}

impl PostgresStore {
    /// Connects, checks the server answers, and applies the embedded
    /// migrations. Fails with [`StoreError::Unavailable`] (URL redacted,
    /// cause named) when PostgreSQL cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let shown = redact(url);
        let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::Database {
            store: shown.clone(),
            cause: format!("not a valid PostgreSQL URL: {e}"),
        })?;
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("modelpool-postgres".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let _ = handle_tx.send(Ok((rt.handle().clone(), stop_tx)));
                rt.block_on(async move {
                    let _ = stop_rx.await;
                });
            })
            .map_err(|e| StoreError::Database { store: shown.clone(), cause: format!("cannot start a thread: {e}") })?;
        let (handle, stop) = handle_rx
            .await
            .map_err(|_| StoreError::Database { store: shown.clone(), cause: "its runtime did not start".into() })?
            .map_err(|cause| StoreError::Database { store: shown.clone(), cause })?;
        let runtime = Arc::new(RuntimeGuard { handle, _stop: stop });
        let pool = runtime
            .handle
            .spawn(async move {
                // One plain connection first: its error names the cause
                // (refused, unknown host, authentication), where the pool would only time out.
                let first = tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options))
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??;
                first.close().await?;
                let pool = PgPoolOptions::new()
                    .max_connections(MAX_CONNECTIONS)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await?;
                sqlx::migrate!("./migrations").run(&pool).await?;
                Ok::<_, sqlx::Error>(pool)
            })
            .await
            .map_err(|e| StoreError::Database { store: shown.clone(), cause: e.to_string() })?
            .map_err(|e| {
                let cause = describe(&e);
                if is_unavailable(&e) {
                    StoreError::Unavailable { store: shown.clone(), cause }
                } else {
                    StoreError::Database { store: shown.clone(), cause }
                }
            })?;
        Ok(Self { pool, url: shown, health: Arc::default(), runtime })
    }

    /// Runs `f` on the store's runtime and records its outcome for [`Store::health`].
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = Result<T, Failure>> + Send + 'static,
    {
        let outcome = self.runtime.handle.spawn(f(self.pool.clone())).await;
        let result = match outcome {
            Err(e) => Err(StoreError::Database { store: self.url.clone(), cause: format!("query task failed: {e}") }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(Failure::NotFound(id))) => Err(StoreError::NotFound(id)),
            Ok(Err(Failure::Sql(e))) if is_unavailable(&e) => {
                Err(StoreError::Unavailable { store: self.url.clone(), cause: describe(&e) })
            }
            Ok(Err(Failure::Sql(e))) => Err(StoreError::Database { store: self.url.clone(), cause: describe(&e) }),
        };
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Err(e @ StoreError::Unavailable { .. }) => {
                if health.is_none() {
                    tracing::error!(error = %e, "the conversation store is unavailable");
                }
                *health = Some(e.to_string());
            }
            Err(_) => {}
            Ok(_) => {
                if health.take().is_some() {
                    tracing::info!(store = %self.url, "the conversation store is available again");
                }
            }
        }
        result
    }
}

/// The error's message, with the server's detail where it gave one.
fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::PoolTimedOut => {
            format!("no connection within {} ms (is the server running and reachable?)", ACQUIRE_TIMEOUT.as_millis())
        }
        other => other.to_string(),
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn shared(&self) -> bool {
        true
    }

    async fn conversation(&self, id: &ConversationId) -> Result<Conversation, StoreError> {
        let id = *id;
        self.run(move |pool| async move {
            let row = sqlx::query(&format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = $1"))
                .bind(id)
                .fetch_optional(&pool)
                .await?;
            match row {
                Some(row) => Ok(conversation_from(&row)?),
                None => Err(Failure::NotFound(id)),
            }
        })
        .await
    }

    async fn list_conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        self.run(|pool| async move {
            let rows =
                sqlx::query(&format!("SELECT {CONVERSATION_COLUMNS} FROM conversations")).fetch_all(&pool).await?;
            Ok(rows.iter().map(conversation_from).collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn conversations_page(
        &self,
        namespace: Option<&str>,
        before: Option<(u64, ConversationId)>,
        limit: usize,
    ) -> Result<Vec<Conversation>, StoreError> {
        let namespace = namespace.map(str::to_string);
        // A cursor past every row: i64::MAX and the greatest uuid.
        let (ms, id) = before
            .map(|(ms, id)| (ms.min(i64::MAX as u64) as i64, id))
            .unwrap_or((i64::MAX, uuid::Uuid::from_bytes([0xff; 16])));
        let limit = limit.min(i64::MAX as usize) as i64;
        self.run(move |pool| async move {
            let rows = sqlx::query(&format!(
                "SELECT {CONVERSATION_COLUMNS} FROM conversations \
                 WHERE ($1::text IS NULL OR namespace = $1) AND (created_at_ms, id) < ($2, $3) \
                 ORDER BY created_at_ms DESC, id DESC LIMIT $4"
            ))
            .bind(namespace)
            .bind(ms)
            .bind(id)
            .bind(limit)
            .fetch_all(&pool)
            .await?;
            Ok(rows.iter().map(conversation_from).collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn append_messages(
        &self,
        conv: &Conversation,
        new_conversation: bool,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let conv = conv.clone();
        self.run(move |pool| async move {
            let mut tx = pool.begin().await?;
            if new_conversation {
                insert_conversation(&mut tx, &conv, 1).await?;
            }
            // Takes the conversation's row lock until commit: its turns are ordered.
            let n = messages.len() as i64;
            let first: Option<i64> = sqlx::query_scalar(
                "UPDATE conversations SET next_seq = next_seq + $2 WHERE id = $1 RETURNING next_seq - $2",
            )
            .bind(conv.id)
            .bind(n)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(first) = first else { return Err(Failure::NotFound(conv.id)) };
            let mut stored = Vec::with_capacity(messages.len());
            for (i, m) in messages.into_iter().enumerate() {
                stored.push(insert_message(&mut tx, conv.id, first + i as i64, m).await?);
            }
            tx.commit().await?;
            Ok(stored)
        })
        .await
    }

    async fn import(&self, conv: &Conversation, messages: Vec<NewMessage>) -> Result<Vec<StoredMessage>, StoreError> {
        let conv = conv.clone();
        self.run(move |pool| async move {
            let mut tx = pool.begin().await?;
            insert_conversation(&mut tx, &conv, messages.len() as i64 + 1).await?;
            let mut stored = Vec::with_capacity(messages.len());
            for (i, m) in messages.into_iter().enumerate() {
                stored.push(insert_message(&mut tx, conv.id, i as i64 + 1, m).await?);
            }
            tx.commit().await?;
            Ok(stored)
        })
        .await
    }

    async fn messages(
        &self,
        conv: &ConversationId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let conv = *conv;
        let after = after.map(|a| a.min(i64::MAX as u64) as i64).unwrap_or(0);
        let limit = limit.min(i64::MAX as usize) as i64;
        self.run(move |pool| async move {
            // Within a conversation, ids grow with seq: appends are serialised by the row lock.
            let rows = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND id > $2 ORDER BY seq LIMIT $3"
            ))
            .bind(conv)
            .bind(after)
            .bind(limit)
            .fetch_all(&pool)
            .await?;
            Ok(rows.iter().map(message_from).collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn count(&self, conv: &ConversationId) -> Result<usize, StoreError> {
        let conv = *conv;
        self.run(move |pool| async move {
            // Messages are only ever deleted with their conversation: the sequence counts them.
            let n: Option<i64> = sqlx::query_scalar("SELECT next_seq - 1 FROM conversations WHERE id = $1")
                .bind(conv)
                .fetch_optional(&pool)
                .await?;
            Ok(n.unwrap_or(0).max(0) as usize)
        })
        .await
    }

    async fn recent(&self, conv: &ConversationId, n: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let conv = *conv;
        let n = n.min(i64::MAX as usize) as i64;
        self.run(move |pool| async move {
            let rows = sqlx::query(&format!(
                "SELECT * FROM (SELECT {MESSAGE_COLUMNS}, seq FROM messages WHERE conversation_id = $1 \
                 ORDER BY seq DESC LIMIT $2) recent ORDER BY seq"
            ))
            .bind(conv)
            .bind(n)
            .fetch_all(&pool)
            .await?;
            Ok(rows.iter().map(message_from).collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn messages_by_id(&self, ids: &[(ConversationId, u64)]) -> Result<Vec<StoredMessage>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = ids.iter().map(|(_, id)| *id as i64).collect();
        self.run(move |pool| async move {
            let rows = sqlx::query(&format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ANY($1)"))
                .bind(&ids)
                .fetch_all(&pool)
                .await?;
            Ok(rows.iter().map(message_from).collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn delete_conversation(&self, conv: &ConversationId) -> Result<Vec<u64>, StoreError> {
        let conv = *conv;
        self.run(move |pool| async move {
            let mut tx = pool.begin().await?;
            let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE")
                .bind(conv)
                .fetch_optional(&mut *tx)
                .await?;
            if found.is_none() {
                return Err(Failure::NotFound(conv));
            }
            let ids: Vec<i64> = sqlx::query_scalar("DELETE FROM messages WHERE conversation_id = $1 RETURNING id")
                .bind(conv)
                .fetch_all(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM conversations WHERE id = $1").bind(conv).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(ids.into_iter().map(|id| id as u64).collect())
        })
        .await
    }

    async fn vectors(&self, conv: Option<&ConversationId>) -> Result<Vec<StoredVector>, StoreError> {
        let conv = conv.copied();
        self.run(move |pool| async move {
            let query = match conv {
                Some(c) => sqlx::query(
                    "SELECT id, conversation_id, embedding FROM messages \
                         WHERE conversation_id = $1 AND embedding IS NOT NULL",
                )
                .bind(c),
                None => sqlx::query("SELECT id, conversation_id, embedding FROM messages WHERE embedding IS NOT NULL"),
            };
            let rows = query.fetch_all(&pool).await?;
            let out = rows.iter().map(vector_from).collect::<Result<Vec<_>, _>>()?;
            Ok(out)
        })
        .await
    }

    async fn clock_ms(&self) -> Result<u64, StoreError> {
        self.run(|pool| async move {
            let now: i64 = sqlx::query_scalar(&format!("SELECT {NOW_MS}")).fetch_one(&pool).await?;
            Ok(now.max(0) as u64)
        })
        .await
    }

    async fn namespace_vectors_since(
        &self,
        namespace: &str,
        since_ms: u64,
    ) -> Result<(Vec<StoredVector>, u64), StoreError> {
        let namespace = namespace.to_string();
        let since = since_ms.min(i64::MAX as u64) as i64;
        self.run(move |pool| async move {
            let now: i64 = sqlx::query_scalar(&format!("SELECT {NOW_MS}")).fetch_one(&pool).await?;
            let rows = sqlx::query(
                "SELECT m.id, m.conversation_id, m.embedding FROM messages m \
                 JOIN conversations c ON c.id = m.conversation_id \
                 WHERE m.embedded_at_ms >= $2 AND c.namespace = $1 AND m.embedding IS NOT NULL",
            )
            .bind(namespace)
            .bind(since)
            .fetch_all(&pool)
            .await?;
            let out = rows.iter().map(vector_from).collect::<Result<Vec<_>, _>>()?;
            Ok((out, now.max(0) as u64))
        })
        .await
    }

    async fn set_vector(&self, conv: &ConversationId, id: u64, vector: &[f32]) -> Result<bool, StoreError> {
        let (conv, vector) = (*conv, vector.to_vec());
        self.run(move |pool| async move {
            let done = sqlx::query(&format!(
                "UPDATE messages SET embedding = $3, embedded_at_ms = {NOW_MS} WHERE conversation_id = $1 AND id = $2"
            ))
            .bind(conv)
            .bind(id as i64)
            .bind(&vector)
            .execute(&pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Every append is committed before it returns.
        Ok(())
    }

    fn health(&self) -> Option<String> {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn check(&self) -> Option<String> {
        let probe = self.run(|pool| async move {
            match tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(&pool)).await {
                Ok(r) => r.map(|_| ()).map_err(Failure::Sql),
                Err(_) => Err(Failure::Sql(sqlx::Error::PoolTimedOut)),
            }
        });
        match probe.await {
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        }
    }
}
