//! The checked-in header is what cbindgen writes from the library's source today: a change to the
//! API without `tools/header.sh` fails here (and in CI).

use std::path::Path;

#[test]
fn checked_in_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen reads src/lib.rs")
        .write(&mut generated);
    let path = dir.join("include/loupe.h");
    if std::env::var_os("LOUPE_WRITE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write include/loupe.h");
        return;
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is stale: run tools/header.sh and commit it",
        path.display()
    );
}
