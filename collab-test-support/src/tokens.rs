//! Tokens signed with a data directory's key, which every server started on that directory
//! loads and so accepts.

use std::path::Path;
use std::time::Duration;

use collab_server::auth::{Identity, Keys};
use sync_core::Role;

/// The signing key of one data directory.
pub struct Tokens {
    keys: Keys,
}

impl Tokens {
    /// Loads the directory's key, creating it if need be: call it before a server starts on
    /// `dir`, so that the server loads this key rather than making its own.
    pub fn for_data_dir(dir: &Path) -> Tokens {
        Tokens { keys: Keys::load_or_create(dir).expect("the data directory's signing key") }
    }

    /// A token for `user` (display name: `user` in capitals) in `project`, valid for an hour.
    pub fn token(&self, project: &str, role: Role, user: &str) -> String {
        let identity = Identity { user: user.into(), name: user.to_uppercase(), project: project.into(), role };
        self.keys.sign(&identity, Duration::from_secs(3600)).expect("sign")
    }

    pub fn editor(&self, project: &str, user: &str) -> String {
        self.token(project, Role::Editor, user)
    }

    /// A correctly signed editor token that expired ten seconds ago.
    pub fn expired(&self, project: &str) -> String {
        let identity =
            Identity { user: "late".into(), name: "Late".into(), project: project.into(), role: Role::Editor };
        self.keys.sign_expired(&identity).expect("sign")
    }
}
