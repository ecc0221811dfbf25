//! Resource bounds of every parser a caller reaches, measured: no input
//! under 1 MiB may take more than 100 ms (release; ten times that in a
//! debug build) or 64 MiB of allocation to accept or reject. The worst
//! shapes known are tried by name; proptest throws generated documents in
//! the YAML and JSON alphabets at the same entry points. Every blow-up the
//! fuzzers find becomes a named case here. Release figures: `cargo bench
//! --bench bounds`.

use std::sync::Mutex;
use std::time::Duration;

use coffer::fuzzing;
use proptest::prelude::*;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::measure;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

/// One measurement at a time: the counters are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

const MAX_BYTES: usize = 64 * 1024 * 1024;
fn max_time() -> Duration {
    if cfg!(debug_assertions) {
        Duration::from_millis(1000)
    } else {
        Duration::from_millis(100)
    }
}

fn bounded<T: std::fmt::Debug>(label: &str, input_len: usize, f: impl FnOnce() -> T) -> T {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (out, took, peak) = measure(f);
    println!(
        "{label:40} {input_len:>8} B  {took:>10.1?}  peak {:>6} KiB",
        peak / 1024
    );
    assert!(took <= max_time(), "{label}: {took:?}");
    assert!(peak <= MAX_BYTES, "{label}: {} MiB", peak >> 20);
    out
}

fn attributes(objects: &str) -> String {
    serde_json::json!({
        "secretProviderClass": "s",
        "csi.storage.k8s.io/pod.name": "p",
        "csi.storage.k8s.io/pod.namespace": "ns",
        "csi.storage.k8s.io/pod.uid": "u",
        "csi.storage.k8s.io/serviceAccount.name": "sa",
        "objects": objects,
    })
    .to_string()
}

const MIB: usize = 1 << 20;
use coffer::fuzzing::{fill, worst_shapes as named_shapes};

#[test]
fn named_shapes_are_accepted_or_refused_within_bounds() {
    for (label, doc) in named_shapes() {
        assert!(doc.len() < MIB + 1024, "{label}: {} bytes", doc.len());
        let attrs = attributes(&doc);
        let _ = bounded(label, doc.len(), || {
            fuzzing::mount_request(&attrs, "null", "420")
        });
    }
}

