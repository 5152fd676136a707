//! Fuzz target: inputs for the qcow2 parser (the signature is added when missing).
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::exercise(data, Some(b"QFI\xfb"), "fuzz.qcow2"));
