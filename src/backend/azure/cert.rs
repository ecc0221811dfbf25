//! What the Azure provider writes for certificates and keys: a PKCS#12
//! secret as its private key (PKCS#8 PEM) followed by its chain ordered
//! leaf → intermediates → root; a `key` as its public key (SPKI PEM); a
//! `cert` as PEM. Chain order follows the Authority/Subject Key Identifier
//! links (then issuer/subject names) as the peer's does; an incomplete
//! chain is left in the order it came.

use base64::Engine as _;
use serde_json::Value as Json;

const CERT: &str = "CERTIFICATE";

fn pem_block(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Key-derivation rounds one PKCS#12 value may ask for, summed over its
/// MAC and encrypted parts. The count is the value's own: a vault owner
/// could ask for billions and hold a thread for minutes. Key Vault and
/// OpenSSL use 2,048 per part; 1,000,000 costs well under a second.
pub const MAX_PKCS12_ITERATIONS: u64 = 1_000_000;

/// The key-derivation rounds a PKCS#12 value asks for (MAC, PBKDF2 and
/// PKCS#12 PBE parameters anywhere in it), read before anything is
/// derived. An unreadable structure counts as zero: decoding refuses it.
pub fn pkcs12_iterations(der: &[u8]) -> u64 {
    use x509_parser::der_parser::ber::{BerObject, BerObjectContent};
    const PBKDF2: &str = "1.2.840.113549.1.5.12";
    const PKCS12_PBE: &str = "1.2.840.113549.1.12.1.";
    fn walk(o: &BerObject, depth: usize, budget: &mut usize, total: &mut u64) {
        if depth > 24 || *budget == 0 {
            return;
        }
        *budget -= 1;
        match &o.content {
            BerObjectContent::Sequence(items) | BerObjectContent::Set(items) => {
                // AlgorithmIdentifier { OID, params SEQUENCE { salt, iterations, … } }
                if let (Some(first), Some(second)) = (items.first(), items.get(1)) {
                    if let Ok(oid) = first.as_oid() {
                        let oid = oid.to_id_string();
                        if oid == PBKDF2 || oid.starts_with(PKCS12_PBE) {
                            if let BerObjectContent::Sequence(params) = &second.content {
                                if let Some(n) = params.iter().find_map(|p| p.as_u64().ok()) {
                                    *total = total.saturating_add(n);
                                }
                            }
                        }
                    }
                }
                // MacData { DigestInfo, salt OCTET STRING, iterations INTEGER }
                if items.len() == 3
                    && matches!(items[0].content, BerObjectContent::Sequence(_))
                    && matches!(items[1].content, BerObjectContent::OctetString(_))
                {
                    if let Ok(n) = items[2].as_u64() {
                        *total = total.saturating_add(n);
                    }
                }
                for i in items {
                    walk(i, depth + 1, budget, total);
                }
            }
            BerObjectContent::Tagged(_, _, inner) => walk(inner, depth + 1, budget, total),
            BerObjectContent::OctetString(bytes) => inner(bytes, depth, budget, total),
            BerObjectContent::Unknown(any) => inner(any.data, depth, budget, total),
            _ => {}
        }
    }
    fn inner(mut bytes: &[u8], depth: usize, budget: &mut usize, total: &mut u64) {
        while !bytes.is_empty() && *budget > 0 {
            match x509_parser::der_parser::parse_der(bytes) {
                Ok((rest, o)) => {
                    walk(&o, depth + 1, budget, total);
                    bytes = rest;
                }
                Err(_) => return,
            }
        }
    }
    let mut total = 0;
    let mut budget = 20_000;
    inner(der, 0, &mut budget, &mut total);
    total
}

/// A certificate secret stored as PKCS#12 (Key Vault stores it without a
/// password), as key + ordered chain PEM.
pub fn pfx_to_pem(
    pfx: &[u8],
    construct_chain: bool,
) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let rounds = pkcs12_iterations(pfx);
    if rounds > MAX_PKCS12_ITERATIONS {
        return Err(format!(
            "the PKCS#12 value asks for {rounds} key-derivation rounds; coffer allows {MAX_PKCS12_ITERATIONS}"
        ));
    }
    let archive = p12_keystore::Pkcs12Archive::from_pkcs12(pfx, "")
        .map_err(|e| format!("the PKCS#12 value cannot be read ({e})"))?;
    let mut out = zeroize::Zeroizing::new(String::new());
    for bag in &archive.keys {
        out.push_str(&zeroize::Zeroizing::new(pem_block(
            "PRIVATE KEY",
            bag.key.as_der(),
        )));
    }
    let certs = archive
        .certs
        .iter()
        .map(|c| c.cert.as_der().to_vec())
        .collect();
    push_chain(&mut out, certs, construct_chain);
    Ok(zeroize::Zeroizing::new(out.as_bytes().to_vec()))
}

