//! AWS secrets through jmesPath expressions: the first byte says where the
//! expression ends and the secret begins.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(rest.len());
    let (expr, value) = rest.split_at(at);
    if let Ok(expr) = std::str::from_utf8(expr) {
        let _ = coffer::fuzzing::jmes_path(value, expr);
    }
});
