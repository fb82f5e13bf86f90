//! Small pieces shared by vireo's crates.

pub mod files;
pub mod ratelimit;
pub mod seccomp;
pub mod unix_socket;

/// The inputs of cargo-fuzz target `target` kept in the repository (`fuzz/corpus/<target>`),
/// for replaying them under `cargo test`. Panics if there are none: a replay of nothing would
/// pass without testing anything.
#[doc(hidden)]
pub fn fuzz_corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz corpus {}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("corpus entry").path();
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, std::fs::read(&p).expect("corpus file"))
        })
        .collect();
    assert!(!out.is_empty(), "fuzz corpus {} is empty", dir.display());
    out.sort();
    out
}
