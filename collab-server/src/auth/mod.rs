//! Signed access tokens (JWT, HS256): minting, verification and the scope check.
//!
//! A token names a user, a display name, one project and a role, and expires. The signing key is
//! a random secret kept in the data directory, so `collab token` and `collab serve` given the same
//! `--data-dir` agree without any other configuration.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sync_core::{DocName, Role};

const SECRET_FILE: &str = "token-secret";

/// Claims carried by a token; this is a wire type (it is serialized into the JWT).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    sub: String,
    name: String,
    project: String,
    role: String,
    exp: u64,
    iat: u64,
    /// Not valid before (seconds since the epoch); tokens we mint leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    /// A server peer's token (the node's own exec bridge): signed only by [`Keys::sign_service`],
    /// never by `collab token` or for a person, and exempt from the limits meant for people's
    /// sockets (documents per socket).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    svc: bool,
}

/// A verified token: who it speaks for, and until when (seconds since the Unix epoch). A
/// connection holds a grant only until `expires`: a timer closes it then (see
/// [`Grant::deadline`]), whatever it is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub identity: Identity,
    /// `None`: no expiry (an anonymous connection, which `--allow-anonymous` allows).
    pub expires: Option<u64>,
    /// The token is one the node signed for a server peer of its own ([`Keys::sign_service`]).
    pub service: bool,
}

impl Grant {
    /// A grant that never expires.
    pub fn forever(identity: Identity) -> Grant {
        Grant { identity, expires: None, service: false }
    }

    /// When, on the runtime's clock, the grant ends; `None` if it never does. Exact to the
    /// clock, not to the second: `exp` is the first moment the token is no longer valid.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        let expires = UNIX_EPOCH + Duration::from_secs(self.expires?);
        let left = expires.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        Some(tokio::time::Instant::now() + left)
    }
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub name: String,
    pub project: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("invalid token")]
    Invalid,
    #[error("token does not cover this document")]
    OutOfScope,
}

/// The node's access check: tokens verified with its keys, and an anonymous editor for
/// token-less requests only when the operator allowed it (`--allow-anonymous`).
#[derive(Debug, Clone)]
pub struct Authorizer {
    pub keys: Keys,
    pub allow_anonymous: bool,
}

impl Authorizer {
    /// Verifies a token for `doc`, falling back to an anonymous editor only when the operator
    /// allowed it and no token was given at all.
    pub fn authorize(&self, token: &str, doc: &DocName) -> Result<Identity, AuthError> {
        self.authorize_grant(token, doc).map(|grant| grant.identity)
    }

    /// [`Authorizer::authorize`], keeping the token's expiry (an anonymous grant has none).
    pub fn authorize_grant(&self, token: &str, doc: &DocName) -> Result<Grant, AuthError> {
        match self.keys.authorize_grant(token, doc) {
            Err(AuthError::Missing) if self.allow_anonymous => Ok(Grant::forever(anonymous(doc.project()))),
            other => other,
        }
    }
}

/// The identity used for token-less connections when `--allow-anonymous` is on.
pub fn anonymous(project: &str) -> Identity {
    Identity { user: "anonymous".into(), name: "Anonymous".into(), project: project.to_owned(), role: Role::Editor }
}

#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// Loads the signing secret from `data_dir`, creating it (mode 0600) on first use.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Keys> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(SECRET_FILE);
        let secret = match std::fs::read(&path) {
            Ok(bytes) if bytes.len() >= 32 => bytes,
            Ok(_) => anyhow::bail!("{} is shorter than 32 bytes; delete it to make a new one", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_secret(&path)?,
            Err(e) => return Err(e.into()),
        };
        Ok(Keys::from_secret(&secret))
    }

    pub fn from_secret(secret: &[u8]) -> Keys {
        Keys { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret) }
    }

    pub fn sign(&self, identity: &Identity, ttl: Duration) -> anyhow::Result<String> {
        let now = unix_now();
        self.sign_until(identity, now, now + ttl.as_secs())
    }

    /// A token valid from `not_before` (when given) until `expires`, both in seconds since the
    /// Unix epoch: for tests of expiry and of tokens that are not valid yet.
    pub fn sign_window(&self, identity: &Identity, not_before: Option<u64>, expires: u64) -> anyhow::Result<String> {
        self.sign_claims(identity, unix_now(), not_before, expires)
    }

    /// A token that expired ten seconds ago, for tests of expiry handling.
    pub fn sign_expired(&self, identity: &Identity) -> anyhow::Result<String> {
        let now = unix_now();
        self.sign_until(identity, now - 20, now - 10)
    }

    fn sign_until(&self, identity: &Identity, now: u64, exp: u64) -> anyhow::Result<String> {
        self.sign_claims(identity, now, None, exp)
    }

    /// A token for one of the node's own server peers (the exec bridge), valid for `ttl`: it
    /// carries the service claim, which lifts the limits meant for people's sockets.
    pub fn sign_service(&self, identity: &Identity, ttl: Duration) -> anyhow::Result<String> {
        let now = unix_now();
        self.encode(Claims { svc: true, ..self.claims(identity, now, None, now + ttl.as_secs()) })
    }

    fn sign_claims(&self, identity: &Identity, now: u64, nbf: Option<u64>, exp: u64) -> anyhow::Result<String> {
        self.encode(self.claims(identity, now, nbf, exp))
    }

    fn encode(&self, claims: Claims) -> anyhow::Result<String> {
        Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?)
    }

    fn claims(&self, identity: &Identity, now: u64, nbf: Option<u64>, exp: u64) -> Claims {
        Claims {
            svc: false,
            nbf,
            sub: identity.user.clone(),
            name: identity.name.clone(),
            project: identity.project.clone(),
            role: identity.role.as_str().to_owned(),
            iat: now,
            exp,
        }
    }

    /// Verifies signature and validity window; does not check which document it is used for.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_grant(token).map(|grant| grant.identity)
    }

    /// [`Keys::verify`], keeping the token's expiry: what an open connection is held to.
    pub fn verify_grant(&self, token: &str) -> Result<Grant, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        // A token whose `nbf` is ahead is refused (jsonwebtoken does not check it by default).
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            _ => AuthError::Invalid,
        })?;
        let c = data.claims;
        // RFC 7519: not accepted on or after `exp`. jsonwebtoken compares whole seconds and
        // still accepts a token during the second of its `exp`.
        if SystemTime::now() >= UNIX_EPOCH + Duration::from_secs(c.exp) {
            return Err(AuthError::Expired);
        }
        let role = Role::parse(&c.role).ok_or(AuthError::Invalid)?;
        if !sync_core::names::is_project_id(&c.project) {
            return Err(AuthError::Invalid);
        }
        let identity = Identity { user: c.sub, name: c.name, project: c.project, role };
        Ok(Grant { identity, expires: Some(c.exp), service: c.svc })
    }

    /// Verifies a token and checks that it covers `doc`.
    pub fn authorize(&self, token: &str, doc: &DocName) -> Result<Identity, AuthError> {
        self.authorize_grant(token, doc).map(|grant| grant.identity)
    }

    /// [`Keys::authorize`], keeping the token's expiry.
    pub fn authorize_grant(&self, token: &str, doc: &DocName) -> Result<Grant, AuthError> {
        let grant = self.verify_grant(token)?;
        if grant.identity.project != doc.project() {
            return Err(AuthError::OutOfScope);
        }
        Ok(grant)
    }
}

