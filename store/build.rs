//! `sqlx::migrate!` embeds the migrations when the crate compiles: a new or changed migration
//! must recompile it, or the binaries would run without it.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
