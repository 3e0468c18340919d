//! Kernel arguments: splitting a boot entry's `options` line and applying the `delete`,
//! `replace` and `append` edits of `SetKernelArguments`. Pure: no sysroot needed.

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
}
