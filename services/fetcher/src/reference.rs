//! The name an image reference gets in the cache. References themselves are parsed by
//! `dnfimage_interfaces::reference`, which every service shares.

use dnfimage_interfaces::reference::ImageRef;
use sha2::{Digest, Sha256};

/// A tag naming `image` in the cache's OCI layout: readable, unique per reference.
pub fn cache_tag(image: &ImageRef) -> String {
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
        .take(80)
        .collect();
    let hash = Sha256::digest(image.to_string().as_bytes());
    format!("{readable}-{}", &hex::encode(hash)[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_tags_are_valid_and_distinct() {
        let a = ImageRef::parse("docker://127.0.0.1:5000/dnfimage/base:v1").unwrap();
        let b = ImageRef::parse("oci:/127.0.0.1:5000/dnfimage/base:v1").unwrap();
        let ta = cache_tag(&a);
        assert!(ta.starts_with("127.0.0.1_5000_dnfimage_base_v1-"), "{ta}");
        assert_ne!(ta, cache_tag(&b));
        assert!(
            ta.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        );
        assert_eq!(ta, cache_tag(&a));
    }
}
