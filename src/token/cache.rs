//! Optional on-disk token cache (`auth.token_cache`): lets a restart within the token's lifetime
//! skip the token endpoint, which Auth0-style providers meter. Written with mode 0600 via a
//! temporary file and rename; a corrupt, foreign (other client, audience or token URL) or expired
//! file is ignored with a warning, never trusted.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::AuthConfig;
use crate::token::{Token, MAX_LIFETIME};

/// A cached token is only used when at least this much of its life remains.
const MIN_REMAINING: Duration = Duration::from_secs(120);

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheFile {
    version: u32,
    token_url: String,
    audience: String,
    client_id: String,
    access_token: String,
    expires_at_unix: u64,
}

/// The cached access token and its remaining lifetime, when the cache is valid for `cfg`.
pub fn load(path: &Path, cfg: &AuthConfig) -> Option<(String, Duration)> {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        // aleph-proxy writes the cache 0600. A file other users can read or write was not written
        // by it (or was changed since): another user could have planted the token in it.
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(file = %path.display(), mode = format!("{mode:o}"), "token cache is accessible to other users (aleph-proxy writes it 0600); ignoring it");
            return None;
        }
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e.kind(), "cannot read the token cache; ignoring it");
            return None;
        }
    };
    let Ok(file) = serde_json::from_slice::<CacheFile>(&bytes) else {
        tracing::warn!(file = %path.display(), "token cache is corrupt; ignoring it");
        return None;
    };
    if file.version != 1
        || file.token_url != cfg.token_url.as_str()
        || file.audience != cfg.audience
        || file.client_id != cfg.client_id
    {
        tracing::warn!(file = %path.display(), "token cache belongs to another credential or version; ignoring it");
        return None;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    let remaining = Duration::from_secs(file.expires_at_unix.saturating_sub(now));
    // No token the proxy fetched lives longer: a file saying otherwise was not written by it.
    if remaining > MAX_LIFETIME {
        tracing::warn!(file = %path.display(), "token cache is corrupt (its expiry is beyond 30 days); ignoring it");
        return None;
    }
    if remaining < MIN_REMAINING {
        tracing::warn!(file = %path.display(), "cached token is expired or about to; ignoring it");
        return None;
    }
    if file.access_token.trim().is_empty() {
        tracing::warn!(file = %path.display(), "token cache holds no token; ignoring it");
        return None;
    }
    Some((file.access_token, remaining))
}

/// For `aleph-proxy check`: can the proxy write the cache, and what does it hold now? A read-only
/// or missing directory would otherwise show only as a warning at every token refresh.
pub fn check(path: &Path, cfg: &AuthConfig) -> Result<String, String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!("directory {} does not exist", dir.display()));
    }
    // The same create-and-rename `store` does, on a name of its own, then removed.
    let probe = path.with_extension(format!("check{}", std::process::id()));
    let written = write_private(&probe, b"");
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = written {
        return Err(format!("cannot write in {}: {}", dir.display(), e.kind()));
    }
    Ok(match load(path, cfg) {
        Some((_, remaining)) => format!(
            "holds a token for {} more s (a restart now fetches none)",
            remaining.as_secs()
        ),
        None if path.exists() => {
            "holds nothing usable (see the warning above); the next fetch replaces it".into()
        }
        None => "empty; written after the first token fetch".into(),
    })
}

/// Writes the token to the cache (mode 0600). Failures are logged, never fatal.
pub fn store(path: &Path, cfg: &AuthConfig, token: &Token) {
    let expires_at_unix = token
        .expires_at_wall
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let file = CacheFile {
        version: 1,
        token_url: cfg.token_url.to_string(),
        audience: cfg.audience.clone(),
        client_id: cfg.client_id.clone(),
        access_token: token.access_token.expose().to_string(),
        expires_at_unix,
    };
    if let Err(e) = write_private(path, &serde_json::to_vec(&file).expect("serializes")) {
        tracing::warn!(file = %path.display(), error = %e.kind(), "cannot write the token cache");
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    // A leftover temporary file (a crash between open and rename) keeps its old mode when opened
    // again, so remove it and create it afresh with 0600.
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    drop(f);
    // The rename replaces the old file whatever its mode, so a cache once left readable by others
    // is 0600 again after the next write.
    let result = written.and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthMode;
    use crate::secret::Secret;

    fn cfg(client_id: &str) -> AuthConfig {
        AuthConfig {
            mode: AuthMode::OAuth,
            token_url: "http://127.0.0.1:1/oauth/token".parse().unwrap(),
            audience: "https://api.satellogic.com/".into(),
            client_id: client_id.into(),
            client_secret: Secret::new("s"),
            client_secret_file: None,
            token_cache: None,
            wait_timeout: Duration::from_secs(1),
            retry_initial_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(1),
        }
    }

    #[test]
    fn round_trip_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        let t = Token::new("tok-1", Duration::from_secs(3600), 1, 0.5).unwrap();
        store(&path, &cfg("a"), &t);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let (tok, left) = load(&path, &cfg("a")).expect("valid cache");
        assert_eq!(tok, "tok-1");
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
        // Another client, a corrupt file, an expired token: ignored.
        assert!(load(&path, &cfg("b")).is_none());
        let short = Token::new("tok-2", Duration::from_secs(60), 2, 0.5).unwrap();
        store(&path, &cfg("a"), &short);
        assert!(load(&path, &cfg("a")).is_none());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load(&path, &cfg("a")).is_none());
        assert!(load(&dir.path().join("missing.json"), &cfg("a")).is_none());
    }

    #[test]
    fn an_expiry_beyond_thirty_days_is_corrupt_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        let c = cfg("a");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for expires_at_unix in [u64::MAX, now + 31 * 86400] {
            let file = CacheFile {
                version: 1,
                token_url: c.token_url.to_string(),
                audience: c.audience.clone(),
                client_id: c.client_id.clone(),
                access_token: "tok-1".into(),
                expires_at_unix,
            };
            write_private(&path, &serde_json::to_vec(&file).unwrap()).unwrap();
            assert!(load(&path, &c).is_none(), "{expires_at_unix}");
        }
        // Start-up with such a cache fetches a token instead of aborting.
        let c = AuthConfig {
            token_cache: Some(path.clone()),
            ..c
        };
        let tls = crate::upstream::tls_config(None).unwrap();
        let m = crate::token::TokenManager::new(&c, tls, Duration::from_secs(1)).unwrap();
        assert!(m.current_usable().is_none());
    }

    #[cfg(unix)]
    #[test]
    fn a_cache_other_users_can_touch_is_ignored_then_rewritten_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        let t = Token::new("tok-1", Duration::from_secs(3600), 1, 0.5).unwrap();
        store(&path, &cfg("a"), &t);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&path, &cfg("a")).is_none());
        store(&path, &cfg("a"), &t);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(load(&path, &cfg("a")).is_some());
    }
}
