//! The `stoke` binary.

#[cfg(not(feature = "system-alloc"))]
use mimalloc::MiMalloc;

// pingora allocates per request; mimalloc is measurably faster than glibc
// malloc on that path (../shared/PINGORA-NOTES.md).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> std::process::ExitCode {
    stoke_router::cli::main()
}
