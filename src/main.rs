//! The `cport` binary: subcommands over the cport library.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
