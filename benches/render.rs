//! The render stage's cost: a Mount of 5 objects with 20 files built from
//! them (templates and every format), next to the same Mount without the
//! files, against the real daemon (file backend, its kept-files cache warm)
//! at 1 and 8 concurrent callers. Runs alternate; medians are printed.
//!
//! cargo bench --bench render
//! Knobs (env): RB_SECONDS (2), RB_RUNS (3).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{drive, env_num, median, Daemon, Options};

const OBJECTS: &str = "\
- objectName: db
  path: db.json
- objectName: cache
  path: cache.json
- objectName: api
  path: api.json
- objectName: token
- objectName: cert
";

fn files() -> String {
    let mut f = String::new();
    for i in 0..4 {
        f += &format!(
            "- path: out/pgpass{i}\n  template: \"{{{{ db.host }}}}:{{{{ db.port }}}}:*:{{{{ db.username }}}}:{{{{ db.password }}}}\\n\"\n\
             - path: out/url{i}\n  template: \"redis://:{{{{ cache.password|urlencode }}}}@{{{{ cache.host }}}}:6379/{i}\"\n\
             - path: out/app{i}.env\n  format: env\n  from: {{DB_USER: db.username, DB_PASS: db.password, TOKEN: token}}\n\
             - path: out/api{i}.json\n  format: json\n  fromObject: api\n\
             - path: out/cfg{i}.properties\n  format: properties\n  from: {{db.password: db.password, api.key: api.key}}\n"
        );
    }
    f
}

fn main() {
    let secs = env_num("RB_SECONDS", 2) as f64;
    let runs = env_num("RB_RUNS", 3) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let d = Daemon::start_with(Options::default());
        d.write_secret(
            "db.json",
            r#"{"host":"db.internal","port":5432,"username":"app","password":"s3cr:et\\pw"}"#,
        );
        d.write_secret("cache.json", r#"{"host":"redis","password":"p@ss/word"}"#);
        d.write_secret("api.json", r#"{"key":"k-123","secret":"s-456","region":"eu"}"#);
        d.write_secret("token", "tok-abcdef");
        d.write_secret(
            "cert",
            "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n",
        );
        // Settled files are kept and re-checked with one statx per Mount.
        std::thread::sleep(coffer::nodefs::SETTLE + Duration::from_millis(300));
        let plain = common::spc(OBJECTS);
        let mut templated = plain.clone();
        templated.parameters.insert("files".into(), files());
        let target = std::path::Path::new("/var/lib/kubelet/pods/p/volumes/v/mount");
        let plain_req = Arc::new(vec![common::driver(target).to_proto(&plain)]);
        let templated_req = Arc::new(vec![common::driver(target).to_proto(&templated)]);
        let c = d.client().await;
        let check = c.clone().mount(templated_req[0].clone()).await.unwrap().into_inner();
        assert_eq!(check.files.len(), 25);
        println!(
            "file backend, 5 objects; templated: the same + 20 files (8 templates, 12 env/json/properties); {secs} s x {runs} runs, medians"
        );
        println!("callers  plain/s  templated/s  ratio  plain p50  templated p50");
        for callers in [1usize, 8] {
            let (mut pr, mut tr, mut pl, mut tl) = (vec![], vec![], vec![], vec![]);
            for _ in 0..runs {
                let (r, l) = drive(std::slice::from_ref(&c), &plain_req, callers, secs).await;
                pr.push(r);
                pl.push(l);
                let (r, l) = drive(std::slice::from_ref(&c), &templated_req, callers, secs).await;
                tr.push(r);
                tl.push(l);
            }
            let (p, t) = (median(pr), median(tr));
            println!(
                "{callers:>7} {p:>8.0} {t:>12.0} {:>6.2} {:>10.1?} {:>14.1?}",
                t / p,
                median(pl),
                median(tl)
            );
        }
        println!("daemon CPU over the whole run: {:.2} s", d.cpu_secs());
    });
}
