//! NBD client (placeholder; being written).
