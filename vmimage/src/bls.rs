//! Boot Loader Specification entries as ostree writes them (`/boot/loader/entries/*.conf`).

use anyhow::{Result, anyhow};

/// One BLS entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub title: String,
    /// ostree's sort key: the higher, the earlier (the default has the highest).
    pub version: u64,
    pub linux: String,
    pub initrd: String,
    pub options: String,
}

/// Parses the text of one entry.
pub fn parse(text: &str) -> Result<Entry> {
    let mut title = String::new();
    let (mut version, mut linux, mut initrd, mut options) = (0, None, None, String::new());
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once(char::is_whitespace) else {
            continue;
        };
        let value = value.trim().to_string();
        match key {
            "title" => title = value,
            "version" => version = value.parse().unwrap_or(0),
            "linux" => linux = Some(value),
            "initrd" => initrd = Some(value),
            "options" => options = value,
            _ => {}
        }
    }
    Ok(Entry {
        title,
        version,
        linux: linux.ok_or_else(|| anyhow!("BLS entry without `linux`"))?,
        initrd: initrd.ok_or_else(|| anyhow!("BLS entry without `initrd`"))?,
        options,
    })
}

/// Sorts entries default first.
pub fn sort(entries: &mut [Entry]) {
    entries.sort_by_key(|e| std::cmp::Reverse(e.version));
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: &str = "title Debian GNU/Linux 12 (bookworm) (ostree:default:0)\n\
        version 2\n\
        options root=LABEL=dnfimage-root rw console=ttyS0 ostree=/ostree/boot.1/default/abc/0\n\
        linux /ostree/default-abc/vmlinuz-6.1.0-28-amd64\n\
        initrd /ostree/default-abc/initramfs-6.1.0-28-amd64.img\n";

    #[test]
    fn parses_and_sorts() -> Result<()> {
        let e = parse(ENTRY)?;
        assert_eq!(e.version, 2);
        assert_eq!(e.linux, "/ostree/default-abc/vmlinuz-6.1.0-28-amd64");
        assert!(e.options.ends_with("ostree=/ostree/boot.1/default/abc/0"));
        let mut older = e.clone();
        older.version = 1;
        older.title = "old".into();
        let mut v = vec![older, e];
        sort(&mut v);
        assert_eq!(v[0].version, 2);
        assert_eq!(v[1].title, "old");
        assert!(parse("title x\n").is_err());
        Ok(())
    }
}
