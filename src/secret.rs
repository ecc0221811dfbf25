//! Types that hold secret material. Their `Debug` never prints the value and
//! their memory is zeroized on drop, so a stray `{:?}` in a log line or a
//! panic message cannot leak a secret or a service-account token.

use std::fmt;

use secrecy::{ExposeSecret, SecretBox, SecretString};

/// Secret bytes fetched from a backend, zeroized on drop.
pub struct SecretBytes(SecretBox<[u8]>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(SecretBox::new(bytes.into_boxed_slice()))
    }

    /// The raw bytes. Callers must not log or format them.
    pub fn expose(&self) -> &[u8] {
        self.0.expose_secret()
    }

    pub fn len(&self) -> usize {
        self.expose().len()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        Self::new(self.expose().to_vec())
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.len())
    }
}

/// A credential string (service-account token, backend token, secret value
/// handed over as text), zeroized on drop.
#[derive(Clone)]
pub struct Credential(SecretString);

impl Credential {
    pub fn new(value: String) -> Self {
        Self(SecretString::from(value))
    }

    /// The raw credential. Callers must not log or format it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_values() {
        let b = SecretBytes::new(b"hunter2-bytes".to_vec());
        let c = Credential::new("eyJhbGciOi.token".into());
        let shown = format!("{b:?} {c:?} {:#?}", (&b, &c));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("eyJhbGciOi"), "{shown}");
        assert!(shown.contains("13 bytes"));
        assert_eq!(b.expose(), b"hunter2-bytes");
        assert_eq!(c.expose(), "eyJhbGciOi.token");
    }
}
