//! The generated manual pages and completions are complete: every command of `dnf-image` (the
//! clap tree walked here, not by the generator) has its page naming each of its options, bash
//! completes each subcommand and option, every service's page names each of its options, the
//! configuration page each key; groff renders every page without a warning; and
//! `scripts/install.sh` puts them where man and the shells look.

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use clap::{Command, CommandFactory};

fn generate() -> tempfile::TempDir {
    let out = tempfile::Builder::new()
        .prefix("dnfimage-docs-")
        .tempdir()
        .unwrap();
    let status = Process::new(env!("CARGO_BIN_EXE_dnfimage-docs"))
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "dnfimage-docs: {status}");
    out
}

/// Every command a user can type: (words after `dnf-image`, command), the root first.
fn commands() -> Vec<(Vec<String>, Command)> {
    fn walk(cmd: &Command, path: Vec<String>, all: &mut Vec<(Vec<String>, Command)>) {
        all.push((path.clone(), cmd.clone()));
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() || sub.get_name() == "help" {
                continue;
            }
            let mut p = path.clone();
            p.push(sub.get_name().to_owned());
            walk(sub, p, all);
        }
    }
    let mut cmd = dnf_image::Cli::command();
    cmd.build();
    let mut all = Vec::new();
    walk(&cmd, Vec::new(), &mut all);
    all
}

/// The visible long options of a command, as `--name`.
fn long_options(cmd: &Command) -> Vec<String> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .collect()
}

