#![no_std]
// This file exists so that `monitor` can name this crate as a build-dependency (cargo then
// rebuilds the agent when the programs change); the programs live in src/main.rs.
