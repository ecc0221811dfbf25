//! Entry points for fuzzers (`fuzz/`, cargo-fuzz) and the property tests
//! (`tests/bounds.rs`): every parser a caller can reach, driven exactly as
//! a Mount drives it up to the first fetch, with no network and no files.

use std::sync::{Arc, OnceLock};

use crate::backend::file::{FileBackend, Scope};
use crate::backend::gcp::GcpBackend;
use crate::backend::vault::VaultBackend;
use crate::backend::Registry;
use crate::config::{GcpArgs, VaultArgs};
use crate::mount::{check_objects, check_parameters};
use crate::request::MountContext;
use crate::spc::{self, Encoding};

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut r = Registry::new();
        r.register(Arc::new(FileBackend::new(
            "/nonexistent".into(),
            Scope::Namespace,
        )));
        r.register(Arc::new(VaultBackend::new(VaultArgs {
            address: Some("https://vault.invalid:8200".into()),
            ..VaultArgs::default()
        })));
        r.register(Arc::new(GcpBackend::new(
            GcpArgs {
                project: Some("p".into()),
                cluster_location: Some("l".into()),
                cluster_name: Some("c".into()),
                ..GcpArgs::default()
            },
            std::time::Duration::from_secs(1),
        )));
        r.register(Arc::new(crate::backend::aws::AwsBackend::new(
            crate::config::AwsArgs {
                region: Some("us-east-1".into()),
                role_arn_template: Some(
                    "arn:aws:iam::123456789012:role/{namespace}-{serviceAccount}".into(),
                ),
                ..Default::default()
            },
            &[],
            std::time::Duration::from_secs(1),
            1 << 20,
        )));
        r.register(Arc::new(crate::backend::azure::AzureBackend::new(
            crate::config::AzureArgs {
                keyvault_endpoint: Some("https://{name}.vault.invalid".into()),
                ..Default::default()
            },
            std::time::Duration::from_secs(1),
            1 << 20,
        )));
        r
    })
}

/// Everything Mount does with a request before fetching: the request model
/// (attributes JSON, tokens, secrets, permission), the object list (YAML,
/// Google's form), path rules, every backend's object form and parameters.
/// Returns the number of objects that would be fetched, or the error text.
pub fn mount_request(attributes: &str, secrets: &str, permission: &str) -> Result<usize, String> {
    let ctx =
        MountContext::parse(attributes, secrets, permission, "/t").map_err(|e| e.to_string())?;
    let mut failures = check_parameters(&ctx);
    let objects = match spc::parse_objects(&ctx.parameters, "file") {
        Ok(o) => o,
        Err(f) => {
            failures.extend(f);
            return Err(failures.len().to_string());
        }
    };
    failures.extend(check_objects(registry(), &objects, &ctx));
    match crate::render::Files::parse(&ctx.parameters) {
        Ok(Some(files)) => failures.extend(files.check(&objects)),
        Ok(None) => {}
        Err(f) => failures.extend(f),
    }
    for object in &objects {
        // Cache keys and audit addresses are computed for every object.
        if let Ok(backend) = registry().get(&object.backend) {
            let _ = backend.cache_key(object, &ctx);
            let _ = backend.describe(object);
        }
    }
    if failures.is_empty() {
        Ok(objects.len())
    } else {
        Err(crate::error::MountError::Objects {
            total: objects.len(),
            failures,
        }
        .to_string())
    }
}

/// An `objects` document alone, as the SPC carries it.
pub fn objects_document(text: &str) -> Result<usize, String> {
    let params =
        std::collections::BTreeMap::from([(spc::OBJECTS_PARAM.to_string(), text.to_string())]);
    spc::parse_objects(&params, "file")
        .map(|o| o.len())
        .map_err(|f| f.len().to_string())
}

/// The objects a fuzzed `files` document reads (`many` is expanded when
/// the value is a map).
const FILES_OBJECTS: &str = "- objectName: db\n  render: false\n- objectName: token\n";
const FILES_OBJECTS_EXPAND: &str = "- objectName: many\n  expand: true\n";

