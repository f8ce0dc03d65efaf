//! Optional on-disk token cache (`auth.token_cache`): lets a restart within the token's lifetime
//! skip the token endpoint, which Auth0-style providers meter. Written with mode 0600 via a
//! temporary file and rename; a corrupt, foreign (other client, audience or token URL) or expired
//! file is ignored with a warning, never trusted.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::AuthConfig;
use crate::token::Token;

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
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}
