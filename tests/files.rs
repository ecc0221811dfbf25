//! End-to-end: files built from fetched values (`expand`, `files` with
//! templates and formats, `versionsFile`) through the real daemon's socket,
//! each output read back by an independent parser (Python's json, PyYAML,
//! python-dotenv, jproperties).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use coffer::manifest::SecretProviderClass;
use coffer::proto;
use common::*;

/// A value with everything the formats must escape.
const HOSTILE: &str = "it's \"q\" \\ back $HOME ${HOME} $(id) `id` = : # ! \n second line\r\n\ttab é 😀 \u{7f}\u{85}\u{2028} -x ~ null";

fn spc_with(objects: &str, extra: &[(&str, &str)]) -> SecretProviderClass {
    let mut s = spc(objects);
    for (k, v) in extra {
        s.parameters.insert(k.to_string(), v.to_string());
    }
    s
}

fn mount_req(s: &SecretProviderClass) -> proto::MountRequest {
    driver(std::path::Path::new("/t")).to_proto(s)
}

fn versions_of(r: &proto::MountResponse) -> BTreeMap<String, String> {
    r.object_version
        .iter()
        .map(|v| (v.id.clone(), v.version.clone()))
        .collect()
}

/// Parses the written files with Python's own parsers.
fn parse_with_python(dir: &std::path::Path) -> serde_json::Value {
    let kinds = [
        ("env", "app.env"),
        ("env-interpolated", "plain.env"),
        ("json", "app.json"),
        ("yaml", "app.yaml"),
        ("properties", "app.properties"),
    ];
    let paths: Vec<(&str, std::path::PathBuf)> =
        kinds.iter().map(|(k, f)| (*k, dir.join(f))).collect();
    let refs: Vec<(&str, &std::path::Path)> =
        paths.iter().map(|(k, p)| (*k, p.as_path())).collect();
    let parsed = python::parse_formats(&refs);
    let mut by_kind = serde_json::Map::new();
    for (kind, path) in &paths {
        let key = if *kind == "env-interpolated" {
            "env_interpolated"
        } else {
            kind
        };
        by_kind.insert(key.to_string(), parsed[path.display().to_string()].clone());
    }
    serde_json::Value::Object(by_kind)
}

#[tokio::test]
async fn formats_and_templates_round_trip_hostile_values_through_independent_parsers() {
    let d = Daemon::start();
    let db = serde_json::json!({
        "host": "db.local",
        "username": "app",
        "password": HOSTILE,
        "port": 5432,
        "yes": "yes",
        "zero": "0123",
        "nested": {"a": [1, true, null, "x\ny"]},
    });
    d.write_secret("db.json", db.to_string());
    d.write_secret("token", "tok$en'\\\"");
    let objects = "\
- objectName: db
  path: db.json
  render: false
- objectName: token
";
    let files = r#"
- path: pgpass
  filePermission: 0600
  template: "{{ db.host }}:{{ db.port }}:*:{{ db.username }}:{{ db.password|urlencode }}\n"
- path: app.env
  format: env
  from:
    DB_USER: db.username
    DB_PASS: db.password
    TOKEN: token
- path: plain.env
  format: env
  from:
    TOKEN: token
    USER: db.username
- path: app.json
  format: json
  fromObject: db
- path: app.yaml
  format: yaml
  fromObject: db
- path: app.properties
  format: properties
  from:
    db.password: db.password
    "odd key=:#!": token
    nested: db.nested
"#;
    let s = spc_with(objects, &[("files", files)]);
    let mut c = d.client().await;
    let r = c.mount(mount_req(&s)).await.unwrap().into_inner();
    let out = files_of(&r);
    let names: Vec<&str> = out.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "app.env",
            "app.json",
            "app.properties",
            "app.yaml",
            "pgpass",
            "plain.env",
            "token"
        ],
        "render: false writes no db file"
    );
    let pgpass_mode = r.files.iter().find(|f| f.path == "pgpass").unwrap().mode;
    assert_eq!(pgpass_mode, 0o600);
    let pw_encoded: String = HOSTILE
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    assert_eq!(
        String::from_utf8(out["pgpass"].clone()).unwrap(),
        format!("db.local:5432:*:app:{pw_encoded}\n")
    );

    let dir = tempfile::tempdir().unwrap();
    for (path, bytes) in &out {
        std::fs::write(dir.path().join(path), bytes).unwrap();
    }
    let parsed = parse_with_python(dir.path());
    assert_eq!(parsed["env"]["DB_PASS"], HOSTILE);
    assert_eq!(parsed["env"]["DB_USER"], "app");
    assert_eq!(parsed["env"]["TOKEN"], "tok$en'\\\"");
    // python-dotenv's default (interpolating) read of values without `${`.
    assert_eq!(parsed["env_interpolated"]["TOKEN"], "tok$en'\\\"");
    assert_eq!(parsed["json"], db);
    assert_eq!(
        parsed["yaml"], db,
        "YAML 1.1 reader: no bools or numbers from strings"
    );
    assert_eq!(parsed["properties"]["db.password"], HOSTILE);
    assert_eq!(parsed["properties"]["odd key=:#!"], "tok$en'\\\"");
    assert_eq!(parsed["properties"]["nested"], db["nested"].to_string());

    // Every produced file has an ObjectVersion (id = path); db has its own.
    let v = versions_of(&r);
    for id in ["db", "token", "pgpass", "app.env", "app.json"] {
        assert_eq!(v[id].len(), 32, "{id}");
    }
}

