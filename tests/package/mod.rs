//! The Debian package (issue 10): scripts/package.sh builds it; its control
//! data, files, units and lintian's verdict are checked on the real .deb,
//! unpacked into a temporary root (never installed into this system).
//!
//! `package_builds_installs_and_verifies` is the only test that runs
//! package.sh (and so cargo-deb and the release build); .config/nextest.toml
//! gives it the whole machine, so the build slows no other test down.

use crate::support::tether_bin;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Panics with what to do when a tool the package test needs is missing.
fn require(tool: &str, args: &[&str]) {
    let ok = Command::new(tool).args(args).output().is_ok_and(|o| o.status.success());
    assert!(ok, "`{tool} {}` failed: {tool} is missing; run scripts/install-deps.sh", args.join(" "));
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// stdout of a command that must succeed.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    text
}

/// The units with their paths to tether pointed at `bin`, in `dir` (systemd-analyze
/// verify checks that every Exec*= binary exists).
fn units_for(bin: &Path, units_dir: &Path, dir: &Path) -> Vec<PathBuf> {
    ["tether.service", "tether@.service"]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(units_dir.join(name)).unwrap();
            assert!(text.contains("ExecStart=/usr/bin/tether run --config /etc/tether/"), "{name} runs /usr/bin/tether:\n{text}");
            let path = dir.join(name);
            std::fs::write(&path, text.replace("/usr/bin/tether", bin.to_str().unwrap())).unwrap();
            path
        })
        .collect()
}

fn verify(unit: &Path) {
    let out = run(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(unit));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify {}:\n{text}", unit.display());
}

