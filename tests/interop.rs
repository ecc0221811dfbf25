//! Wire compatibility with a gRPC implementation that is not ours: Python's
//! grpcio compiles `proto/provider.proto` itself and drives the real daemon
//! over its Unix socket, the way the driver (grpc-go) does.

mod common;

use std::process::Command;

use common::*;

const CLIENT: &str = r#"
import json, subprocess, sys, os, tempfile
out = tempfile.mkdtemp()
proto_dir = sys.argv[1]
from grpc_tools import protoc
rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}", os.path.join(proto_dir, "provider.proto")])
assert rc == 0, rc
sys.path.insert(0, out)
import grpc, provider_pb2 as pb, provider_pb2_grpc as rpc
sock, attributes = sys.argv[2], sys.argv[3]
ch = grpc.insecure_channel("unix://" + sock, options=[("grpc.default_authority", "localhost")])
stub = rpc.CSIDriverProviderStub(ch)
result = {}
v = stub.Version(pb.VersionRequest(version="v1alpha1"), timeout=10)
result["version"] = [v.version, v.runtime_name, v.runtime_version]
r = stub.Mount(pb.MountRequest(attributes=attributes, secrets="null", target_path="/t", permission="420"), timeout=10)
result["files"] = [[f.path, f.mode, f.contents.decode()] for f in r.files]
result["versions"] = [[o.id, o.version] for o in r.object_version]
result["error"] = r.error.code if r.HasField("error") else None
try:
    stub.Mount(pb.MountRequest(attributes="{bad", secrets="null", target_path="/t", permission="420"), timeout=10)
    result["bad"] = None
except grpc.RpcError as e:
    result["bad"] = [e.code().name, e.details()]
print(json.dumps(result))
"#;

#[tokio::test]
async fn python_grpcio_client_speaks_to_coffer() {
    let venv = common::python::venv(&["grpcio-tools==1.85.1", "grpcio==1.85.3"]);
    let d = Daemon::start();
    d.write_secret("db/pass", "py-value");
    let req = request(
        "- objectName: db/pass\n  filePermission: 0640\n- objectName: copy\n  path: db/pass",
    );
    let out = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(CLIENT)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/proto"))
        .arg(&d.socket)
        .arg(&req.attributes)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        result["version"],
        serde_json::json!(["v1alpha1", "coffer", env!("CARGO_PKG_VERSION")])
    );
    assert_eq!(
        result["files"],
        serde_json::json!([["db/pass", 0o640, "py-value"], ["copy", 420, "py-value"]])
    );
    assert_eq!(result["versions"][0][0], "db/pass");
    assert_eq!(result["versions"][1][0], "copy");
    assert_eq!(result["error"], serde_json::Value::Null);
    assert_eq!(result["bad"][0], "INVALID_ARGUMENT");
    assert!(result["bad"][1]
        .as_str()
        .unwrap()
        .contains("attributes is not valid JSON"));
}