/// A certificate secret stored as PEM: its key blocks as they are, then
/// its certificates in chain order.
pub fn pem_secret(
    text: &[u8],
    construct_chain: bool,
) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let blocks =
        pem::parse_many(text).map_err(|e| format!("the PEM value cannot be read ({e})"))?;
    let mut out = zeroize::Zeroizing::new(String::new());
    let mut certs = Vec::new();
    for b in &blocks {
        if b.tag() == CERT {
            certs.push(b.contents().to_vec());
        } else {
            out.push_str(&zeroize::Zeroizing::new(pem_block(b.tag(), b.contents())));
        }
    }
    push_chain(&mut out, certs, construct_chain);
    Ok(zeroize::Zeroizing::new(out.as_bytes().to_vec()))
}

/// Appends `certs` as PEM, in chain order when asked.
fn push_chain(out: &mut String, certs: Vec<Vec<u8>>, construct_chain: bool) {
    let certs = if construct_chain {
        order_chain(certs)
    } else {
        certs
    };
    for c in &certs {
        out.push_str(&pem_block(CERT, c));
    }
}

/// The certificates (`.crt`) or the key blocks (`.key`) of key + chain PEM.
pub fn split(pem_text: &[u8], want_certs: bool) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let blocks =
        pem::parse_many(pem_text).map_err(|e| format!("the PEM value cannot be read ({e})"))?;
    let mut out = zeroize::Zeroizing::new(String::new());
    for b in blocks.iter().filter(|b| (b.tag() == CERT) == want_certs) {
        out.push_str(&zeroize::Zeroizing::new(pem_block(b.tag(), b.contents())));
    }
    Ok(zeroize::Zeroizing::new(out.as_bytes().to_vec()))
}

struct Node {
    der: Vec<u8>,
    aki: Option<Vec<u8>>,
    ski: Option<Vec<u8>>,
    subject: Vec<u8>,
    issuer: Vec<u8>,
}

fn node(der: Vec<u8>) -> Option<Node> {
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let mut aki = None;
    let mut ski = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0.to_vec()),
            _ => {}
        }
    }
    let subject = cert.subject().as_raw().to_vec();
    let issuer = cert.issuer().as_raw().to_vec();
    Some(Node {
        der,
        aki,
        ski,
        subject,
        issuer,
    })
}

/// Leaf first, then each certificate's issuer, root last. Certificates
/// that cannot be parsed or a chain that does not cover every
/// certificate leave the order as it came.
pub fn order_chain(certs: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let Some(nodes) = certs
        .iter()
        .cloned()
        .map(node)
        .collect::<Option<Vec<Node>>>()
    else {
        return certs;
    };
    let n = nodes.len();
    let mut parent: Vec<Option<usize>> = vec![None; n];
    let mut is_parent = vec![false; n];
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            let by_key = matches!((&nodes[i].aki, &nodes[j].ski), (Some(a), Some(s)) if a == s);
            let by_name = nodes[i].aki.is_none()
                && nodes[i].issuer == nodes[j].subject
                && nodes[i].issuer != nodes[i].subject;
            if by_key || by_name {
                parent[i] = Some(j);
                is_parent[j] = true;
                break;
            }
        }
    }
    let Some(mut at) = (0..n).find(|&i| !is_parent[i]) else {
        return certs;
    };
    let mut ordered = Vec::with_capacity(n);
    loop {
        ordered.push(nodes[at].der.clone());
        if ordered.len() > n {
            return certs;
        }
        match parent[at] {
            Some(p) => at = p,
            None => break,
        }
    }
    if ordered.len() != n {
        return certs;
    }
    ordered
}

