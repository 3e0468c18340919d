//! Kernel arguments: splitting a boot entry's `options` line, applying the `delete`,
//! `replace` and `append` edits of `SetKernelArguments`, and the arguments images declare in
//! bootc's `/usr/lib/bootc/kargs.d/*.toml` files and how `Deploy` carries them from one image
//! to the next. Pure: no sysroot needed.

use serde::Deserialize;

/// The argument ostree manages itself; it is never shown or edited.
pub const OSTREE_KEY: &str = "ostree";

/// Why an argument was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The argument as given.
    pub argument: String,
    /// What is wrong with it.
    pub message: String,
}

fn invalid(argument: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        argument: argument.to_string(),
        message: message.into(),
    }
}

/// Splits a kernel command line into arguments: whitespace separates them except inside double
/// quotes (`foo="a b"` is one argument).
pub fn split(options: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in options.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    args.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        args.push(current);
    }
    args
}

/// The arguments of a boot entry's `options`, without the `ostree=` one.
pub fn user_arguments(options: &str) -> Vec<String> {
    split(options)
        .into_iter()
        .filter(|a| key_of(a) != OSTREE_KEY)
        .collect()
}

/// The key of an argument: what comes before the first `=`.
pub fn key_of(argument: &str) -> &str {
    argument.split_once('=').map_or(argument, |(k, _)| k)
}

/// Checks one argument as a user gives it: not empty, a key, no unquoted whitespace, no control
/// characters, balanced quotes, and not the `ostree=` argument.
pub fn check(argument: &str) -> Result<(), Invalid> {
    if argument.is_empty() {
        return Err(invalid(argument, "An argument cannot be empty"));
    }
    if argument.chars().any(char::is_control) {
        return Err(invalid(argument, "Control characters are not allowed"));
    }
    if !argument.matches('"').count().is_multiple_of(2) {
        return Err(invalid(argument, "Unbalanced double quote"));
    }
    if split(argument).len() != 1 {
        return Err(invalid(
            argument,
            "Whitespace must be inside double quotes (key=\"a b\")",
        ));
    }
    let key = key_of(argument);
    if key.is_empty() {
        return Err(invalid(argument, "The argument has no key before '='"));
    }
    if key.contains('"') {
        return Err(invalid(argument, "The key cannot be quoted"));
    }
    if key == OSTREE_KEY {
        return Err(invalid(
            argument,
            "The ostree= argument is managed by ostree and cannot be changed",
        ));
    }
    Ok(())
}

/// The edits of one `SetKernelArguments` call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edits {
    /// "K" removes every K, "K=V" that one.
    pub delete: Vec<String>,
    /// "K=V" sets every K to V, "K=OLD=NEW" changes one value.
    pub replace: Vec<String>,
    /// "K" or "K=V", added at the end.
    pub append: Vec<String>,
}

impl Edits {
    /// Applies the edits to `current` (without `ostree=`): deletions, then replacements, then
    /// additions. An argument to delete or replace that is not there is an error.
    pub fn apply(&self, current: &[String]) -> Result<Vec<String>, Invalid> {
        let mut args = current.to_vec();
        for d in &self.delete {
            check(d)?;
            let before = args.len();
            if d.contains('=') {
                // Only the first one, as ostree's `--delete K=V` does.
                if let Some(pos) = args.iter().position(|a| a == d) {
                    args.remove(pos);
                }
            } else {
                args.retain(|a| key_of(a) != d);
            }
            if args.len() == before {
                return Err(invalid(d, "No such kernel argument"));
            }
        }
        for r in &self.replace {
            check(r)?;
            let Some((key, value)) = r.split_once('=') else {
                return Err(invalid(r, "Expected K=V or K=OLD=NEW"));
            };
            match value.split_once('=') {
                Some((old, new)) if !old.contains('"') => {
                    let wanted = format!("{key}={old}");
                    let pos = args
                        .iter()
                        .position(|a| *a == wanted)
                        .ok_or_else(|| invalid(r, format!("No kernel argument {wanted}")))?;
                    args[pos] = format!("{key}={new}");
                }
                _ => {
                    let mut found = false;
                    for a in args.iter_mut().filter(|a| key_of(a) == key) {
                        *a = format!("{key}={value}");
                        found = true;
                    }
                    if !found {
                        return Err(invalid(r, format!("No kernel argument {key}")));
                    }
                }
            }
        }
        for a in &self.append {
            check(a)?;
            args.push(a.clone());
        }
        Ok(args)
    }
}

