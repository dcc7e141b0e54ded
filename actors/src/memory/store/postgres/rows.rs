//! Rows and the types they hold: decoding, and the two inserts that appending
//! and importing share.

use sqlx::postgres::PgRow;
use sqlx::Row;

use super::super::{Conversation, ConversationId, NewMessage, StoredMessage};
use crate::params::Role;

pub(super) fn message_from(row: &PgRow) -> Result<StoredMessage, sqlx::Error> {
    let role: String = row.try_get("role")?;
    let role = match role.as_str() {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => return Err(sqlx::Error::Decode(format!("unknown role {other:?}").into())),
    };
    Ok(StoredMessage {
        id: row.try_get::<i64, _>("id")? as u64,
        conversation_id: row.try_get("conversation_id")?,
        role,
        content: row.try_get("content")?,
        created_at_ms: row.try_get::<i64, _>("created_at_ms")? as u64,
        token_count: row.try_get::<i32, _>("token_count")? as u32,
    })
}

/// A row of (id, conversation_id, embedding).
pub(super) fn vector_from(row: &PgRow) -> Result<super::super::StoredVector, sqlx::Error> {
    Ok((row.try_get::<i64, _>("id")? as u64, row.try_get("conversation_id")?, row.try_get::<Vec<f32>, _>("embedding")?))
}

pub(super) fn conversation_from(row: &PgRow) -> Result<Conversation, sqlx::Error> {
    Ok(Conversation {
        id: row.try_get("id")?,
        namespace: row.try_get("namespace")?,
        created_at_ms: row.try_get::<i64, _>("created_at_ms")? as u64,
        title: row.try_get("title")?,
    })
}

pub(super) const CONVERSATION_COLUMNS: &str = "id, namespace, created_at_ms, title";
pub(super) const MESSAGE_COLUMNS: &str = "id, conversation_id, role, content, created_at_ms, token_count";

pub(super) type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

/// Inserts the conversation's row; its next message gets `next_seq`.
pub(super) async fn insert_conversation(tx: &mut Tx, conv: &Conversation, next_seq: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO conversations (id, namespace, created_at_ms, title, next_seq) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(conv.id)
    .bind(&conv.namespace)
    .bind(conv.created_at_ms as i64)
    .bind(&conv.title)
    .bind(next_seq)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The database's clock in milliseconds (one clock for every replica).
pub(super) const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Inserts one message at position `seq` of its conversation.
pub(super) async fn insert_message(
    tx: &mut Tx,
    conversation_id: ConversationId,
    seq: i64,
    m: NewMessage,
) -> Result<StoredMessage, sqlx::Error> {
    let id: i64 = sqlx::query_scalar(&format!(
            "INSERT INTO messages \
             (conversation_id, seq, role, content, created_at_ms, token_count, embedding, embedded_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $7::real[] IS NULL THEN NULL ELSE {NOW_MS} END) RETURNING id"
        ))
    .bind(conversation_id)
    .bind(seq)
    .bind(m.role.as_str())
    .bind(&m.content)
    .bind(m.created_at_ms as i64)
    .bind(m.token_count as i32)
    .bind((!m.vector.is_empty()).then_some(&m.vector))
    .fetch_one(&mut **tx)
    .await?;
    Ok(StoredMessage {
        id: id as u64,
        conversation_id,
        role: m.role,
        content: m.content,
        created_at_ms: m.created_at_ms,
        token_count: m.token_count,
    })
}
