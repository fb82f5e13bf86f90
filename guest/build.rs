//! Gives each image kind its linker script: ELF (vmlinux-like, with or without a PVH note) or a
//! flat bzImage with its setup header in front.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rustc-link-arg=-L{dir}/link");
    println!("cargo:rustc-link-arg-bin=vireo-guest-elf=-T{dir}/link/elf.ld");
    println!("cargo:rustc-link-arg-bin=vireo-guest-pvh=-T{dir}/link/elf.ld");
    println!("cargo:rustc-link-arg-bin=vireo-guest-bzimage=-T{dir}/link/bzimage.ld");
    println!("cargo:rustc-link-arg-bin=vireo-guest-bzimage=--oformat=binary");
    println!("cargo:rerun-if-changed=link");
}
