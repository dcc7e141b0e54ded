//! `scripts/setup.sh --check` verifies what it relies on and, when a piece is
//! missing, fails with one clear line naming it (here: libclang where bindgen
//! would look, and cmake on a PATH without it).

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

fn setup_check(env: &[(&str, &str)]) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("scripts/setup.sh")).arg("--check");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run setup.sh");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn everything_is_present_after_setup() {
    let (ok, err) = setup_check(&[]);
    assert!(ok, "setup.sh --check failed on the machine the suite runs on:\n{err}");
    assert!(err.contains("libclang.so") || err.contains("libclang-"), "{err}");
}

#[test]
fn libclang_missing_where_bindgen_looks_is_named_in_one_line() {
    let empty = tempfile::tempdir().unwrap();
    // libclang-cpp is not the library bindgen loads: it must not count.
    std::fs::write(empty.path().join("libclang-cpp.so.14"), b"").unwrap();
    let (ok, err) = setup_check(&[("LIBCLANG_PATH", empty.path().to_str().unwrap())]);
    assert!(!ok, "setup.sh --check passed without libclang.so:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("libclang.so") && lines[0].contains("libclang-dev"), "{err}");
}

#[test]
fn a_path_without_cmake_is_named_in_one_line() {
    // A PATH holding every tool the check needs except cmake.
    let bin = tempfile::tempdir().unwrap();
    let keep = [
        "bash",
        "cargo",
        "c++",
        "cc",
        "unzip",
        "promtool",
        "python3",
        "sha256sum",
        "head",
        "cat",
        "cut",
        "printf",
        "dirname",
        "sed",
    ];
    for tool in keep {
        // python3 may be a shim script: link the interpreter itself.
        let which = if tool == "python3" {
            "python3 -c 'import sys; print(sys.executable)'".to_string()
        } else {
            format!("command -v {tool}")
        };
        let found = Command::new("bash").args(["-c", &which]).output().unwrap();
        let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
        if !path.is_empty() {
            symlink(&path, bin.path().join(tool)).unwrap();
        }
    }
    let (ok, err) = setup_check(&[("PATH", bin.path().to_str().unwrap())]);
    assert!(!ok, "setup.sh --check passed without cmake:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("missing: cmake (package cmake)"), "{err}");
}