#[tokio::test]
async fn expand_versions_and_rotation_re_render_only_dependents() {
    let d = Daemon::start();
    let cfg: serde_json::Map<String, serde_json::Value> = (0..50)
        .map(|i| {
            (
                format!("key{i}"),
                serde_json::Value::String(format!("value-{i}")),
            )
        })
        .collect();
    d.write_secret(
        "cfg.json",
        serde_json::Value::Object(cfg.clone()).to_string(),
    );
    d.write_secret("greeting", "hello");
    d.write_secret("db.yaml", "user: app\npass: 'p: q'\n");
    let objects = "\
- objectName: cfg
  path: cfg.json
  expand: true
  filePermission: 0640
- objectName: greeting
- objectName: db
  path: db.yaml
  render: false
";
    let files = "\
- path: hello.txt
  template: '{{ greeting }}, {{ db.user }}!'
- path: db.env
  format: env
  fromObject: db
";
    let s = spc_with(
        objects,
        &[("files", files), ("versionsFile", "versions.json")],
    );
    let mut c = d.client().await;
    let r1 = c.mount(mount_req(&s)).await.unwrap().into_inner();
    let f1 = files_of(&r1);
    assert_eq!(f1.len(), 50 + 4, "{:?}", f1.keys().collect::<Vec<_>>());
    assert_eq!(f1["cfg/key7"], b"value-7");
    assert_eq!(
        r1.files.iter().find(|f| f.path == "cfg/key7").unwrap().mode,
        0o640
    );
    assert_eq!(f1["hello.txt"], b"hello, app!");
    assert_eq!(f1["db.env"], b"pass='p: q'\nuser='app'\n");
    let listed: BTreeMap<String, String> = serde_json::from_slice(&f1["versions.json"]).unwrap();
    assert_eq!(listed.len(), 53, "every file but itself");
    assert!(listed.contains_key("cfg/key49") && listed.contains_key("db.env"));

    // The same Mount again: nothing moves.
    let r2 = c.mount(mount_req(&s)).await.unwrap().into_inner();
    assert_eq!(versions_of(&r1), versions_of(&r2));
    assert_eq!(f1, files_of(&r2));

    // Rotate one input: its dependents move, nothing else.
    d.write_secret("greeting", "howdy");
    let r3 = c.mount(mount_req(&s)).await.unwrap().into_inner();
    let (v1, v3) = (versions_of(&r1), versions_of(&r3));
    let moved: Vec<&str> = v1
        .keys()
        .filter(|k| v1[*k] != v3[*k])
        .map(String::as_str)
        .collect();
    assert_eq!(moved, ["greeting", "hello.txt", "versions.json"]);
    assert_eq!(files_of(&r3)["hello.txt"], b"howdy, app!");
    let listed3: BTreeMap<String, String> =
        serde_json::from_slice(&files_of(&r3)["versions.json"]).unwrap();
    let changed: Vec<&str> = listed
        .keys()
        .filter(|k| listed[*k] != listed3[*k])
        .map(String::as_str)
        .collect();
    assert_eq!(changed, ["greeting", "hello.txt"]);
}

