/// mimalloc instead of glibc malloc: under 64 writers glibc's malloc and free (arena locks,
/// `malloc_consolidate`) were a fifth of the leader's CPU samples; see docs/BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    citadel::cli::main()
}
