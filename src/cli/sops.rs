//! The Git side of the `sops` backend: `coffer sops keygen` makes a
//! namespace's age identity on the node's key directory, `coffer seal`
//! encrypts a value or a document into a SOPS document that the `sops`
//! tool and other SOPS implementations read, ready to paste into an SPC.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_yaml_ng::Value;
use zeroize::Zeroizing;

use crate::backend::sops::auth::CLUSTER_FILE;
use crate::backend::sops::crypt;
use crate::backend::sops::document::{self, Format, MasterKey, Metadata};

#[derive(Debug, Subcommand)]
pub enum SopsCommand {
    /// Create a namespace's age identity (0600) in the node's key
    /// directory and print its public recipient for `coffer seal`.
    Keygen(KeygenArgs),
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The namespace whose pods may use the identity.
    #[arg(long, required_unless_present = "cluster")]
    pub namespace: Option<String>,
    /// The cluster-wide identity (`_cluster.txt`; the daemon uses it only
    /// with --sops-cluster-key).
    #[arg(long, conflicts_with = "namespace")]
    pub cluster: bool,
    /// The daemon's --sops-age-key-dir.
    #[arg(long, env = "COFFER_SOPS_AGE_KEY_DIR")]
    pub dir: PathBuf,
    /// Add a new identity to an existing file (key rotation: the old ones
    /// keep opening documents sealed for them).
    #[arg(long)]
    pub add: bool,
}

#[derive(Debug, Args)]
pub struct SealArgs {
    /// The value or document to encrypt (`-`, the default: standard input).
    #[arg(default_value = "-")]
    pub input: PathBuf,
    /// age recipients (`age1…`), repeatable or comma-separated.
    #[arg(long = "recipient", short = 'r', value_delimiter = ',')]
    pub recipients: Vec<String>,
    /// A Vault transit key, as `sops --hc-vault-transit` takes it:
    /// `https://vault.example.com:8200/v1/transit/keys/NAME`. The data key
    /// is wrapped with `VAULT_TOKEN`'s authority (and `VAULT_NAMESPACE`).
    #[arg(long = "vault-transit", value_delimiter = ',')]
    pub vault_transit: Vec<String>,
    /// yaml, json, dotenv or binary (a single value); default: by the
    /// file's extension, binary for standard input.
    #[arg(long = "input-type")]
    pub input_type: Option<String>,
    /// Values under keys ending in this stay in clear (sops' default).
    #[arg(long, default_value = "_unencrypted")]
    pub unencrypted_suffix: String,
    /// Encrypt only values under keys matching this regex.
    #[arg(long)]
    pub encrypted_regex: Option<String>,
    /// Put the document into this SPC manifest's object (with --object),
    /// rewriting the file in place (comments inside `objects` are not kept).
    #[arg(long, requires = "object")]
    pub spc: Option<PathBuf>,
    /// The `objectName` of the object that gets the document.
    #[arg(long, requires = "spc")]
    pub object: Option<String>,
}

/// `coffer sops keygen`: prints the recipient.
pub fn keygen(args: KeygenArgs) -> Result<String, String> {
    let name = if args.cluster {
        CLUSTER_FILE.to_string()
    } else {
        let ns = args.namespace.unwrap_or_default();
        if !crate::backend::file::is_dns1123_label(&ns) {
            return Err(format!(
                "--namespace {}: not a Kubernetes namespace name",
                crate::error::shown(&ns)
            ));
        }
        format!("{ns}.txt")
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.dir)
        .map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    let path = args.dir.join(&name);
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let text = {
        use secrecy::ExposeSecret;
        Zeroizing::new(format!(
            "# created: {}\n# public key: {recipient}\n{}\n",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            identity.to_string().expose_secret()
        ))
    };
    let mut options = std::fs::OpenOptions::new();
    options.mode(0o600);
    if args.add {
        options.append(true);
        let meta = std::fs::metadata(&path)
            .map_err(|e| format!("--add: cannot read {}: {e}", path.display()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "{} is mode 0{:o}; coffer ignores key files that are not 0600",
                path.display(),
                meta.mode() & 0o777
            ));
        }
    } else {
        options.write(true).create_new(true);
    }
    let mut file = options.open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!(
                "{} exists; use --add to add an identity (rotation)",
                path.display()
            )
        } else {
            format!("cannot write {}: {e}", path.display())
        }
    })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(recipient)
}