/// A Key Vault `key` (JWK) as its public key, SPKI PEM.
pub fn public_key_pem(jwk: &Json) -> Result<String, String> {
    let b64 = |k: &str| -> Result<Vec<u8>, String> {
        let v = jwk
            .get(k)
            .and_then(Json::as_str)
            .ok_or_else(|| format!("the key has no {k}"))?;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(v.trim_end_matches('='))
            .map_err(|_| format!("the key's {k} is not base64url"))
    };
    let kty = jwk.get("kty").and_then(Json::as_str).unwrap_or("");
    let spki = match kty {
        "RSA" | "RSA-HSM" => {
            let rsa = der::seq(&[der::uint(&b64("n")?), der::uint(&b64("e")?)]);
            der::seq(&[
                der::seq(&[der::oid(der::RSA_ENCRYPTION), der::NULL.to_vec()]),
                der::bit_string(&rsa),
            ])
        }
        "EC" | "EC-HSM" => {
            let crv = jwk.get("crv").and_then(Json::as_str).unwrap_or("");
            let (curve, size) = match crv {
                "P-256" => (der::P256, 32),
                "P-384" => (der::P384, 48),
                "P-521" => (der::P521, 66),
                other => {
                    return Err(format!(
                        "curve {} is not supported",
                        crate::error::shown(other)
                    ))
                }
            };
            let (x, y) = (b64("x")?, b64("y")?);
            if x.len() > size || y.len() > size {
                return Err("the key's coordinates are longer than its curve".into());
            }
            let mut point = vec![4u8];
            for c in [&x, &y] {
                point.extend(std::iter::repeat_n(0u8, size - c.len()));
                point.extend_from_slice(c);
            }
            der::seq(&[
                der::seq(&[der::oid(der::EC_PUBLIC_KEY), der::oid(curve)]),
                der::bit_string(&point),
            ])
        }
        other => {
            return Err(format!(
                "key type {} is not supported (RSA and EC are)",
                crate::error::shown(other)
            ))
        }
    };
    Ok(pem_block("PUBLIC KEY", &spki))
}

/// The few DER shapes an SPKI needs (SEQUENCE, INTEGER, OID, BIT STRING,
/// NULL); checked against OpenSSL's reading in the tests.
mod der {
    pub const NULL: [u8; 2] = [0x05, 0x00];
    /// 1.2.840.113549.1.1.1
    pub const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    /// 1.2.840.10045.2.1
    pub const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    /// 1.2.840.10045.3.1.7
    pub const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    /// 1.3.132.0.34
    pub const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    /// 1.3.132.0.35
    pub const P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];

    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(content);
        out
    }

    pub fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
        tlv(0x30, &parts.concat())
    }

    /// An unsigned big-endian integer.
    pub fn uint(bytes: &[u8]) -> Vec<u8> {
        let trimmed: &[u8] = {
            let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
            &bytes[first..]
        };
        let mut content = Vec::with_capacity(trimmed.len() + 1);
        if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
            content.push(0);
        }
        content.extend_from_slice(trimmed);
        tlv(0x02, &content)
    }

    pub fn oid(encoded: &[u8]) -> Vec<u8> {
        tlv(0x06, encoded)
    }

    pub fn bit_string(bytes: &[u8]) -> Vec<u8> {
        let mut content = vec![0u8];
        content.extend_from_slice(bytes);
        tlv(0x03, &content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_integers_and_lengths() {
        assert_eq!(der::uint(&[0x00, 0x01]), [0x02, 0x01, 0x01]);
        assert_eq!(der::uint(&[0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der::uint(&[]), [0x02, 0x01, 0x00]);
        let long = der::seq(&[vec![0u8; 300]]);
        assert_eq!(&long[..4], &[0x30, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn unknown_key_types_are_refused() {
        let e = public_key_pem(&serde_json::json!({"kty": "oct", "k": "AA"})).unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        let e = public_key_pem(&serde_json::json!({"kty": "EC", "crv": "P-192"})).unwrap_err();
        assert!(e.contains("curve"), "{e}");
    }
}
