//! An image's rpm database: where it is (found from the image, never from the host's macros:
//! Debian's rpm would look in `~/.rpmdb`), the macros file that points rpm and dnf at it, and
//! the cleaning before a commit (sqlite WAL checkpointed with `sqlite3`, the only place that
//! runs it; `-wal`, `-shm` and `.rpm.lock` removed).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Where images keep their rpm database, in the order they are looked for: Fedora since 36
/// (and bootc images), older rpm-ostree images, classic.
pub const CANDIDATES: [&str; 3] = ["usr/lib/sysimage/rpm", "usr/share/rpm", "var/lib/rpm"];

/// Files that mark a directory as an rpm database: sqlite, ndb, Berkeley DB.
const MARKERS: [&str; 3] = ["rpmdb.sqlite", "Packages.db", "Packages"];

/// The rpm database directory of the tree at `root` (relative, e.g. "usr/lib/sysimage/rpm"),
/// if it has one. A symlink (e.g. `var/lib/rpm` → `../../usr/lib/sysimage/rpm`) is skipped in
/// favour of the real directory.
pub fn find(root: &Path) -> Option<&'static str> {
    CANDIDATES.into_iter().find(|c| {
        let dir = root.join(c);
        std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
            && MARKERS.iter().any(|m| dir.join(m).exists())
    })
}

/// Writes `home/.rpmmacros` so that rpm (and dnf through librpm) use the database at `dbpath`
/// (relative to their root) whatever the host's macros say.
pub fn write_macros(home: &Path, dbpath: &str) -> Result<()> {
    std::fs::create_dir_all(home).with_context(|| format!("Creating {}", home.display()))?;
    let text = format!("%_dbpath /{}\n", dbpath.trim_start_matches('/'));
    std::fs::write(home.join(".rpmmacros"), text).context("Writing .rpmmacros")
}

/// Copies the database files of `from` into `to` (created), for a resolver that must not touch
/// the image's copy.
pub fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("Creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("Listing {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))
                .with_context(|| format!("Copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Makes the database in `dir` a single self-contained file again, readable where it cannot be
/// written: checkpoints the sqlite WAL into `rpmdb.sqlite`, leaves WAL mode (a database in WAL
/// mode cannot be opened on a read-only `/usr` without its `-shm` file: rpm and dnf then fail
/// with "unable to open database file", as rpm-ostree found too), and removes
/// `rpmdb.sqlite-wal`, `rpmdb.sqlite-shm` and `.rpm.lock`. A database that ends byte for byte
/// the one in `base` (the build's starting point: nothing was installed or removed) is left
/// as it is, so that such a build gives the image's own tree.
pub fn clean(dir: &Path, base: Option<&Path>) -> Result<()> {
    let db = dir.join("rpmdb.sqlite");
    if db.exists() {
        sqlite(&db, "PRAGMA wal_checkpoint(TRUNCATE);")?;
        let unchanged = base
            .and_then(|b| std::fs::read(b.join("rpmdb.sqlite")).ok())
            .is_some_and(|before| std::fs::read(&db).is_ok_and(|now| now == before));
        if !unchanged {
            sqlite(&db, "PRAGMA journal_mode=DELETE;")?;
        }
    }
    for name in ["rpmdb.sqlite-wal", "rpmdb.sqlite-shm", ".rpm.lock"] {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("Removing {}", p.display())),
        }
    }
    Ok(())
}

/// Runs `sql` on the database `db` with the sqlite3 program.
fn sqlite(db: &Path, sql: &str) -> Result<()> {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .context("Running sqlite3")?;
    if !out.status.success() {
        bail!(
            "sqlite3 failed on {} ({sql}): {}",
            db.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `sqlite3 --version`, when it runs.
pub fn sqlite_version() -> Option<String> {
    crate::process::version_line("sqlite3")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_database_where_the_image_has_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        assert_eq!(find(root), None);
        std::fs::create_dir_all(root.join("var/lib/rpm")).expect("mkdir");
        std::fs::write(root.join("var/lib/rpm/Packages"), "").expect("write");
        assert_eq!(find(root), Some("var/lib/rpm"));
        std::fs::create_dir_all(root.join("usr/lib/sysimage/rpm")).expect("mkdir");
        assert_eq!(
            find(root),
            Some("var/lib/rpm"),
            "an empty directory is no database"
        );
        std::fs::write(root.join("usr/lib/sysimage/rpm/rpmdb.sqlite"), "").expect("write");
        assert_eq!(find(root), Some("usr/lib/sysimage/rpm"));
        write_macros(&root.join("home"), "usr/lib/sysimage/rpm").expect("macros");
        assert_eq!(
            std::fs::read_to_string(root.join("home/.rpmmacros")).expect("read"),
            "%_dbpath /usr/lib/sysimage/rpm\n"
        );
    }

    #[test]
    fn a_cleaned_database_is_one_file_out_of_wal_mode() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = tmp.path().join("rpmdb.sqlite");
        let out = Command::new("sqlite3")
            .arg(&db)
            .arg("PRAGMA journal_mode=WAL; CREATE TABLE p(x); INSERT INTO p VALUES (1);")
            .output()
            .expect("sqlite3 runs");
        assert!(out.status.success(), "{out:?}");
        // Bytes 18 and 19 of the header: 2 in WAL mode, 1 with a rollback journal.
        let header = |db: &Path| std::fs::read(db).expect("read")[18..20].to_vec();
        assert_eq!(header(&db), [2, 2]);
        std::fs::write(tmp.path().join(".rpm.lock"), "").expect("write");
        // The same database as the build started from: left in its mode.
        let base = tempfile::tempdir().expect("tempdir");
        std::fs::copy(&db, base.path().join("rpmdb.sqlite")).expect("copy");
        clean(tmp.path(), Some(base.path())).expect("clean");
        assert_eq!(header(&db), [2, 2]);
        // Changed: out of WAL mode.
        let out = Command::new("sqlite3")
            .arg(&db)
            .arg("INSERT INTO p VALUES (2);")
            .output()
            .expect("sqlite3 runs");
        assert!(out.status.success(), "{out:?}");
        std::fs::write(tmp.path().join(".rpm.lock"), "").expect("write");
        clean(tmp.path(), Some(base.path())).expect("clean");
        assert_eq!(header(&db), [1, 1]);
        let mut left: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["rpmdb.sqlite"]);
        let out = Command::new("sqlite3")
            .arg(format!("file:{}?mode=ro", db.display()))
            .arg("SELECT x FROM p;")
            .output()
            .expect("sqlite3 runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1\n2");
    }
}
