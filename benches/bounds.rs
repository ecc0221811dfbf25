//! Release figures for the parsing bounds: every worst shape of
//! `coffer::fuzzing::worst_shapes` (and request JSON shapes) through the
//! Mount validation path, timed (best of 5) with peak allocation counted.
//! Fails if any input under 1 MiB takes more than 100 ms or 64 MiB.
//!
//! `cargo bench --bench bounds`

use std::time::Duration;

use coffer::fuzzing::{self, fill, worst_shapes};

#[path = "../tests/common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::measure;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

fn attributes(objects: &str) -> String {
    serde_json::json!({
        "csi.storage.k8s.io/pod.namespace": "ns",
        "csi.storage.k8s.io/serviceAccount.name": "sa",
        "objects": objects,
    })
    .to_string()
}

fn main() {
    let mut cases: Vec<(String, String)> = worst_shapes()
        .into_iter()
        .map(|(label, doc)| (label.to_string(), attributes(&doc)))
        .collect();
    cases.push(("deep attributes JSON".into(), fill("[", (1 << 20) - 1)));
    let wide: Vec<String> = (0..40_000).map(|i| format!("\"k{i}\":\"v\"")).collect();
    cases.push((
        "40,000 attributes".into(),
        format!("{{{}}}", wide.join(",")),
    ));
    let mut worst = (Duration::ZERO, 0usize);
    let mut failed = false;
    println!(
        "{:44} {:>9} {:>10} {:>10}",
        "input", "bytes", "time", "peak KiB"
    );
    for (label, attrs) in &cases {
        let mut best = Duration::MAX;
        let mut peak = 0;
        for _ in 0..5 {
            let (_, took, bytes) =
                measure(|| std::hint::black_box(fuzzing::mount_request(attrs, "null", "420")));
            best = best.min(took);
            peak = peak.max(bytes);
        }
        println!(
            "{label:44} {:>9} {best:>10.2?} {:>10}",
            attrs.len(),
            peak / 1024
        );
        worst = (worst.0.max(best), worst.1.max(peak));
        if best > Duration::from_millis(100) || peak > 64 << 20 {
            failed = true;
        }
    }
    // Templates of `files` that cost the most, reading a 1,000-byte value.
    let value = "x".repeat(1000);
    for (label, doc) in fuzzing::template_bombs() {
        let mut best = Duration::MAX;
        let mut peak = 0;
        for _ in 0..5 {
            let (_, took, bytes) =
                measure(|| std::hint::black_box(fuzzing::files_document(&doc, value.as_bytes())));
            best = best.min(took);
            peak = peak.max(bytes);
        }
        println!(
            "{:44} {:>9} {best:>10.2?} {:>10}",
            format!("template: {label}"),
            doc.len(),
            peak / 1024
        );
        worst = (worst.0.max(best), worst.1.max(peak));
        if best > Duration::from_millis(100) || peak > 64 << 20 {
            failed = true;
        }
    }
    println!(
        "worst: {:.2?} and {} KiB peak (bounds: 100 ms, 65536 KiB)",
        worst.0,
        worst.1 / 1024
    );
    if failed {
        std::process::exit(1);
    }
}
