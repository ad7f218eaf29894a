//! Bearer credentials of two scopes: the operator token (everything, sessions included) and an
//! optional read-only one (GET: `/metrics`, breakdowns, results), for the scraper. Each is read
//! from a file and read again when the file changes, so rotating a Secret needs no restart.

use std::{
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use axum::http::{HeaderMap, Method, header};
use subtle::ConstantTimeEq as _;

/// Shortest token accepted: 16 bytes (128 bits of a random hex or base64 string, far more).
pub const MIN_TOKEN_LEN: usize = 16;
/// How often a token file is looked at for a change.
const RECHECK: Duration = Duration::from_secs(1);
/// How long a request with a missing or wrong token waits for its 401: guessing is slowed to
/// one try per second per connection, and the connection caps bound the connections.
pub const FAILURE_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the token in {path} is {len} bytes: at least {MIN_TOKEN_LEN} are needed (make one with \
         `head -c 32 /dev/urandom | base64`)"
    )]
    TooShort { path: PathBuf, len: usize },
    #[error("the read-only token is the operator token: give each its own")]
    SameToken,
}

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// GET and HEAD requests: metrics, breakdowns, sessions' results, the node report.
    Read,
    /// Everything: also opening and stopping sessions (which switch BPF statistics on).
    Operate,
}

impl Scope {
    /// The scope a request needs.
    pub fn needed_for(method: &Method) -> Self {
        if method == Method::GET || method == Method::HEAD {
            Self::Read
        } else {
            Self::Operate
        }
    }
}

/// Reads a token file: trimmed, and refused when shorter than [`MIN_TOKEN_LEN`].
pub fn read_token(path: &Path) -> Result<String, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim().to_owned();
    if token.len() < MIN_TOKEN_LEN {
        return Err(AuthError::TooShort {
            path: path.to_owned(),
            len: token.len(),
        });
    }
    Ok(token)
}

/// A file's identity as far as a change goes: modification time and size (a Secret volume
/// swaps a symlink, which changes both as seen through the path).
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

struct Loaded {
    token: String,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

/// One token, fixed or from a file that is read again when it changes.
struct Credential {
    file: Option<PathBuf>,
    loaded: Mutex<Loaded>,
}

impl Credential {
    fn fixed(token: String) -> Self {
        Self {
            file: None,
            loaded: Mutex::new(Loaded {
                token,
                stamp: None,
                checked: Instant::now(),
            }),
        }
    }

    fn from_file(path: &Path) -> Result<Self, AuthError> {
        let token = read_token(path)?;
        Ok(Self {
            file: Some(path.to_owned()),
            loaded: Mutex::new(Loaded {
                token,
                stamp: stamp(path),
                checked: Instant::now(),
            }),
        })
    }

    /// Whether `presented` is the token now. A changed file is read again; a new token that
    /// cannot be read or is too short leaves the old one in force, and says so in the log.
    fn matches(&self, presented: &[u8]) -> bool {
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(path) = &self.file
            && loaded.checked.elapsed() >= RECHECK
        {
            loaded.checked = Instant::now();
            let now = stamp(path);
            if now != loaded.stamp {
                match read_token(path) {
                    Ok(token) => {
                        tracing::info!("token file {} changed: new token in force", path.display());
                        loaded.token = token;
                        loaded.stamp = now;
                    }
                    Err(e) => {
                        // Said once per change of the file, not once a second.
                        loaded.stamp = now;
                        tracing::warn!("{e}; the previous token stays in force");
                    }
                }
            }
        }
        // Constant time, so response timing does not reveal how much of a guess was right.
        presented.ct_eq(loaded.token.as_bytes()).into()
    }
}

/// The agent's credentials and the count of requests they refused.
pub struct Auth {
    operator: Credential,
    read_only: Option<Credential>,
    failures: AtomicU64,
}

impl Auth {
    /// One operator token that never changes (tests, and callers that hold the token).
    pub fn fixed(operator: String) -> Self {
        Self {
            operator: Credential::fixed(operator),
            read_only: None,
            failures: AtomicU64::new(0),
        }
    }

