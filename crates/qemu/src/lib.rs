//! QMP and QGA clients (placeholder; being written).
