//! Showing a PostgreSQL URL without its password.

/// `url` with its password replaced by `***`, fit for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    // A password may also come as a query parameter.
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| if kv.starts_with("password=") { "password=***".to_string() } else { kv.to_string() })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_show() {
        assert_eq!(redact("postgres://mp:s3cret@db:5432/chat"), "postgres://mp:***@db:5432/chat");
        assert_eq!(redact("postgres://mp@db/chat"), "postgres://mp@db/chat");
        assert_eq!(redact("postgres://db/chat?user=mp&password=s3cret"), "postgres://db/chat?user=mp&password=***");
        assert_eq!(redact("postgresql://u:p@h"), "postgresql://u:***@h");
    }
}
