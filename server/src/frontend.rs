//! Where the official ComfyUI frontend is served from: `--front-end-root DIR`, else the `static`
//! folder of the `comfyui-frontend-package` that `pip install comfyui-frontend-package` put
//! where the Python on the PATH imports it from, as ComfyUI itself finds it.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Asks Python where the frontend package's files are (ComfyUI's `importlib.resources` lookup).
const FIND_PACKAGE: &str =
    "import importlib.resources as r, comfyui_frontend_package as p; print(r.files(p) / 'static')";

/// The web root to serve: the flag's directory, else an installed frontend package, else none.
pub fn front_end_root(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| {
        let root = ["python3", "python"]
            .into_iter()
            .find_map(|python| installed_frontend(&mut Command::new(python)))?;
        tracing::info!("Serving the ComfyUI frontend installed at {}", root.display());
        Some(root)
    })
}

/// The frontend package's `static` folder as `python` (a command ready to take `-c`) finds it;
/// `None` when Python or the package is missing, or the folder has no `index.html`.
pub fn installed_frontend(python: &mut Command) -> Option<PathBuf> {
    let output = python
        .args(["-c", FIND_PACKAGE])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let root = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    root.join("index.html").is_file().then_some(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A package laid out as the wheel lays it out is found through the Python path; a missing
    /// one is not.
    #[test]
    fn an_installed_frontend_package_is_found() {
        let site_packages = tempfile::tempdir().expect("temporary directory");
        let package = site_packages.path().join("comfyui_frontend_package");
        let python = |path: &std::path::Path| {
            let mut command = Command::new("python3");
            command.env("PYTHONPATH", path).env("PYTHONNOUSERSITE", "1");
            command
        };
        assert_eq!(installed_frontend(&mut python(site_packages.path())), None);
        std::fs::create_dir_all(package.join("static")).expect("package folder");
        std::fs::write(package.join("__init__.py"), "").expect("package module");
        std::fs::write(package.join("static").join("index.html"), "<html></html>").expect("index");
        let found = installed_frontend(&mut python(site_packages.path())).expect("found");
        assert_eq!(found.canonicalize().ok(), package.join("static").canonicalize().ok());
    }
}
