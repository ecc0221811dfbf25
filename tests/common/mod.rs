//! Shared harness for end-to-end tests: starts the real `coffer serve` binary
//! on a socket in a temp dir, dials it over that socket, and cleans up by PID.
#![allow(dead_code)]

pub mod azure;
pub mod bao;
pub mod google;
pub mod moto;
pub mod proxy;
pub mod python;
pub mod sops;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coffer::client::{self, ProviderClient};
use coffer::manifest::{DriverRequest, Pod, SecretProviderClass};
use coffer::proto;
use coffer::secret::Credential;

pub const BIN: &str = env!("CARGO_BIN_EXE_coffer");

/// A running `coffer serve` with its own temp dir, killed on drop.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub secrets: PathBuf,
    pub log: PathBuf,
    pub health: Option<String>,
    pub child: Option<Child>,
    env: Vec<(String, String)>,
    rlimits: Vec<(nix::sys::resource::Resource, u64)>,
}

#[derive(Default)]
pub struct Options {
    pub extra_args: Vec<String>,
    pub health: bool,
    /// Extra environment of the daemon process.
    pub env: Vec<(String, String)>,
    /// Resource limits (soft = hard) set in the daemon process before exec.
    pub rlimits: Vec<(nix::sys::resource::Resource, u64)>,
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let secrets = dir.path().join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        let socket = dir.path().join("run/coffer.sock");
        let mut d = Daemon {
            log: dir.path().join("daemon.log"),
            socket,
            secrets,
            health: opts.health.then(|| format!("127.0.0.1:{}", free_port())),
            dir,
            child: None,
            env: opts.env.clone(),
            rlimits: opts.rlimits.clone(),
        };
        d.spawn(&opts.extra_args);
        d.wait_ready();
        d
    }

    pub fn args(&self, extra: &[String]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--file-backend-root".into(),
            self.secrets.display().to_string(),
            "--version-key-file".into(),
            self.dir.path().join("version.key").display().to_string(),
        ];
        if !extra.iter().any(|a| a == "--health-addr") {
            args.push("--health-addr".into());
            args.push(self.health.clone().unwrap_or_else(|| "off".into()));
        }
        args.extend(extra.iter().cloned());
        args
    }

    /// Spawns the binary with output appended to the log file.
    pub fn spawn(&mut self, extra: &[String]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(self.args(extra))
            .env("RUST_BACKTRACE", "0")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let limits = self.rlimits.clone();
        if !limits.is_empty() {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    for (resource, value) in &limits {
                        nix::sys::resource::setrlimit(*resource, *value, *value)
                            .map_err(std::io::Error::from)?;
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn coffer");
        self.child = Some(child);
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("coffer exited early with {status}: {}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("coffer did not listen in time: {}", self.logs());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// Resident memory of the daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status(self.pid(), "VmRSS:")
    }

    /// CPU time the daemon has used (user + system), in seconds.
    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(self.pid())
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit and returns its status. Async, so the
    /// test's own client connections keep being driven meanwhile.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("coffer did not exit within {within:?}: {}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn write_secret(&self, rel: &str, contents: impl AsRef<[u8]>) {
        let path = self.secrets.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    pub async fn client(&self) -> ProviderClient {
        client::connect(&self.socket)
            .await
            .expect("connect to coffer")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An SPC for the file backend with the given `objects` YAML.
pub fn spc(objects: &str) -> SecretProviderClass {
    SecretProviderClass {
        name: "test-spc".into(),
        namespace: Some("shop".into()),
        provider: "coffer".into(),
        parameters: BTreeMap::from([
            ("backend".to_string(), "file".to_string()),
            ("objects".to_string(), objects.to_string()),
        ]),
    }
}

pub fn driver(target: &Path) -> DriverRequest {
    DriverRequest {
        pod: Pod {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "0f6b7a0e-1111-4222-8333-444455556666".into(),
            service_account: "web".into(),
        },
        tokens: BTreeMap::new(),
        node_publish_secrets: None,
        volume_attributes: BTreeMap::new(),
        permission: 0o644,
        target_path: target.display().to_string(),
    }
}

pub fn request(objects: &str) -> proto::MountRequest {
    driver(Path::new(
        "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/v/mount",
    ))
    .to_proto(&spc(objects))
}

/// The Mount-path benchmarks' SPC: `bench/bench` with these parameters.
pub fn bench_spc(params: &[(&str, &str)]) -> SecretProviderClass {
    SecretProviderClass {
        name: "bench".into(),
        namespace: Some("bench".into()),
        provider: "coffer".into(),
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The Mount-path benchmarks' request of pod `n` (its own name, uid and
/// target path), with a nodePublishSecretRef `token` when given.
pub fn bench_request(
    spc: &SecretProviderClass,
    n: usize,
    token: Option<&str>,
) -> proto::MountRequest {
    DriverRequest {
        pod: Pod {
            namespace: "bench".into(),
            name: format!("pod-{n}"),
            uid: format!("uid-{n}"),
            service_account: "app".into(),
        },
        tokens: BTreeMap::new(),
        node_publish_secrets: token
            .map(|t| BTreeMap::from([("token".to_string(), Credential::new(t.to_string()))])),
        volume_attributes: BTreeMap::new(),
        permission: 0o644,
        target_path: format!("/var/lib/kubelet/pods/uid-{n}/volumes/v/mount"),
    }
    .to_proto(spc)
}

pub fn with_tokens(mut d: DriverRequest, tokens: &[(&str, &str)]) -> DriverRequest {
    d.tokens = tokens
        .iter()
        .map(|(a, t)| (a.to_string(), Credential::new(t.to_string())))
        .collect();
    d
}

/// Calls Mount and returns the status code and message on failure.
pub async fn mount_err(
    client: &mut ProviderClient,
    req: proto::MountRequest,
) -> (tonic::Code, String) {
    match client.mount(req).await {
        Ok(r) => panic!(
            "mount unexpectedly succeeded with {} files",
            r.into_inner().files.len()
        ),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

/// A plain HTTP/1.1 GET on loopback, returning the whole answer.
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// A number from the environment (benchmark knobs), or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `coffer serve` on a socket in `dir` with no health port and no audit
/// log, for tests of start-up itself; add the flags under test.
pub fn serve_command(dir: &Path, socket: &str, version_key: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--health-addr",
        "off",
        "--audit-log",
        "off",
        "--socket",
    ])
    .arg(dir.join(socket))
    .arg("--version-key-file")
    .arg(version_key)
    .env("RUST_BACKTRACE", "0");
    cmd
}

/// CPU time a process has used (user + system), in seconds.
pub fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parens.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// A driver request carrying a Vault token in nodePublishSecretRef.
pub fn with_vault_token(token: &str) -> DriverRequest {
    let mut d = driver(Path::new("/t"));
    d.node_publish_secrets = Some(BTreeMap::from([(
        "token".to_string(),
        Credential::new(token.to_string()),
    )]));
    d
}

/// A `/proc/<pid>/status` value in KiB (0 if unreadable).
pub fn proc_status(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// An HTTP/1.1 GET from a chosen loopback source address, with a timeout;
/// `None` if the connection was refused, closed or too slow.
pub async fn http_get_from(
    source: &str,
    addr: &str,
    path: &str,
    within: Duration,
) -> Option<String> {
    http_get_traced(source, addr, path, within).await.ok()
}

/// [`http_get_from`], saying which step failed and how.
/// Makes a socket about to be bound to `ADDR:0` take its source port at
/// connect time, unique for the 4-tuple. A port taken at bind time can be
/// one whose connection to the same server still sits in TIME_WAIT there,
/// and the new SYN is answered with a reset: a rare "Connection refused"
/// from a healthy server under a stream of probes.
pub fn late_source_port(socket: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid descriptor, and an int option given its own size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IP_BIND_ADDRESS_NO_PORT");
}

pub async fn http_get_traced(
    source: &str,
    addr: &str,
    path: &str,
    within: Duration,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        late_source_port(&socket);
        let from = format!("{source}:0").parse().map_err(|e| format!("{e}"))?;
        socket.bind(from).map_err(|e| format!("bind: {e}"))?;
        let to = addr.parse().map_err(|e| format!("{e}"))?;
        let mut s = socket
            .connect(to)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if out.is_empty() {
            return Err("closed without an answer".to_string());
        }
        Ok(out)
    };
    tokio::time::timeout(within, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {within:?}")))
}

/// The benchmarks' floor: a bare tonic server on a Unix socket answering
/// every Mount with `answer`, so what coffer adds can be told from what
/// gRPC itself costs.
pub async fn serve_fixed_answer(socket: &Path, answer: proto::MountResponse) {
    serve_fixed_answer_after(socket, answer, Duration::ZERO).await
}

/// [`serve_fixed_answer`], busy for `work` before each answer: what a fixed
/// amount of server work costs a caller's round trip on this host.
pub async fn serve_fixed_answer_after(socket: &Path, answer: proto::MountResponse, work: Duration) {
    struct Fixed(proto::MountResponse, Duration);
    #[tonic::async_trait]
    impl proto::csi_driver_provider_server::CsiDriverProvider for Fixed {
        async fn version(
            &self,
            _: tonic::Request<proto::VersionRequest>,
        ) -> Result<tonic::Response<proto::VersionResponse>, tonic::Status> {
            Ok(tonic::Response::new(proto::VersionResponse::default()))
        }
        async fn mount(
            &self,
            _: tonic::Request<proto::MountRequest>,
        ) -> Result<tonic::Response<proto::MountResponse>, tonic::Status> {
            if !self.1.is_zero() {
                let began = Instant::now();
                while began.elapsed() < self.1 {
                    std::hint::spin_loop();
                }
            }
            Ok(tonic::Response::new(self.0.clone()))
        }
    }
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tonic::transport::Server::builder()
        .add_service(
            proto::csi_driver_provider_server::CsiDriverProviderServer::new(Fixed(answer, work)),
        )
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .unwrap();
}

/// Closed-loop load for the benches: `callers` tasks share `clients` round
/// robin, each sending `reqs` in turn until `secs` pass. Returns Mounts per
/// second and the median latency.
pub async fn drive(
    clients: &[ProviderClient],
    reqs: &std::sync::Arc<Vec<proto::MountRequest>>,
    callers: usize,
    secs: f64,
) -> (f64, Duration) {
    let started = Instant::now();
    let stop = started + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..callers {
        let mut c = clients[t % clients.len()].clone();
        let reqs = std::sync::Arc::clone(reqs);
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut i = t;
            while Instant::now() < stop {
                let at = Instant::now();
                let r = c.mount(reqs[i % reqs.len()].clone()).await;
                assert!(r.is_ok(), "{r:?}");
                lat.push(at.elapsed());
                i += callers;
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    let took = started.elapsed().as_secs_f64();
    all.sort();
    (all.len() as f64 / took, all[all.len() / 2])
}

/// The median of a bench's repeated figures.
pub fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs `cmd` with `input` on its standard input and returns its output.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// `make(dir)` under an exclusive lock on `dir` (below the target
/// directory), so test binaries install a shared tool once.
pub fn locked<T>(name: &str, make: impl FnOnce(&Path) -> T) -> T {
    use nix::fcntl::{Flock, FlockArg};
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&base).unwrap();
    let lock_file = std::fs::File::create(base.join("lock")).unwrap();
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    make(&base)
}

/// A Mount's files by path.
pub fn files_of(r: &proto::MountResponse) -> BTreeMap<String, Vec<u8>> {
    r.files
        .iter()
        .map(|f| (f.path.clone(), f.contents.clone()))
        .collect()
}
