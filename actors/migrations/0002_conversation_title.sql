-- A title given when a conversation is imported (else the first message is its title).
ALTER TABLE conversations ADD COLUMN title text;