/// Where an image declares kernel arguments, as path components under its root (bootc's
/// `kargs.d`).
pub const KARGS_D: [&str; 4] = ["usr", "lib", "bootc", "kargs.d"];

/// The largest kargs.d file read; a command line is a few KiB at most.
pub const KARGS_FILE_LIMIT: u64 = 64 << 10;

/// The architecture `match-architectures` lists are compared with: Rust's name for it (as bootc
/// compares them), the same as `uname -m` on x86_64, aarch64, s390x and riscv64.
pub fn host_architecture() -> &'static str {
    std::env::consts::ARCH
}

/// Whether a file of kargs.d is read: its name ends in `.toml` (after a stem, as bootc takes
/// the extension of the name).
pub fn is_kargs_file(name: &str) -> bool {
    std::path::Path::new(name)
        .extension()
        .is_some_and(|e| e == "toml")
}

/// One kargs.d file: bootc's format.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct KargsFile {
    /// The arguments, in order.
    kargs: Vec<String>,
    /// The architectures the file applies to; every one when absent.
    match_architectures: Option<Vec<String>>,
}

/// A kargs.d file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidFile {
    /// Its name in kargs.d.
    pub name: String,
    /// What is wrong with it.
    pub message: String,
}

/// The arguments one kargs.d file declares for architecture `arch`: none when its
/// `match-architectures` does not list `arch`. Every argument is checked as one a user gives.
pub fn parse_kargs_file(contents: &str, arch: &str) -> Result<Vec<String>, String> {
    let file: KargsFile = toml::from_str(contents).map_err(|e| {
        let message = e.message().trim_end().to_string();
        match e.span() {
            // Lines counted as TOML counts them, from 1.
            Some(span) => {
                let before = &contents.as_bytes()[..span.start.min(contents.len())];
                let line = before.iter().filter(|b| **b == b'\n').count() + 1;
                format!("Line {line}: {message}")
            }
            None => message,
        }
    })?;
    for a in &file.kargs {
        check(a).map_err(|e| format!("Kernel argument {:?}: {}", e.argument, e.message))?;
    }
    let applies = file
        .match_architectures
        .is_none_or(|arches| arches.iter().any(|a| a == arch));
    Ok(if applies { file.kargs } else { Vec::new() })
}

/// A file of an image's kargs.d as the repository holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KargsEntry {
    /// Its name in kargs.d.
    pub name: String,
    /// Its bytes, or why they cannot be read (e.g. it is a symbolic link).
    pub content: Result<Vec<u8>, String>,
}

/// The arguments the kargs.d files `entries` declare for `arch`: the `.toml` ones in name order
/// (others are ignored), each file's arguments in its order. The first file that cannot be
/// read or parsed is the error.
pub fn declared(entries: &[KargsEntry], arch: &str) -> Result<Vec<String>, InvalidFile> {
    let mut files: Vec<&KargsEntry> = entries.iter().filter(|e| is_kargs_file(&e.name)).collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let mut args = Vec::new();
    for file in files {
        let invalid = |message: String| InvalidFile {
            name: file.name.clone(),
            message,
        };
        let bytes = file.content.as_ref().map_err(|m| invalid(m.clone()))?;
        let text = std::str::from_utf8(bytes)
            .map_err(|e| invalid(format!("It is not UTF-8 text: {e}")))?;
        args.extend(parse_kargs_file(text, arch).map_err(invalid)?);
    }
    Ok(args)
}

/// How `Deploy` changed the arguments it started from because of the images' kargs.d files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    /// The new deployment's arguments.
    pub arguments: Vec<String>,
    /// Those added: the new image declares them and the old one did not.
    pub added: Vec<String>,
    /// Those removed: the old image declared them and the new one does not.
    pub removed: Vec<String>,
}

