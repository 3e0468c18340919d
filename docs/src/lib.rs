//! The manual pages and shell completions of dnfimage, generated from the sources they document:
//! the clap definitions of `dnf-image` and of the services, the comments of the units and of
//! the default configuration. Nothing here is written twice by hand.
//!
//! Layout of the output directory (what `scripts/install.sh` copies):
//!
//! ```text
//! man8/dnf-image.8, man8/dnf-image-<subcommand>[-<subcommand>].8   the command line
//! man8/dnfimage-<service>.8                                         the services
//! man8/dnfimage-<service>.{service,socket}.8                        aliases (.so) of those
//! man8/dnfimage-upgrade.service.8, man8/dnfimage-upgrade.timer.8    the automatic upgrade
//! man5/dnfimage.conf.5                                              the configuration file
//! completions/bash/dnf-image, completions/zsh/_dnf-image, completions/fish/dnf-image.fish
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::Man;
use roff::{Roff, bold, italic, roman};

/// The name of the command line.
pub const BIN: &str = "dnf-image";
/// The manual every page belongs to.
const MANUAL: &str = "dnfimage";

/// A service: its command line and the units that run it.
struct Service {
    name: &'static str,
    command: fn() -> Command,
    service_unit: &'static str,
    socket_unit: &'static str,
}

/// The services, with their units' text (the comments above `[Unit]` describe them).
const SERVICES: &[Service] = &[
    Service {
        name: "fetcher",
        command: dnfimage_fetcher::Args::command,
        service_unit: include_str!("../../units/dnfimage-fetcher.service"),
        socket_unit: include_str!("../../units/dnfimage-fetcher.socket"),
    },
    Service {
        name: "importer",
        command: dnfimage_importer::Args::command,
        service_unit: include_str!("../../units/dnfimage-importer.service"),
        socket_unit: include_str!("../../units/dnfimage-importer.socket"),
    },
    Service {
        name: "deployer",
        command: dnfimage_deployer::Args::command,
        service_unit: include_str!("../../units/dnfimage-deployer.service"),
        socket_unit: include_str!("../../units/dnfimage-deployer.socket"),
    },
    Service {
        name: "layerer",
        command: dnfimage_layerer::Args::command,
        service_unit: include_str!("../../units/dnfimage-layerer.service"),
        socket_unit: include_str!("../../units/dnfimage-layerer.socket"),
    },
];

const UPGRADE_SERVICE: &str = include_str!("../../units/dnfimage-upgrade.service");
const UPGRADE_TIMER: &str = include_str!("../../units/dnfimage-upgrade.timer");
const CONFIG: &str = include_str!("../../config/dnfimage.conf");

/// The shells completions are generated for, with the file name each one looks for.
pub const SHELLS: &[(Shell, &str)] = &[
    (Shell::Bash, "bash/dnf-image"),
    (Shell::Zsh, "zsh/_dnf-image"),
    (Shell::Fish, "fish/dnf-image.fish"),
];

/// The command line as the pages and completions describe it: `help` is a flag, not a page.
pub fn cli_command() -> Command {
    let mut cmd = dnf_image::Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Every command of the command line with a page: `dnf-image` and each visible subcommand,
/// depth first, as (page name, command).
pub fn cli_pages() -> Vec<(String, Command)> {
    fn walk(cmd: &Command, name: String, pages: &mut Vec<(String, Command)>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, format!("{name}-{}", sub.get_name()), pages);
        }
        pages.push((name, cmd.clone()));
    }
    let mut pages = Vec::new();
    walk(&cli_command(), BIN.to_owned(), &mut pages);
    pages
}

