//! Secret Manager payloads through extractJSONKey / extractYAMLKey; the
//! first byte picks the format and the second the key.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let key = ["a", "user", "objectName", ""][usize::from(data[1] % 4)];
    let _ = coffer::fuzzing::extract_key(&data[2..], key, data[0] % 2 == 0);
});
