//! Fetched values through an object's `encoding`; the first byte picks it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((first, value)) = data.split_first() else {
        return;
    };
    let encoding = ["utf-8", "base64", "hex", "BASE64"][usize::from(first % 4)];
    let _ = coffer::fuzzing::decode(encoding, value);
});