/// Writes every page and completion under `out`; returns the files written.
pub fn generate(out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut put = |rel: &str, text: &[u8]| -> Result<()> {
        let path = out.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("Creating {}", dir.display()))?;
        }
        fs::write(&path, text).with_context(|| format!("Writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };

    for (name, cmd) in cli_pages() {
        put(&format!("man8/{name}.8"), &cli_page(&name, cmd)?)?;
    }
    for s in SERVICES {
        let page = format!("dnfimage-{}", s.name);
        put(&format!("man8/{page}.8"), &service_page(s)?)?;
        let alias = format!(".so man8/{page}.8\n");
        put(
            &format!("man8/dnfimage-{}.service.8", s.name),
            alias.as_bytes(),
        )?;
        put(
            &format!("man8/dnfimage-{}.socket.8", s.name),
            alias.as_bytes(),
        )?;
    }
    put("man8/dnfimage-upgrade.service.8", &upgrade_page())?;
    put(
        "man8/dnfimage-upgrade.timer.8",
        b".so man8/dnfimage-upgrade.service.8\n",
    )?;
    put("man5/dnfimage.conf.5", &config_page()?)?;

    for (shell, file) in SHELLS {
        let mut text = Vec::new();
        clap_complete::generate(*shell, &mut dnf_image::Cli::command(), BIN, &mut text);
        if *shell == Shell::Bash {
            text = fix_bash(&text)?;
        }
        put(&format!("completions/{file}"), &text)?;
    }
    Ok(written)
}

/// clap_complete 4.6 names the bash function of a subcommand of a hyphenated program from its
/// path with every `-` made a subcommand separator (`dnf__subcmd__image__subcmd__upgrade`) but
/// looks it up with the program's `-` made `__` (`dnf__image__subcmd__upgrade`), so nothing after
/// the first word completes. Spell both the second way (a no-op once clap_complete agrees with
/// itself); the test of the completions runs bash on them.
fn fix_bash(script: &[u8]) -> Result<Vec<u8>> {
    let script = std::str::from_utf8(script).context("Reading the bash completion")?;
    let wrong = format!("{}__subcmd__", BIN.replace('-', "__subcmd__"));
    let right = format!("{}__subcmd__", BIN.replace('-', "__"));
    Ok(script.replace(&wrong, &right).into_bytes())
}

/// The page of `dnf-image` or one of its subcommands.
fn cli_page(name: &str, cmd: Command) -> Result<Vec<u8>> {
    let is_root = name == BIN;
    let man = Man::new(cmd.clone())
        .title(name.to_uppercase())
        .section("8")
        .manual(MANUAL)
        .source(source());
    let mut page = Vec::new();
    man.render(&mut page).context("Rendering a page")?;
    let mut see_also = Roff::new();
    see_also.control("SH", ["SEE ALSO"]);
    let mut refs = Vec::new();
    if !is_root {
        // The page of the command one level up: dnf-image-override-remove → dnf-image-override.
        let parent = name.rsplit_once('-').map_or(BIN, |(p, _)| p);
        let parent = if parent.len() < BIN.len() {
            BIN
        } else {
            parent
        };
        refs.push(format!("{parent}(8)"));
    }
    if is_root || cmd.get_name() == "upgrade" {
        refs.push("dnfimage.conf(5)".to_owned());
        refs.push("dnfimage-upgrade.timer(8)".to_owned());
    }
    if is_root {
        refs.extend(SERVICES.iter().map(|s| format!("dnfimage-{}(8)", s.name)));
    }
    see_also.text([roman(refs.join(", "))]);
    page.extend(see_also.render().into_bytes());
    Ok(page)
}

/// The page of a service: its options from its clap definition, its description from the
/// comments of its `.service` and `.socket` units (they say what it does and why it may do it).
fn service_page(s: &Service) -> Result<Vec<u8>> {
    let cmd = (s.command)();
    let name = format!("dnfimage-{}", s.name);
    let man = Man::new(cmd)
        .title(name.to_uppercase())
        .section("8")
        .manual(MANUAL)
        .source(source());
    let mut page = Vec::new();
    man.render_title(&mut page).context("Rendering a page")?;
    man.render_name_section(&mut page)
        .context("Rendering a page")?;
    man.render_synopsis_section(&mut page)
        .context("Rendering a page")?;

    let mut roff = Roff::new();
    roff.control("SH", ["DESCRIPTION"]);
    roff.text([
        roman("Started by systemd from "),
        bold(format!("{name}.socket")),
        roman(" on its first client and run by "),
        bold(format!("{name}.service")),
        roman("; not meant to be run by hand except in tests, where it binds its socket itself."),
    ]);
    paragraphs(&mut roff, &unit_comment(s.service_unit));
    roff.control("SS", ["The socket"]);
    paragraphs(&mut roff, &unit_comment(s.socket_unit));
    page.extend(roff.render().into_bytes());

    man.render_options_section(&mut page)
        .context("Rendering a page")?;

    let mut roff = Roff::new();
    roff.control("SH", ["FILES"]);
    for (path, what) in [
        (
            format!("/usr/libexec/dnfimage/{name}"),
            "the program".to_owned(),
        ),
        (
            format!("/usr/lib/systemd/system/{name}.service"),
            "the service unit".to_owned(),
        ),
        (
            format!("/usr/lib/systemd/system/{name}.socket"),
            "the socket unit".to_owned(),
        ),
        (
            format!("/run/dnfimage/{}", interface(s.name)),
            "the varlink socket".to_owned(),
        ),
        (
            format!("/usr/share/varlink/{}.varlink", interface(s.name)),
            "the interface it serves".to_owned(),
        ),
    ] {
        roff.control("TP", []);
        roff.text([bold(path)]);
        roff.text([roman(what)]);
    }
    see_also(
        &mut roff,
        &["dnf-image(8)", "systemd.socket(5)", "varlinkctl(1)"],
    );
    page.extend(roff.render().into_bytes());
    Ok(page)
}

/// The page of the automatic upgrade's service and timer, from their comments.
fn upgrade_page() -> Vec<u8> {
    let mut roff = Roff::new();
    roff.control(
        "TH",
        ["DNFIMAGE-UPGRADE.SERVICE", "8", "", &source(), MANUAL],
    );
    roff.control("SH", ["NAME"]);
    roff.text([roman(
        "dnfimage-upgrade.service, dnfimage-upgrade.timer - automatic image upgrades",
    )]);
    roff.control("SH", ["SYNOPSIS"]);
    roff.text([bold("dnfimage-upgrade.service")]);
    roff.control("br", []);
    roff.text([bold("dnfimage-upgrade.timer")]);
    roff.control("SH", ["DESCRIPTION"]);
    paragraphs(&mut roff, &unit_comment(UPGRADE_TIMER));
    roff.control("SS", ["The service"]);
    paragraphs(&mut roff, &unit_comment(UPGRADE_SERVICE));
    roff.control("SH", ["FILES"]);
    roff.control("TP", []);
    roff.text([bold("/etc/dnfimage/dnfimage.conf")]);
    roff.text([
        roman("the policy: "),
        bold("[upgrade] policy"),
        roman(", see "),
        italic("dnfimage.conf"),
        roman("(5)"),
    ]);
    see_also(
        &mut roff,
        &[
            "dnf-image-upgrade(8)",
            "dnfimage.conf(5)",
            "systemd.timer(5)",
        ],
    );
    roff.render().into_bytes()
}

/// The page of the configuration file: the comments of the default one, section by section.
fn config_page() -> Result<Vec<u8>> {
    let config = parse_config(CONFIG)?;
    let mut roff = Roff::new();
    roff.control("TH", ["DNFIMAGE.CONF", "5", "", &source(), MANUAL]);
    roff.control("SH", ["NAME"]);
    roff.text([roman("dnfimage.conf - dnfimage configuration")]);
    roff.control("SH", ["SYNOPSIS"]);
    roff.text([bold("/etc/dnfimage/dnfimage.conf")]);
    roff.control("SH", ["DESCRIPTION"]);
    paragraphs(&mut roff, &config.intro);
    for section in &config.sections {
        roff.control("SH", [format!("[{}] SECTION", section.name).as_str()]);
        paragraphs(&mut roff, &section.comment);
        for key in &section.keys {
            roff.control("TP", []);
            roff.text([bold(format!("{}=", key.name)), italic(&key.default)]);
            // The comment's lines as written: they may list the values one a line.
            for line in &key.comment {
                roff.text([roman(line.clone())]);
                roff.control("br", []);
            }
            roff.text([roman(format!("Default: {}.", key.default))]);
        }
    }
    see_also(
        &mut roff,
        &[
            "dnf-image-upgrade(8)",
            "dnfimage-upgrade.timer(8)",
            "dnf-image(8)",
        ],
    );
    Ok(roff.render().into_bytes())
}

fn see_also(roff: &mut Roff, pages: &[&str]) {
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(pages.join(", "))]);
}

