//! include/rsocket.h must equal a fresh cbindgen generation (set RSOCKET_BLESS=1 to rewrite it).

use std::path::Path;

#[test]
fn checked_in_header_matches_generation() {
    let crate_dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(Path::new(crate_dir).join("cbindgen.toml"))
        .expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = Path::new(crate_dir).join("../include/rsocket.h");
    if std::env::var_os("RSOCKET_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write include/rsocket.h");
        return;
    }
    let current = std::fs::read(&path).unwrap_or_default();
    assert!(
        current == fresh,
        "include/rsocket.h differs from a fresh generation: run `make header` and commit it"
    );
}
