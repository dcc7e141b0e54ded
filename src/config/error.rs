//! What can keep the configuration from loading.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("unknown profile {name:?}; known profiles: {known}")]
    UnknownProfile { name: String, known: String },
    #[error("environment variable {var}={value:?}: expected {expected}")]
    Env { var: String, value: String, expected: &'static str },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}