#[test]
fn request_json_shapes_are_bounded() {
    let cases = [
        ("deep attributes", fill("[", MIB - 1)),
        ("deep attribute object", fill("{\"a\":", MIB - 1)),
        ("wide attributes", {
            let body: Vec<String> = (0..40_000).map(|i| format!("\"k{i}\":\"v\"")).collect();
            format!("{{{}}}", body.join(","))
        }),
        (
            "deep tokens",
            attributes("- objectName: a").replace(
                "\"objects\"",
                &format!(
                    "\"csi.storage.k8s.io/serviceAccount.tokens\":{:?},\"objects\"",
                    "[".repeat(MIB / 2)
                ),
            ),
        ),
    ];
    for (label, attrs) in cases {
        let _ = bounded(label, attrs.len(), || {
            fuzzing::mount_request(&attrs, "null", "420")
        });
    }
    let secrets = format!(
        "{{{}}}",
        (0..30_000)
            .map(|i| format!("\"k{i}\":\"v\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let attrs = attributes("- objectName: a");
    let _ = bounded("wide nodePublish secrets", secrets.len(), || {
        fuzzing::mount_request(&attrs, &secrets, "420")
    });
}

/// AWS `jmesPath` expressions meant to multiply a 1 MiB secret: each is
/// refused when checked or evaluated within the time and memory bounds.
#[test]
fn jmes_paths_are_bounded() {
    // At the size jmesPath reads (256 KiB), and beyond it.
    let quotes = serde_json::to_string(&vec!["\"\u{1}".repeat(64); 256 * 1024 / 600]).unwrap();
    let numbers = format!("[{}0]", "0,".repeat(128 * 1024 - 2));
    let deep = fill("[", 256 * 1024 - 1);
    let big = format!("[{}0]", "0,".repeat(MIB / 2 - 1));
    let cases = [
        ("sort", "sort(@) | to_string(@)"),
        ("nested to_string", "to_string(to_string(@))"),
        ("three to_string", "to_string(to_string(to_string(@)))"),
        ("flatten projections", "[][][][][][][][] | to_string(@)"),
        ("map to_string", "map(&to_string(@), @) | join(',', @)"),
        ("sort_by", "sort_by(@, &to_string(@)) | [0] | to_string(@)"),
        ("filters", "[?@ == `0`] | length(@) | to_string(@)"),
        ("multi-select", "[@,@][][@,@][][@,@][] | to_string(@)"),
        ("reverse slices", "reverse(@)[::-1][::2] | to_string(@)"),
    ];
    for (label, expr) in cases {
        for (shape, doc) in [
            ("quotes", &quotes),
            ("numbers", &numbers),
            ("deep", &deep),
            ("1 MiB", &big),
        ] {
            let _ = bounded(&format!("jmesPath {label} / {shape}"), doc.len(), || {
                fuzzing::jmes_path(doc.as_bytes(), expr)
            });
        }
    }
}

#[test]
fn aws_objects_documents_are_bounded() {
    // 1,000 AWS objects with two jmesPath items each: refused by count.
    let items: String = (0..2)
        .map(|i| format!("    - {{path: k{i}, objectAlias: a{i}}}\n"))
        .collect();
    let doc: String = (0..1000)
        .map(|i| format!("- objectName: s{i}\n  objectType: secretsmanager\n  jmesPath:\n{items}"))
        .collect();
    let attrs = attributes(&doc);
    let out = bounded("AWS objects with jmesPath", doc.len(), || {
        fuzzing::mount_request(&attrs, "null", "420")
    });
    assert!(out.is_err(), "3,000 objects are over the limit");
}

#[test]
fn payload_and_value_shapes_are_bounded() {
    for (label, doc) in named_shapes() {
        let _ = bounded(&format!("extractYAMLKey: {label}"), doc.len(), || {
            fuzzing::extract_key(doc.as_bytes(), "objectName", true)
        });
    }
    let json = fill("[", MIB - 1);
    let _ = bounded("extractJSONKey: deep", json.len(), || {
        fuzzing::extract_key(json.as_bytes(), "a", false)
    });
    let b64 = fill("QUJD", MIB - 1);
    let _ = bounded("base64 1 MiB", b64.len(), || {
        fuzzing::decode("base64", b64.as_bytes())
    });
    let hex = fill("4142", MIB - 1);
    let _ = bounded("hex 1 MiB", hex.len(), || {
        fuzzing::decode("hex", hex.as_bytes())
    });
}

/// The `sops` backend's reader and decryption on the worst documents
/// known: as many values as fit in 1 MiB (each an AES-GCM open until the
/// first refusal), deep nesting, alias bombs, huge metadata lists.
#[test]
fn sops_documents_are_bounded() {
    let meta = "sops:\n  age:\n  - recipient: age1x\n    enc: x\n  lastmodified: '2024-01-01T00:00:00Z'\n  mac: ENC[AES256_GCM,data:AA==,iv:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=,tag:AAAAAAAAAAAAAAAAAAAAAA==,type:str]\n";
    let value = "ENC[AES256_GCM,data:AA==,iv:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=,tag:AAAAAAAAAAAAAAAAAAAAAA==,type:str]";
    // Unencrypted values (suffix rule) are not opened: many of them.
    let many: String = (0..8000)
        .map(|i| format!("k{i}_unencrypted: {i}\n"))
        .collect::<String>()
        + "sops:\n  unencrypted_suffix: _unencrypted\n"
        + &meta[6..];
    let _ = bounded("SOPS: 8,000 clear values", many.len(), || {
        fuzzing::sops_document(many.as_bytes(), 0)
    });
    let sealed: String = (0..7000)
        .map(|i| format!("k{i}: {value}\n"))
        .collect::<String>()
        + meta;
    let out = bounded("SOPS: 7,000 sealed values", sealed.len(), || {
        fuzzing::sops_document(sealed.as_bytes(), 0)
    });
    assert!(out.is_err(), "not its key");
    let too_many: String = (0..30000).map(|i| format!("k{i}: 1\n")).collect::<String>() + meta;
    let out = bounded("SOPS: 30,000 values", too_many.len(), || {
        fuzzing::sops_document(too_many.as_bytes(), 0)
    });
    assert!(out.is_err(), "over the value bound");
    let deep = format!(
        "{{\"a\": {}1{}, {:?}: {{}}}}",
        "[".repeat(100_000),
        "]".repeat(100_000),
        "sops"
    );
    let _ = bounded("SOPS: deep JSON", deep.len(), || {
        fuzzing::sops_document(deep.as_bytes(), 1)
    });
    let list_bomb: String = (0..40000)
        .map(|i| format!("sops_a{i}__list_255=x\n"))
        .collect();
    let out = bounded("SOPS: dotenv metadata lists", list_bomb.len(), || {
        fuzzing::sops_document(list_bomb.as_bytes(), 2)
    });
    assert!(out.is_err());
    let keys: String = (0..85_000).map(|i| format!("\"k{i}\":0,")).collect();
    let keys = format!("{{{keys}\"sops\": {{}}}}");
    let _ = bounded("SOPS: a JSON map of 85,000 keys", keys.len(), || {
        fuzzing::sops_document(keys.as_bytes(), 1)
    });
    let lines: String = (0..80_000).map(|i| format!("K{i}=v\n")).collect();
    let _ = bounded("SOPS: dotenv of 80,000 lines", lines.len(), || {
        fuzzing::sops_document(lines.as_bytes(), 2)
    });
    let wide: String = (0..60000).map(|i| format!("[{i}],")).collect();
    let wide = format!("{{\"a\": [{}0], \"sops\": {{}}}}", wide);
    let _ = bounded("SOPS: wide JSON", wide.len(), || {
        fuzzing::sops_document(wide.as_bytes(), 1)
    });
    for (label, doc) in named_shapes() {
        let _ = bounded(&format!("SOPS: {label}"), doc.len(), || {
            fuzzing::sops_document(doc.as_bytes(), 0)
        });
    }
}

/// Text from the characters YAML and JSON give meaning to.
fn structured(max: usize) -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "[",
        "]",
        "{",
        "}",
        ",",
        ": ",
        "- ",
        "? ",
        "&a ",
        "&b ",
        "*a",
        "*b",
        "!!str ",
        "'",
        "\"",
        "\\",
        "#",
        "|",
        ">",
        "\n",
        "\n  ",
        "\n    ",
        " ",
        "objectName",
        "secretPath",
        "backend",
        "path",
        "encoding",
        "filePermission",
        "0644",
        "vault",
        "gcp",
        "file",
        "..",
        "/",
        "x",
        "1",
        "secretArgs",
        "method",
        "PUT",
        "resourceName",
        "projects/p/secrets/s/versions/1",
        "\t",
        "\u{0}",
        "\u{1b}",
        "é",
        "%YAML 1.2\n",
        "---\n",
        "...\n",
    ]);
    prop::collection::vec(atoms, 0..max).prop_map(|v| v.concat())
}