/// `coffer seal`: the encrypted document (printed, or written into the SPC).
pub async fn seal(args: SealArgs) -> Result<Option<String>, String> {
    if args.recipients.is_empty() && args.vault_transit.is_empty() {
        return Err("give at least one --recipient (age) or --vault-transit key".into());
    }
    let format = match &args.input_type {
        Some(t) => Format::parse(t)
            .ok_or_else(|| format!("--input-type {t}: not one of yaml, json, dotenv, binary"))?,
        None if args.input == Path::new("-") => Format::Binary,
        None => Format::of_path(&args.input.to_string_lossy()),
    };
    let input = read_input(&args.input)?;
    let mut branches =
        document::parse_plain(&input, format).map_err(|e| format!("the input {e}"))?;
    drop(input);
    let data_key = crypt::new_data_key();
    let mut keys = Vec::new();
    for r in &args.recipients {
        keys.push(MasterKey::Age {
            recipient: r.trim().to_string(),
            enc: wrap_age(r.trim(), &data_key)?,
        });
    }
    for uri in &args.vault_transit {
        keys.push(wrap_transit(uri, &data_key).await?);
    }
    let mut meta = Metadata {
        groups: vec![keys],
        lastmodified: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        version: SOPS_FORMAT_VERSION.into(),
        ..Default::default()
    };
    match &args.encrypted_regex {
        Some(re) => meta.encrypted_regex = Some(re.clone()),
        None if !args.unencrypted_suffix.is_empty() => {
            meta.unencrypted_suffix = Some(args.unencrypted_suffix.clone())
        }
        None => {}
    }
    meta.mac = crypt::encrypt(&mut branches, &meta, &data_key).map_err(|e| e.to_string())?;
    let sealed = document::emit_encrypted(&branches, &meta, format)
        .map_err(|e| format!("the document {e}"))?;
    let sealed =
        String::from_utf8(sealed).map_err(|_| "the sealed document is not UTF-8".to_string())?;
    match (&args.spc, &args.object) {
        (Some(spc), Some(object)) => {
            put_into_spc(spc, object, &sealed, format)?;
            Ok(None)
        }
        _ => Ok(Some(sealed)),
    }
}

/// The SOPS file-format version written into `sops.version`.
const SOPS_FORMAT_VERSION: &str = "3.9.4";

fn read_input(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut buf = Zeroizing::new(Vec::new());
    let limit = document::MAX_DOCUMENT_BYTES as u64 + 1;
    let read = if path == Path::new("-") {
        std::io::stdin().take(limit).read_to_end(&mut buf)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut buf))
    };
    read.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if buf.len() as u64 >= limit {
        return Err(format!(
            "{} is larger than {} bytes",
            path.display(),
            document::MAX_DOCUMENT_BYTES
        ));
    }
    Ok(buf)
}

/// The data key as an armored age file for `recipient`.
fn wrap_age(recipient: &str, key: &crypt::DataKey) -> Result<String, String> {
    let parsed: age::x25519::Recipient = recipient.parse().map_err(|_| {
        format!(
            "--recipient {}: not an age recipient (age1…)",
            crate::error::shown(recipient)
        )
    })?;
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&parsed as &dyn age::Recipient))
            .map_err(|e| format!("age: {e}"))?;
    let mut out = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
        .map_err(|e| format!("age: {e}"))?;
    let mut writer = encryptor
        .wrap_output(armor)
        .map_err(|e| format!("age: {e}"))?;
    writer
        .write_all(key.as_slice())
        .map_err(|e| format!("age: {e}"))?;
    writer
        .finish()
        .and_then(|armor| armor.finish())
        .map_err(|e| format!("age: {e}"))?;
    String::from_utf8(out).map_err(|_| "age: armored output is not text".into())
}

