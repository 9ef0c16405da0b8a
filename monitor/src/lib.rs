//! cgsentry, the agent: collects per-cgroup signals from eBPF and cgroup v2 files and,
//! in later stages, detects, decides and contains (see DESIGN.md's pipeline).
//!
//! Stages: [`preflight`] (is the kernel usable), [`probes`] (eBPF load/attach/maps),
//! [`cgroupfs`] (cgroup v2 files), [`events`] (ring-buffer decoding),
//! [`collect`] (one `Snapshot` per tick),
//! [`gpu`] (NVML), [`report`] (table, JSON), [`watch`] (early ticks on a memory burst), [`agent`] (the
//! tokio loop), [`cli`].
pub mod act;
pub mod agent;
pub mod cgroupfs;
pub mod cli;
pub mod collect;
pub mod control;
pub mod decide;
pub mod detect;
pub mod durable;
pub mod eventlog;
pub mod events;
pub mod explain;
pub mod gpu;
pub mod history;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod policy;
pub mod preflight;
pub mod probes;
pub mod procinfo;
pub mod report;
pub mod safety;
pub mod systemd;
pub mod top;
pub mod watch;
