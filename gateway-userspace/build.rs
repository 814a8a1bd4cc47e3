//! Embeds the XDP object that `cargo xtask build` produced.
//!
//! `GATEWAY_EBPF_OBJECT` names the object. When it is unset, an empty object is embedded
//! and `gateway serve --xdp-iface` explains how to build one. When it is set, the object
//! must be newer than every source file of the XDP program and the shared types: an older
//! one would embed a program that does not match the code, so the build fails instead.
use std::{
    env, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

const OBJECT_ENV: &str = "GATEWAY_EBPF_OBJECT";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let embedded = out.join("gateway.bpf.o");
    println!("cargo:rerun-if-env-changed={OBJECT_ENV}");

    let Some(object) = env::var_os(OBJECT_ENV).map(PathBuf::from) else {
        fs::write(&embedded, []).expect("OUT_DIR is writable");
        return;
    };
    println!("cargo:rerun-if-changed={}", object.display());

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let workspace = manifest
        .parent()
        .expect("the crate sits inside the workspace");
    let sources = [
        workspace.join("gateway-ebpf/src"),
        workspace.join("gateway-ebpf/Cargo.toml"),
        workspace.join("gateway-common/src"),
    ];
    let built = modified(&object).unwrap_or_else(|| {
        panic!(
            "{OBJECT_ENV}={} cannot be read; build it with `cargo xtask build`",
            object.display()
        )
    });
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
        if let Some(newest) = newest(source)
            && newest > built
        {
            panic!(
                "the XDP object {} is older than {}: rebuild it with `cargo xtask build`",
                object.display(),
                source.display()
            );
        }
    }
    fs::copy(&object, &embedded).expect("copy the XDP object into OUT_DIR");
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn newest(path: &Path) -> Option<SystemTime> {
    let meta = fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| newest(&entry.path()))
        .max()
}
