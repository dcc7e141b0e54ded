-- Conversations, their messages in exact order, and each message's embedding.
CREATE TABLE conversations (
    id            uuid PRIMARY KEY,
    namespace     text   NOT NULL,
    created_at_ms bigint NOT NULL,
    -- The sequence number the next message gets. Appending takes this row's
    -- lock, so turns of one conversation are ordered even across replicas.
    next_seq      bigint NOT NULL DEFAULT 1
);
CREATE INDEX conversations_namespace ON conversations (namespace);

CREATE TABLE messages (
    -- Unique in the store: the payload of every replica's vector index.
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id uuid    NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             bigint  NOT NULL,
    role            text    NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         text    NOT NULL,
    created_at_ms   bigint  NOT NULL,
    token_count     integer NOT NULL,
    -- The message's embedding (pgvector is not required).
    embedding       real[]  NOT NULL,
    UNIQUE (conversation_id, seq)
);
