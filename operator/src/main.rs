use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use llmo_operator::{api, crdgen};

/// llmo: deploy large language models across a GPU fleet.
#[derive(Parser, Debug)]
#[command(name = "llmo-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the CustomResourceDefinitions generated from the API types.
    Crdgen {
        /// Directory to write `<plural>.llmo.dev.yaml` files into.
        #[arg(long, default_value = "crds")]
        dir: PathBuf,
        /// Print every CRD to standard output instead of writing files.
        #[arg(long, conflicts_with = "check")]
        stdout: bool,
        /// Fail when the files in --dir differ from the generated ones.
        #[arg(long)]
        check: bool,
    },
    /// Check llmo manifests offline: schema shape and every validation rule.
    Validate {
        /// Manifest files (multi-document YAML); `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen { dir, stdout, check } => run_crdgen(&dir, stdout, check),
        Command::Validate { files } => run_validate(&files),
    }
}

fn run_crdgen(dir: &std::path::Path, stdout: bool, check: bool) -> ExitCode {
    if stdout {
        for (i, (_, yaml)) in crdgen::render().into_iter().enumerate() {
            if i > 0 {
                println!("---");
            }
            print!("{yaml}");
        }
        return ExitCode::SUCCESS;
    }
    let result = if check {
        crdgen::check(dir).map(|()| println!("CRDs in {} are up to date", dir.display()))
    } else {
        crdgen::write_all(dir).map(|written| {
            for (path, size) in written {
                println!("wrote {} ({size} bytes)", path.display());
            }
        })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_validate(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        let text = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(file)
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                failed = true;
                continue;
            }
        };
        for result in api::parse_manifests(&text) {
            match result {
                Ok(m) => println!("{}: {} is valid", file.display(), m.describe()),
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    failed = true;
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
