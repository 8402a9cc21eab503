//! Helpers shared by integration tests: real servers started on loopback.

pub mod knot;