fn source() -> String {
    format!("dnfimage {}", env!("CARGO_PKG_VERSION"))
}

fn interface(service: &str) -> String {
    let mut chars = service.chars();
    let first = chars.next().map(|c| c.to_ascii_uppercase());
    format!(
        "org.dnfimage.{}{}",
        first.unwrap_or_default(),
        chars.as_str()
    )
}

/// Renders comment lines as paragraphs (an empty line separates two).
fn paragraphs(roff: &mut Roff, lines: &[String]) {
    for para in lines.split(|l| l.is_empty()).filter(|p| !p.is_empty()) {
        roff.control("PP", []);
        roff.text([roman(para.join(" "))]);
    }
}

/// The comment at the top of a unit file, without the SPDX line: its lines, "" between
/// paragraphs.
pub fn unit_comment(unit: &str) -> Vec<String> {
    let lines: Vec<String> = unit
        .lines()
        .take_while(|l| l.starts_with('#'))
        .filter(|l| !l.contains("SPDX-License-Identifier"))
        .map(|l| l.trim_start_matches('#').trim().to_owned())
        .collect();
    let start = lines.iter().position(|l| !l.is_empty()).unwrap_or(0);
    lines[start..].to_vec()
}

/// The default configuration file, as its page shows it.
#[derive(Debug, Default, PartialEq)]
pub struct Config {
    /// The comment before the first section.
    pub intro: Vec<String>,
    pub sections: Vec<Section>,
}

