//! The layers as TOML tables: each file parsed, merged over the one below,
//! and the `MODELPOOL_<KEY>` environment variables typed like the key they set.

use std::path::{Path, PathBuf};

use super::error::ConfigError;

/// Environment variables with the prefix that are not config keys.
/// Variables of the scripts, tests and benchmarks (`MODELPOOL_TEST_*`,
/// `MODELPOOL_BENCH_*`, `MODELPOOL_FUZZ_*`), not settings: never warned about.
const NOT_KEY_PREFIXES: &[&str] = &["TEST_", "BENCH_", "FUZZ_", "SCHEMATHESIS_"];

const NOT_KEYS: &[&str] = &[
    "PORTABLE",
    "LLAMA_BUILD",
    "CONFIG",
    "PROFILE",
    "MODELS_DIR",
    "VENV",
    "LOG",
    "TEST_MODEL",
    "TEST_EMBED_MODEL",
    "REMOTES",
    "LLAMA_SERVER",
    "PG_BIN",
];

/// A layer's TOML text as a table; `origin` names it in the error.
pub(super) fn parse_table(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })
}

/// Deep-merges `over` into `base`.
pub(super) fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Converts an environment value to the type of the key's default.
fn typed(var: &str, raw: &str, like: &toml::Value) -> Result<toml::Value, ConfigError> {
    let err = |expected| ConfigError::Env { var: var.to_string(), value: raw.to_string(), expected };
    Ok(match like {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(raw.trim().parse().map_err(|_| err("an integer"))?),
        toml::Value::Float(_) => toml::Value::Float(raw.trim().parse().map_err(|_| err("a number"))?),
        toml::Value::Boolean(_) => toml::Value::Boolean(raw.trim().parse().map_err(|_| err("true or false"))?),
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',').filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.to_string())).collect(),
        ),
        _ => return Err(err("a plain value")),
    })
}

/// Sets each `MODELPOOL_<KEY>` variable's key (`<SECTION>_<KEY>` for the
/// nested tables), typed like its default.
pub(super) fn apply_env(
    table: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, raw) in vars {
        let Some(rest) = var.strip_prefix("MODELPOOL_") else { continue };
        if NOT_KEYS.contains(&rest) || NOT_KEY_PREFIXES.iter().any(|p| rest.starts_with(p)) {
            continue;
        }
        let key = rest.to_ascii_lowercase();
        // Top-level key first, then `section_key` for the nested tables.
        if let Some(like) = table.get(&key).filter(|v| !v.is_table()).cloned() {
            table.insert(key, typed(&var, &raw, &like)?);
            continue;
        }
        let nested = ["sampling", "server", "chat"].iter().find_map(|section| {
            let sub = key.strip_prefix(section)?.strip_prefix('_')?;
            Some((*section, sub.to_string()))
        });
        match nested {
            Some((section, sub)) => {
                let t = table.get_mut(section).and_then(|v| v.as_table_mut()).expect("default has the section");
                let like = match t.get(&sub) {
                    Some(v) => v.clone(),
                    // Optional keys without a default (sampling.seed, sampling.max_tokens_default).
                    None if section == "sampling" && ["seed", "max_tokens_default"].contains(&sub.as_str()) => {
                        toml::Value::Integer(0)
                    }
                    None => {
                        tracing::warn!(%var, "ignoring unknown MODELPOOL_ environment variable");
                        continue;
                    }
                };
                t.insert(sub, typed(&var, &raw, &like)?);
            }
            None => tracing::warn!(%var, "ignoring unknown MODELPOOL_ environment variable"),
        }
    }
    Ok(())
}

/// Expands a leading `~` to $HOME.
pub(super) fn expand(path: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(rest),
        Err(_) => path.to_path_buf(),
    }
}
