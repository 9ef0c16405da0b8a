//! cgsentry's test workloads and VM scenario runner (see `workload --help`).
#![allow(
    clippy::missing_errors_doc,
    clippy::missing_panics_doc,
    reason = "a test harness: its failures are printed where they happen, and it panics \
              only on poisoned locks or pipes it created itself"
)]
pub mod behaviours;
pub mod cgroup;
pub mod keeper;
pub mod mem;
pub mod runner;
pub mod scenario;
pub mod systemd;
