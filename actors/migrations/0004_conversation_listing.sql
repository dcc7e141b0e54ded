-- GET /conversations pages newest first, per namespace or over all of them.
CREATE INDEX conversations_listing ON conversations (namespace, created_at_ms DESC, id DESC);
CREATE INDEX conversations_newest ON conversations (created_at_ms DESC, id DESC);