fn exposure(unit: &Path) -> f64 {
    let out = run(Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(unit));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    line.split(':').nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn package_builds_installs_and_verifies() {
    for (tool, args) in [
        ("cargo-deb", &["deb", "--version"][..]),
        ("dpkg-deb", &["--version"][..]),
        ("lintian", &["--version"][..]),
        ("systemd-analyze", &["--version"][..]),
        ("readelf", &["--version"][..]),
    ] {
        require(tool, args);
    }
    let version = env!("CARGO_PKG_VERSION");

    // Build: one release build and cargo deb, both inside package.sh.
    let out = run(Command::new("bash").arg(root().join("scripts/package.sh")).current_dir(root()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "scripts/package.sh failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let deb = PathBuf::from(stdout.lines().last().expect("package.sh prints the .deb's path").trim());
    assert_eq!(deb.file_name().unwrap().to_str().unwrap(), format!("tether_{version}_amd64.deb"));
    let size = std::fs::metadata(&deb).unwrap().len();
    eprintln!("{}: {size} bytes", deb.display());

    // Control data.
    let control = ok(Command::new("dpkg-deb").args(["-f"]).arg(&deb));
    let field = |name: &str| {
        control.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).unwrap_or_else(|| panic!("no {name} in:\n{control}")).to_string()
    };
    assert_eq!(field("Package"), "tether");
    assert_eq!(field("Version"), version);
    assert_eq!(field("Architecture"), "amd64");
    // Statically linked (scripts/package.sh), so dpkg-shlibdeps finds no
    // library to depend on; the binary itself is checked below.
    let depends = control.lines().find_map(|l| l.strip_prefix("Depends: ")).unwrap_or_default();
    assert!(!depends.contains("libc6"), "a static binary needs no libc6: {depends}");
    assert!(!depends.contains("adduser"), "no users are created (DynamicUser): {depends}");
    let conffiles = ok(Command::new("dpkg-deb").args(["-I"]).arg(&deb).arg("conffiles"));
    let mut conffiles: Vec<&str> = conffiles.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    conffiles.sort();
    assert_eq!(conffiles, ["/etc/tether/services.d/README", "/etc/tether/tether.toml"]);

    // Maintainer scripts: daemon-reload, never enable or start, no users.
    let work = tempfile::tempdir().unwrap();
    let control_dir = work.path().join("DEBIAN");
    ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control_dir));
    let scripts: String = ["postinst", "prerm", "postrm"]
        .iter()
        .map(|s| std::fs::read_to_string(control_dir.join(s)).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(scripts.contains("daemon-reload"), "{scripts}");
    for never in ["enable", "systemctl start", "--now", "useradd", "adduser"] {
        assert!(
            !scripts.lines().filter(|l| !l.trim_start().starts_with('#')).any(|l| l.contains(never)),
            "maintainer scripts {never}:\n{scripts}"
        );
    }

    // File list.
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let files: Vec<(&str, &str)> = listing
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            (f.next().unwrap(), f.last().unwrap().trim_start_matches('.'))
        })
        .collect();
    let mode = |path: &str| {
        files.iter().find(|(_, p)| *p == path).map(|(m, _)| *m).unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
    };
    assert_eq!(mode("/usr/bin/tether"), "-rwxr-xr-x");
    for path in [
        "/lib/systemd/system/tether.service",
        "/lib/systemd/system/tether@.service",
        "/etc/tether/tether.toml",
        "/etc/tether/services.d/README",
        "/usr/share/doc/tether/README.md",
        "/usr/share/doc/tether/LICENSE",
        "/usr/share/doc/tether/copyright",
        "/usr/share/lintian/overrides/tether",
        "/usr/share/doc/tether/changelog.gz",
        "/usr/share/doc/tether/examples/services.d/orders.toml",
        "/usr/share/doc/tether/examples/services.d/billing.toml",
        "/usr/share/man/man1/tether.1.gz",
        "/usr/share/man/man1/tether-run.1.gz",
        "/usr/share/man/man1/tether-validate.1.gz",
        "/usr/share/bash-completion/completions/tether",
        "/usr/share/zsh/vendor-completions/_tether",
        "/usr/share/fish/vendor_completions.d/tether.fish",
        "/usr/share/tether/grafana/tether.json",
        "/usr/share/tether/prometheus/tether.rules.yml",
    ] {
        assert_eq!(mode(path), "-rw-r--r--", "{path}");
    }
    assert_eq!(mode("/etc/tether/services.d/"), "drwxr-xr-x");
    let toml_in_services_d: Vec<_> =
        files.iter().filter(|(_, p)| p.starts_with("/etc/tether/services.d/") && p.ends_with(".toml")).collect();
    assert!(toml_in_services_d.is_empty(), "no active service file: {toml_in_services_d:?}");

    // Install into a temporary root.
    let dest = work.path().join("root");
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest));
    let bin = dest.join("usr/bin/tether");
    let sections = ok(Command::new("readelf").args(["-S", "--wide"]).arg(&bin));
    assert!(!sections.contains(".symtab") && !sections.contains(".debug_"), "/usr/bin/tether is stripped:\n{sections}");
    let dynamic = ok(Command::new("readelf").args(["--dynamic", "--program-headers", "--wide"]).arg(&bin));
    assert!(
        !dynamic.contains("INTERP") && !dynamic.contains("(NEEDED)"),
        "/usr/bin/tether is statically linked (no interpreter, no shared libraries):\n{dynamic}"
    );
    let v = ok(Command::new(&bin).arg("--version"));
    assert!(v.starts_with(&format!("tether {version} (")), "{v}");
    if let Ok(o) = Command::new("git").args(["rev-parse", "--short", "HEAD"]).current_dir(root()).output() {
        if o.status.success() {
            let commit = String::from_utf8_lossy(&o.stdout).trim().to_string();
            assert_eq!(v.trim(), format!("tether {version} ({commit})"), "--version names the commit built");
        }
    }
    let completion = std::fs::read_to_string(dest.join("usr/share/bash-completion/completions/tether")).unwrap();
    assert!(completion.contains("complete") && completion.contains("validate"), "{completion}");
    assert!(!completion.contains("generate"), "the generator is not a subcommand:\n{completion}");
    let man = ok(Command::new("gzip").arg("-dc").arg(dest.join("usr/share/man/man1/tether.1.gz")));
    assert!(man.contains(".TH tether 1") && man.contains("tether\\-run(1)"), "{man}");

    // The packaged config is valid and has no services (README is not one).
    let config = dest.join("etc/tether/tether.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("\"/etc/tether/services.d\"", "\"services.d\"");
    std::fs::write(&config, text).unwrap();
    let v = ok(Command::new(&bin).args(["validate", "--config"]).arg(&config));
    assert!(v.contains("ok: 0 service(s) valid"), "{v}");

    // The installed units verify against the installed binary, also an instance of the template.
    let units_dir = work.path().join("units");
    std::fs::create_dir(&units_dir).unwrap();
    let units = units_for(&bin, &dest.join("lib/systemd/system"), &units_dir);
    for unit in &units {
        verify(unit);
        let level = exposure(unit);
        eprintln!("systemd-analyze security {}: {level}", unit.display());
        assert!(level <= 2.0, "{}: exposure {level} > 2.0", unit.display());
    }
    verify(&units_dir.join("tether@blue.service"));

    // lintian: no errors. Warnings accepted: maintainer-script-calls-systemctl
    // (postinst try-restarts running agents on upgrade, prerm stops them on
    // removal; lintian wants deb-systemd-invoke, which cannot address every
    // tether@*.service instance).
    let out = run(Command::new("lintian").args(["--fail-on", "error"]).arg(&deb));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("lintian:\n{text}");
    assert!(out.status.success() && !text.lines().any(|l| l.starts_with("E:")), "lintian reports errors:\n{text}");
}

/// tether@.service is tether.service with /etc/tether/ -> /etc/tether/%i/:
/// the same notify, watchdog and hardening.
#[test]
fn template_unit_matches_tether_service() {
    require("systemd-analyze", &["--version"]);
    let read = |name: &str| std::fs::read_to_string(root().join("systemd").join(name)).unwrap();
    let settings = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("Description="))
            .map(String::from)
            .collect()
    };
    let expected: Vec<String> = settings(&read("tether.service"))
        .iter()
        .map(|l| l.replace("/etc/tether/", "/etc/tether/%i/"))
        .map(|l| if l.starts_with("ExecStart=") { format!("{l} --instance %i") } else { l })
        .map(|l| if l == "RuntimeDirectory=tether" { "RuntimeDirectory=tether/%i".to_string() } else { l })
        .collect();
    let template = read("tether@.service");
    assert_eq!(settings(&template), expected);
    assert!(template.contains("ExecStart=/usr/bin/tether run --config /etc/tether/%i/tether.toml --instance %i"), "{template}");
    assert!(template.contains("Description=") && template.lines().any(|l| l.starts_with("Description=") && l.contains("%i")));
    // The repo's units are the packaged ones: they run the packaged binary.
    let dir = tempfile::tempdir().unwrap();
    for unit in units_for(&tether_bin(), &root().join("systemd"), dir.path()) {
        verify(&unit);
    }
}
