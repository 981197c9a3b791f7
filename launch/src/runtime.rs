//! The node's launcher.
