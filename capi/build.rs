//! Link settings of the cdylib: SONAME and -Bsymbolic.
//!
//! librdmacm exports the same r* names: -Bsymbolic binds our internal references to our own
//! definitions even when librdmacm is loaded first.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,librsocket-rs.so.0");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
    println!("cargo:rerun-if-changed=build.rs");
}
