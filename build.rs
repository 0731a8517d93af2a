//! Link libtorch so that the binary, the tests and the benches run without LD_LIBRARY_PATH.
//!
//! torch-sys tells dependents where libtorch lives (`DEP_TCH_LIBTORCH_LIB`). Without an rpath the
//! binary fails with "libtorch_cpu.so: cannot open shared object file", and without
//! `--no-as-needed` the linker drops libtorch_cuda, so CUDA is never found on a GPU machine
//! (tch-rs issues 907, 980, 177, 787).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
