//! Generates the ctest suite: upstream's <rdma/rsocket.h> then our include/rsocket.h in one C
//! translation unit (the C compiler rejects any prototype that differs), checked against the
//! Rust declarations in src/lib.rs (ctest compares constants' values and call addresses).
fn main() {
    let mut cfg = ctest::TestGenerator::new();
    cfg.header("rdma/rsocket.h")
        .header("rsocket.h")
        .include(concat!(env!("CARGO_MANIFEST_DIR"), "/../../include"))
        // glibc names the field __fds_bits; its size and alignment are still checked.
        .skip_struct_field(|s, f| s.ident() == "fd_set" && f.ident() == "fds_bits")
        // fd_set is a typedef, not a struct tag.
        .rename_struct_ty(|ty| (ty == "fd_set").then(|| "fd_set".to_string()));
    ctest::generate_test(&mut cfg, "src/lib.rs", "all.rs").expect("ctest generation");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=../../include/rsocket.h");
}