#[tokio::test]
async fn a_versions_file_alone_lists_the_objects_files() {
    let d = Daemon::start();
    d.write_secret("a", "1");
    d.write_secret("b/c", "2");
    let s = spc_with(
        "- objectName: a\n- objectName: b/c\n",
        &[("versionsFile", "meta/versions.json")],
    );
    let mut c = d.client().await;
    let r = c.mount(mount_req(&s)).await.unwrap().into_inner();
    let f = files_of(&r);
    let listed: BTreeMap<String, String> =
        serde_json::from_slice(&f["meta/versions.json"]).unwrap();
    let v = versions_of(&r);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed["a"], v["a"]);
    assert_eq!(listed["b/c"], v["b/c"]);
    assert!(v.contains_key("meta/versions.json"));
    // It may not land on an object's path.
    let clash = spc_with("- objectName: a\n", &[("versionsFile", "a")]);
    let (code, msg) = mount_err(&mut c, mount_req(&clash)).await;
    assert_eq!(code, tonic::Code::InvalidArgument, "{msg}");
    assert!(msg.contains("more than one"), "{msg}");
}

#[tokio::test]
async fn missing_objects_and_keys_and_forbidden_templates_fail_clearly() {
    let d = Daemon::start();
    d.write_secret("db.json", r#"{"user":"app","password":"hunter2-secret"}"#);
    d.write_secret("bad.json", r#"{"ok":"1","../escape":"2"}"#);
    let objects = "\
- objectName: db
  path: db.json
  render: false
- objectName: bad
  path: bad.json
  render: false
- objectName: gone
  optional: true
";
    let mut c = d.client().await;
    let case = |files: &str| spc_with(objects, &[("files", files)]);
    let cases: &[(&str, &[&str])] = &[
        (
            "- path: f\n  template: '{{ db.pasword }}'\n",
            &["files[0] (f)", "db.pasword", "undefined"],
        ),
        (
            "- path: f\n  template: '{{ nodb.user }}'\n",
            &["files[0] (f)", "\"nodb\"", "not an object"],
        ),
        (
            "- path: f\n  format: env\n  from: {A: db.nokey}\n",
            &["files[0] (f)", "no key", "\"nokey\""],
        ),
        (
            "- path: f\n  format: env\n  from: {A: other.user}\n",
            &["names no object"],
        ),
        (
            "- path: f\n  format: env\n  fromObject: bad\n",
            &["../escape", "not an environment variable name"],
        ),
        (
            "- path: f\n  template: \"{% include '/etc/passwd' %}\"\n",
            &["include"],
        ),
        (
            "- path: f\n  template: '{{ env.HOME }}'\n",
            &["\"env\"", "not an object"],
        ),
        ("- path: f\n  template: '{{ range(10) }}'\n", &["call"]),
        (
            "- path: f\n  template: '{{ gone.x }}'\n",
            &["gone.x", "undefined"],
        ),
        (
            "- path: db\n  template: x\n- path: db\n  template: y\n",
            &["\"db\"", "more than one"],
        ),
        (
            "- path: f\n  template: x\n  format: env\n",
            &["exclude each other"],
        ),
        (
            "- path: f\n  format: toml\n  fromObject: db\n",
            &["toml", "env, json, yaml, properties"],
        ),
    ];
    for (files, wanted) in cases {
        let (code, msg) = mount_err(&mut c, mount_req(&case(files))).await;
        assert_eq!(code, tonic::Code::InvalidArgument, "{files}: {msg}");
        for w in *wanted {
            assert!(msg.contains(w), "{files}: {msg:?} lacks {w:?}");
        }
        assert!(!msg.contains("hunter2"), "{msg}");
    }
    // A template reading an absent optional object with a default works.
    let ok = case("- path: f\n  template: \"{{ gone|default('none') }}\"\n");
    let r = c.mount(mount_req(&ok)).await.unwrap().into_inner();
    assert_eq!(files_of(&r)["f"], b"none");
    // expand of an absent optional object writes nothing; expand with a
    // key picker is refused.
    let objects_expand = "- objectName: gone\n  optional: true\n  expand: true\n";
    let r = c
        .mount(mount_req(&spc(objects_expand)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.files.is_empty());
    let (code, msg) = mount_err(
        &mut c,
        mount_req(&spc("- objectName: x\n  expand: true\n  secretKey: a\n")),
    )
    .await;
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("secretKey"), "{msg}");
    assert!(!d.logs().contains("hunter2"));
}

#[tokio::test]
async fn template_bombs_fail_fast_while_other_mounts_are_served() {
    let d = Daemon::start();
    d.write_secret("seed", "x".repeat(1000));
    d.write_secret("plain", "ok");
    let bombs = [
        format!(
            "{{% set a = seed %}}{}{{{{ a|length }}}}",
            "{% set a = a ~ a %}".repeat(60)
        ),
        "{% for a in seed %}{% for b in seed %}{% for c in seed %}{{ a }}{% endfor %}{% endfor %}{% endfor %}".to_string(),
        format!("{{{{ seed{} }}}}", "|replace('x', 'xxxxxxxxxx')".repeat(20)),
    ];
    let mut c = d.client().await;
    for bomb in &bombs {
        let files = format!(
            "- path: out\n  template: {}\n",
            serde_json::to_string(bomb).unwrap()
        );
        let s = spc_with(
            "- objectName: seed\n  render: false\n",
            &[("files", &files)],
        );
        let started = Instant::now();
        let mut c2 = d.client().await;
        let bomb_call = tokio::spawn(async move { mount_err(&mut c2, mount_req(&s)).await });
        // Meanwhile, a normal Mount is answered.
        let r = c.mount(request("- objectName: plain\n")).await.unwrap();
        assert_eq!(r.into_inner().files[0].contents, b"ok");
        let (code, msg) = bomb_call.await.unwrap();
        assert_eq!(code, tonic::Code::InvalidArgument, "{msg}");
        assert!(
            msg.contains("fuel") || msg.contains("bytes"),
            "{bomb:.60}: {msg}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(d.logs().len() < 200_000, "no runaway logging");
}

/// Runs `coffer check` on an SPC with two objects (`db` not rendered,
/// `token`) and the given `files` and `versionsFile`; returns whether it
/// passed and what it printed.
fn check_spc(files: &str, versions_file: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("spc.yaml");
    let indented: String = files.lines().map(|l| format!("      {l}\n")).collect();
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata:\n  name: app\nspec:\n  provider: coffer\n  parameters:\n    backend: file\n    objects: |\n      - objectName: db\n        render: false\n      - objectName: token\n    files: |\n{indented}    versionsFile: {versions_file}\n"
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg(&manifest)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn check_validates_files_without_fetching() {
    let files = "- path: token\n  template: \"{{ db.user }}\"\n- path: app.env\n  format: env\n  from: {A: nothing.here}\n";
    let (ok, text) = check_spc(
        &format!("{files}- path: x.txt\n  template: \"{{{{ db.user \"\n"),
        "versions.json",
    );
    assert!(!ok, "{text}");
    assert!(text.contains("files[2] (x.txt)"), "{text}");
    assert!(text.contains("line 1"), "{text}");

    // Parsable, but wrong: a reference to no object, a file on an object's
    // path, a versions file on another file's path.
    let (ok, text) = check_spc(files, "app.env");
    assert!(!ok, "{text}");
    assert!(text.contains("\"nothing.here\" names no object"), "{text}");
    assert!(
        text.contains("path \"token\" is used by more than one"),
        "{text}"
    );
    assert!(
        text.contains("path \"app.env\" is used by more than one"),
        "{text}"
    );
}
