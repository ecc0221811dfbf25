//! Output paths, one per line, through the path rules and set checks.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let list: Vec<&str> = text.lines().collect();
    let _ = coffer::fuzzing::paths(&list);
});