/// A `[section]` and its keys.
#[derive(Debug, Default, PartialEq)]
pub struct Section {
    pub name: String,
    /// Comment lines right after the section header that are not a key's.
    pub comment: Vec<String>,
    pub keys: Vec<Key>,
}

/// A `key = value` line with the comment above it.
#[derive(Debug, Default, PartialEq)]
pub struct Key {
    pub name: String,
    pub default: String,
    pub comment: Vec<String>,
}

/// Reads the documented form of the configuration: comments, `[section]` headers and
/// `key = value` lines; every key is documented by the comment right above it.
pub fn parse_config(text: &str) -> Result<Config> {
    let mut config = Config::default();
    let mut comment: Vec<String> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(c) = line.strip_prefix('#') {
            if !c.contains("SPDX-License-Identifier") {
                comment.push(c.trim().to_owned());
            }
        } else if line.is_empty() {
            if !comment.is_empty() {
                comment.push(String::new());
            }
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let comment = trim_blank(std::mem::take(&mut comment));
            match config.sections.last_mut() {
                None => config.intro = comment,
                Some(s) => s.comment.extend(comment),
            }
            config.sections.push(Section {
                name: name.trim().to_owned(),
                ..Section::default()
            });
        } else if let Some((key, value)) = line.split_once('=') {
            let section = config.sections.last_mut().with_context(|| {
                format!(
                    "Reading line {} of the configuration: a key outside a section",
                    n + 1
                )
            })?;
            let comment = trim_blank(std::mem::take(&mut comment));
            anyhow::ensure!(
                !comment.is_empty(),
                "Reading line {} of the configuration: {} has no comment to document it",
                n + 1,
                key.trim()
            );
            section.keys.push(Key {
                name: key.trim().to_owned(),
                default: value.trim().to_owned(),
                comment,
            });
        } else {
            anyhow::bail!("Reading line {} of the configuration: {line:?}", n + 1);
        }
    }
    Ok(config)
}

fn trim_blank(mut lines: Vec<String>) -> Vec<String> {
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let start = lines
        .iter()
        .position(|l| !l.is_empty())
        .unwrap_or(lines.len());
    lines.split_off(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_comments_document_keys() {
        let text = "# SPDX-License-Identifier: MIT\n#\n# Intro.\n\n[upgrade]\n# What to do:\n#   \"none\" nothing.\npolicy = \"check\"\n";
        let c = parse_config(text).unwrap();
        assert_eq!(c.intro, vec!["Intro."]);
        assert_eq!(c.sections.len(), 1);
        assert_eq!(c.sections[0].name, "upgrade");
        let key = &c.sections[0].keys[0];
        assert_eq!(key.name, "policy");
        assert_eq!(key.default, "\"check\"");
        assert_eq!(key.comment, vec!["What to do:", "\"none\" nothing."]);
    }

    #[test]
    fn config_refuses_undocumented_or_stray_lines() {
        for (text, wanted) in [
            ("[a]\nkey = 1\n", "has no comment"),
            ("# c\nkey = 1\n", "outside a section"),
            ("[a]\nnonsense\n", "line 2"),
        ] {
            let e = parse_config(text).unwrap_err().to_string();
            assert!(e.contains(wanted), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_shipped_configuration_is_documented() {
        let c = parse_config(CONFIG).unwrap();
        assert!(
            c.sections
                .iter()
                .any(|s| s.name == "upgrade" && s.keys.iter().any(|k| k.name == "policy"))
        );
    }

    #[test]
    fn unit_comments_lose_the_license_line() {
        let lines =
            unit_comment("# SPDX-License-Identifier: MIT\n#\n# One.\n#\n# Two.\n\n[Unit]\n");
        assert_eq!(lines, vec!["One.", "", "Two."]);
    }
}
