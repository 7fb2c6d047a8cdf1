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
    /// Run the controller: turn ModelDeployments into running replica groups.
    Run(llmo_operator::reconcile::RunArgs),
    /// Preview what the operator would do with a manifest: precision, layout, memory per GPU,
    /// KV tokens, cost and (with --inventory) placement. Touches no cluster.
    Plan {
        /// Manifest files holding ModelDeployments (and optionally GPUClasses).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Files with GPUClass definitions, e.g. examples/gpuclasses.yaml.
        #[arg(long)]
        classes: Vec<PathBuf>,
        /// A YAML file of GPUNode objects (as `kubectl get gpunodes -o yaml` lists them).
        #[arg(long)]
        inventory: Option<PathBuf>,
        /// The model's Hugging Face config.json or GGUF file, read instead of the size hints.
        #[arg(long)]
        model_config: Option<PathBuf>,
    },
    /// Run the node agent: read this node's GPUs and keep its GPUNode status current.
    Agent(llmo_operator::inventory::AgentArgs),
    /// Replay a request trace against a simulated fleet under llmo's autoscaler and baselines.
    Simulate(llmo_operator::autoscale::sim::SimulateArgs),
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
        Command::Run(args) => run_controller(args),
        Command::Agent(args) => llmo_operator::inventory::main(args),
        Command::Simulate(args) => llmo_operator::autoscale::sim::main(args),
        Command::Plan {
            files,
            classes,
            inventory,
            model_config,
        } => run_plan(
            &files,
            &classes,
            inventory.as_deref(),
            model_config.as_deref(),
        ),
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

/// The files `-f` names: a directory stands for its `.yaml`, `.yml` and `.json` files, sorted,
/// as with `kubectl apply -f DIR`.
fn expand(files: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for path in files {
        if !path.is_dir() {
            out.push(path.clone());
            continue;
        }
        let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            })
            .collect();
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

fn run_validate(files: &[PathBuf]) -> ExitCode {
    let files = match expand(files) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for file in &files {
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

fn read_objects(files: &[PathBuf]) -> Result<Vec<api::Manifest>, String> {
    let mut out = Vec::new();
    for file in &expand(files)? {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        if file.extension().is_some_and(|e| e == "json") {
            continue;
        }
        for result in api::parse_manifests(&text) {
            out.push(result.map_err(|e| format!("{}: {e}", file.display()))?);
        }
    }
    Ok(out)
}

fn run_plan(
    files: &[PathBuf],
    classes: &[PathBuf],
    inventory: Option<&std::path::Path>,
    model_config: Option<&std::path::Path>,
) -> ExitCode {
    let fail = |message: String| {
        eprintln!("error: {message}");
        ExitCode::FAILURE
    };
    let objects = match read_objects(&[files, classes].concat()) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let nodes: Option<Vec<api::GPUNode>> = match inventory {
        None => None,
        Some(path) => match read_objects(&[path.to_path_buf()]) {
            Ok(objects) => Some(
                objects
                    .into_iter()
                    .filter_map(|m| match m {
                        api::Manifest::GpuNode(n) => Some(*n),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(e) => return fail(e),
        },
    };
    let model = match model_config
        .map(llmo_operator::preview::read_model_file)
        .transpose()
    {
        Ok(m) => m,
        Err(e) => return fail(format!("--model-config: {e}")),
    };
    let gpu_classes: Vec<api::GPUClass> = objects
        .iter()
        .filter_map(|m| match m {
            api::Manifest::GpuClass(c) => Some((**c).clone()),
            _ => None,
        })
        .collect();
    let mut failed = false;
    let mut any = false;
    for object in &objects {
        let api::Manifest::ModelDeployment(md) = object else {
            continue;
        };
        any = true;
        match llmo_operator::preview::preview(md, &gpu_classes, nodes.as_deref(), model.as_ref()) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}\n");
                failed = true;
            }
        }
    }
    if !any {
        return fail("no ModelDeployment in the given files".into());
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run_controller(args: llmo_operator::reconcile::RunArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only on a terminal, not in pod logs and files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("llmo-operator run: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(llmo_operator::reconcile::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmo-operator run: {e}");
            ExitCode::FAILURE
        }
    }
}
