//! CONNECT authentication for the listener's own users (user name / password), checked in the
//! connection task before the router sees the client.

use ferry_codec::{Connect, ReasonCode};
use subtle::ConstantTimeEq;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub password: String,
}

#[derive(Clone, Debug, Default)]
pub struct Authenticator {
    pub allow_anonymous: bool,
    pub users: Vec<User>,
}

impl Authenticator {
    /// `Ok` to let the client in, or the CONNACK reason code to refuse it with.
    pub fn check(&self, connect: &Connect) -> Result<(), ReasonCode> {
        let Some(name) = connect.username.as_deref() else {
            return if self.allow_anonymous {
                Ok(())
            } else {
                Err(ReasonCode::NOT_AUTHORIZED)
            };
        };
        let Some(user) = self.users.iter().find(|u| u.name == name) else {
            return if self.allow_anonymous && self.users.is_empty() {
                Ok(())
            } else {
                Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
            };
        };
        let given = connect.password.as_deref().unwrap_or_default();
        if bool::from(user.password.as_bytes().ct_eq(given)) {
            Ok(())
        } else {
            Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
        }
    }
}
