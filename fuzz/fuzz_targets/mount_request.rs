//! A whole MountRequest up to the first fetch. The input is split at NUL
//! bytes into attributes, secrets and permission.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let attributes = parts.next().unwrap_or("");
    let secrets = parts.next().unwrap_or("null");
    let permission = parts.next().unwrap_or("420");
    let _ = coffer::fuzzing::mount_request(attributes, secrets, permission);
});
