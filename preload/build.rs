//! Link settings of the preload library: its SONAME, and -Bsymbolic so that the library's own
//! references (the rsocket calls it is built on) bind to its own definitions, never to
//! librdmacm's same-named ones.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,librspreload-rs.so");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
    println!("cargo:rerun-if-changed=build.rs");
}
