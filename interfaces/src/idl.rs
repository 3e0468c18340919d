//! The canonical text of an interface description.
//!
//! The committed `*.varlink` files are written in systemd's layout (one member a line, a comment
//! above each). The services generate their descriptions from the Rust code; the two are the same
//! interface when their canonical forms are equal, which the interface tests check.

use std::fmt::Write;

use zlink::idl::{Comment, CustomType, Field, Interface};

/// Parses `idl` and renders it canonically: comments trimmed and one a line, every field on its
/// own line, members in the order given.
pub fn canonical(idl: &str) -> Result<String, String> {
    let iface = Interface::try_from(idl).map_err(|e| format!("Parsing the description: {e}"))?;
    let mut out = String::new();
    comments(&mut out, iface.comments(), "");
    let _ = writeln!(out, "interface {}", iface.name());
    for ty in iface.custom_types() {
        out.push('\n');
        match ty {
            CustomType::Object(o) => {
                comments(&mut out, o.comments(), "");
                let _ = write!(out, "type {}", o.name());
                fields(&mut out, o.fields());
                out.push('\n');
            }
            CustomType::Enum(e) => {
                comments(&mut out, e.comments(), "");
                let _ = writeln!(out, "type {} (", e.name());
                let variants: Vec<_> = e.variants().collect();
                for (i, v) in variants.iter().enumerate() {
                    comments(&mut out, v.comments(), "\t");
                    let sep = if i + 1 < variants.len() { "," } else { "" };
                    let _ = writeln!(out, "\t{}{sep}", v.name());
                }
                out.push_str(")\n");
            }
        }
    }
    for m in iface.methods() {
        out.push('\n');
        comments(&mut out, m.comments(), "");
        let _ = write!(out, "method {}", m.name());
        fields(&mut out, m.inputs());
        out.push_str(" -> ");
        fields(&mut out, m.outputs());
        out.push('\n');
    }
    for e in iface.errors() {
        out.push('\n');
        comments(&mut out, e.comments(), "");
        let _ = write!(out, "error {}", e.name());
        fields(&mut out, e.fields());
        out.push('\n');
    }
    Ok(out)
}

fn comments<'a, 'b: 'a>(out: &mut String, cs: impl Iterator<Item = &'a Comment<'b>>, indent: &str) {
    for c in cs {
        let text = c.text().trim();
        if text.is_empty() {
            let _ = writeln!(out, "{indent}#");
        } else {
            let _ = writeln!(out, "{indent}# {text}");
        }
    }
}

fn fields<'a, 'b: 'a>(out: &mut String, fs: impl Iterator<Item = &'a Field<'b>>) {
    let fs: Vec<_> = fs.collect();
    if fs.is_empty() {
        out.push_str("()");
        return;
    }
    out.push_str("(\n");
    for (i, f) in fs.iter().enumerate() {
        comments(out, f.comments(), "\t");
        let sep = if i + 1 < fs.len() { "," } else { "" };
        let _ = writeln!(out, "\t{}: {}{sep}", f.name(), f.ty());
    }
    out.push(')');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_ignores_layout_but_not_content() {
        let compact = "#  A test.\ninterface org.example.T\n# A type.\ntype X (# Its name.\nname: string, size: ?int)\n# Get.\nmethod Get(a: string) -> (# Out.\nx: X)\nerror Bad ()\n";
        let pretty = "# A test.\ninterface org.example.T\n\n# A type.\ntype X (\n\t# Its name.\n\tname: string,\n\tsize: ?int\n)\n\n# Get.\nmethod Get(\n\ta: string\n) -> (\n\t# Out.\n\tx: X\n)\n\nerror Bad()\n";
        let a = canonical(compact).unwrap();
        assert_eq!(a, canonical(pretty).unwrap());
        assert_eq!(a, canonical(&a).unwrap(), "canonical form is a fixed point");
        let changed = compact.replace("size: ?int", "size: int");
        assert_ne!(canonical(&changed).unwrap(), a);
        let recommented = compact.replace("Its name.", "Its label.");
        assert_ne!(canonical(&recommented).unwrap(), a);
        assert!(canonical("interface").is_err());
    }

    #[test]
    fn committed_descriptions_are_canonical() {
        for (name, text) in crate::DESCRIPTIONS {
            let canon = canonical(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(&canon, text, "{name} is not in canonical form");
        }
    }
}
