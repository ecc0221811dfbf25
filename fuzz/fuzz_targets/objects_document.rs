//! The `objects` YAML alone, wrapped in otherwise valid attributes so every
//! backend's object form is reached.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let doc = String::from_utf8_lossy(data);
    let _ = coffer::fuzzing::objects_document(&doc);
    let attributes = serde_json::json!({
        "csi.storage.k8s.io/pod.namespace": "ns",
        "csi.storage.k8s.io/serviceAccount.name": "sa",
        "csi.storage.k8s.io/serviceAccount.tokens":
            "{\"vault\": {\"token\": \"t\"}, \"p.svc.id.goog\": {\"token\": \"t\"}}",
        "objects": doc,
    })
    .to_string();
    let _ = coffer::fuzzing::mount_request(&attributes, "null", "420");
});
