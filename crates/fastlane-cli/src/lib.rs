//! The `fastlane` command's logic; `main.rs` only parses and dispatches.
//!
//! * [`demo`]: the demo app of the seed scenarios;
//! * [`probe`]: the concurrency tester (`fastlane probe`).

pub mod demo;
pub mod probe;
