//! One chat turn with memory: the chat actor, the turn's work, and the handle
//! callers use.

pub mod actor;
pub mod handle;
pub mod import;
mod recall;
pub mod turn;
pub mod types;
