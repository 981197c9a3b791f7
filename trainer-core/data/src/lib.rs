//! Training data (placeholder; being written).
