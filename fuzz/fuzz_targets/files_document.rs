//! A `files` document (templates and formats) and the value its objects
//! hold, parsed, checked and rendered as a Mount does after its fetches.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let doc = String::from_utf8_lossy(&data[..split]);
    let value = data.get(split + 1..).unwrap_or_default();
    let _ = coffer::fuzzing::files_document(&doc, value);
});