    /// Tokens from files, read again whenever a file changes.
    pub fn from_files(operator: &Path, read_only: Option<&Path>) -> Result<Self, AuthError> {
        let operator = Credential::from_file(operator)?;
        let read_only = read_only.map(Credential::from_file).transpose()?;
        if let Some(read_only) = &read_only {
            let token = read_only
                .loaded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .token
                .clone();
            if operator.matches(token.as_bytes()) {
                return Err(AuthError::SameToken);
            }
        }
        Ok(Self {
            operator,
            read_only,
            failures: AtomicU64::new(0),
        })
    }

    /// With a read-only token too.
    #[must_use]
    pub fn with_read_only(mut self, token: String) -> Self {
        self.read_only = Some(Credential::fixed(token));
        self
    }

    /// The scope the request's bearer token grants; `None` (and a failure counted) when it
    /// carries none or a wrong one.
    pub fn scope_of(&self, headers: &HeaderMap) -> Option<Scope> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        let scope = presented.and_then(|token| {
            if self.operator.matches(token) {
                Some(Scope::Operate)
            } else if self.read_only.as_ref().is_some_and(|c| c.matches(token)) {
                Some(Scope::Read)
            } else {
                None
            }
        });
        if scope.is_none() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        scope
    }

    /// Requests refused for a missing or wrong token since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    /// A directory only root can read, removed on drop (tokens must not sit in a shared,
    /// predictable place).
    struct PrivateDir(PathBuf);

    impl PrivateDir {
        fn new(tag: &str) -> Self {
            use std::os::unix::fs::DirBuilderExt as _;
            let path = std::env::temp_dir().join(format!(
                "cnitrace-auth-{tag}-{}-{}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .unwrap();
            Self(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for PrivateDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn private_file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn short_tokens_are_refused_with_how_to_make_one() {
        let dir = PrivateDir::new("short");
        let path = private_file(dir.path(), "t", "short\n");
        let err = read_token(&path).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
        assert!(err.to_string().contains("urandom"), "{err}");
    }

    #[test]
    fn scopes_and_failures() {
        let auth = Auth::fixed("o".repeat(20)).with_read_only("r".repeat(20));
        assert_eq!(
            auth.scope_of(&bearer(&"o".repeat(20))),
            Some(Scope::Operate)
        );
        assert_eq!(auth.scope_of(&bearer(&"r".repeat(20))), Some(Scope::Read));
        assert_eq!(auth.scope_of(&bearer("wrong-wrong-wrong")), None);
        assert_eq!(auth.scope_of(&HeaderMap::new()), None);
        assert_eq!(auth.failures(), 2);
        assert_eq!(Scope::needed_for(&Method::GET), Scope::Read);
        assert_eq!(Scope::needed_for(&Method::POST), Scope::Operate);
    }

    #[test]
    fn a_rotated_token_file_is_read_again() {
        let dir = PrivateDir::new("rotate");
        let (old, new) = ("a".repeat(24), "b".repeat(32));
        let path = private_file(dir.path(), "token", &old);
        let auth = Auth::from_files(&path, None).unwrap();
        assert_eq!(auth.scope_of(&bearer(&old)), Some(Scope::Operate));
        std::fs::write(&path, &new).unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(auth.scope_of(&bearer(&new)), Some(Scope::Operate));
        assert_eq!(auth.scope_of(&bearer(&old)), None, "the old token is gone");
        // A broken rotation keeps the token in force.
        std::fs::write(&path, "tiny").unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(auth.scope_of(&bearer(&new)), Some(Scope::Operate));
    }

    #[test]
    fn the_same_token_for_both_scopes_is_refused() {
        let dir = PrivateDir::new("same");
        let a = private_file(dir.path(), "a", &"x".repeat(20));
        let b = private_file(dir.path(), "b", &"x".repeat(20));
        assert!(matches!(
            Auth::from_files(&a, Some(&b)),
            Err(AuthError::SameToken)
        ));
    }
}