/// A `files` document and one value every object holds, parsed, checked
/// and rendered as a Mount does after its fetches. Returns the number of
/// files built, or the error text.
pub fn files_document(text: &str, value: &[u8]) -> Result<usize, String> {
    static KEY: OnceLock<Option<crate::version::VersionKey>> = OnceLock::new();
    let key = KEY
        .get_or_init(|| crate::version::VersionKey::random().ok())
        .as_ref()
        .ok_or("no version key")?;
    let map = value.trim_ascii_start().starts_with(b"{");
    let objects_doc = if map {
        format!("{FILES_OBJECTS}{FILES_OBJECTS_EXPAND}")
    } else {
        FILES_OBJECTS.to_string()
    };
    let params = std::collections::BTreeMap::from([
        (spc::OBJECTS_PARAM.to_string(), objects_doc),
        (crate::render::FILES_PARAM.to_string(), text.to_string()),
    ]);
    let objects = spc::parse_objects(&params, "file").map_err(|f| f.len().to_string())?;
    let files = crate::render::Files::parse(&params).map_err(|f| {
        f.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    if let Some(files) = &files {
        let failures = files.check(&objects);
        if !failures.is_empty() {
            return Err(failures
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "));
        }
    }
    let identity = |v: serde_json::Value| v;
    let inputs: Vec<crate::render::Input<'_>> = objects
        .iter()
        .map(|object| crate::render::Input {
            object,
            contents: value,
            version: "v1",
            absent: false,
            data_view: &identity,
        })
        .collect();
    let settings = crate::render::Settings {
        default_mode: 0o644,
        version_key: key,
        max_bytes: 4 * MIB,
    };
    crate::render::build(files.as_ref(), &inputs, &[], &settings)
        .map(|o| o.len())
        .map_err(|f| {
            f.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })
}

/// Templates known to be costly, each as a one-entry `files` document, and
/// the value they read: what the bounds tests measure.
pub fn template_bombs() -> Vec<(&'static str, String)> {
    let entry = |t: String| {
        format!(
            "- path: out\n  template: {}\n",
            serde_json::to_string(&t).unwrap_or_default()
        )
    };
    vec![
        (
            "doubling through set",
            entry(format!("{{% set a = db %}}{}{{{{ a|length }}}}", "{% set a = a ~ a %}".repeat(64))),
        ),
        (
            "nested loops over a value",
            entry("{% for a in db %}{% for b in db %}{% for c in db %}{{ a }}{% endfor %}{% endfor %}{% endfor %}".into()),
        ),
        (
            "replace chain",
            entry(format!("{{{{ db{} }}}}", "|replace('x', 'xxxxxxxxxx')".repeat(30))),
        ),
        (
            "deep nesting",
            entry(format!("{}x{}", "{% if true %}".repeat(400), "{% endif %}".repeat(400))),
        ),
        (
            "long output",
            entry("{% for a in db %}{{ db }}{{ db }}{{ db }}{{ db }}{{ db }}{{ db }}{% endfor %}".into()),
        ),
        (
            "many comparisons",
            entry("{% for a in db %}{% for b in db %}{% if db == db ~ b %}{% endif %}{% endfor %}{% endfor %}".into()),
        ),
    ]
}

/// A fetched value through an object's `encoding`.
pub fn decode(encoding: &str, value: &[u8]) -> Result<usize, String> {
    let yaml = format!("- objectName: x\n  encoding: {encoding:?}\n");
    let objects = spc::parse_objects(
        &std::collections::BTreeMap::from([(spc::OBJECTS_PARAM.to_string(), yaml)]),
        "file",
    )
    .map_err(|f| f.len().to_string())?;
    let encoding: Encoding = objects[0].encoding;
    encoding
        .decode(value)
        .map(|v| v.len())
        .map_err(|e| e.to_string())
}

/// A Secret Manager payload through `extractJSONKey` / `extractYAMLKey`.
pub fn extract_key(payload: &[u8], key: &str, yaml: bool) -> Result<usize, String> {
    crate::backend::gcp::extract_for_fuzzing(payload, key, yaml)
}

/// An AWS secret through a `jmesPath` expression (checked, then
/// evaluated; the result must be a string).
pub fn jmes_path(value: &[u8], expr: &str) -> Result<usize, String> {
    crate::backend::aws::jmes_for_fuzzing(value, expr)
}

/// A SOPS document (`format`: 0 YAML, 1 JSON, 2 dotenv, 3 binary) read,
/// inspected and decrypted with a key that is not its own: every value
/// and the MAC are looked at until the first refusal.
pub fn sops_document(bytes: &[u8], format: u8) -> Result<usize, String> {
    use crate::backend::sops::{crypt, document::Format, inspect};
    let format = match format % 4 {
        0 => Format::Yaml,
        1 => Format::Json,
        2 => Format::Dotenv,
        _ => Format::Binary,
    };
    let mut doc = inspect(bytes, format).map_err(|e| e.to_string())?;
    let key = zeroize::Zeroizing::new([7u8; 32]);
    crypt::decrypt(&mut doc, &key).map_err(|e| e.to_string())?;
    Ok(doc.branches.len())
}

/// A set of output paths through the driver's and coffer's path rules.
pub fn paths(list: &[&str]) -> usize {
    list.iter()
        .filter(|p| crate::paths::validate_path(p).is_err())
        .count()
        + crate::paths::validate_path_set(list.iter().copied()).len()
}

const MIB: usize = 1 << 20;

/// Repeats `unit` to just under `size` bytes.
pub fn fill(unit: &str, size: usize) -> String {
    unit.repeat(size / unit.len())
}

/// The worst `objects` shapes known, each at most about 1 MiB: what the
/// bounds tests and `cargo bench --bench bounds` measure.
pub fn worst_shapes() -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("flow sequences", fill("[", MIB - 1)),
        ("flow mappings", fill("{a: ", MIB - 1)),
        ("block sequences", fill("- ", MIB - 1)),
        ("complex keys", fill("? ", MIB - 1)),
        (
            "nesting at the depth limit, repeated",
            fill(
                &format!("- {}1{}\n", "[".repeat(31), "]".repeat(31)),
                MIB - 1,
            ),
        ),
        ("many small keys", fill("- objectName: a\n", MIB - 1)),
        (
            "one long scalar",
            format!("- objectName: {}\n", "x".repeat(MIB - 100)),
        ),
        (
            "quotes and escapes",
            fill("- \"\\u0041\\n\\\"\" \n", MIB - 1),
        ),
        ("comments", fill("# [[[[{{{{ &a *a\n", MIB - 1)),
        ("anchors without aliases", fill("- &a1 x\n", MIB - 1)),
        (
            "garbage bytes",
            fill("\u{1}\u{7f}\u{fffd}:[-?&*!|>%@`", MIB - 64),
        ),
        ("tags", fill("- !!binary AAAA\n", MIB - 1)),
    ];
    // One anchor of 32,000 nodes and one alias: 64,000 nodes, at the bound.
    let mut fan = format!("- &a [{}]\n", vec!["x"; 31_990].join(","));
    fan.push_str("- *a\n");
    v.push(("alias at the node bound", fan));
    let mut fan = format!("- &a [{}]\n", vec!["x"; 5000].join(","));
    while fan.len() < MIB - 10 {
        fan.push_str("- *a\n");
    }
    v.push(("alias fan-out", fan));
    let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..60 {
        let p = i - 1;
        laughs.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    v.push(("nested laughs", laughs));
    // 1,000 objects with paths that were quadratic to check as a set.
    let objects: String = (1..=1000)
        .map(|i| {
            format!(
                "- objectName: x{}\n  optional: true\n",
                "-".repeat(i.min(900))
            )
        })
        .collect();
    v.push(("paths x, x-, x--, …", objects));
    // 1,000 Vault objects with large secretArgs.
    let args = format!("'{{\"a\": \"{}\"}}'", "y".repeat(800));
    let vault: String = (0..1000)
        .map(|i| format!("- objectName: v{i}\n  secretPath: pki/issue/x\n  method: PUT\n  secretArgs: {args}\n"))
        .collect();
    v.push(("1,000 Vault objects with secretArgs", vault));
    let deep_args = format!(
        "- objectName: v\n  secretPath: x\n  method: PUT\n  secretArgs: '{}'\n",
        "[".repeat(MIB - 200)
    );
    v.push(("deep JSON in secretArgs", deep_args));
    v
}
