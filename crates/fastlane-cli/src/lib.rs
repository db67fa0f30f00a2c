//! The `fastlane` command's logic; `main.rs` only parses and dispatches.
//!
//! * [`demo`]: the demo app of the seed scenarios;
//! * [`probe`]: the concurrency tester (`fastlane probe`);
//! * [`mixed`]: the fast-route-under-load benchmark (`fastlane bench mixed`);
//! * [`jobs`]: the built-in demo job types and `fastlane jobs bench`;
//! * [`serve`]: `fastlane serve main:app`, for ASGI (FastAPI) apps.

pub mod demo;
pub mod jobs;
pub mod mixed;
pub mod probe;
pub mod serve;
