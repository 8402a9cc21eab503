//! Helpers shared by integration tests: real servers started on loopback.
// Each test crate compiles this module and uses a different part of it.
#![allow(dead_code)]

pub mod knot;
