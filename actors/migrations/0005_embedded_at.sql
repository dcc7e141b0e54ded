-- When a message's embedding was stored, by the database's clock: a replica
-- with namespace recall reads the vectors other replicas stored since it last
-- looked (NULL for rows written before this column existed: they are read
-- when a replica starts).
ALTER TABLE messages ADD COLUMN embedded_at_ms bigint;
CREATE INDEX messages_embedded_at ON messages (embedded_at_ms) WHERE embedded_at_ms IS NOT NULL;
