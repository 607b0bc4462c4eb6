//! Link-time layout of the `outrigger` binary.
//!
//! `link/hot-text.txt` (written by `scripts/hot-text.sh`) lists the functions a sidecar
//! runs at start-up and on the mesh path. lld places them first in `.text`, so the
//! code a sidecar uses sits in a few contiguous pages instead of being spread over the
//! whole binary. That matters for RSS: the kernel maps code around each touched page in
//! 64 KiB windows, so scattered hot code kept most of the 6 MB `.text` resident. The
//! ordering changes no behaviour; names that no longer exist are skipped.
//!
//! Only for x86_64 Linux GNU, where rustc links with lld by default (Rust ≥ 1.90); GNU
//! ld has no such option. `OUTRIGGER_TEXT_ORDER=0` turns it off (for a comparison).

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link/hot-text.txt");
    println!("cargo:rerun-if-env-changed=OUTRIGGER_TEXT_ORDER");

    let target = std::env::var("TARGET").unwrap_or_default();
    let enabled = !matches!(std::env::var("OUTRIGGER_TEXT_ORDER").as_deref(), Ok("0"));
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let order = Path::new(&manifest).join("link/hot-text.txt");
    if !enabled || target != "x86_64-unknown-linux-gnu" || !order.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=outrigger=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // The list comes from one build; symbols renamed since then are expected.
    println!("cargo:rustc-link-arg-bin=outrigger=-Wl,--no-warn-symbol-ordering");
}
