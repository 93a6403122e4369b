//! Finding one cycle in a directed graph of names, deterministically: the
//! `after` of roles within a service (`checks`) and of machines across
//! services (`resolution`). It only finds a cycle; whether that is an error
//! and where to report it is the caller's business.

use std::collections::BTreeMap;

use crate::spec::names::Name;

/// Finds one cycle in a directed graph given as (node, successors).
pub(super) fn find_cycle(graph: impl Iterator<Item = (Name, Vec<Name>)>) -> Option<Vec<Name>> {
    let graph: BTreeMap<Name, Vec<Name>> = graph.collect();
    find_cycle_from(graph.keys(), |node| {
        graph
            .get_key_value(node)
            .map(|(name, successors)| (name, successors.iter()))
    })
}

/// Finds one cycle reachable from `starts` (tried in order), depth first.
/// `node(n)` gives the node named `n` and its successors in order, or `None`
/// when there is no such node (an edge to it is ignored). Deterministic: the
/// same graph and starts give the same cycle. A cycle is found exactly when
/// one is reachable from the starts.
pub(super) fn find_cycle_from<'g, I>(
    starts: impl Iterator<Item = &'g Name>,
    node: impl Fn(&Name) -> Option<(&'g Name, I)>,
) -> Option<Vec<Name>>
where
    I: Iterator<Item = &'g Name>,
{
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Active,
        Done,
    }
    let mut marks: BTreeMap<&Name, Mark> = BTreeMap::new();
    for start in starts {
        if marks.contains_key(start) {
            continue;
        }
        let Some((start, successors)) = node(start) else {
            continue;
        };
        // Iterative DFS: the active path, each node with its successors not
        // yet followed.
        let mut stack: Vec<(&Name, I)> = vec![(start, successors)];
        marks.insert(start, Mark::Active);
        while let Some((current, successors)) = stack.last_mut() {
            let current: &Name = current;
            let Some(succ) = successors.next() else {
                marks.insert(current, Mark::Done);
                stack.pop();
                continue;
            };
            match marks.get(succ) {
                Some(Mark::Active) => {
                    let from = stack.iter().position(|(n, _)| *n == succ).unwrap_or(0);
                    return Some(stack[from..].iter().map(|(n, _)| (*n).clone()).collect());
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some((key, successors)) = node(succ) {
                        marks.insert(key, Mark::Active);
                        stack.push((key, successors));
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn find_cycle_finds_cycles_and_only_cycles() {
        let acyclic = vec![
            (n("a"), vec![n("b")]),
            (n("b"), vec![n("c")]),
            (n("c"), vec![]),
        ];
        assert_eq!(find_cycle(acyclic.into_iter()), None);
        let cyclic = vec![
            (n("a"), vec![n("b")]),
            (n("b"), vec![n("c")]),
            (n("c"), vec![n("a")]),
        ];
        let cycle = find_cycle(cyclic.into_iter()).unwrap();
        assert_eq!(cycle.len(), 3);
    }
}
