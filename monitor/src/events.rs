//! Lifecycle events from the eBPF ring buffer, decoded into typed values.
//!
//! The wire format is `monitor_common::ProcEvent` (`#[repr(C)]`, native endian): a
//! versioned header, then the event's fields. Decoding reads it field by field through
//! `bytes::Buf` (no pointer casts of kernel-provided bytes), checks length, version and
//! kind, and turns anything unexpected into a [`DecodeError`].
use bytes::Buf as _;
use monitor_common::{EVENT_VERSION, EventKind};
use serde::Serialize;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `pid` created `other_pid`.
    Fork,
    /// `pid` exec'd (`comm` is the new name).
    Exec,
    /// Process `tgid` exited.
    Exit,
    /// The kernel OOM killer chose `other_pid`, while `pid` was allocating.
    OomVictim,
}

/// One decoded lifecycle event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcEvent {
    pub kind: Kind,
    /// Monotonic ns (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// cgroup v2 id of the task the event happened in.
    pub cgroup: u64,
    pub pid: u32,
    pub tgid: u32,
    /// Fork child or OOM victim; 0 otherwise.
    pub other_pid: u32,
    /// The task's name, lossily decoded; control characters escaped.
    pub comm: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("event version {0} is not {EVENT_VERSION}: agent and programs disagree")]
    Version(u32),
    #[error("unknown event kind {0}")]
    Kind(u32),
}

const HEADER: usize = 32;
const EVENT: usize = 56;
const _: () = assert!(core::mem::size_of::<monitor_common::EventHeader>() == HEADER);
const _: () = assert!(core::mem::size_of::<monitor_common::ProcEvent>() == EVENT);

/// A comm as the operator may see it: up to the first NUL, invalid UTF-8 replaced,
/// control characters (newlines, escapes) and invisible or direction-changing ones
/// escaped (`\u{202e}`).
#[must_use]
pub fn comm_to_string(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end])
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if crate::cgroupfs::needs_escape(c) {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

impl ProcEvent {
    /// Decodes one ring-buffer record.
    ///
    /// # Errors
    /// Too short, another layout version, or an unknown kind.
    pub fn decode(mut buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() < HEADER {
            return Err(DecodeError::Short(buf.len()));
        }
        let kind = buf.get_u32_ne();
        let version = buf.get_u32_ne();
        if version != EVENT_VERSION {
            return Err(DecodeError::Version(version));
        }
        let kind = match kind {
            k if k == EventKind::Fork as u32 => Kind::Fork,
            k if k == EventKind::Exec as u32 => Kind::Exec,
            k if k == EventKind::Exit as u32 => Kind::Exit,
            k if k == EventKind::OomVictim as u32 => Kind::OomVictim,
            k => return Err(DecodeError::Kind(k)),
        };
        if buf.len() < EVENT - 8 {
            return Err(DecodeError::Short(buf.len() + 8));
        }
        let ts_ns = buf.get_u64_ne();
        let cgroup = buf.get_u64_ne();
        let pid = buf.get_u32_ne();
        let tgid = buf.get_u32_ne();
        let other_pid = buf.get_u32_ne();
        let _padding = buf.get_u32_ne();
        let comm = comm_to_string(&buf[..16]);
        Ok(Self {
            kind,
            ts_ns,
            cgroup,
            pid,
            tgid,
            other_pid,
            comm,
        })
    }
}

#[cfg(test)]
mod tests {
    use monitor_common::{EventHeader, ProcEvent as Raw};

    use super::*;

    fn raw(kind: u32, version: u32, comm: &[u8]) -> Vec<u8> {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm);
        let ev = Raw {
            header: EventHeader {
                kind,
                version,
                ts_ns: 7,
                cgroup: 42,
                pid: 100,
                tgid: 99,
            },
            other_pid: 101,
            padding: 0,
            comm: c,
        };
        // The bytes as the kernel writes them: the struct's native representation.
        let mut out = Vec::new();
        out.extend_from_slice(&ev.header.kind.to_ne_bytes());
        out.extend_from_slice(&ev.header.version.to_ne_bytes());
        out.extend_from_slice(&ev.header.ts_ns.to_ne_bytes());
        out.extend_from_slice(&ev.header.cgroup.to_ne_bytes());
        out.extend_from_slice(&ev.header.pid.to_ne_bytes());
        out.extend_from_slice(&ev.header.tgid.to_ne_bytes());
        out.extend_from_slice(&ev.other_pid.to_ne_bytes());
        out.extend_from_slice(&ev.padding.to_ne_bytes());
        out.extend_from_slice(&ev.comm);
        assert_eq!(out.len(), core::mem::size_of::<Raw>());
        out
    }

    #[test]
    fn decodes_a_fork() {
        let e = ProcEvent::decode(&raw(EventKind::Fork as u32, EVENT_VERSION, b"pool")).unwrap();
        assert_eq!(e.kind, Kind::Fork);
        assert_eq!(
            (e.ts_ns, e.cgroup, e.pid, e.tgid, e.other_pid),
            (7, 42, 100, 99, 101)
        );
        assert_eq!(e.comm, "pool");
    }

    #[test]
    fn odd_comms_are_safe() {
        let e = ProcEvent::decode(&raw(
            EventKind::Exec as u32,
            EVENT_VERSION,
            b"a b\n\x1b[2J\xff\xfe",
        ))
        .unwrap();
        assert_eq!(e.comm, "a b\\n\\u{1b}[2J\u{fffd}\u{fffd}");
        // A right-to-left override cannot reorder what follows it on screen.
        assert_eq!(comm_to_string("x\u{202e}gpj".as_bytes()), "x\\u{202e}gpj");
        let full = ProcEvent::decode(&raw(
            EventKind::Exit as u32,
            EVENT_VERSION,
            b"0123456789abcdef",
        ))
        .unwrap();
        assert_eq!(
            full.comm, "0123456789abcdef",
            "a comm without NUL uses all 16 bytes"
        );
    }

    #[test]
    fn rejects_what_it_does_not_understand() {
        assert_eq!(ProcEvent::decode(&[0; 8]), Err(DecodeError::Short(8)));
        assert_eq!(
            ProcEvent::decode(&raw(1, 99, b"x")),
            Err(DecodeError::Version(99))
        );
        assert_eq!(
            ProcEvent::decode(&raw(77, EVENT_VERSION, b"x")),
            Err(DecodeError::Kind(77))
        );
        let short = raw(1, EVENT_VERSION, b"x");
        assert_eq!(ProcEvent::decode(&short[..40]), Err(DecodeError::Short(40)));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap exhaustive-ish sweep: every length, a few fill patterns, valid headers.
        for len in 0..80 {
            for fill in [0u8, 0xff, 0x01, 0x80] {
                let mut b = vec![fill; len];
                if len >= 8 {
                    b[..4].copy_from_slice(&1u32.to_ne_bytes());
                    b[4..8].copy_from_slice(&EVENT_VERSION.to_ne_bytes());
                }
                let _ = ProcEvent::decode(&b);
            }
        }
    }
}
