//! The four command-line dialects, each read into a [`crate::LaunchPlan`].
