//! The pool: its decisions as a plain struct (`state`), what it reports (`status`), the manager actor that
//! drives them, one model actor per instance (on its own thread, owning its context),
//! the lease guard, and the handle callers use.

pub mod handle;
pub mod instance;
pub mod lease;
pub mod manager;
pub mod state;
pub mod status;
