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

/// A growing buffer for secret output (rendered files): every buffer it
/// outgrows is wiped, and it refuses to grow past its limit.
pub struct SecretBuf {
    buf: zeroize::Zeroizing<Vec<u8>>,
    limit: usize,
}

impl SecretBuf {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: zeroize::Zeroizing::new(Vec::new()),
            limit,
        }
    }

    /// Appends `bytes`, or fails (appending nothing) past the limit.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), TooLarge> {
        let needed = self.buf.len().saturating_add(bytes.len());
        if needed > self.limit {
            return Err(TooLarge { limit: self.limit });
        }
        if self.buf.capacity() < needed {
            let capacity = needed.max(self.buf.capacity() * 2).max(64).min(self.limit);
            let mut next = zeroize::Zeroizing::new(Vec::with_capacity(capacity));
            next.extend_from_slice(&self.buf);
            // The old buffer is wiped as it drops.
            self.buf = next;
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    pub fn push_str(&mut self, s: &str) -> Result<(), TooLarge> {
        self.push(s.as_bytes())
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn into_bytes(self) -> zeroize::Zeroizing<Vec<u8>> {
        self.buf
    }
}

impl fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBuf([REDACTED; {} bytes])", self.len())
    }
}

/// A secret output would pass its size limit.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the output would exceed {limit} bytes")]
pub struct TooLarge {
    pub limit: usize,
}

impl std::io::Write for SecretBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::FileTooLarge, e))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl fmt::Write for SecretBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_str(s).map_err(|_| fmt::Error)
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
        let mut buf = SecretBuf::with_limit(8);
        buf.push_str("secret").unwrap();
        assert!(buf.push_str("123").is_err());
        assert_eq!(&**buf.into_bytes(), b"secret");
    }
}
