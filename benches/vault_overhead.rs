//! What coffer adds on top of Vault: Mount latency through the daemon's socket
//! (one KV v2 object, warm token) against a direct vaultrs read of the same
//! secret, on the same machine and run. Prints figures; asserts nothing.
//!
//! cargo bench --bench vault_overhead

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::bao::{setup_jwt, Bao, Signer};
use common::{driver, with_tokens, Daemon};
use serde_json::json;

const ROUNDS: usize = 1000;

fn summary(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{name:<28} n={:<5} p50={:>8.1?} p90={:>8.1?} p99={:>8.1?} mean={:>8.1?}",
        samples.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        mean
    );
    pct(0.5)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bao = Bao::start().await;
    let signer = Signer::new();
    bao.policy("app", "path \"secret/*\" { capabilities = [\"read\"] }")
        .await;
    setup_jwt(&bao, &signer, &["app"]).await;
    bao.put_kv2("bench", json!({"password": "bench-password-value"}))
        .await;

    // Cache off: every Mount reaches Vault, so the difference to a direct
    // read is what coffer adds. A second daemon with the cache on shows
    // what a warm rotation poll costs.
    let daemon = Daemon::start_with(common::Options {
        extra_args: vec![
            "--cache-ttl".into(),
            "0s".into(),
            "--audit-log".into(),
            "off".into(),
            "--backend-qps".into(),
            "0".into(),
        ],
        ..Default::default()
    });
    let cached = Daemon::start_with(common::Options {
        extra_args: vec!["--audit-log".into(), "off".into()],
        ..Default::default()
    });
    let mut client = daemon.client().await;
    let mut cached_client = cached.client().await;
    let spc = coffer::manifest::SecretProviderClass {
        name: "bench".into(),
        namespace: None,
        provider: "coffer".into(),
        parameters: [
            ("backend", "vault"),
            ("vaultAddress", bao.addr().as_str()),
            ("roleName", "app"),
            ("vaultAuthMountPath", "jwt"),
            (
                "objects",
                "- objectName: password\n  secretPath: secret/data/bench\n  secretKey: password\n",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    };
    let jwt = signer.token("shop", "web", "vault", 3600);
    let request = with_tokens(driver(Path::new("/bench")), &[("vault", &jwt)]).to_proto(&spc);

    let vault = vaultrs::client::VaultClient::new(
        vaultrs::client::VaultClientSettingsBuilder::default()
            .address(bao.addr())
            .token(common::bao::ROOT)
            .build()
            .unwrap(),
    )
    .unwrap();

    // Warm up both paths (coffer logs in once here).
    for _ in 0..50 {
        client.mount(request.clone()).await.unwrap();
        cached_client.mount(request.clone()).await.unwrap();
        let _: serde_json::Value = vaultrs::kv2::read(&vault, "secret", "bench").await.unwrap();
    }
    let mut through_coffer = Vec::with_capacity(ROUNDS);
    let mut through_cache = Vec::with_capacity(ROUNDS);
    let mut direct = Vec::with_capacity(ROUNDS);
    // Interleave so both see the same machine state.
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let resp = client.mount(request.clone()).await.unwrap().into_inner();
        through_coffer.push(t.elapsed());
        assert_eq!(resp.files[0].contents, b"bench-password-value");
        let t = Instant::now();
        let _: serde_json::Value = vaultrs::kv2::read(&vault, "secret", "bench").await.unwrap();
        direct.push(t.elapsed());
        let t = Instant::now();
        cached_client.mount(request.clone()).await.unwrap();
        through_cache.push(t.elapsed());
    }
    println!("Mount latency, 1 KV v2 object, warm Vault token, concurrency 1, {ROUNDS} rounds:");
    let a = summary("coffer Mount, cache off", through_coffer);
    let b = summary("direct vaultrs kv2::read", direct);
    summary("coffer Mount, warm cache", through_cache);
    println!(
        "coffer overhead at p50: {:.1?} ({:.2}x the direct read)",
        a.saturating_sub(b),
        a.as_secs_f64() / b.as_secs_f64()
    );
}
