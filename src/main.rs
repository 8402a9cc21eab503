//! The `mtasts` binary: all logic lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    mtasts::cli::main()
}
