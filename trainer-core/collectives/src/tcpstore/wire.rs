//! Frames of the c10d TCPStore protocol, shared by the client and the server: the query codes,
//! the reply codes, and little-endian readers and writers of its integers and length-prefixed
//! byte strings. See the module docs of [`crate::tcpstore`] for the format.

use std::io::{self, Read};

/// The first byte of every request (`c10d::detail::QueryType`).
pub(crate) mod query {
    pub const VALIDATE: u8 = 0;
    pub const SET: u8 = 1;
    pub const COMPARE_SET: u8 = 2;
    pub const GET: u8 = 3;
    pub const ADD: u8 = 4;
    pub const CHECK: u8 = 5;
    pub const WAIT: u8 = 6;
    pub const GETNUMKEYS: u8 = 7;
    pub const DELETE_KEY: u8 = 8;
    pub const APPEND: u8 = 9;
    pub const MULTI_GET: u8 = 10;
    pub const MULTI_SET: u8 = 11;
    pub const CANCEL_WAIT: u8 = 12;
    pub const PING: u8 = 13;
    pub const QUEUE_PUSH: u8 = 14;
    pub const QUEUE_POP: u8 = 15;
    pub const QUEUE_LEN: u8 = 16;
    pub const LIST_KEYS: u8 = 17;
    pub const BARRIER: u8 = 18;
}

/// `c10d::detail::validationMagicNumber`: the argument of VALIDATE.
pub(crate) const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;

/// `CheckResponseType::READY`.
pub(crate) const CHECK_READY: u8 = 0;
/// `CheckResponseType::NOT_READY`.
pub(crate) const CHECK_NOT_READY: u8 = 1;
/// `WaitResponseType::STOP_WAITING`.
pub(crate) const STOP_WAITING: u8 = 0;
/// `WaitResponseType::WAIT_CANCELED`.
pub(crate) const WAIT_CANCELED: u8 = 1;

/// Why a frame could not be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    Io(io::Error),
    /// A length or count over its bound.
    TooLarge {
        what: &'static str,
        len: u64,
        max: usize,
    },
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::TooLarge { what, len, max } => {
                write!(f, "{what} of {len} over the limit of {max}")
            }
        }
    }
}

pub(crate) fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

pub(crate) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub(crate) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub(crate) fn read_i64(r: &mut impl Read) -> io::Result<i64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(i64::from_le_bytes(b))
}

/// A count (of keys) of at most `max`.
pub(crate) fn read_count(
    r: &mut impl Read,
    what: &'static str,
    max: usize,
) -> Result<usize, FrameError> {
    let n = read_u64(r)?;
    match usize::try_from(n) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(FrameError::TooLarge { what, len: n, max }),
    }
}

/// A u64 length and that many bytes, at most `max`. The buffer grows as the bytes arrive, so a
/// peer that announces a large value and sends nothing costs no memory.
pub(crate) fn read_bytes(
    r: &mut impl Read,
    what: &'static str,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let len = read_count(r, what, max)?;
    let mut v = Vec::with_capacity(len.min(64 * 1024));
    let got = r.take(len as u64).read_to_end(&mut v)?;
    if got < len {
        return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(v)
}

/// A request or reply being assembled, sent with one write.
pub(crate) struct Frame(pub(crate) Vec<u8>);

impl Frame {
    /// A request starting with its query code.
    pub(crate) fn query(q: u8) -> Frame {
        let mut v = Vec::with_capacity(32);
        v.push(q);
        Frame(v)
    }

    /// An empty reply.
    pub(crate) fn reply() -> Frame {
        Frame(Vec::with_capacity(16))
    }

    pub(crate) fn u8(&mut self, x: u8) -> &mut Frame {
        self.0.push(x);
        self
    }

    pub(crate) fn u32(&mut self, x: u32) -> &mut Frame {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }

    pub(crate) fn u64(&mut self, x: u64) -> &mut Frame {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }

    pub(crate) fn i64(&mut self, x: i64) -> &mut Frame {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }

    /// A u64 length and the bytes (torch's `sendString` / `sendVector`).
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Frame {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
}

/// Parses a stored counter the way torch's server does (`std::stoll`): leading whitespace, an
/// optional sign, then decimal digits up to the first non-digit. `None` where `stoll` throws (no
/// digits, out of range).
pub(crate) fn parse_counter(v: &[u8]) -> Option<i64> {
    let mut i = 0;
    while i < v.len() && matches!(v[i], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
        i += 1;
    }
    let start = i;
    if i < v.len() && (v[i] == b'+' || v[i] == b'-') {
        i += 1;
    }
    let digits = i;
    while i < v.len() && v[i].is_ascii_digit() {
        i += 1;
    }
    if i == digits {
        return None;
    }
    std::str::from_utf8(&v[start..i]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_like_stoll() {
        assert_eq!(parse_counter(b"12"), Some(12));
        assert_eq!(parse_counter(b"  -7"), Some(-7));
        assert_eq!(parse_counter(b"+3x"), Some(3));
        assert_eq!(parse_counter(b"12abc"), Some(12));
        assert_eq!(parse_counter(b""), None);
        assert_eq!(parse_counter(b"-"), None);
        assert_eq!(parse_counter(b"abc"), None);
        assert_eq!(parse_counter(b"99999999999999999999"), None);
        assert_eq!(
            parse_counter(i64::MIN.to_string().as_bytes()),
            Some(i64::MIN)
        );
    }

    #[test]
    fn bytes_roundtrip_and_bounds() {
        let mut f = Frame::reply();
        f.bytes(b"hello").u64(3);
        let mut r = &f.0[..];
        assert_eq!(read_bytes(&mut r, "value", 5).unwrap(), b"hello");
        assert_eq!(read_u64(&mut r).unwrap(), 3);
        let mut f = Frame::reply();
        f.bytes(b"hello");
        let err = read_bytes(&mut &f.0[..], "value", 4).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 5, .. }), "{err}");
        // Announced but not sent: an EOF, not an allocation of the announced size.
        let mut f = Frame::reply();
        f.u64(1 << 40);
        let err = read_bytes(&mut &f.0[..], "value", usize::MAX).unwrap_err();
        assert!(matches!(err, FrameError::Io(_)), "{err}");
    }
}
