//! The name an image reference gets in the cache. References themselves are parsed by
//! `dnfimage_interfaces::reference`, which every service shares.

use dnfimage_interfaces::reference::ImageRef;
use sha2::{Digest, Sha256};

/// Bytes of the reference kept readable in a cache tag.
const READABLE: usize = 80;

/// A tag naming `image` in the cache's OCI layout: readable, unique per reference, and one
/// skopeo accepts in `oci:PATH:TAG` (letters and digits separated by one of `-`, `.`, `_` or
/// `--`): other characters become `_`, a run of separators skopeo refuses becomes one `_`.
pub fn cache_tag(image: &ImageRef) -> String {
    let mapped: Vec<u8> = image
        .name()
        .trim_start_matches('/')
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
                b
            } else {
                b'_'
            }
        })
        .collect();
    let mut readable = Vec::with_capacity(mapped.len().min(READABLE * 2));
    for run in mapped.chunk_by(|a, b| a.is_ascii_alphanumeric() == b.is_ascii_alphanumeric()) {
        if readable.len() >= READABLE {
            break;
        }
        if run[0].is_ascii_alphanumeric() {
            readable.extend_from_slice(run);
        } else if !readable.is_empty() {
            let valid = matches!(run, b"-" | b"." | b"_" | b"--");
            readable.extend_from_slice(if valid { run } else { b"_" });
        }
    }
    readable.truncate(READABLE);
    // The tag goes on with "-": a trailing "-" makes a valid "--", any other separator not.
    let kept = readable
        .iter()
        .rposition(u8::is_ascii_alphanumeric)
        .map_or(0, |last| last + 1);
    if &readable[kept..] != b"-" {
        readable.truncate(kept);
    }
    let hash = hex::encode(Sha256::digest(image.to_string().as_bytes()));
    let hash = &hash[..12];
    if readable.is_empty() {
        return hash.to_string();
    }
    format!(
        "{}-{hash}",
        String::from_utf8(readable).expect("mapped to ASCII")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tag before separators were checked, to show valid tags did not change.
    fn unchecked_tag(image: &ImageRef) -> String {
        let readable: String = image
            .name()
            .trim_start_matches('/')
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(READABLE)
            .collect();
        let hash = Sha256::digest(image.to_string().as_bytes());
        format!("{readable}-{}", &hex::encode(hash)[..12])
    }

    #[test]
    fn cache_tags_are_valid_and_distinct() {
        let a = ImageRef::parse("docker://127.0.0.1:5000/dnfimage/base:v1").unwrap();
        let b = ImageRef::parse("oci:/127.0.0.1:5000/dnfimage/base:v1").unwrap();
        let ta = cache_tag(&a);
        assert!(ta.starts_with("127.0.0.1_5000_dnfimage_base_v1-"), "{ta}");
        assert_ne!(ta, cache_tag(&b));
        assert_eq!(ta, cache_tag(&a));
    }

    #[test]
    fn cache_tags_are_layout_tags_skopeo_accepts() {
        let long = "a".repeat(78);
        let references = [
            "docker://127.0.0.1:5000/dnfimage/base:v1".to_string(),
            "quay.io/fedora/fedora-bootc:41".to_string(),
            "quay.io/os:v1.".to_string(),
            "quay.io/os:v1-".to_string(),
            "quay.io/os:_x".to_string(),
            "quay.io/os:x__".to_string(),
            "quay.io/a---b:1".to_string(),
            "quay.io/a--b:1".to_string(),
            "quay.io/a__b/c.d/e-f:1.0_2-3".to_string(),
            format!("quay.io/os@sha256:{}", "ab".repeat(32)),
            "[::1]:5000/os:1".to_string(),
            format!("x.io/{long}:1"),
            format!("x.io/{long}-b:1"),
            format!("x.io/{long}--b:1"),
            format!("x.io/{long}.b:1"),
            format!("x.io/{long}b.c:1"),
            "oci:/.hidden/x".to_string(),
            "oci:/srv/é/layout:A--b+c@d".to_string(),
            "oci:/__/x".to_string(),
            "oci:/_".to_string(),
            "oci-archive:/tmp/os.tar:v1".to_string(),
        ];
        for reference in &references {
            let image = ImageRef::parse(reference).unwrap();
            let tag = cache_tag(&image);
            let layout = format!("oci:/var/lib/dnfimage/cache:{tag}");
            assert!(
                ImageRef::parse_local(&layout).is_ok(),
                "{reference} -> {tag}: {:?}",
                ImageRef::parse_local(&layout)
            );
            assert!(tag.len() <= READABLE + 13, "{tag}");
            // A tag that was valid before stays the same: the cache finds its entries.
            let before = unchecked_tag(&image);
            if ImageRef::parse_local(&format!("oci:/cache:{before}")).is_ok() {
                assert_eq!(tag, before, "{reference}");
            }
        }
        let tags: std::collections::BTreeSet<String> = references
            .iter()
            .map(|r| cache_tag(&ImageRef::parse(r).unwrap()))
            .collect();
        assert_eq!(tags.len(), references.len());
    }
}
