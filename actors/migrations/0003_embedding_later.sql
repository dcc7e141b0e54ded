-- A reply is stored as soon as it is generated and its embedding is added
-- right after, off the answer's path: until then (or if the process stops in
-- between) the message has none, and the next load of the conversation
-- embeds it.
ALTER TABLE messages ALTER COLUMN embedding DROP NOT NULL;
