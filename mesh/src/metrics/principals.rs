//! Label values for principals, bounded: a metric's label set lives as long as the process, so
//! a label that took any value a peer chose would let peers grow memory and the scrape without
//! limit. Only SPIFFE IDs from verified certificates become labels, and only the first
//! [`Principals::MAX`] distinct ones; later ones are labelled `other`.

use std::collections::HashSet;
use std::sync::Mutex;

use hbone::identity::SpiffeId;

/// The label of a connection whose peer showed no verified identity.
pub const UNKNOWN: &str = "unknown";

/// The label of a principal beyond the cap.
pub const OTHER: &str = "other";

/// The principals seen so far, at most [`Principals::MAX`].
#[derive(Debug, Default)]
pub struct Principals(Mutex<HashSet<String>>);

impl Principals {
    /// Distinct principals that get their own label value.
    pub const MAX: usize = 100;

    /// The label value of `principal` (a verified identity, or `None`).
    pub fn label(&self, principal: Option<&SpiffeId>) -> String {
        let Some(principal) = principal else {
            return UNKNOWN.to_owned();
        };
        let uri = principal.to_string();
        let Ok(mut seen) = self.0.lock() else {
            return OTHER.to_owned();
        };
        if seen.contains(&uri) {
            return uri;
        }
        if seen.len() >= Self::MAX {
            return OTHER.to_owned();
        }
        seen.insert(uri.clone());
        uri
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_beyond_the_cap_share_one_label() {
        let principals = Principals::default();
        let id = |i: usize| SpiffeId::new("cluster.local", "ns", &format!("sa{i}"));
        for i in 0..Principals::MAX {
            assert_eq!(
                principals.label(Some(&id(i))),
                "spiffe://cluster.local/ns/ns/sa/sa".to_owned() + &i.to_string()
            );
        }
        assert_eq!(principals.label(Some(&id(Principals::MAX))), OTHER);
        assert_eq!(
            principals.label(Some(&id(0))),
            "spiffe://cluster.local/ns/ns/sa/sa0",
            "a principal already labelled keeps its label"
        );
        assert_eq!(principals.label(None), UNKNOWN);
    }
}
