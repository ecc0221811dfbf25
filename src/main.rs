use std::process::ExitCode;

use clap::{Parser, Subcommand};

use coffer::cli::{check, demo, mount, sops};
use coffer::config::{LogArgs, LogFormat, ServeArgs};
use coffer::logging;

/// mimalloc, not glibc's malloc: a Mount allocates and frees a few dozen
/// small blocks on whichever Mount thread serves it. Measured back to back
/// on the Mount-path bench at 64 callers: daemon CPU per Mount 14.6–16.2 µs
/// against 16.6–21.0 with glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs before Rust's runtime allocates (mimalloc reserves its first arena
/// on first use). mimalloc's defaults suit a large heap: committed up front,
/// freed pages were not handed back (the heap under the 64-caller load held
/// 15 MiB, not 4); a first reservation of 1 GiB is most of the address
/// space `tests/hardening.rs` gives its constrained daemons (two of them
/// once failed to come up with it); freed memory kept for 100 ms left 48 MiB
/// resident after a lying Vault's oversized answers (17 with glibc, 20 with
/// these settings).
#[used]
#[link_section = ".init_array"]
static ALLOCATOR_OPTIONS: extern "C" fn() = allocator_options;

extern "C" fn allocator_options() {
    // Positions in mimalloc's option enum (v2 and v3 keep retired options'
    // slots); libmimalloc-sys does not name these.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const ARENA_RESERVE: libmimalloc_sys::mi_option_t = 23;
    // SAFETY: sets options; nothing has been allocated yet.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
        // In KiB.
        libmimalloc_sys::mi_option_set(ARENA_RESERVE, 16 * 1024);
    }
}

/// coffer: a Secrets Store CSI Driver provider.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Built once at start-up; the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the provider daemon on its Unix socket.
    Serve(ServeArgs),
    /// Act as the driver: mount an SPC through a running daemon into a directory.
    Mount(mount::MountArgs),
    /// Start a daemon with example secrets, mount, rotate, and show the result.
    Demo(demo::DemoArgs),
    /// Validate SecretProviderClass manifests as Mount would, fetching nothing.
    Check(check::CheckArgs),
    /// Keys for the `sops` backend (age identities per namespace).
    #[command(subcommand)]
    Sops(sops::SopsCommand),
    /// Encrypt a value or a YAML/JSON/dotenv document into a SOPS document
    /// for an SPC's `sops` object.
    Seal(sops::SealArgs),
}

fn runtime(workers: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // File reads and large parses run on blocking threads; a bound keeps a
    // flood from costing a thread (and its stack) each.
    builder.max_blocking_threads(32);
    if let Some(n) = workers {
        builder.worker_threads(usize::from(n));
    }
    builder.enable_all().build()
}

/// Charts render unset values as empty strings: an empty `COFFER_*` or
/// `VAULT_*` variable means "not set", not "set to nothing" (an empty
/// COFFER_GCP_PROJECT made the audience `.svc.id.goog`). Runs before any
/// thread exists.
fn drop_empty_settings() {
    let empty: Vec<std::ffi::OsString> = std::env::vars_os()
        .filter(|(k, v)| {
            v.is_empty()
                && k.to_str()
                    .is_some_and(|k| k.starts_with("COFFER_") || k.starts_with("VAULT_"))
        })
        .map(|(k, _)| k)
        .collect();
    for k in empty {
        // SAFETY (edition 2021: safe): single-threaded here.
        std::env::remove_var(k);
    }
}

fn main() -> ExitCode {
    drop_empty_settings();
    let cli = Cli::parse();
    let workers = match &cli.command {
        Command::Serve(_) => {
            coffer::work::tune_allocator();
            // Mounts are served on threads of their own (`server::shard`,
            // sized by --worker-threads); this runtime accepts connections
            // and runs the health port and housekeeping.
            Some(1)
        }
        _ => None,
    };
    let rt = match runtime(workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coffer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => {
            if let Err(e) = logging::init(&args.log) {
                eprintln!("coffer: {e}");
                return ExitCode::from(2);
            }
            logging::harden_process();
            rt.block_on(async {
                // Register the handlers before binding, so a SIGTERM that
                // arrives during start-up still drains instead of killing.
                let shutdown = match shutdown_signal() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot install signal handlers");
                        return ExitCode::FAILURE;
                    }
                };
                match coffer::server::serve(&args, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "coffer failed");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Mount(args) => {
            let _ = logging::init(&quiet_logs());
            match rt.block_on(mount::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("coffer mount: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check(args) => {
            let _ = logging::init(&quiet_logs());
            if check::run(args) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Sops(sops::SopsCommand::Keygen(args)) => match sops::keygen(args) {
            Ok(recipient) => {
                println!("{recipient}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("coffer sops keygen: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Seal(args) => {
            let _ = logging::init(&quiet_logs());
            match rt.block_on(sops::seal(args)) {
                Ok(Some(document)) => {
                    print!("{document}");
                    ExitCode::SUCCESS
                }
                Ok(None) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("coffer seal: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo(args) => {
            let _ = logging::init(&quiet_logs());
            match rt.block_on(demo::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("coffer demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn quiet_logs() -> LogArgs {
    LogArgs {
        log_format: LogFormat::Text,
        log_level: std::env::var("COFFER_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
    }
}

fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
