//! What a wedged guest's CPUs were doing when its console went silent.
//!
//! A guest that prints nothing for a minute has no way left to tell us where it is stuck
//! (its own lockup reports are cut off mid-stack). QEMU still can: its monitor reports
//! every vCPU's registers. The harness samples them a few times before it stops the VM
//! and names each instruction pointer from the kernel's `System.map` (the guest boots
//! with `nokaslr`, so the map's addresses are the running ones). Debian's packaged map
//! is a stub (the real one is in `linux-image-*-dbg`); then the exact addresses are
//! printed for resolving offline. A CPU that stays in one
//! function across the samples is the one to look at; `HLT=1` is an idle CPU that was
//! never woken.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// One vCPU in one `info registers -a` sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    pub index: usize,
    pub rip: u64,
    pub cpl: u8,
    pub halted: bool,
}

/// Reads the vCPUs out of `info registers -a` output (`CPU#n` headers, then the
/// `RIP=… RFL=… CPL=… HLT=…` line of each).
pub fn parse_registers(text: &str) -> Vec<Cpu> {
    let mut cpus = Vec::new();
    let mut index = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(n) = line.strip_prefix("CPU#") {
            index = n.trim().parse().ok();
            continue;
        }
        let Some(rest) = line.strip_prefix("RIP=") else {
            continue;
        };
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
        };
        let rip = rest.split_whitespace().next().unwrap_or_default();
        let (Some(i), Ok(rip)) = (index.take(), u64::from_str_radix(rip, 16)) else {
            continue;
        };
        cpus.push(Cpu {
            index: i,
            rip,
            cpl: field("CPL=").and_then(|v| v.parse().ok()).unwrap_or(0),
            halted: field("HLT=").as_deref() == Some("1"),
        });
    }
    cpus
}

/// The kernel's text symbols, sorted by address.
pub struct Symbols(Vec<(u64, String)>);

impl Symbols {
    /// Parses `System.map` text (`ffffffff81000000 T _stext`); only code symbols.
    pub fn parse(text: &str) -> Self {
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_owned()))
            })
            .collect();
        syms.sort_unstable();
        Self(syms)
    }

    /// `function+0xoffset`, or where the address lies outside the kernel image (modules,
    /// eBPF JIT images, user space) a plain note.
    pub fn name(&self, addr: u64, cpl: u8) -> String {
        if cpl == 3 {
            return format!("user space {addr:#x}");
        }
        if self.0.is_empty() {
            // Debian ships a stub System.map: the address is still exact (nokaslr), to
            // be resolved with the kernel's -dbg package.
            return format!("kernel {addr:#x}");
        }
        let last = self.0.last().map_or(0, |(a, _)| *a);
        match self.0.partition_point(|(a, _)| *a <= addr) {
            0 => format!("{addr:#x} (outside the kernel image)"),
            // Past the last symbol by more than a page: modules or JIT images.
            _ if addr > last + 0x1000 => format!("{addr:#x} (module or eBPF JIT image)"),
            i => {
                let (base, name) = &self.0[i - 1];
                format!("{name}+{:#x}", addr - base)
            }
        }
    }
}

/// Asks QEMU's monitor for every vCPU's registers `samples` times, `gap` apart. Empty
/// where the monitor does not answer within a few seconds (QEMU itself wedged).
pub fn sample(socket: &Path, samples: usize, gap: Duration) -> Vec<Vec<Cpu>> {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return Vec::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut out = Vec::new();
    for i in 0..samples {
        if i > 0 {
            std::thread::sleep(gap);
        }
        if stream.write_all(b"info registers -a\n").is_err() {
            break;
        }
        let text = read_until_quiet(&mut stream, Duration::from_secs(3));
        let cpus = parse_registers(&text);
        if cpus.is_empty() {
            break;
        }
        out.push(cpus);
    }
    out
}