/// The arguments of a new deployment, as bootc computes them: `current` (the arguments the new
/// deployment starts from) without the arguments `old` (the old image's kargs.d) declared and
/// `new` (the new image's) no longer declares, then the arguments `new` declares and `old` did
/// not, in their order. So the old image's arguments give way to the new image's, the ones both
/// declare keep their place (and stay away if the user deleted them), and the ones the user
/// added stay. An argument already there is not added a second time. A first deploy (no old
/// image) has `old` empty.
pub fn carry(current: &[String], old: &[String], new: &[String]) -> Carried {
    let mut arguments = current.to_vec();
    let mut removed = Vec::new();
    for gone in old.iter().filter(|a| !new.contains(a)) {
        if arguments.contains(gone) && !removed.contains(gone) {
            removed.push(gone.clone());
        }
        arguments.retain(|a| a != gone);
    }
    let mut added = Vec::new();
    for a in new.iter().filter(|a| !old.contains(a)) {
        if !arguments.contains(a) {
            arguments.push(a.clone());
            added.push(a.clone());
        }
    }
    Carried {
        arguments,
        added,
        removed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn splits_options() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            ("  ", &[]),
            ("quiet", &["quiet"]),
            (
                "root=/dev/vda2 rw  quiet\tsplash",
                &["root=/dev/vda2", "rw", "quiet", "splash"],
            ),
            (
                "a=\"x y\" b ostree=/ostree/boot.1/os/abc/0",
                &["a=\"x y\"", "b", "ostree=/ostree/boot.1/os/abc/0"],
            ),
            ("\"quoted whole\" x", &["\"quoted whole\"", "x"]),
        ];
        for (options, want) in cases {
            assert_eq!(split(options), v(want), "{options:?}");
        }
        assert_eq!(
            user_arguments("rw ostree=/ostree/boot.0/os/x/0 quiet"),
            v(&["rw", "quiet"])
        );
    }

    #[test]
    fn checks_arguments() {
        let cases: &[(&str, bool)] = &[
            ("quiet", true),
            ("console=ttyS0,115200", true),
            ("root=UUID=1234", true),
            ("foo=\"a b\"", true),
            ("", false),
            ("a b", false),
            ("=value", false),
            ("foo=\"open", false),
            ("ostree=/ostree/boot.0", false),
            ("ostree", false),
            ("new\nline", false),
        ];
        for (arg, ok) in cases {
            assert_eq!(check(arg).is_ok(), *ok, "{arg:?}");
        }
    }

    #[test]
    fn applies_edits() {
        struct Case {
            current: &'static [&'static str],
            delete: &'static [&'static str],
            replace: &'static [&'static str],
            append: &'static [&'static str],
            want: Result<&'static [&'static str], &'static str>,
        }
        let cases = [
            Case {
                current: &["rw", "quiet"],
                delete: &[],
                replace: &[],
                append: &["dnfimage.test=1"],
                want: Ok(&["rw", "quiet", "dnfimage.test=1"]),
            },
            Case {
                current: &["console=tty0", "quiet", "console=ttyS0"],
                delete: &["console"],
                replace: &[],
                append: &[],
                want: Ok(&["quiet"]),
            },
            Case {
                current: &["console=tty0", "quiet", "console=ttyS0"],
                delete: &["console=ttyS0"],
                replace: &[],
                append: &[],
                want: Ok(&["console=tty0", "quiet"]),
            },
            Case {
                current: &["quiet"],
                delete: &["splash"],
                replace: &[],
                append: &[],
                want: Err("splash"),
            },
            Case {
                current: &["console=tty0", "console=ttyS0"],
                delete: &[],
                replace: &["console=hvc0"],
                append: &[],
                want: Ok(&["console=hvc0", "console=hvc0"]),
            },
            Case {
                current: &["console=tty0", "console=ttyS0"],
                delete: &[],
                replace: &["console=ttyS0=ttyS1"],
                append: &[],
                want: Ok(&["console=tty0", "console=ttyS1"]),
            },
            Case {
                current: &["console=tty0"],
                delete: &[],
                replace: &["console=ttyS0=ttyS1"],
                append: &[],
                want: Err("console=ttyS0=ttyS1"),
            },
            Case {
                current: &["quiet"],
                delete: &[],
                replace: &["root=/dev/vda"],
                append: &[],
                want: Err("root=/dev/vda"),
            },
            Case {
                current: &["quiet", "a=1"],
                delete: &["quiet"],
                replace: &["a=2"],
                append: &["b"],
                want: Ok(&["a=2", "b"]),
            },
            Case {
                current: &[],
                delete: &[],
                replace: &[],
                append: &["ostree=/x"],
                want: Err("ostree=/x"),
            },
            Case {
                current: &[],
                delete: &[],
                replace: &[],
                append: &["two words"],
                want: Err("two words"),
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let edits = Edits {
                delete: v(c.delete),
                replace: v(c.replace),
                append: v(c.append),
            };
            let got = edits.apply(&v(c.current));
            match (got, c.want) {
                (Ok(got), Ok(want)) => assert_eq!(got, v(want), "case {i}"),
                (Err(e), Err(arg)) => assert_eq!(e.argument, arg, "case {i}: {e:?}"),
                (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn parses_kargs_files() {
        // (contents, arch, Ok(arguments) or Err(part of the message))
        type Case<'a> = (&'a str, &'a str, Result<&'a [&'a str], &'a str>);
        let cases: &[Case] = &[
            (
                r#"kargs = ["console=tty0", "nosmt"]"#,
                "x86_64",
                Ok(&["console=tty0", "nosmt"]),
            ),
            (
                r#"kargs = ["console=tty0", "nosmt"]"#,
                "aarch64",
                Ok(&["console=tty0", "nosmt"]),
            ),
            ("kargs = []", "x86_64", Ok(&[])),
            (
                "kargs = [\"a\"]\nmatch-architectures = [\"x86_64\", \"aarch64\"]",
                "aarch64",
                Ok(&["a"]),
            ),
            (
                "kargs = [\"a\"]\nmatch-architectures = [\"s390x\"]",
                "x86_64",
                Ok(&[]),
            ),
            (
                "kargs = [\"a\"]\nmatch-architectures = []",
                "x86_64",
                Ok(&[]),
            ),
            // Not bootc's format.
            ("", "x86_64", Err("missing field `kargs`")),
            ("foo = \"bar\"", "x86_64", Err("unknown field `foo`")),
            (
                "kargs = [\"a\"]\nfoo = 1",
                "x86_64",
                Err("unknown field `foo`"),
            ),
            ("kargs = \"quiet\"", "x86_64", Err("Line 1")),
            ("kargs = [1]", "x86_64", Err("Line 1")),
            (
                "kargs = [\"a\"]\nmatch-architectures = \"x86_64\"",
                "x86_64",
                Err("Line 2"),
            ),
            ("kargs = [\"a\",\n", "x86_64", Err("Line 2")),
            ("[kargs]", "x86_64", Err("")),
            // Arguments checked as a user's, even for another architecture.
            ("kargs = [\"two words\"]", "x86_64", Err("\"two words\"")),
            (
                "kargs = [\"ostree=/x\"]",
                "x86_64",
                Err("managed by ostree"),
            ),
            ("kargs = [\"\"]", "x86_64", Err("cannot be empty")),
            (
                "kargs = [\"a\\nb\"]\nmatch-architectures = [\"s390x\"]",
                "x86_64",
                Err("Control characters"),
            ),
        ];
        for (contents, arch, want) in cases {
            let got = parse_kargs_file(contents, arch);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, v(want), "{contents:?}"),
                (Err(e), Err(part)) => assert!(e.contains(part), "{contents:?}: {e}"),
                (got, want) => panic!("{contents:?}: got {got:?}, want {want:?}"),
            }
        }
        assert!(!host_architecture().is_empty());
    }

    #[test]
    fn reads_kargs_d_in_name_order_and_only_toml_files() {
        let entry = |name: &str, content: &str| KargsEntry {
            name: name.to_string(),
            content: Ok(content.as_bytes().to_vec()),
        };
        let names: &[(&str, bool)] = &[
            ("10-a.toml", true),
            ("a.b.toml", true),
            ("x.TOML", false),
            ("x.toml.bak", false),
            ("README", false),
            ("toml", false),
            (".toml", false),
        ];
        for (name, want) in names {
            assert_eq!(is_kargs_file(name), *want, "{name}");
        }
        let entries = vec![
            entry("20-b.toml", r#"kargs = ["b=2"]"#),
            entry("README", "not toml at all"),
            entry("10-a.toml", r#"kargs = ["a=1", "quiet"]"#),
            entry(
                "15-other-arch.toml",
                "kargs = [\"other\"]\nmatch-architectures = [\"no-such-arch\"]",
            ),
            entry("30-c.toml.disabled", "garbage"),
        ];
        assert_eq!(
            declared(&entries, "x86_64"),
            Ok(v(&["a=1", "quiet", "b=2"]))
        );
        assert_eq!(declared(&[], "x86_64"), Ok(vec![]));

        let broken = |bad: KargsEntry, message: &str| {
            let mut all = entries.clone();
            let name = bad.name.clone();
            all.push(bad);
            let e = declared(&all, "x86_64").expect_err("a broken file is refused");
            assert_eq!(e.name, name);
            assert!(e.message.contains(message), "{e:?}");
        };
        broken(entry("25-bad.toml", "kargs = [\"a\""), "Line 1");
        broken(
            KargsEntry {
                name: "25-bad.toml".into(),
                content: Ok(vec![b'k', 0xff]),
            },
            "not UTF-8",
        );
        broken(
            KargsEntry {
                name: "25-link.toml".into(),
                content: Err("It is a symbolic link".into()),
            },
            "symbolic link",
        );
    }

    #[test]
    fn carries_image_arguments_across_deploys() {
        struct Case {
            current: &'static [&'static str],
            old: &'static [&'static str],
            new: &'static [&'static str],
            want: &'static [&'static str],
            added: &'static [&'static str],
            removed: &'static [&'static str],
        }
        let cases = [
            // First deploy: the image's arguments after the current ones.
            Case {
                current: &[],
                old: &[],
                new: &["console=ttyS0", "dnfimage.v=1"],
                want: &["console=ttyS0", "dnfimage.v=1"],
                added: &["console=ttyS0", "dnfimage.v=1"],
                removed: &[],
            },
            // Rebase from a deployment whose command line already has one of them.
            Case {
                current: &["rw", "console=ttyS0"],
                old: &[],
                new: &["console=ttyS0", "dnfimage.v=1"],
                want: &["rw", "console=ttyS0", "dnfimage.v=1"],
                added: &["dnfimage.v=1"],
                removed: &[],
            },
            // An upgrade: the user's `quiet` stays, the shared one keeps its place, the old
            // image's own one goes, the new image's come.
            Case {
                current: &["console=ttyS0", "dnfimage.v=1", "quiet"],
                old: &["console=ttyS0", "dnfimage.v=1"],
                new: &["console=ttyS0", "dnfimage.v=2", "new=1"],
                want: &["console=ttyS0", "quiet", "dnfimage.v=2", "new=1"],
                added: &["dnfimage.v=2", "new=1"],
                removed: &["dnfimage.v=1"],
            },
            // The same image again: nothing changes.
            Case {
                current: &["quiet", "console=ttyS0"],
                old: &["console=ttyS0"],
                new: &["console=ttyS0"],
                want: &["quiet", "console=ttyS0"],
                added: &[],
                removed: &[],
            },
            // The user deleted an argument both images declare: it stays deleted.
            Case {
                current: &["quiet"],
                old: &["console=ttyS0"],
                new: &["console=ttyS0"],
                want: &["quiet"],
                added: &[],
                removed: &[],
            },
            // The new image declares none: the old image's go, every copy.
            Case {
                current: &["a=1", "quiet", "a=1"],
                old: &["a=1"],
                new: &[],
                want: &["quiet"],
                added: &[],
                removed: &["a=1"],
            },
            // An old argument the user already deleted is not reported as removed.
            Case {
                current: &["quiet"],
                old: &["a=1"],
                new: &["b=1"],
                want: &["quiet", "b=1"],
                added: &["b=1"],
                removed: &[],
            },
            // Declared twice (two files): added once.
            Case {
                current: &[],
                old: &[],
                new: &["x", "x"],
                want: &["x"],
                added: &["x"],
                removed: &[],
            },
            // Same key, another value: exact arguments are compared.
            Case {
                current: &["console=tty0", "console=ttyS0"],
                old: &["console=ttyS0"],
                new: &["console=ttyS1"],
                want: &["console=tty0", "console=ttyS1"],
                added: &["console=ttyS1"],
                removed: &["console=ttyS0"],
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let got = carry(&v(c.current), &v(c.old), &v(c.new));
            assert_eq!(
                got,
                Carried {
                    arguments: v(c.want),
                    added: v(c.added),
                    removed: v(c.removed),
                },
                "case {i}"
            );
        }
    }
}
