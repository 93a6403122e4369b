//! The desired-state test suite: one integration binary, one file per scenario.
//!
//! Everything here goes through the public API (`converge::source`,
//! `converge::spec`) or the `converge` binary, with real files in temporary
//! directories.

// Helpers outside `#[test]` functions (fixtures, proptest bodies) are test
// code too: a failed fixture should stop the test loudly.
#![expect(clippy::expect_used, reason = "test helpers fail loudly")]

mod examples;
mod fuzz;
mod incremental;
mod invalid_inputs;
mod roles;
mod schemas;
mod source_cache;
mod support;
