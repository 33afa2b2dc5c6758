/// jemalloc rather than glibc's malloc: under 64 concurrent writers glibc's malloc, free and
/// `malloc_consolidate` were about a third of the leader's CPU samples, spread over every path
/// (hyper's buffers, JSON, openraft's entries, redb's pages). With jemalloc the leader spends
/// 14 % less CPU per write and 17 % less per linearizable read (A/B runs in docs/BENCHMARKS.md),
/// and `bench scale` ends within its run-to-run variation of resident memory.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    citadel::cli::main()
}