/// A long option as roff writes it (`\-\-name`, hyphens escaped).
fn roff(option: &str) -> String {
    option.replace('-', "\\-")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What bash completes for `dnf-image WORDS… CUR`, through the generated script.
fn bash_complete(script: &Path, words: &[String], cur: &str) -> Vec<String> {
    let mut line: Vec<String> = vec!["dnf-image".into()];
    line.extend(words.iter().cloned());
    line.push(cur.into());
    let quoted: Vec<String> = line.iter().map(|w| format!("'{w}'")).collect();
    let prev = &line[line.len() - 2];
    let program = format!(
        "source '{}'\nCOMP_WORDS=({})\nCOMP_CWORD={}\n_dnf__image dnf-image '{cur}' '{prev}'\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script.display(),
        quoted.join(" "),
        line.len() - 1
    );
    let out = Process::new("bash")
        .args(["--norc", "-c", &program])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Renders a page with groff, every warning on; returns what it complained about.
fn groff_warnings(dir: &Path, page: &Path) -> String {
    let out = Process::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z", "-s"])
        .arg(page)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "groff {}: {}",
        page.display(),
        out.status
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn every_command_has_a_complete_page() {
    let out = generate();
    let commands = commands();
    assert!(
        commands.len() > 10,
        "the walk found {} commands",
        commands.len()
    );
    for (path, cmd) in &commands {
        let name = std::iter::once("dnf-image".to_owned())
            .chain(path.iter().cloned())
            .collect::<Vec<_>>()
            .join("-");
        let page = out.path().join(format!("man8/{name}.8"));
        let text = read(&page);
        let title = format!(".TH {} 8 ", name.to_uppercase());
        assert!(
            text.lines().any(|l| l.starts_with(&title)),
            "{name}.8 has no {title:?}"
        );
        for option in long_options(cmd) {
            assert!(text.contains(&roff(&option)), "{name}.8 lacks {option}");
        }
        // A command with subcommands names each one's page.
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let sub_page = roff(&format!("{name}-{}(8)", sub.get_name()));
            assert!(text.contains(&sub_page), "{name}.8 lacks {sub_page}");
        }
        assert_eq!(groff_warnings(out.path(), &page), "", "{name}.8");
    }
}

#[test]
fn bash_completes_every_command_and_option() {
    let out = generate();
    let script = out.path().join("completions/bash/dnf-image");
    for (path, cmd) in commands() {
        let offered = bash_complete(&script, &path, "");
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            assert!(
                offered.iter().any(|o| o == sub.get_name()),
                "`dnf-image {} <TAB>` does not offer {}: {offered:?}",
                path.join(" "),
                sub.get_name()
            );
        }
        for option in long_options(&cmd) {
            let offered = bash_complete(&script, &path, "--");
            assert!(
                offered.contains(&option),
                "`dnf-image {} --<TAB>` does not offer {option}: {offered:?}",
                path.join(" ")
            );
        }
    }
    // A prefix narrows the choice.
    assert_eq!(bash_complete(&script, &[], "upg"), vec!["upgrade"]);
}

#[test]
fn zsh_and_fish_know_every_command() {
    let out = generate();
    let zsh = read(&out.path().join("completions/zsh/_dnf-image"));
    let fish = read(&out.path().join("completions/fish/dnf-image.fish"));
    assert!(zsh.starts_with("#compdef dnf-image"));
    for (path, cmd) in commands().iter().skip(1) {
        let name = cmd.get_name();
        assert!(
            zsh.contains(&format!("'{name}:")),
            "zsh lacks {}",
            path.join(" ")
        );
        assert!(
            fish.contains(&format!("-a \"{name}\"")),
            "fish lacks {}",
            path.join(" ")
        );
    }
}

#[test]
fn services_units_and_configuration_have_pages() {
    let out = generate();
    let dir = out.path();
    for (name, cmd) in [
        ("fetcher", dnfimage_fetcher::Args::command()),
        ("importer", dnfimage_importer::Args::command()),
        ("deployer", dnfimage_deployer::Args::command()),
        ("layerer", dnfimage_layerer::Args::command()),
    ] {
        let page = dir.join(format!("man8/dnfimage-{name}.8"));
        let text = read(&page);
        for option in long_options(&cmd) {
            assert!(
                text.contains(&roff(&option)),
                "dnfimage-{name}.8 lacks {option}"
            );
        }
        // The unit's own comment describes it.
        let unit = read(&PathBuf::from(format!(
            "{}/../units/dnfimage-{name}.service",
            env!("CARGO_MANIFEST_DIR")
        )));
        let first = dnfimage_docs::unit_comment(&unit)[0].clone();
        let first_words: String = first.split(' ').take(4).collect::<Vec<_>>().join(" ");
        assert!(
            text.contains(&first_words),
            "dnfimage-{name}.8 lacks {first_words:?}"
        );
        assert_eq!(groff_warnings(dir, &page), "");
        for unit in ["service", "socket"] {
            let alias = read(&dir.join(format!("man8/dnfimage-{name}.{unit}.8")));
            assert_eq!(alias, format!(".so man8/dnfimage-{name}.8\n"));
        }
    }
    let upgrade = dir.join("man8/dnfimage-upgrade.service.8");
    assert!(read(&upgrade).contains("dnf\\-image upgrade \\-\\-auto"));
    assert_eq!(groff_warnings(dir, &upgrade), "");
    assert_eq!(
        read(&dir.join("man8/dnfimage-upgrade.timer.8")),
        ".so man8/dnfimage-upgrade.service.8\n"
    );

    let conf = dir.join("man5/dnfimage.conf.5");
    let text = read(&conf);
    let shipped = read(&PathBuf::from(format!(
        "{}/../config/dnfimage.conf",
        env!("CARGO_MANIFEST_DIR")
    )));
    let config = dnfimage_docs::parse_config(&shipped).unwrap();
    for section in &config.sections {
        assert!(text.contains(&format!("[{}]", section.name)));
        for key in &section.keys {
            assert!(
                text.contains(&format!("{}=", roff(&key.name))),
                "no {}",
                key.name
            );
        }
    }
    assert_eq!(groff_warnings(dir, &conf), "");
}

/// `scripts/install.sh` runs the built generator and puts its output under PREFIX.
#[test]
fn install_puts_pages_and_completions_in_place() {
    let scratch = tempfile::Builder::new()
        .prefix("dnfimage-docs-install-")
        .tempdir()
        .unwrap();
    // A target directory holding only the generator: install.sh skips the other binaries.
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_dnfimage-docs"));
    let profile = exe.parent().unwrap().file_name().unwrap();
    let bindir = scratch.path().join("target").join(profile);
    std::fs::create_dir_all(&bindir).unwrap();
    std::os::unix::fs::symlink(&exe, bindir.join("dnfimage-docs")).unwrap();
    let dest = scratch.path().join("root");
    for prefix in ["/usr", "/usr/local"] {
        let out = Process::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/install.sh"
        ))
        .env("DESTDIR", &dest)
        .env("PREFIX", prefix)
        .env("PROFILE", profile)
        .env("CARGO_TARGET_DIR", scratch.path().join("target"))
        .env_remove("SYSCONFDIR")
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "install.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let root = dest.join(prefix.trim_start_matches('/'));
        for (path, _) in commands() {
            let name = std::iter::once("dnf-image".to_owned())
                .chain(path)
                .collect::<Vec<_>>()
                .join("-");
            assert!(
                root.join(format!("share/man/man8/{name}.8")).is_file(),
                "{name}"
            );
        }
        for file in [
            "share/man/man5/dnfimage.conf.5",
            "share/man/man8/dnfimage-fetcher.8",
            "share/man/man8/dnfimage-layerer.socket.8",
            "share/man/man8/dnfimage-upgrade.timer.8",
            "share/bash-completion/completions/dnf-image",
            "share/zsh/site-functions/_dnf-image",
            "share/fish/vendor_completions.d/dnf-image.fish",
        ] {
            assert!(root.join(file).is_file(), "{prefix}: {file}");
        }
        // man finds an installed alias page by its unit's name and shows the service's page.
        let man = Process::new("man")
            .arg("-M")
            .arg(root.join("share/man"))
            .args(["-P", "cat", "8", "dnfimage-deployer.socket"])
            .env("MANWIDTH", "200")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&man.stdout);
        assert!(
            man.status.success(),
            "man: {}",
            String::from_utf8_lossy(&man.stderr)
        );
        assert!(text.contains("--sysroot"), "{text}");
    }
}