/// Creates the secret file whole, or reads the one another process created first. The file is
/// written under a temporary name and then linked into place, so no process (nodes of a cluster
/// sharing a data directory start together) can ever read a half-written secret.
fn create_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    let secret: [u8; 32] = rand::random();
    let tmp = path.with_extension(format!("tmp.{}.{:x}", std::process::id(), rand::random::<u64>()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&tmp).and_then(|mut file| {
        file.write_all(&secret)?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(secret.to_vec()),
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let theirs = std::fs::read(path)?;
            anyhow::ensure!(theirs.len() >= 32, "{} is shorter than 32 bytes", path.display());
            Ok(theirs)
        }
        Err(e) => Err(e.into()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ada(project: &str, role: Role) -> Identity {
        Identity { user: "ada".into(), name: "Ada".into(), project: project.into(), role }
    }

    /// Nodes of a cluster start together on one data directory: all of them must end up with
    /// the same whole secret, whoever creates it.
    #[test]
    fn processes_racing_to_create_the_secret_share_one() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    let path = dir.path().to_path_buf();
                    std::thread::spawn(move || Keys::load_or_create(&path).unwrap())
                })
                .collect();
            let keys: Vec<Keys> = racers.into_iter().map(|r| r.join().unwrap()).collect();
            let token = keys[0].sign(&ada("p1", Role::Editor), Duration::from_secs(60)).unwrap();
            for other in &keys {
                assert_eq!(other.verify(&token).unwrap().user, "ada");
            }
            let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(files.len(), 1, "temporary files left behind");
        }
    }

    #[test]
    fn round_trip_and_scope() {
        let keys = Keys::from_secret(&[7; 32]);
        let token = keys.sign(&ada("p1", Role::Viewer), Duration::from_secs(60)).unwrap();
        let doc = DocName::parse("p1/abc").unwrap();
        assert_eq!(keys.authorize(&token, &doc), Ok(ada("p1", Role::Viewer)));
        let other = DocName::parse("p2/abc").unwrap();
        assert_eq!(keys.authorize(&token, &other), Err(AuthError::OutOfScope));
    }

    #[test]
    fn hostile_tokens_are_refused() {
        let keys = Keys::from_secret(&[7; 32]);
        let forger = Keys::from_secret(&[8; 32]);
        let forged = forger.sign(&ada("p1", Role::Editor), Duration::from_secs(60)).unwrap();
        assert_eq!(keys.verify(&forged), Err(AuthError::Invalid));
        assert_eq!(keys.verify(""), Err(AuthError::Missing));
        assert_eq!(keys.verify("not.a.jwt"), Err(AuthError::Invalid));
        let now = unix_now();
        let expired = keys.sign_until(&ada("p1", Role::Editor), now - 20, now - 10).unwrap();
        assert_eq!(keys.verify(&expired), Err(AuthError::Expired));
        let early = keys.sign_window(&ada("p1", Role::Editor), Some(now + 60), now + 120).unwrap();
        assert_eq!(keys.verify(&early), Err(AuthError::NotYetValid));
        let started = keys.sign_window(&ada("p1", Role::Editor), Some(now - 1), now + 120).unwrap();
        assert_eq!(keys.verify_grant(&started).map(|g| g.expires), Ok(Some(now + 120)));
        // alg=none with the same claims must not pass.
        let parts: Vec<&str> = forged.split('.').collect();
        let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        assert_eq!(keys.verify(&format!("{none_header}.{}.", parts[1])), Err(AuthError::Invalid));
    }
}
