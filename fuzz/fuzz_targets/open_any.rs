//! Fuzz target: any bytes, opened as whatever format they are detected as.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::exercise(data, None, "fuzz.img"));
