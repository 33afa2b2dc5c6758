fn main() -> std::process::ExitCode {
    citadel::cli::main()
}