#[test]
fn template_bombs_are_stopped_within_bounds() {
    let value = "x".repeat(1000);
    for (label, doc) in fuzzing::template_bombs() {
        let out = bounded(label, doc.len(), || {
            fuzzing::files_document(&doc, value.as_bytes())
        });
        let err = out.expect_err(label);
        assert!(
            ["fuel", "bytes", "recursion"]
                .iter()
                .any(|w| err.contains(w)),
            "{label}: {err}"
        );
    }
    // A map value: expanded, and its keys read by a template.
    let doc = "- path: out\n  template: '{{ db.a }}-{{ objects.many.b }}'\n";
    let built = fuzzing::files_document(doc, br#"{"a": "1", "b": "2"}"#);
    assert_eq!(built, Ok(3), "two expanded keys and out");
}

/// Templates stitched from the pieces that cost: loops, concatenation,
/// growing filters, sets.
fn template_text() -> impl Strategy<Value = String> {
    let pieces = vec![
        "{{ ",
        " }}",
        "{% for a in db %}",
        "{% endfor %}",
        "{% if db %}",
        "{% endif %}",
        "{% set db = db ~ db %}",
        "db",
        "a",
        "|replace('x', 'xxxx')",
        "|upper",
        " ~ ",
        "x",
        "\n",
        "'",
        "(",
        ")",
        "[db, db]",
        "|join(',')",
        "{{ db }}",
    ];
    prop::collection::vec(prop::sample::select(pieces), 0..200).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_templates_are_bounded(t in template_text()) {
        let doc = format!("- path: out\n  template: {}\n", serde_json::to_string(&t).unwrap());
        let _ = bounded("generated templates", doc.len(), || fuzzing::files_document(&doc, b"xxxxxxxxxxxxxxxx"));
    }

    #[test]
    fn generated_objects_documents_are_bounded(doc in structured(4000)) {
        let attrs = attributes(&doc);
        let _ = bounded("generated objects", doc.len(), || fuzzing::mount_request(&attrs, "null", "420"));
    }

    #[test]
    fn generated_google_lists_are_bounded(doc in structured(4000)) {
        let attrs = attributes("x").replace("\"objects\":\"x\"", &format!("\"secrets\":{doc:?}"));
        let _ = bounded("generated secrets", doc.len(), || fuzzing::mount_request(&attrs, "null", "420"));
    }

    #[test]
    fn generated_attributes_are_bounded(raw in "[\\[\\]{}\":,a-z0-9 \\\\]{0,20000}") {
        let _ = bounded("generated attributes", raw.len(), || fuzzing::mount_request(&raw, &raw, &raw));
    }

    #[test]
    fn generated_paths_are_bounded(list in prop::collection::vec("[a./-]{0,40}", 0..300)) {
        let refs: Vec<&str> = list.iter().map(String::as_str).collect();
        let _ = bounded("generated paths", list.len(), || fuzzing::paths(&refs));
    }

    #[test]
    fn generated_jmes_paths_are_bounded(expr in "[a-z@*.\\[\\]|(),&?=!<> `0-9:-]{0,120}", doc in structured(4000)) {
        let _ = bounded("generated jmesPath", doc.len(), || fuzzing::jmes_path(doc.as_bytes(), &expr));
    }

    #[test]
    fn generated_sops_documents_are_bounded(doc in structured(4000), format in 0u8..4) {
        let _ = bounded("generated SOPS documents", doc.len(), || fuzzing::sops_document(doc.as_bytes(), format));
    }

    #[test]
    fn generated_payloads_are_bounded(doc in structured(4000), yaml in any::<bool>()) {
        let _ = bounded("generated payloads", doc.len(), || fuzzing::extract_key(doc.as_bytes(), "a", yaml));
    }
}
