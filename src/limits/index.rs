//! Which limits of a namespace can apply to a request, found without evaluating each one.
//!
//! Most limits have a condition `descriptors[N].key == 'literal'` (a route, a tier, a
//! descriptor entry Envoy sets). Such a condition must hold for the limit to apply, so the
//! limit is filed under (N, key) and the literal: a request reads each filed (N, key) once and
//! gets the limits filed under its value. Limits without such a condition are candidates for
//! every request. Candidates are then evaluated in full, in file order, exactly as without the
//! index: it only skips limits that could not apply.

use std::collections::HashMap;

use smallvec::SmallVec;

use super::Limit;
use super::native::Lookup;
use crate::request::Descriptor;

#[derive(Default)]
pub struct LimitIndex {
    /// Positions (in file order) of the limits that no filed condition rules out.
    unfiled: Vec<usize>,
    /// Per lookup, literal → positions of the limits that require `lookup == literal`.
    filed: Vec<(Lookup, ByLiteral)>,
}

type ByLiteral = HashMap<Box<str>, Vec<usize>>;

/// Positions of candidate limits, ascending.
pub type Candidates = SmallVec<[usize; 8]>;

impl LimitIndex {
    pub fn new<'a>(limits: impl IntoIterator<Item = &'a Limit>) -> Self {
        let mut index = Self::default();
        for (position, limit) in limits.into_iter().enumerate() {
            let required = limit
                .conditions
                .iter()
                .find_map(|c| c.native().and_then(|n| n.required_equality()));
            let Some((lookup, literal)) = required else {
                index.unfiled.push(position);
                continue;
            };
            let slot = match index.filed.iter().position(|(l, _)| l == lookup) {
                Some(slot) => slot,
                None => {
                    index.filed.push((lookup.clone(), HashMap::new()));
                    index.filed.len() - 1
                }
            };
            index.filed[slot]
                .1
                .entry(literal.into())
                .or_default()
                .push(position);
        }
        index
    }

    /// The positions of the limits that may apply to `descriptors`, in file order.
    pub fn candidates(&self, descriptors: &[Descriptor]) -> Candidates {
        let mut found: Candidates = self.unfiled.iter().copied().collect();
        for (lookup, by_literal) in &self.filed {
            let value = lookup.read(descriptors).ok().flatten();
            if let Some(positions) = value.and_then(|v| by_literal.get(v)) {
                found.extend(positions.iter().copied());
            }
        }
        if !self.filed.is_empty() {
            found.sort_unstable();
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Input, KeyValues, parse_limits};

    const LIMITS: &str = r#"
- {namespace: n, max_value: 1, seconds: 1, conditions: ["descriptors[0].route == 'a'"], variables: []}
- {namespace: n, max_value: 1, seconds: 1, conditions: ["'b' == descriptors[0]['route']", "descriptors[0].user != 'x'"], variables: ["descriptors[0].user"]}
- {namespace: n, max_value: 1, seconds: 1, conditions: ["descriptors[0].route != 'a'"], variables: []}
- {namespace: n, max_value: 1, seconds: 1, conditions: ["size(descriptors) > 1", "descriptors[1].tier == 'gold'"], variables: []}
- {namespace: n, max_value: 1, seconds: 1, conditions: ["descriptors[1].tier == 'gold'"], variables: []}
- {namespace: n, max_value: 1, seconds: 1, conditions: ["descriptors[0].route == 'a' || descriptors[0].route == 'b'"], variables: []}
- {namespace: n, max_value: 1, seconds: 1, conditions: [], variables: ["descriptors[0].user"]}
- {namespace: n, max_value: 1, seconds: 2, conditions: ["descriptors[0].route == 'a'"], variables: ["descriptors[0].user"]}
"#;

    /// Evaluating only the candidates applies exactly the limits that evaluating every limit
    /// does, and the index does skip limits.
    #[test]
    fn candidates_lose_no_limit_that_applies() {
        let limits = parse_limits("test", LIMITS).unwrap();
        let index = LimitIndex::new(&limits);
        let requests = [
            vec![],
            vec![Descriptor::of(&[("route", "a"), ("user", "u")])],
            vec![Descriptor::of(&[("route", "b"), ("user", "x")])],
            vec![Descriptor::of(&[("route", "b"), ("user", "y")])],
            vec![Descriptor::of(&[("route", "a"), ("route", "c")])],
            vec![Descriptor::of(&[("route", "c"), ("route", "a")])],
            vec![
                Descriptor::of(&[("user", "u")]),
                Descriptor::of(&[("tier", "gold")]),
            ],
            vec![
                Descriptor::of(&[("route", "a")]),
                Descriptor::of(&[("tier", "free")]),
            ],
        ];
        let mut skipped = 0;
        for descriptors in &requests {
            let input = Input::new(descriptors);
            let applies = |i: &usize| limits[*i].applies(&input, &mut KeyValues::new()) == Ok(true);
            let everything: Vec<usize> = (0..limits.len()).filter(applies).collect();
            let candidates = index.candidates(descriptors);
            let through_index: Vec<usize> = candidates.iter().copied().filter(applies).collect();
            assert_eq!(through_index, everything, "{descriptors:?}");
            assert!(candidates.windows(2).all(|w| w[0] < w[1]), "in file order");
            skipped += limits.len() - candidates.len();
        }
        assert!(skipped > 0, "the index never skipped a limit");
    }
}
