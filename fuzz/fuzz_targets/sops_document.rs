//! SOPS documents through the `sops` backend's reader and decryption: the
//! first byte picks the format.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&format, rest)) = data.split_first() else {
        return;
    };
    let _ = coffer::fuzzing::sops_document(rest, format);
});
