//! Cross-memory attach: between ranks of one machine, the receiver copies a chunk straight out
//! of the sender's buffer with `process_vm_readv` — one copy instead of a socket's two (into
//! the kernel, out of it). Only descriptors (address, length) and one-byte acks go over the
//! Unix socket. The sender keeps a chunk unchanged until its ack arrives (every call fences on
//! the acks before it returns), and the socket still carries failures: a dead peer is an EOF.
//!
//! Used only when the handshake proved it works (the receiver read a probe pattern from the
//! sender): ptrace restrictions (Yama `ptrace_scope`, seccomp) fall back to plain sockets.

/// A pattern the connecting rank exposes so that its peer can test `process_vm_readv`.
pub static PROBE: [u8; 16] = *b"ringmaster-cma!\0";

/// Copies `dst.len()` bytes from address `remote` of process `pid` into `dst`.
///
/// # Errors
/// The kernel's error (the process is gone, or reading its memory is not permitted).
pub fn read(pid: i32, remote: u64, dst: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < dst.len() {
        let local = libc::iovec {
            iov_base: dst[done..].as_mut_ptr().cast(),
            iov_len: dst.len() - done,
        };
        let remote_iov = libc::iovec {
            iov_base: (remote as usize + done) as *mut libc::c_void,
            iov_len: dst.len() - done,
        };
        // SAFETY: `local` describes memory this function exclusively borrows; the kernel
        // validates the remote range and fails with EFAULT/ESRCH/EPERM instead of faulting.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote_iov, 1, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "process_vm_readv read nothing",
            ));
        }
        done += n as usize;
    }
    Ok(())
}

/// Whether this process can read `pid`'s probe at `addr`.
pub fn probe(pid: i32, addr: u64) -> bool {
    let mut buf = [0u8; 16];
    read(pid, addr, &mut buf).is_ok() && buf == PROBE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory() {
        let pid = std::process::id() as i32;
        assert!(probe(pid, PROBE.as_ptr() as u64));
        let src: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        read(pid, src.as_ptr() as u64, &mut dst).unwrap();
        assert_eq!(src, dst);
        assert!(
            read(pid, 8, &mut [0u8; 4]).is_err(),
            "address 8 is not mapped"
        );
    }
}
