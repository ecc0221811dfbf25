//! What a node policy costs a warm Mount: the same Mount (file backend, two
//! small kept files) against a daemon without a policy and one with 200
//! rules where only the last matches (every rule is tried), at 1 and 8
//! callers, runs alternating; medians printed.
//!
//! cargo bench --bench policy
//! Knobs (env): PB_SECONDS (2), PB_RUNS (3), PB_RULES (200), PB_AA (1 =
//! both daemons without a policy: the noise between two daemons).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::Duration;

use common::{drive, env_num, median, Daemon, Options};

fn policy(rules: usize) -> String {
    let mut p = String::from("default: deny\nrules:\n");
    for i in 0..rules - 1 {
        p += &format!(
            "  - name: team-{i}\n    when: {{namespaces: [\"team-{i}-*\"], serviceAccounts: [app]}}\n    objects: {{backends: [vault], paths: [\"secret/data/team-{i}/*\"]}}\n    action: allow\n"
        );
    }
    p += "  - name: shop-files\n    when: {namespaces: [shop]}\n    objects: {backends: [file], paths: [\"*\"]}\n    action: allow\n";
    p
}

fn main() {
    let secs = env_num("PB_SECONDS", 2) as f64;
    let runs = env_num("PB_RUNS", 3) as usize;
    let rules = env_num("PB_RULES", 200).max(1) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, policy(rules)).unwrap();
        let plain = Daemon::start_with(Options::default());
        let aa = env_num("PB_AA", 0) == 1;
        let judged = Daemon::start_with(Options {
            extra_args: if aa {
                Vec::new()
            } else {
                vec!["--policy".into(), file.display().to_string()]
            },
            ..Default::default()
        });
        for d in [&plain, &judged] {
            d.write_secret("db/password", "s3cret");
            d.write_secret("api-token", "tok");
        }
        std::thread::sleep(coffer::nodefs::SETTLE + Duration::from_millis(300));
        let req = std::sync::Arc::new(vec![common::request(
            "- objectName: db/password\n- objectName: api-token\n",
        )]);
        let (pc, jc) = (plain.client().await, judged.client().await);
        jc.clone().mount(req[0].clone()).await.expect("the policy allows it");
        println!("file backend, 2 kept files; policy of {rules} rules, the last one matching; {secs} s x {runs} runs, medians");
        println!("callers  plain/s  policy/s  plain p50  policy p50  p50 +%   CPU µs/Mount plain → policy");
        for callers in [1usize, 8] {
            let (mut pr, mut jr, mut pl, mut jl) = (vec![], vec![], vec![], vec![]);
            let (mut pc_us, mut jc_us) = (vec![], vec![]);
            for run in 0..runs {
                // Alternate which daemon goes first: the second of a pair
                // measured consistently slower even when both were alike.
                for judged_turn in [run % 2 == 1, run % 2 == 0] {
                    let (d, c) = if judged_turn { (&judged, &jc) } else { (&plain, &pc) };
                    let cpu = d.cpu_secs();
                    let (r, l) = drive(std::slice::from_ref(c), &req, callers, secs).await;
                    let us = (d.cpu_secs() - cpu) / (r * secs) * 1e6;
                    if judged_turn {
                        jc_us.push(us);
                        jr.push(r);
                        jl.push(l);
                    } else {
                        pc_us.push(us);
                        pr.push(r);
                        pl.push(l);
                    }
                }
            }
            let (p50p, p50j) = (median(pl), median(jl));
            println!(
                "{callers:>7} {:>8.0} {:>9.0} {:>10.1?} {:>11.1?} {:>+7.1}   {:>6.1} → {:.1}",
                median(pr),
                median(jr),
                p50p,
                p50j,
                (p50j.as_secs_f64() / p50p.as_secs_f64() - 1.0) * 100.0,
                median(pc_us),
                median(jc_us)
            );
        }
    });
}
