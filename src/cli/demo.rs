//! `coffer demo`: the README's first command. Starts a real daemon on a
//! temporary socket with the `file` backend seeded with example secrets,
//! mounts an example SecretProviderClass through the socket exactly as the
//! driver would, rotates one secret, and shows the `..data` swap on disk.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::mount::{mount_once, print_report, CliError};
use crate::client;
use crate::config::ServeArgs;
use crate::manifest::{DriverRequest, Pod, SecretProviderClass};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Directory for the demo's secrets, socket and pod volume (recreated).
    #[arg(long, default_value = "coffer-demo")]
    pub dir: PathBuf,
}

const MARKER: &str = ".coffer-demo";

pub const EXAMPLE_SPC: &str = r#"apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: shop-secrets
  namespace: shop
spec:
  provider: coffer
  parameters:
    backend: file
    objects: |
      - objectName: db/username
      - objectName: db/password
        filePermission: 0600
      - objectName: api-token
        path: api-token.b64
        encoding: base64
        filePermission: 0640
      - objectName: config.json
"#;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0} exists and was not made by `coffer demo`; choose another --dir")]
    Occupied(PathBuf),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the demo daemon did not start: {0}")]
    Daemon(String),
    #[error(transparent)]
    Mount(#[from] CliError),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DemoError + 'a {
    move |source| DemoError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, contents: &str) -> Result<(), DemoError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io("create", parent))?;
    }
    fs::write(path, contents).map_err(io("write", path))
}

fn prepare(dir: &Path) -> Result<(), DemoError> {
    if dir.exists() {
        let empty = fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty && !dir.join(MARKER).exists() {
            return Err(DemoError::Occupied(dir.to_path_buf()));
        }
        fs::remove_dir_all(dir).map_err(io("clean", dir))?;
    }
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    write(&dir.join(MARKER), "made by coffer demo; safe to delete\n")?;
    let secrets = dir.join("secrets");
    write(&secrets.join("db/username"), "shop_app")?;
    write(&secrets.join("db/password"), "correct-horse-battery-staple")?;
    // "demo-api-token-v1", stored base64 as many secret stores hold binary values.
    write(&secrets.join("api-token.b64"), "ZGVtby1hcGktdG9rZW4tdjE=\n")?;
    write(
        &secrets.join("config.json"),
        "{\"featureFlags\": [\"fast-checkout\"]}\n",
    )?;
    write(&dir.join("spc.yaml"), EXAMPLE_SPC)
}

/// Prints the volume as `ls -l` would show the interesting parts.
fn show_volume(target: &Path) {
    let Ok(entries) = fs::read_dir(target) else {
        return;
    };
    let mut names: Vec<(String, PathBuf)> = entries
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    names.sort();
    println!("  {}/", target.display());
    for (name, path) in names {
        match fs::read_link(&path) {
            Ok(to) => println!("    {name} -> {}", to.display()),
            Err(_) => println!("    {name}/"),
        }
    }
    let mut files = Vec::new();
    collect(&target.join("..data"), Path::new(""), &mut files);
    for (rel, mode, len) in files {
        println!(
            "      ..data/{:<20} mode {:04o}  {len} bytes",
            rel.display(),
            mode
        );
    }
}

fn collect(dir: &Path, prefix: &Path, out: &mut Vec<(PathBuf, u32, u64)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let rel = prefix.join(e.file_name());
        match e.metadata() {
            Ok(m) if m.is_dir() => collect(&e.path(), &rel, out),
            Ok(m) => out.push((rel, m.permissions().mode() & 0o7777, m.len())),
            Err(_) => {}
        }
    }
}

pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let dir = std::path::absolute(&args.dir).unwrap_or(args.dir.clone());
    prepare(&dir)?;
    let socket = dir.join("coffer.sock");
    let target = dir.join("pod-volume");
    let serve = ServeArgs::from_args([
        "--socket".into(),
        socket.clone().into_os_string(),
        "--health-addr".into(),
        "off".into(),
        "--shutdown-grace".into(),
        "5s".into(),
        "--default-backend".into(),
        "file".into(),
        "--version-key-file".into(),
        dir.join("version.key").into_os_string(),
        "--file-backend-root".into(),
        dir.join("secrets").into_os_string(),
        "--audit-log".into(),
        "off".into(),
    ])
    .map_err(|e| DemoError::Daemon(e.to_string()))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(async move {
        crate::server::serve(&serve, async {
            let _ = stop_rx.await;
        })
        .await
    });

    println!("== coffer demo in {}", dir.display());
    println!(
        "1. daemon started: `coffer serve --socket {} --file-backend-root {}`",
        socket.display(),
        dir.join("secrets").display()
    );
    let mut client = None;
    for _ in 0..100 {
        if daemon.is_finished() {
            break;
        }
        if let Ok(c) = client::connect(&socket).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(mut client) = client else {
        let why = match daemon.await {
            Ok(Err(e)) => e.to_string(),
            _ => "socket did not accept connections within 5 s".into(),
        };
        return Err(DemoError::Daemon(why));
    };

    let spc = SecretProviderClass::from_yaml(EXAMPLE_SPC)
        .map_err(|e| DemoError::Daemon(format!("example SPC: {e}")))?;
    let driver = DriverRequest {
        pod: Pod {
            namespace: "shop".into(),
            name: "checkout-7d9f".into(),
            uid: "5a1c6c1e-0000-4000-8000-000000000001".into(),
            service_account: "checkout".into(),
        },
        tokens: BTreeMap::new(),
        node_publish_secrets: None,
        volume_attributes: BTreeMap::new(),
        permission: 0o644,
        target_path: target.to_string_lossy().into_owned(),
    };
    let timeout = Duration::from_secs(120);

    println!(
        "2. pod shop/checkout-7d9f mounts {} (as the driver would):",
        dir.join("spc.yaml").display()
    );
    for line in EXAMPLE_SPC.lines() {
        println!("   | {line}");
    }
    println!(
        "   Each object comes back with a version: an opaque tag that changes exactly when \
         its content does (the driver rewrites a file only then)."
    );
    let first = mount_once(&mut client, driver.to_proto(&spc), &target, timeout).await?;
    print_report(&target, &first, None);
    show_volume(&target);
    let password = fs::read_to_string(target.join("db/password")).unwrap_or_default();
    println!(
        "   the pod reads db/password: {} bytes; api-token decoded from base64 to {:?}",
        password.len(),
        fs::read_to_string(target.join("api-token")).unwrap_or_default()
    );

    let rotated = dir.join("secrets/db/password");
    write(&rotated, "tr0ub4dor-and-3")?;
    println!("3. the backend's db/password changes; the rotation poll calls Mount again:");
    let second = mount_once(&mut client, driver.to_proto(&spc), &target, timeout).await?;
    print_report(&target, &second, Some(&first.versions));
    show_volume(&target);

    println!("4. the next poll finds nothing new:");
    let third = mount_once(&mut client, driver.to_proto(&spc), &target, timeout).await?;
    print_report(&target, &third, Some(&second.versions));

    let _ = stop_tx.send(());
    match daemon.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(DemoError::Daemon(e.to_string())),
        Err(e) => return Err(DemoError::Daemon(e.to_string())),
    }
    // The commands name this very binary, so they work from anywhere.
    let me = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "coffer".into());
    println!("== done. Look around {}.", dir.display());
    println!("   To try it by hand, run the daemon in one terminal:");
    println!(
        "   {me} serve --socket {0} --file-backend-root {1} --version-key-file {2} --health-addr off",
        socket.display(),
        dir.join("secrets").display(),
        dir.join("version.key").display()
    );
    println!(
        "   and mount (polling like rotation) in a second one; then edit a file under secrets/:"
    );
    println!(
        "   {me} mount {} --socket {} --target {} --namespace shop --watch 5",
        dir.join("spc.yaml").display(),
        socket.display(),
        target.display()
    );
    Ok(())
}