/// Reads what the monitor sends until it pauses (its prompt) or `limit` passes.
fn read_until_quiet(stream: &mut UnixStream, limit: Duration) -> String {
    let start = Instant::now();
    let mut text = Vec::new();
    let mut buf = [0u8; 8192];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            // A pause after the register dump has begun: the dump is complete.
            Err(_) if text.windows(4).any(|w| w == b"RIP=") && text.ends_with(b"(qemu) ") => {
                break;
            }
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// One line per vCPU: where it was in each sample.
pub fn describe(samples: &[Vec<Cpu>], symbols: &Symbols) -> Vec<String> {
    let Some(first) = samples.first() else {
        return vec!["QEMU's monitor did not answer (the emulator itself is stuck)".into()];
    };
    first
        .iter()
        .map(|cpu| {
            let seen: Vec<String> = samples
                .iter()
                .filter_map(|s| s.iter().find(|c| c.index == cpu.index))
                .map(|c| {
                    let at = symbols.name(c.rip, c.cpl);
                    if c.halted {
                        format!("{at} (halted)")
                    } else {
                        at
                    }
                })
                .collect();
            format!("vCPU {}: {}", cpu.index, seen.join(" -> "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "info registers -a\r\n\r\nCPU#0\r\n\
RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000001 RDX=0000000000000000\r\n\
RIP=ffffffff81a3c0f2 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n\
ES =0000 0000000000000000 00000000 00000000\r\n\r\nCPU#1\r\n\
RAX=ffff888003c1a000 RBX=0000000000000002 RCX=0000000000000000 RDX=0000000000000001\r\n\
RIP=ffffffff81158a4d RFL=00000202 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\r\n(qemu) ";

    const MAP: &str = "ffffffff81000000 T _stext\n\
ffffffff81158a00 T smp_call_function_single\n\
ffffffff81158c00 t generic_exec_single\n\
ffffffff81a3c0e0 T default_idle\n\
ffffffff81a3c100 T default_idle_call\n\
ffffffff82000000 D some_data\n";

    #[test]
    fn registers_are_read_per_cpu() {
        let cpus = parse_registers(DUMP);
        assert_eq!(
            cpus,
            vec![
                Cpu {
                    index: 0,
                    rip: 0xffff_ffff_81a3_c0f2,
                    cpl: 0,
                    halted: true
                },
                Cpu {
                    index: 1,
                    rip: 0xffff_ffff_8115_8a4d,
                    cpl: 0,
                    halted: false
                },
            ]
        );
    }

    #[test]
    fn addresses_are_named_from_the_map() {
        let syms = Symbols::parse(MAP);
        assert_eq!(
            syms.name(0xffff_ffff_8115_8a4d, 0),
            "smp_call_function_single+0x4d"
        );
        assert_eq!(syms.name(0xffff_ffff_81a3_c0e0, 0), "default_idle+0x0");
        assert!(
            syms.name(0xffff_ffff_c012_3456, 0)
                .contains("module or eBPF")
        );
        assert!(syms.name(0x7f00_0000_1000, 3).starts_with("user space"));
        // Data symbols are not functions: an address there is past the last function.
        assert_eq!(
            syms.name(0xffff_ffff_81a3_c180, 0),
            "default_idle_call+0x80"
        );
        assert!(!syms.name(0xffff_ffff_8200_0010, 0).contains("some_data"));
    }

    #[test]
    fn a_stuck_cpu_reads_as_one_line_per_vcpu() {
        let syms = Symbols::parse(MAP);
        let s = parse_registers(DUMP);
        let lines = describe(&[s.clone(), s], &syms);
        assert_eq!(
            lines,
            vec![
                "vCPU 0: default_idle+0x12 (halted) -> default_idle+0x12 (halted)",
                "vCPU 1: smp_call_function_single+0x4d -> smp_call_function_single+0x4d",
            ]
        );
        assert!(describe(&[], &syms)[0].contains("did not answer"));
        // Debian's stub map has no code symbols: the exact address is kept.
        let stub = Symbols::parse("ffffffffffffffff B The real System.map is in the -dbg package");
        let cpu0 = vec![parse_registers(DUMP)[..1].to_vec()];
        assert_eq!(
            describe(&cpu0, &stub),
            vec!["vCPU 0: kernel 0xffffffff81a3c0f2 (halted)"]
        );
    }
}
