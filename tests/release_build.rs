//! A normal (release) build of the binary does not contain the test hooks:
//! the `fault-injection` feature of modelpool-actors is enabled only through
//! the dev-dependencies that test builds use.

use std::process::Command;

fn features_of_actors(edges: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "--offline", "-p", "modelpool", "-e", edges, "-i", "modelpool-actors", "--prefix", "none"])
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_binary_is_built_without_fault_injection() {
    let normal = features_of_actors("normal,features");
    assert!(normal.contains("modelpool-actors"), "{normal}");
    assert!(!normal.contains("fault-injection"), "a normal build enables the fault hooks:\n{normal}");
    // The check can fail: the test build does enable them.
    let dev = features_of_actors("normal,dev,features");
    assert!(dev.contains("fault-injection"), "{dev}");
}
