//! One chat turn with memory: the chat actor (the registry of the
//! conversations' actors), the actor of one conversation (which runs its
//! turns in order), the turn's work, and the handle callers use.

pub mod actor;
mod conversation;
pub mod handle;
pub mod import;
mod recall;
pub mod turn;
pub mod types;