/// The data key wrapped by Vault transit encrypt (the caller's token).
async fn wrap_transit(uri: &str, key: &crypt::DataKey) -> Result<MasterKey, String> {
    use base64::Engine as _;
    let bad = || {
        format!(
            "--vault-transit {}: expected https://HOST:PORT/v1/ENGINE/keys/NAME",
            crate::error::shown(uri)
        )
    };
    let url = url::Url::parse(uri).map_err(|_| bad())?;
    let path = url.path().trim_matches('/').to_string();
    let rest = path.strip_prefix("v1/").ok_or_else(bad)?;
    let (engine, name) = rest.rsplit_once("/keys/").ok_or_else(bad)?;
    if engine.is_empty() || name.is_empty() || name.contains('/') {
        return Err(bad());
    }
    let address = format!(
        "{}://{}",
        url.scheme(),
        &url[url::Position::BeforeHost..url::Position::AfterPort]
    );
    let token = Zeroizing::new(std::env::var("VAULT_TOKEN").map_err(|_| {
        "--vault-transit: set VAULT_TOKEN to a token that may use the key".to_string()
    })?);
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let mut req = client
        .post(format!("{address}/v1/{engine}/encrypt/{name}"))
        .header("X-Vault-Token", token.as_str())
        .header("X-Vault-Request", "true")
        .json(&serde_json::json!({
            "plaintext": base64::engine::general_purpose::STANDARD.encode(key.as_slice())
        }));
    if let Ok(ns) = std::env::var("VAULT_NAMESPACE") {
        req = req.header("X-Vault-Namespace", ns);
    }
    let resp = req.send().await.map_err(|e| {
        format!(
            "Vault transit at {address}: {}",
            crate::error::cause_chain(&e)
        )
    })?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let ciphertext = body
        .pointer("/data/ciphertext")
        .and_then(serde_json::Value::as_str)
        .filter(|_| status.is_success())
        .ok_or_else(|| {
            format!(
                "Vault transit encrypt with {engine}/keys/{name} answered {status}: {}",
                body.get("errors")
                    .map(|e| e.to_string())
                    .unwrap_or_default()
            )
        })?;
    Ok(MasterKey::Vault {
        address,
        engine_path: engine.to_string(),
        key_name: name.to_string(),
        enc: ciphertext.to_string(),
    })
}

/// Sets the `sops` field of object `object` in the SPC manifest at `path`
/// (the `objects` list is rewritten; comments inside it are not kept).
fn put_into_spc(path: &Path, object: &str, sealed: &str, format: Format) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut spc: Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| format!("{}: not one YAML manifest: {e}", path.display()))?;
    let objects_text = spc
        .get("spec")
        .and_then(|s| s.get("parameters"))
        .and_then(|p| p.get("objects"))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{}: no spec.parameters.objects", path.display()))?;
    let mut objects: Value = serde_yaml_ng::from_str(objects_text).map_err(|e| {
        format!(
            "{}: spec.parameters.objects is not YAML: {e}",
            path.display()
        )
    })?;
    let list = objects
        .as_sequence_mut()
        .ok_or_else(|| format!("{}: spec.parameters.objects is not a list", path.display()))?;
    let entry = list
        .iter_mut()
        .find(|o| o.get("objectName").and_then(Value::as_str) == Some(object))
        .ok_or_else(|| {
            format!(
                "{}: no object with objectName {}",
                path.display(),
                crate::error::shown(object)
            )
        })?;
    let map = entry
        .as_mapping_mut()
        .ok_or_else(|| format!("{}: object {object} is not a map", path.display()))?;
    map.remove("sopsFile");
    map.insert("backend".into(), "sops".into());
    map.insert("sops".into(), Value::String(sealed.to_string()));
    if format != Format::Yaml {
        map.insert("format".into(), format.name().into());
    }
    let new_objects = serde_yaml_ng::to_string(&objects).map_err(|e| e.to_string())?;
    if let Some(params) = spc
        .get_mut("spec")
        .and_then(|s| s.get_mut("parameters"))
        .and_then(Value::as_mapping_mut)
    {
        params.insert("objects".into(), Value::String(new_objects));
    }
    let out = serde_yaml_ng::to_string(&spc).map_err(|e| e.to_string())?;
    let tmp = path.with_file_name(format!(
        ".{}.coffer-seal-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("spc"),
        std::process::id()
    ));
    let mode = std::fs::metadata(path)
        .map(|m| m.mode() & 0o7777)
        .unwrap_or(0o644);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(out.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(())
}
